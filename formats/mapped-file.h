// A read-only memory map of a whole file (move-only RAII).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace lora {

// Opens `path` read-only as an input: a regular file (symlinks followed),
// never blocking on a FIFO or a device (opened O_NONBLOCK, checked with
// fstat, then set back to blocking). Returns the descriptor (the caller
// closes it) and, when `size` is given, the file's size in bytes.
// Throws lora::error (exit 4) naming the file: cannot open, a directory, a
// FIFO, a device or a socket.
int open_regular_file(const std::string& path, uint64_t* size = nullptr);

// A mapped input that shrinks while it is read would raise SIGBUS on the
// next access past its new end. Every mapped_file is guarded instead: a
// SIGBUS handler (installed with the first map) replaces the missing page
// with a page of zeros and records the file, and check_mapped_inputs()
// throws lora::error (exit 4) naming it: "file shrank while being read".
// check_interrupted() calls it, so every step of every command, the writers'
// commits and the end of each command notice it before any result is kept.
// A SIGBUS at an address no mapped_file holds keeps its default action.
void check_mapped_inputs();

// Fills `into` from `fd` at `offset` (pread, retried on EINTR and short
// reads). Throws lora::error (exit 4) naming `path`: a failed read, or a file
// that ends before `into` is full ("file shrank while being read").
void pread_exact(int fd, const std::string& path, uint64_t offset, std::span<uint8_t> into);

class mapped_file;

// Page-cache hints for one front-to-back pass over [begin, end) of a mapped
// file (a tensor being merged or checked). When less than half of the range
// was in the page cache as the pass began, it streams: reading() asks the
// kernel for the next `ahead` bytes (POSIX_FADV_WILLNEED: the disk stays
// busy while this thread computes, and several threads reading through one
// descriptor do not defeat each other's readahead), and consumed() drops
// what was read from the page cache (POSIX_FADV_DONTNEED), so that the pass
// leaves the cache about as it found it instead of evicting the rest of the
// system. A range already cached is read as it is and kept. Borrows `file`.
// Advisory: never throws.
class read_pass {
 public:
  read_pass(const mapped_file& file, uint64_t begin, uint64_t end, uint64_t ahead = uint64_t{16} << 20) noexcept;
  // About to read [.., end): keeps [end, end + ahead) on its way (streaming only).
  void reading(uint64_t end) noexcept;
  // [begin, end) has been read and will not be read again: dropped (streaming only).
  void consumed(uint64_t end) noexcept;
  bool streaming() const noexcept { return streaming_; }

 private:
  int fd_ = -1;
  uint64_t begin_ = 0, end_ = 0, ahead_ = 0;
  uint64_t prefetched_ = 0, dropped_ = 0;  // file offsets reached so far
  bool streaming_ = false;
};

class mapped_file {
 public:
  // Opens and maps `path` read-only. Throws lora::error (exit 4) when the
  // file cannot be opened, stat'ed or mapped. An empty file maps to an
  // empty span.
  explicit mapped_file(const std::string& path);
  // A view over bytes already in memory (fuzzing, tests), under the name
  // `label`: borrows `bytes`, which must outlive it; fd() is -1 (in-kernel
  // copies fail with exit 4), read() copies, release() does nothing.
  static mapped_file borrow(std::string label, std::span<const uint8_t> bytes);
  mapped_file(mapped_file&& other) noexcept;
  mapped_file& operator=(mapped_file&& other) noexcept;
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  ~mapped_file();

  const std::string& path() const noexcept { return path_; }
  std::span<const uint8_t> bytes() const noexcept { return {data_, size_}; }
  uint64_t size() const noexcept { return size_; }
  // The open descriptor, for in-kernel copies (copy_file_range). Borrowed.
  int fd() const noexcept { return fd_; }

  // Copies [offset, offset + into.size()) of the file into `into` (pread):
  // for streaming, where faulting the map in and releasing it again costs
  // more than the copy. Throws lora::error (exit 4) on a failed or short read.
  void read(uint64_t offset, std::span<uint8_t> into) const;

  // Tells the kernel that [offset, offset + length) will not be needed again
  // soon, so resident memory stays bounded while streaming: unmaps its pages
  // from this process (MADV_DONTNEED); the page cache keeps them. Best effort.
  void release(uint64_t offset, uint64_t length) const noexcept;

  // The fraction (0 to 1) of the pages of [offset, offset + length) that
  // are in the page cache now (mincore on the map; 1 for borrowed bytes and
  // empty ranges; 0 where the kernel does not say).
  double cached_fraction(uint64_t offset, uint64_t length) const noexcept;

 private:
  mapped_file() = default;
  void reset() noexcept;
  std::string path_;
  int fd_ = -1;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  bool mapped_ = false;  // data_ is our mmap (else borrowed, or empty)
  int guard_slot_ = -1;  // this map's entry in the SIGBUS guard, -1 when none
};

}  // namespace lora
