// A progress bar on stderr (tensors, bytes, rate, ETA), drawn only when
// stderr is a terminal and not --quiet, and redrawn at most 10 times a second.
#pragma once

#include <chrono>
#include <mutex>
#include <string>

#include "core/progress-event.h"

namespace lora::cli {

class progress_bar {
 public:
  // `label` starts the line ("merge"). enabled = !quiet && isatty(stderr).
  progress_bar(std::string label, bool quiet);
  ~progress_bar();
  // A callback for core; safe to call from several threads.
  progress_fn callback();
  // Clears the bar line (call before printing the summary).
  void finish();
  bool enabled() const noexcept { return enabled_; }
  double seconds() const;

 private:
  void draw(const progress_event& e, bool force);
  std::string label_;
  bool enabled_ = false;
  bool drawn_ = false;
  std::mutex mutex_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_;
};

// "1.5 GiB", "312 KiB", "17 B"
std::string human_bytes(uint64_t n);

}  // namespace lora::cli
