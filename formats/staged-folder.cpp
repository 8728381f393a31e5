#include "formats/staged-folder.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <mutex>
#include <set>
#include <system_error>

#include <fmt/format.h>

#include "formats/error.h"

namespace lora {

namespace fs = std::filesystem;

namespace {
std::mutex temps_mutex;
std::set<std::string> temps;  // under temps_mutex
}  // namespace

void register_temp(const std::string& path) {
  std::lock_guard<std::mutex> lock(temps_mutex);
  temps.insert(path);
}

void forget_temp(const std::string& path) noexcept {
  std::lock_guard<std::mutex> lock(temps_mutex);
  temps.erase(path);
}

int move_temp_into_place(const std::string& tmp, const std::function<int()>& move) {
  std::lock_guard<std::mutex> lock(temps_mutex);
  const int rc = move();
  const int err = errno;
  if (rc == 0) temps.erase(tmp);
  errno = err;
  return rc;
}

void remove_temps_for_exit() noexcept {
  temps_mutex.lock();  // never unlocked: the process ends next
  for (const std::string& t : temps) {
    std::error_code ec;
    fs::remove_all(t, ec);
  }
}

staged_folder::staged_folder(fs::path out, durability mode) : out_(std::move(out)), mode_(mode) {
  std::string tmpl = out_.string() + ".tmp-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr)
    throw errors::io(out_.parent_path().string(), "cannot create the temporary output folder", errno);
  path_ = tmpl;
  register_temp(path_);
  // mkdtemp makes it 0700: give it the permissions a new folder gets
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::chmod(path_.c_str(), 0777 & ~mask);
  lock_fd_ = ::open(path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (lock_fd_ >= 0) mark_temp_held(lock_fd_);
}

staged_folder::~staged_folder() {
  if (!path_.empty()) {
    std::error_code ec;
    fs::remove_all(path_, ec);
    forget_temp(path_);
  }
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

error staged_folder::shown(const error& e) const {
  if (path_.empty() || !e.file().starts_with(path_)) return e;
  return error(e.code(), out_.string() + e.file().substr(path_.size()), e.tensor(), e.detail());
}

void staged_folder::commit(bool replace) {
  check_interrupted();  // nothing is kept once a signal came or an input shrank
  const bool durable = mode_ == durability::durable;
  if (durable) fsync_path(path_);
  if (replace) {
    // swap in one step: readers see the old output or the new one, never none
    if (move_temp_into_place(
            path_, [&] { return ::renameat2(AT_FDCWD, path_.c_str(), AT_FDCWD, out_.c_str(), RENAME_EXCHANGE); }) != 0)
      throw errors::io(out_.string(), "cannot replace the existing output", errno);
    std::error_code ec;
    fs::remove_all(path_, ec);  // path_ now names the old output
  } else if (move_temp_into_place(path_, [&] {
               return ::renameat2(AT_FDCWD, path_.c_str(), AT_FDCWD, out_.c_str(), RENAME_NOREPLACE);
             }) != 0) {
    throw errors::io(out_.string(), "cannot move the finished output into place", errno);
  }
  path_.clear();
  if (durable) fsync_path(out_.has_parent_path() ? out_.parent_path().string() : std::string("."));
}

namespace {

// The path with every symlink of its existing part resolved, made absolute.
fs::path resolved(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path, ec), ec);
  return ec ? fs::absolute(path, ec).lexically_normal() : p;
}

// A file or folder reached from an input (an entry of its folder, a
// sub-folder's entry, a symlink's target) that `out` would replace or write
// into: out is it, holds it, or lies inside it. Throws usage (exit 2) naming
// the input and the entry, and the link's target when they differ.
void check_reached(const std::string& out, const fs::path& out_abs, const named_input& in, const fs::path& entry) {
  std::error_code ec;
  const fs::path real = fs::canonical(entry, ec);
  if (ec) return;  // broken link or unreachable: not read, nothing to lose
  const std::string shown =
      real == entry ? entry.string() : fmt::format("{} (a symlink to {})", entry.string(), real.string());
  if (path_within(real, out_abs))
    throw errors::usage(fmt::format("--out {} would replace {}, read from the {} {}", out, shown, in.role, in.path));
  if (path_within(out_abs, real) && fs::is_directory(real, ec))
    throw errors::usage(
        fmt::format("--out {} lies inside {}, read from the {} {}: write it somewhere else", out, shown, in.role,
                    in.path));
}

// Every entry of the input folder `dir` and of its sub-folders, `depth`
// levels down (a model folder: its files; a pipeline: its components'
// files), symlinks followed, each checked by check_reached: a weights file
// or a component folder that is a link to a file under --out would be lost
// when --out is replaced. At most `budget` entries in all (a folder of
// millions is not a model): the rest are not looked at.
void check_folder_entries(const std::string& out, const fs::path& out_abs, const named_input& in, const fs::path& dir,
                          int depth, size_t& budget) {
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end && budget > 0; it.increment(ec)) {
    --budget;
    const fs::path entry = it->path();
    check_reached(out, out_abs, in, entry);
    std::error_code dec;
    if (depth > 0 && fs::is_directory(entry, dec)) check_folder_entries(out, out_abs, in, entry, depth - 1, budget);
  }
}

}  // namespace

