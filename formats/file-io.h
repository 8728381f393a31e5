// General file I/O under every writer: a move-only file descriptor, whole
// writes, in-kernel copies, temp files beside their target, small files
// written atomically, and write-behind that keeps a large output from
// filling the page cache.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/staged-folder.h"

namespace lora {

// An open file descriptor, closed when it goes (move-only, like fmt's `file`).
class unique_fd {
 public:
  unique_fd() = default;
  // Takes ownership of `fd` (-1: none).
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& other) noexcept : fd_(other.release()) {}
  unique_fd& operator=(unique_fd&& other) noexcept;
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  ~unique_fd() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  // Gives up ownership; returns the descriptor (the caller closes it).
  int release() noexcept;
  // Closes the descriptor held (errors ignored), then holds `fd`.
  void reset(int fd = -1) noexcept;
  // Closes now, reporting what close says: a write error that only shows
  // at close (NFS). Throws lora::error (exit 4) naming `path`.
  void close(const std::string& path);

 private:
  int fd_ = -1;
};

// Writes all of `bytes` at `offset` (pwrite, retried on EINTR and short
// writes). Throws lora::error (exit 4) naming `path`: a failed write, or no
// progress (disk full).
void pwrite_all(int fd, std::span<const uint8_t> bytes, uint64_t offset, const std::string& path);

// Copies n bytes from src_fd at src_offset to dst_fd at dst_offset: in the
// kernel (copy_file_range) in pieces of at most 64 MiB with an interruption
// check between them, else (another file system, no support) through a
// buffer. `piece(dst_offset, n)`, when given, is called after each piece is
// in the destination (write-behind). `what` names the bytes in messages;
// errors are about `path` (exit 4, or 130 when interrupted), except a source
// that ends early: that is `src_path` (when given) having shrunk while it
// was read.
void copy_bytes(int src_fd, uint64_t src_offset, int dst_fd, uint64_t dst_offset, uint64_t n, const std::string& path,
                const std::string& what, const std::string& src_path,
                const std::function<void(uint64_t, uint64_t)>& piece = {});

// A new file `<target>.tmp-XXXXXX` beside `target` (mode 0644), flock()ed
// and registered as this run's temp (staged-folder.h), removed when the
// object goes unless commit() renamed it onto `target`.
class temp_file {
 public:
  // Throws lora::error (exit 4) when it cannot be created.
  explicit temp_file(std::string target);
  temp_file(const temp_file&) = delete;
  temp_file& operator=(const temp_file&) = delete;
  ~temp_file();

  int fd() const noexcept { return fd_.get(); }
  const std::string& target() const noexcept { return target_; }

  // Closes the file (after an fsync when durable) and renames it onto the
  // target; nothing is kept once a signal came or an input shrank (exit 130
  // / 4). Throws lora::error (exit 4) naming the target.
  void commit(durability mode);

 private:
  std::string target_;
  std::string tmp_;  // empty once committed
  unique_fd fd_;
};

// Write-behind for one output file written once, in pieces, in roughly
// increasing order (several threads may write at once): the file is cut
// into windows; `lag` completed windows after a window is complete, it is
// dropped from the page cache (posix_fadvise DONTNEED, which first starts
// the writeback of its dirty pages), and once more `2 lag` windows after
// (the pages that were still being written back at the first try, which
// the kernel skips). The page cache then holds the part of this output that
// the disk has not taken yet, instead of everything written, so that a
// 16 GB merge on a 24 GiB machine does not push the rest of the system (and
// its own input) out. Never waits for the disk itself: past the kernel's
// dirty limits it throttles the writer, as it does cp. (Starting the
// writeback of each window as soon as it was complete, with
// sync_file_range, measured slower: 1.30x cp -r against 1.23x.) Advisory:
// failures here show up at fsync, or never matter.
class write_behind {
 public:
  // `fd` is borrowed and must outlive *this; `size` is the file's final size.
  write_behind(int fd, uint64_t size, uint64_t window = uint64_t{64} << 20, uint64_t lag = 4);
  // [offset, offset + n) now holds its final bytes. Thread-safe.
  void written(uint64_t offset, uint64_t n);

 private:
  int fd_;
  uint64_t size_, window_, lag_;
  std::mutex mutex_;
  std::vector<uint64_t> filled_;  // bytes written per window
  std::vector<uint8_t> state_;    // 0 filling, 1 complete
  std::vector<uint64_t> order_;   // complete windows, in the order they completed
};

// Writes `bytes` to `path` atomically (temp file beside it, fsync when
// durable, rename). Throws lora::error (exit 4).
void write_file_atomic(const std::string& path, std::string_view bytes, durability mode = durability::durable);

// Copies the whole regular file `src` to `dst`, which must not exist: its
// data extents only, in the kernel where the file system can (holes stay
// holes), with the source's permission bits (0600 stays 0600), then fsyncs
// it when durable. The caller removes a partial `dst` on error (it sits in a
// staged folder). Throws lora::error (exit 4: `src` is not a regular file,
// cannot be read, or `dst` cannot be written; 130 when interrupted).
void copy_file(const std::string& src, const std::string& dst, durability mode = durability::durable);

// Reads a whole small file (config.json, an index) with open_regular_file's
// checks (a FIFO is refused, not waited on). Throws exit 4.
std::string read_text_file(const std::string& path);

}  // namespace lora
