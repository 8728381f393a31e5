// Output folders that appear all at once: written in a temp folder beside
// their final place, then renamed there.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "formats/error.h"

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

  // The same error with a file inside the temp folder named where it was
  // going (`<out>/<name>`): the temp folder is gone by the time the message
  // is read. Other errors are returned unchanged.
  error shown(const error& e) const;

  // Renames the folder onto `out` (durable: syncs it before and the parent
  // after). An
  // existing `out` is refused unless `replace`: then the two are swapped in
  // one step and the old output is removed. Throws lora::error (exit 4).
  void commit(bool replace);

 private:
  std::filesystem::path out_;
  durability mode_;
  std::string path_;  // empty once committed
  int lock_fd_ = -1;  // the open temp folder, flock()ed while it lives (stale_temps)
};

// fsync of a file or folder. Throws lora::error (exit 4).
void fsync_path(const std::string& path);

// True when `inner` is `outer` or lies inside it, compared part by part
// (both absolute and normal, e.g. from std::filesystem::canonical).
bool path_within(const std::filesystem::path& inner, const std::filesystem::path& outer);

// One input of a command, for check_output: its role in messages ("base
// model", "adapter") and the path the user gave.
struct named_input {
  std::string role;
  std::string path;
};

// The one rule for every command that writes, applied before it reads its
// inputs. Throws lora::error (exit 2, --force or not) when `out` is one of
// `inputs`, holds one, or lies inside one (a model or adapter folder), with
// symlinks resolved on both sides; when a file or folder the input is read
// from (each entry of an input folder and of its sub-folders: a model's
// shards and config.json, a pipeline's component folders and their files,
// an adapter's files; for a bare file, config.json and, for an index, the
// linked shards beside it) resolves to `out`, to a path inside it, or to a
// folder that holds it; when `out` exists and `force` is false;
// when a `<out>.tmp-*` left beside it by a killed run is found (with `force`
// it is removed instead); or when one is still held by a running lora.
// Reads the file system only (stat, realpath, flock probes).
void check_output(const std::string& out, const std::vector<named_input>& inputs, bool force);

// The `<out>.tmp-*` entries beside `out` that no running lora holds: left by
// a run that was killed before it could remove them. Every temp file and
// folder this project writes is flock()ed by its writer while it lives.
// Sets `live` to the number of temps still held. Never throws.
std::vector<std::string> stale_temps(const std::filesystem::path& out, size_t& live);

// The temp outputs of this process (`<out>.tmp-*` files and folders), so that
// an interrupt that cannot wait for the command to unwind (blocked in a read,
// a second Ctrl-C) still leaves nothing behind: every temp is registered when
// it is created and forgotten when it is moved into place or removed.
void register_temp(const std::string& path);
void forget_temp(const std::string& path) noexcept;
// Runs `move` (a rename of the temp `tmp` into place; returns 0, or -1 with
// errno set) while no forced exit can remove it, and forgets `tmp` when it
// succeeded. Returns move's result, errno kept.
int move_temp_into_place(const std::string& tmp, const std::function<int()>& move);
// Removes every registered temp (files and folders, recursively) and keeps
// the registry locked, so that nothing is created or moved into place after
// it: for a forced exit only (the caller calls _exit next). Never throws.
void remove_temps_for_exit() noexcept;

// flock(LOCK_EX) on an open temp file or folder: marks it as held by this
// run for stale_temps. Best effort (a file system without locks: no mark).
void mark_temp_held(int fd) noexcept;

}  // namespace lora
