#include "formats/file-io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include <fmt/format.h>

#include "formats/error.h"
#include "formats/mapped-file.h"

namespace lora {

// ---------------------------------------------------------------- unique_fd

unique_fd& unique_fd::operator=(unique_fd&& other) noexcept {
  if (this != &other) reset(other.release());
  return *this;
}

int unique_fd::release() noexcept { return std::exchange(fd_, -1); }

void unique_fd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

void unique_fd::close(const std::string& path) {
  const int fd = release();
  if (fd >= 0 && ::close(fd) != 0) throw errors::io(path, "write failed", errno);
}

// ---------------------------------------------------------------- writes and copies

void pwrite_all(int fd, std::span<const uint8_t> bytes, uint64_t offset, const std::string& path) {
  const uint8_t* p = bytes.data();
  uint64_t n = bytes.size();
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw errors::io(path, "write failed", errno);
    }
    if (w == 0) throw errors::io(path, "write failed: no progress", ENOSPC);
    p += w;
    n -= static_cast<uint64_t>(w);
    offset += static_cast<uint64_t>(w);
  }
}

void copy_bytes(int src_fd, uint64_t src_offset, int dst_fd, uint64_t dst_offset, uint64_t n, const std::string& path,
                const std::string& what, const std::string& src_path,
                const std::function<void(uint64_t, uint64_t)>& piece) {
  const auto shrank = [&] {
    return src_path.empty() ? errors::io(path, fmt::format("copying {} failed: source ended early", what))
                            : errors::io(src_path, "file shrank while being read");
  };
  loff_t in = static_cast<loff_t>(src_offset);
  loff_t out = static_cast<loff_t>(dst_offset);
  uint64_t left = n;
  while (left > 0) {
    check_interrupted();
    const loff_t at = out;
    const ssize_t c = ::copy_file_range(src_fd, &in, dst_fd, &out, std::min<uint64_t>(left, uint64_t{64} << 20), 0);
    if (c < 0) {
      if (errno == EINTR) continue;
      if (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL) break;  // fall back
      throw errors::io(path, fmt::format("copying {} failed", what), errno);
    }
    if (c == 0) throw shrank();
    left -= static_cast<uint64_t>(c);
    if (piece) piece(static_cast<uint64_t>(at), static_cast<uint64_t>(c));
  }
  std::vector<uint8_t> buf(left > 0 ? std::min<uint64_t>(left, 8u << 20) : 0);
  while (left > 0) {
    check_interrupted();
    const ssize_t r = ::pread(src_fd, buf.data(), std::min<uint64_t>(left, buf.size()), in);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw errors::io(path, fmt::format("reading {} failed", what), errno);
    }
    if (r == 0) throw shrank();
    pwrite_all(dst_fd, std::span<const uint8_t>(buf.data(), static_cast<size_t>(r)), static_cast<uint64_t>(out), path);
    if (piece) piece(static_cast<uint64_t>(out), static_cast<uint64_t>(r));
    in += r;
    out += r;
    left -= static_cast<uint64_t>(r);
  }
}

// ---------------------------------------------------------------- temp files

temp_file::temp_file(std::string target) : target_(std::move(target)) {
  std::string name = target_ + ".tmp-XXXXXX";
  const int fd = ::mkostemp(name.data(), O_CLOEXEC);
  if (fd < 0) throw errors::io(target_, "cannot create temporary file", errno);
  fd_.reset(fd);
  tmp_ = name;
  ::fchmod(fd, 0644);
  mark_temp_held(fd);
  register_temp(tmp_);
}

temp_file::~temp_file() {
  fd_.reset();
  if (!tmp_.empty()) {
    ::unlink(tmp_.c_str());
    forget_temp(tmp_);
  }
}

void temp_file::commit(durability mode) {
  check_interrupted();  // nothing is kept once a signal came or an input shrank
  if (mode == durability::durable && ::fsync(fd_.get()) != 0) throw errors::io(target_, "fsync failed", errno);
  fd_.close(target_);
  if (move_temp_into_place(tmp_, [&] { return ::rename(tmp_.c_str(), target_.c_str()); }) != 0)
    throw errors::io(target_, "cannot rename temporary file into place", errno);
  tmp_.clear();
}

