#include "formats/mapped-file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "formats/error.h"

namespace lora {

mapped_file::mapped_file(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw errors::io(path, "cannot open", errno);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    int e = errno;
    reset();
    throw errors::io(path, "cannot stat", e);
  }
  if (S_ISDIR(st.st_mode)) {
    reset();
    throw errors::io(path, "is a directory, not a file");
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ == 0) return;
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    reset();
    throw errors::io(path, "cannot map", e);
  }
  data_ = static_cast<const uint8_t*>(p);
  mapped_ = true;
}

mapped_file mapped_file::borrow(std::string label, std::span<const uint8_t> bytes) {
  mapped_file m;
  m.path_ = std::move(label);
  m.data_ = bytes.data();
  m.size_ = bytes.size();
  return m;
}

mapped_file::mapped_file(mapped_file&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(std::exchange(other.fd_, -1)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapped_(std::exchange(other.mapped_, false)) {}

mapped_file& mapped_file::operator=(mapped_file&& other) noexcept {
  if (this != &other) {
    reset();
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, false);
  }
  return *this;
}

mapped_file::~mapped_file() { reset(); }

void mapped_file::reset() noexcept {
  if (mapped_) ::munmap(const_cast<uint8_t*>(data_), size_);
  if (fd_ >= 0) ::close(fd_);
  data_ = nullptr;
  fd_ = -1;
  size_ = 0;
  mapped_ = false;
}

void mapped_file::release(uint64_t offset, uint64_t length) const noexcept {
  // Only whole pages inside the range: a neighbour tensor may share an edge page.
  // (MADV_DONTNEED on borrowed heap memory would zero it)
  if (!mapped_ || offset >= size_) return;
  if (length > size_ - offset) length = size_ - offset;
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t begin = (offset + page - 1) / page * page;
  const uint64_t end = (offset + length) / page * page;
  if (end <= begin) return;
  ::madvise(const_cast<uint8_t*>(data_) + begin, end - begin, MADV_DONTNEED);
}

void mapped_file::read(uint64_t offset, std::span<uint8_t> into) const {
  if (fd_ < 0) {  // borrowed bytes
    if (offset > size_ || into.size() > size_ - offset) throw errors::io(path_, "read past the end of the bytes");
    std::copy_n(data_ + offset, into.size(), into.data());
    return;
  }
  uint8_t* p = into.data();
  uint64_t left = into.size();
  while (left > 0) {
    const ssize_t r = ::pread(fd_, p, left, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw errors::io(path_, "cannot read", errno);
    if (r == 0) throw errors::io(path_, "file shrank while being read");
    p += r;
    offset += static_cast<uint64_t>(r);
    left -= static_cast<uint64_t>(r);
  }
}

}  // namespace lora
