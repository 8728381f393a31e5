// Output folders that appear all at once: written in a temp folder beside
// their final place, then renamed there.
#pragma once

#include <filesystem>
#include <string>

namespace lora {

// What committing an output promises. Both: it appears whole or not at all
// (written beside its place, then renamed), and an error leaves nothing.
// `durable` also flushes it to disk (fsync of the data and the folders)
// before and after the rename, so that it survives a power loss or a kernel
// crash right after the command returns; `visible` leaves that to the
// kernel's writeback, as cp and PyTorch's save do, and is much faster for a
// large output on a slow disk.
enum class durability { visible, durable };

// The temp folder `<out>.tmp-XXXXXX` (permissions as for a new folder). The
// destructor removes it with its contents unless commit() moved it into
// place, so an error anywhere leaves nothing behind.
class staged_folder {
 public:
  // Throws lora::error (exit 4) when the folder cannot be created.
  explicit staged_folder(std::filesystem::path out, durability mode = durability::durable);
  staged_folder(const staged_folder&) = delete;
  staged_folder& operator=(const staged_folder&) = delete;
  ~staged_folder();

  const std::string& path() const noexcept { return path_; }

  // Renames the folder onto `out` (durable: syncs it before and the parent
  // after). An
  // existing `out` is refused unless `replace`: then the two are swapped in
  // one step and the old output is removed. Throws lora::error (exit 4).
  void commit(bool replace);

 private:
  std::filesystem::path out_;
  durability mode_;
  std::string path_;  // empty once committed
};

// fsync of a file or folder. Throws lora::error (exit 4).
void fsync_path(const std::string& path);

}  // namespace lora