bool path_within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i)
    if (i == inner.end() || *i != *o) return false;
  return true;
}

void mark_temp_held(int fd) noexcept { ::flock(fd, LOCK_EX | LOCK_NB); }

std::vector<std::string> stale_temps(const fs::path& out, size_t& live) {
  live = 0;
  std::vector<std::string> stale;
  fs::path name = out.filename();
  if (name.empty()) name = out.parent_path().filename();
  const std::string prefix = name.string() + ".tmp-";
  const fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(parent, ec)) {
    const std::string n = entry.path().filename().string();
    if (!n.starts_with(prefix)) continue;
    // a temp that a running lora holds is locked; probing must not block or
    // follow a FIFO planted under that name
    const int fd = ::open(entry.path().c_str(), O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    if (fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
      ++live;
    } else {
      stale.push_back(entry.path().string());
    }
    if (fd >= 0) ::close(fd);
  }
  std::sort(stale.begin(), stale.end());
  return stale;
}

void check_output(const std::string& out, const std::vector<named_input>& inputs, bool force) {
  if (out.empty()) throw errors::usage("--out is empty");
  const fs::path out_abs = resolved(out);
  for (const named_input& in : inputs) {
    if (in.path.empty()) continue;
    const fs::path in_abs = resolved(in.path);
    if (path_within(in_abs, out_abs))
      throw errors::usage(fmt::format("--out {} would replace the {} {}", out, in.role, in.path));
    if (path_within(out_abs, in_abs))
      throw errors::usage(
          fmt::format("--out {} lies inside the {} {}: write it somewhere else", out, in.role, in.path));
  }
  // the files an input is read from, symlinks resolved: a model folder's
  // shards and config.json, a pipeline's components (a folder and its
  // files), an adapter folder's files; a bare file's config.json and
  // index-listed shards beside it
  for (const named_input& in : inputs) {
    if (in.path.empty()) continue;
    std::error_code ec;
    size_t budget = 100000;
    if (fs::is_directory(in.path, ec)) {
      check_folder_entries(out, out_abs, in, in.path, 1, budget);
    } else {
      const fs::path p(in.path);
      const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
      check_reached(out, out_abs, in, dir / "config.json");
      if (p.filename().string().ends_with(".index.json"))
        for (fs::directory_iterator it(dir, ec), end; !ec && it != end && budget > 0; it.increment(ec), --budget)
          if (it->is_symlink(ec) && it->path().extension() == ".safetensors") check_reached(out, out_abs, in, it->path());
    }
  }
  size_t live = 0;
  const std::vector<std::string> stale = stale_temps(out_abs, live);
  if (live > 0)
    throw errors::usage(fmt::format("another lora run is writing {} (its temporary output is beside it)", out));
  if (!stale.empty() && !force)
    throw errors::usage(fmt::format("{} was left by an interrupted run{}: remove it, or --force removes it",
                                    stale.front(),
                                    stale.size() > 1 ? fmt::format(" (and {} more)", stale.size() - 1) : ""));
  for (const std::string& s : stale) {
    std::error_code ec;
    fs::remove_all(s, ec);
    if (ec) throw errors::io(s, "cannot remove the temporary output of an interrupted run", ec.value());
  }
  std::error_code ec;
  if (!force && fs::exists(fs::symlink_status(out, ec)))
    throw errors::usage(fmt::format("output {} already exists (--force replaces it)", out));
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
