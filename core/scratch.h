// Small helpers shared by the pipelines: a reused scratch buffer and the
// FNV-1a hash. One copy each (merge and extract used to carry their own).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

namespace lora {

// A buffer reused from tensor to tensor: grown to the largest size asked,
// never shrunk and never zero-filled (a fresh std::vector per tensor spent
// more time in memset and page faults than the work). get(n) returns n
// elements of uninitialized storage that the scratch owns; the span is valid
// until the next get() or the scratch's end. Not thread-safe: one per thread
// (merge keeps one thread_local per buffer).
template <class T>
class scratch {
 public:
  std::span<T> get(size_t n) {
    if (n > capacity_) {
      data_.reset(new T[n]);
      capacity_ = n;
    }
    return {data_.get(), n};
  }

 private:
  std::unique_ptr<T[]> data_;
  size_t capacity_ = 0;
};

// FNV-1a, 64 bits (Fowler, Noll, Vo; offset basis 0xcbf29ce484222325, prime
// 0x100000001b3) of the bytes of `s`: a short, stable fingerprint (merge's
// provenance metadata, extract's per-module seeds). Pure.
constexpr uint64_t fnv1a64(std::string_view s) noexcept {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

}  // namespace lora