// ---------------------------------------------------------------- write-behind

write_behind::write_behind(int fd, uint64_t size, uint64_t window, uint64_t lag)
    : fd_(fd), size_(size), window_(std::max<uint64_t>(window, 1)), lag_(lag) {
  const uint64_t n = (size_ + window_ - 1) / window_;
  filled_.assign(n, 0);
  state_.assign(n, 0);
}

void write_behind::written(uint64_t offset, uint64_t n) {
  if (n == 0 || offset >= size_) return;
  n = std::min(n, size_ - offset);
  std::vector<uint64_t> complete, drop;  // complete: windows finished by this call
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (uint64_t w = offset / window_; w < filled_.size() && w * window_ < offset + n; ++w) {
      const uint64_t b = std::max(offset, w * window_), e = std::min(offset + n, (w + 1) * window_);
      filled_[w] += e - b;
      if (filled_[w] == std::min(window_, size_ - w * window_) && state_[w] == 0) {
        state_[w] = 1;
        complete.push_back(w);
      }
    }
    // each time a window completes: drop the window that completed
    // `lag` completions ago, and once more the one `2 lag` ago (pages still
    // being written back at the first try are skipped by the kernel)
    for (size_t k = 0; k < complete.size(); ++k) {
      order_.push_back(complete[k]);
      for (uint64_t back : {lag_, 2 * lag_})
        if (back > 0 && order_.size() > back) drop.push_back(order_[order_.size() - 1 - back]);
    }
  }
  // outside the lock: this does not wait for the disk (the kernel throttles
  // writers past its dirty limits, as it does cp)
  for (uint64_t w : drop)
    ::posix_fadvise(fd_, static_cast<off_t>(w * window_), static_cast<off_t>(window_), POSIX_FADV_DONTNEED);
}

// ---------------------------------------------------------------- whole files

void write_file_atomic(const std::string& path, std::string_view bytes, durability mode) {
  temp_file tmp(path);
  pwrite_all(tmp.fd(), std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), 0, path);
  tmp.commit(mode);
}

void copy_file(const std::string& src, const std::string& dst, durability mode) {
  uint64_t size = 0;
  const unique_fd in(open_regular_file(src, &size));
  struct stat st {};
  ::fstat(in.get(), &st);
  unique_fd out(::open(dst.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!out) throw errors::io(dst, "cannot create", errno);
  // the source's permissions (a 0600 file stays 0600), whatever the umask
  if (::fchmod(out.get(), st.st_mode & 0777) != 0) throw errors::io(dst, "cannot set permissions", errno);
  // data extents only, so holes stay holes (SEEK_DATA / SEEK_HOLE; a file
  // system without them reports the whole file as data)
  uint64_t at = 0;
  while (at < size) {
    const off_t data = ::lseek(in.get(), static_cast<off_t>(at), SEEK_DATA);
    if (data < 0 && errno == ENXIO) break;  // only a hole is left
    const uint64_t begin = data < 0 ? at : static_cast<uint64_t>(data);
    const off_t hole = data < 0 ? -1 : ::lseek(in.get(), data, SEEK_HOLE);
    const uint64_t end = hole < 0 ? size : std::min<uint64_t>(static_cast<uint64_t>(hole), size);
    if (end <= begin) break;
    copy_bytes(in.get(), begin, out.get(), begin, end - begin, dst, src, src);
    at = end;
  }
  if (::ftruncate(out.get(), static_cast<off_t>(size)) != 0) throw errors::io(dst, "write failed", errno);
  if (mode == durability::durable && ::fsync(out.get()) != 0) throw errors::io(dst, "cannot sync", errno);
  out.close(dst);
}

std::string read_text_file(const std::string& path) {
  uint64_t size = 0;
  const unique_fd fd(open_regular_file(path, &size));
  std::string text(size, '\0');
  pread_exact(fd.get(), path, 0, std::span<uint8_t>(reinterpret_cast<uint8_t*>(text.data()), size));
  return text;
}

}  // namespace lora
