// Output folders that appear all at once: written in a temp folder beside
// their final place, then renamed there.
#pragma once

#include <filesystem>
#include <string>

namespace lora {

// The temp folder `<out>.tmp-XXXXXX` (permissions as for a new folder). The
// destructor removes it with its contents unless commit() moved it into
// place, so an error anywhere leaves nothing behind.
class staged_folder {
 public:
  // Throws lora::error (exit 4) when the folder cannot be created.
  explicit staged_folder(std::filesystem::path out);
  staged_folder(const staged_folder&) = delete;
  staged_folder& operator=(const staged_folder&) = delete;
  ~staged_folder();

  const std::string& path() const noexcept { return path_; }

  // Syncs the folder, renames it onto `out` and syncs the parent. An
  // existing `out` is refused unless `replace`: then the two are swapped in
  // one step and the old output is removed. Throws lora::error (exit 4).
  void commit(bool replace);

 private:
  std::filesystem::path out_;
  std::string path_;  // empty once committed
};

// fsync of a file or folder. Throws lora::error (exit 4).
void fsync_path(const std::string& path);

}  // namespace lora
