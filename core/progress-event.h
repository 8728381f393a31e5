// Progress of a long pipeline, reported by core through a callback that cli
// renders (core never prints).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace lora {

struct progress_event {
  uint64_t done_items = 0;
  uint64_t total_items = 0;
  uint64_t done_bytes = 0;
  uint64_t total_bytes = 0;
  std::string current;  // the tensor or module just finished
};

// May be called from worker threads; calls are serialized by the caller.
using progress_fn = std::function<void(const progress_event&)>;

}  // namespace lora
