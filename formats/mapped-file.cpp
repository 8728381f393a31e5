#include "formats/mapped-file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <mutex>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "formats/error.h"

namespace lora {

namespace {

// ---------------------------------------------------------------- SIGBUS guard
//
// Slots hold the address ranges of live maps. The handler reads them
// lock-free (atomics only, async-signal-safe); registering and naming take
// guard_mutex in normal code.

constexpr int n_guard_slots = 1024;

struct guard_slot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
};

guard_slot guard_slots[n_guard_slots];
std::string guard_names[n_guard_slots];  // under guard_mutex
std::mutex guard_mutex;
std::atomic<int> shrunk_slot{-1};  // the first map found shrunk (its slot is never reused)
std::atomic<uintptr_t> page_size{4096};
struct sigaction previous_sigbus {};

extern "C" void on_sigbus(int signal_number, siginfo_t* info, void* context) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  for (int i = 0; i < n_guard_slots; ++i) {
    const uintptr_t b = guard_slots[i].begin.load(std::memory_order_acquire);
    if (b == 0 || addr < b || addr >= guard_slots[i].end.load(std::memory_order_acquire)) continue;
    // a page past the file's new end: zeros in its place, the file recorded
    const uintptr_t page = addr & ~(page_size.load(std::memory_order_relaxed) - 1);
    if (::mmap(reinterpret_cast<void*>(page), page_size.load(std::memory_order_relaxed), PROT_READ,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
      break;
    int none = -1;
    shrunk_slot.compare_exchange_strong(none, i);
    return;
  }
  // not one of our maps: what would have happened without us
  if (previous_sigbus.sa_flags & SA_SIGINFO) {
    if (previous_sigbus.sa_sigaction != nullptr) return previous_sigbus.sa_sigaction(signal_number, info, context);
  } else if (previous_sigbus.sa_handler != SIG_DFL && previous_sigbus.sa_handler != SIG_IGN &&
             previous_sigbus.sa_handler != nullptr) {
    return previous_sigbus.sa_handler(signal_number);
  }
  ::signal(SIGBUS, SIG_DFL);  // the faulting access runs again and ends the process
}

void install_sigbus_guard() {
  page_size.store(static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE)));
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  ::sigaction(SIGBUS, &sa, &previous_sigbus);
}

// Registers [data, data + size) under `path`; returns the slot (-1 when all
// are taken: that map is then unguarded, as before).
int guard_map(const uint8_t* data, uint64_t size, const std::string& path) {
  static std::once_flag installed;
  std::call_once(installed, install_sigbus_guard);
  std::lock_guard<std::mutex> lock(guard_mutex);
  for (int i = 0; i < n_guard_slots; ++i) {
    if (guard_slots[i].begin.load() != 0 || (shrunk_slot.load() == i)) continue;
    guard_names[i] = path;
    guard_slots[i].end.store(reinterpret_cast<uintptr_t>(data) + size, std::memory_order_release);
    guard_slots[i].begin.store(reinterpret_cast<uintptr_t>(data), std::memory_order_release);
    return i;
  }
  return -1;
}

void unguard_map(int slot) noexcept {
  if (slot < 0) return;
  std::lock_guard<std::mutex> lock(guard_mutex);
  guard_slots[slot].begin.store(0, std::memory_order_release);
  guard_slots[slot].end.store(0, std::memory_order_release);
}

}  // namespace

void check_mapped_inputs() {
  const int slot = shrunk_slot.load();
  if (slot < 0) return;
  std::string name;
  {
    std::lock_guard<std::mutex> lock(guard_mutex);
    name = guard_names[slot];
  }
  throw errors::io(name, "file shrank while being read (changed on disk during the command)");
}

