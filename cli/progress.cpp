#include "cli/progress.h"

#include <unistd.h>

#include <cstdio>

#include <fmt/format.h>

namespace lora::cli {

std::string human_bytes(uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", n) : fmt::format("{:.1f} {}", v, units[u]);
}

progress_bar::progress_bar(std::string label, bool quiet)
    : label_(std::move(label)),
      enabled_(!quiet && ::isatty(STDERR_FILENO) == 1),
      start_(std::chrono::steady_clock::now()),
      last_(start_) {}

progress_bar::~progress_bar() { finish(); }

double progress_bar::seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

progress_fn progress_bar::callback() {
  if (!enabled_) return {};
  return [this](const progress_event& e) { draw(e, e.done_items == e.total_items); };
}

void progress_bar::draw(const progress_event& e, bool force) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto now = std::chrono::steady_clock::now();
  if (!force && now - last_ < std::chrono::milliseconds(100)) return;
  last_ = now;
  const double secs = std::chrono::duration<double>(now - start_).count();
  const double frac = e.total_bytes > 0   ? static_cast<double>(e.done_bytes) / static_cast<double>(e.total_bytes)
                      : e.total_items > 0 ? static_cast<double>(e.done_items) / static_cast<double>(e.total_items)
                                          : 1.0;
  const int width = 24;
  const int filled = static_cast<int>(frac * width);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(width - filled), '.');
  const double rate = secs > 0 ? static_cast<double>(e.done_bytes) / secs : 0.0;
  const double eta = frac > 0 ? secs * (1.0 - frac) / frac : 0.0;
  fmt::print(stderr, "\r\033[K{} [{}] {}/{} tensors  {}/{}  {}/s  ETA {:.0f}s", label_, bar, e.done_items,
             e.total_items, human_bytes(e.done_bytes), human_bytes(e.total_bytes),
             human_bytes(static_cast<uint64_t>(rate)), eta);
  std::fflush(stderr);
  drawn_ = true;
}

void progress_bar::finish() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (drawn_) {
    fmt::print(stderr, "\r\033[K");
    std::fflush(stderr);
    drawn_ = false;
  }
}

}  // namespace lora::cli
