// Runs n independent jobs on up to `threads` threads; no new job starts once
// one has thrown, nor after an interrupting signal (check_interrupted throws,
// exit 130). Once every started job is done, the exception of the failed job
// with the lowest index is rethrown in the caller: jobs start in index order,
// so that is the error a run on one thread gives, whatever the timing.
#pragma once

#include <atomic>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "formats/error.h"

namespace lora {

// threads <= 0 means std::thread::hardware_concurrency().
inline int resolve_threads(int threads) {
  if (threads > 0) return threads;
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

inline void parallel_for(size_t n, int threads, const std::function<void(size_t)>& job) {
  const size_t n_threads = std::min<size_t>(static_cast<size_t>(resolve_threads(threads)), n);
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first;
  size_t first_index = n;
  std::mutex mutex;
  auto worker = [&] {
    for (;;) {
      if (failed.load()) return;
      size_t i = next.fetch_add(1);
      if (i >= n) return;
      try {
        check_interrupted();
        job(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (i < first_index) {
          first = std::current_exception();
          first_index = i;
        }
        failed.store(true);
        return;
      }
    }
  };
  if (n_threads <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(n_threads);
    for (size_t t = 0; t < n_threads; ++t) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace lora
