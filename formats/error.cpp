#include "formats/error.h"
#include "formats/mapped-file.h"

#include <atomic>
#include <csignal>
#include <cstring>

#include <fmt/format.h>

namespace lora {

namespace {
// Error text must stay one line on a terminal: control characters that came
// from a file (a tensor named "a\nb", an ANSI escape) are shown escaped.
std::string one_line(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    auto u = static_cast<unsigned char>(c);
    if (c == '\n')
      out += "\\n";
    else if (c == '\r')
      out += "\\r";
    else if (c == '\t')
      out += "\\t";
    else if (u < 0x20 || u == 0x7f)
      out += fmt::format("\\x{:02x}", u);
    else
      out += c;
  }
  return out;
}

std::string join_message(const std::string& file, const std::string& tensor, const std::string& detail) {
  std::string out;
  if (!file.empty()) out += file + ": ";
  if (!tensor.empty()) out += tensor + ": ";
  out += detail;
  return one_line(out);
}
}  // namespace

error::error(exit_code code, std::string file, std::string tensor, std::string detail)
    : std::runtime_error(join_message(file, tensor, detail)),
      code_(code),
      file_(std::move(file)),
      tensor_(std::move(tensor)),
      detail_(std::move(detail)) {}

namespace errors {

error invalid(const std::string& file, const std::string& tensor, const std::string& detail) {
  return error(exit_code::invalid_input, file, tensor, detail);
}

error shape_mismatch(const std::string& file, const std::string& tensor, const std::string& want,
                     const std::string& got) {
  return error(exit_code::invalid_input, file, tensor, fmt::format("shape mismatch: expected {}, found {}", want, got));
}

error io(const std::string& file, const std::string& detail, int errno_value) {
  if (errno_value == 0) return error(exit_code::io, file, "", detail);
  return error(exit_code::io, file, "", fmt::format("{}: {}", detail, std::strerror(errno_value)));
}

error usage(const std::string& detail) { return error(exit_code::usage, "", "", detail); }

}  // namespace errors

namespace {
std::atomic<int> recorded_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "request_interrupt must be async-signal-safe");
}  // namespace

void request_interrupt(int signal_number) noexcept { recorded_signal.store(signal_number); }

int interrupt_signal() noexcept { return recorded_signal.load(std::memory_order_relaxed); }

std::string interrupted_text(int signal_number) {
  const int s = signal_number;
  const char* name = s == SIGINT ? "SIGINT" : s == SIGTERM ? "SIGTERM" : s == SIGHUP ? "SIGHUP" : "a signal";
  return fmt::format("interrupted by {}; nothing was left behind", name);
}

void check_interrupted() {
  check_mapped_inputs();  // an input that shrank is the real cause of what follows
  const int s = interrupt_signal();
  if (s == 0) return;
  throw error(exit_code::interrupted, "", "", interrupted_text(s));
}

}  // namespace lora