int open_regular_file(const std::string& path, uint64_t* size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) throw errors::io(path, "cannot open", errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw errors::io(path, "cannot stat", e);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    const char* kind = S_ISDIR(st.st_mode)                          ? "a directory"
                       : S_ISFIFO(st.st_mode)                       ? "a FIFO"
                       : S_ISSOCK(st.st_mode)                       ? "a socket"
                       : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                                                                    : "not a file";
    throw errors::io(path, fmt::format("is {}, not a regular file", kind));
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  if (size != nullptr) *size = static_cast<uint64_t>(st.st_size);
  return fd;
}

mapped_file::mapped_file(const std::string& path) : path_(path) {
  fd_ = open_regular_file(path, &size_);
  if (size_ == 0) return;
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    reset();
    throw errors::io(path, "cannot map", e);
  }
  data_ = static_cast<const uint8_t*>(p);
  mapped_ = true;
  guard_slot_ = guard_map(data_, size_, path_);
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
      mapped_(std::exchange(other.mapped_, false)),
      guard_slot_(std::exchange(other.guard_slot_, -1)) {}

mapped_file& mapped_file::operator=(mapped_file&& other) noexcept {
  if (this != &other) {
    reset();
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, false);
    guard_slot_ = std::exchange(other.guard_slot_, -1);
  }
  return *this;
}

mapped_file::~mapped_file() { reset(); }

void mapped_file::reset() noexcept {
  unguard_map(guard_slot_);
  guard_slot_ = -1;
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

double mapped_file::cached_fraction(uint64_t offset, uint64_t length) const noexcept {
  if (!mapped_ || offset >= size_ || length == 0) return 1.0;
  length = std::min(length, size_ - offset);
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t begin = offset / page * page, end = offset + length;
  std::vector<unsigned char> vec((end - begin + page - 1) / page);
  if (::mincore(const_cast<uint8_t*>(data_) + begin, end - begin, vec.data()) != 0) return 0.0;
  uint64_t in = 0;
  for (unsigned char v : vec) in += v & 1;
  return static_cast<double>(in) / static_cast<double>(vec.size());
}

read_pass::read_pass(const mapped_file& file, uint64_t begin, uint64_t end, uint64_t ahead) noexcept
    : fd_(file.fd()), begin_(begin), end_(end), ahead_(ahead), prefetched_(begin), dropped_(begin) {
  streaming_ = fd_ >= 0 && end > begin && file.cached_fraction(begin, end - begin) < 0.5;
}

void read_pass::reading(uint64_t end) noexcept {
  if (!streaming_) return;
  // ask again once less than half the window is ahead of the reader
  const uint64_t want = std::min(end_, end + ahead_);
  if (want <= prefetched_ || prefetched_ >= std::min(end_, end + ahead_ / 2)) return;
  ::posix_fadvise(fd_, static_cast<off_t>(prefetched_), static_cast<off_t>(want - prefetched_), POSIX_FADV_WILLNEED);
  prefetched_ = want;
}

void read_pass::consumed(uint64_t end) noexcept {
  if (!streaming_ || end <= dropped_) return;
  // whole pages only: the kernel keeps a partial page at either edge, which
  // a neighbouring tensor may still need
  ::posix_fadvise(fd_, static_cast<off_t>(dropped_), static_cast<off_t>(end - dropped_), POSIX_FADV_DONTNEED);
  dropped_ = end;
}

void mapped_file::read(uint64_t offset, std::span<uint8_t> into) const {
  if (fd_ < 0) {  // borrowed bytes
    if (offset > size_ || into.size() > size_ - offset) throw errors::io(path_, "read past the end of the bytes");
    std::copy_n(data_ + offset, into.size(), into.data());
    return;
  }
  pread_exact(fd_, path_, offset, into);
}

void pread_exact(int fd, const std::string& path, uint64_t offset, std::span<uint8_t> into) {
  uint8_t* p = into.data();
  uint64_t left = into.size();
  while (left > 0) {
    const ssize_t r = ::pread(fd, p, left, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw errors::io(path, "cannot read", errno);
    if (r == 0) throw errors::io(path, "file shrank while being read");
    p += r;
    offset += static_cast<uint64_t>(r);
    left -= static_cast<uint64_t>(r);
  }
}

}  // namespace lora
