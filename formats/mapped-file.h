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
  // soon, so resident memory stays bounded while streaming. Best effort.
  void release(uint64_t offset, uint64_t length) const noexcept;

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
