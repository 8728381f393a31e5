// The project's one error type and its exit codes.
//
// Every layer throws lora::error; cli/main.cpp catches it once and prints
// `lora <cmd>: error: <file>: <tensor>: <what>`, then exits with code().
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lora {

// Exit codes of the `lora` executable (documented in README.md).
enum class exit_code : int {
  ok = 0,             // done / equivalent
  different = 1,      // verify found a difference
  usage = 2,          // bad command line
  invalid_input = 3,  // malformed file, adapter does not fit the base
  io = 4,             // cannot read, cannot write, disk full
  interrupted = 130,  // SIGINT, SIGTERM or SIGHUP arrived; partial output removed
};

class error : public std::runtime_error {
 public:
  // file and tensor may be empty; detail says what is wrong.
  error(exit_code code, std::string file, std::string tensor, std::string detail);

  exit_code code() const noexcept { return code_; }
  const std::string& file() const noexcept { return file_; }
  const std::string& tensor() const noexcept { return tensor_; }
  const std::string& detail() const noexcept { return detail_; }

 private:
  exit_code code_;
  std::string file_;
  std::string tensor_;
  std::string detail_;
};

// Named factories: each fixes the exit code for one kind of failure.
namespace errors {
// Malformed or inconsistent input (exit 3).
error invalid(const std::string& file, const std::string& tensor, const std::string& detail);
// A tensor whose shape is not the one required (exit 3).
error shape_mismatch(const std::string& file, const std::string& tensor, const std::string& want,
                     const std::string& got);
// An operating-system failure on `file`; errno_value is appended as text (exit 4).
error io(const std::string& file, const std::string& detail, int errno_value = 0);
// A bad command line (exit 2).
error usage(const std::string& detail);
}  // namespace errors

// Interruption is cooperative: the signal handler (cli) only records the
// signal; long loops call check_interrupted() between steps, which throws
// (exit 130) so that the usual unwinding removes any partial output.
// request_interrupt is async-signal-safe; 0 clears the record (tests).
void request_interrupt(int signal_number) noexcept;
// The signal recorded, 0 when none.
int interrupt_signal() noexcept;
// Throws lora::error naming the signal (exit 130) once one was recorded, or
// naming a mapped input that shrank (exit 4, formats/mapped-file.h) first.
void check_interrupted();
// The message of an interruption by `signal_number`, as every path prints it:
// "interrupted by SIGINT; nothing was left behind".
std::string interrupted_text(int signal_number);

}  // namespace lora
