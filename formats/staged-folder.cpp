#include "formats/staged-folder.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

#include "formats/error.h"

namespace lora {

namespace fs = std::filesystem;

staged_folder::staged_folder(fs::path out, durability mode) : out_(std::move(out)), mode_(mode) {
  std::string tmpl = out_.string() + ".tmp-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr)
    throw errors::io(out_.parent_path().string(), "cannot create the temporary output folder", errno);
  path_ = tmpl;
  // mkdtemp makes it 0700: give it the permissions a new folder gets
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::chmod(path_.c_str(), 0777 & ~mask);
}

staged_folder::~staged_folder() {
  if (path_.empty()) return;
  std::error_code ec;
  fs::remove_all(path_, ec);
}

void staged_folder::commit(bool replace) {
  const bool durable = mode_ == durability::durable;
  if (durable) fsync_path(path_);
  if (replace) {
    // swap in one step: readers see the old output or the new one, never none
    if (::renameat2(AT_FDCWD, path_.c_str(), AT_FDCWD, out_.c_str(), RENAME_EXCHANGE) != 0)
      throw errors::io(out_.string(), "cannot replace the existing output", errno);
    std::error_code ec;
    fs::remove_all(path_, ec);  // path_ now names the old output
  } else if (::renameat2(AT_FDCWD, path_.c_str(), AT_FDCWD, out_.c_str(), RENAME_NOREPLACE) != 0) {
    throw errors::io(out_.string(), "cannot move the finished output into place", errno);
  }
  path_.clear();
  if (durable) fsync_path(out_.has_parent_path() ? out_.parent_path().string() : std::string("."));
}

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw errors::io(path, "cannot open to sync", errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw errors::io(path, "cannot sync", err);
}

}  // namespace lora
