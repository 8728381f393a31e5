#include "formats/interrupt.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <thread>

#include <fmt/format.h>

#include "formats/error.h"
#include "formats/staged-folder.h"

namespace lora {

namespace {

int wake_pipe[2] = {-1, -1};
std::atomic<int> n_signals{0};
// who ends the process: 0 nobody yet, 1 main (claim_exit), 2 the watchdog
std::atomic<int> exit_owner{0};

// Async-signal-safe: records the signal and wakes the watchdog through the
// pipe (the self-pipe trick); the third signal gets the default action.
extern "C" void on_interrupt(int signal_number) {
  const int saved = errno;
  request_interrupt(signal_number);
  if (n_signals.fetch_add(1) + 1 >= 3) {
    ::signal(signal_number, SIG_DFL);
    ::raise(signal_number);
  }
  const unsigned char b = static_cast<unsigned char>(signal_number);
  [[maybe_unused]] ssize_t w = ::write(wake_pipe[1], &b, 1);
  errno = saved;
}

// Waits for one byte on the pipe, at most `timeout_ms` (-1: forever).
// Returns the signal number, or 0 on time-out.
int wait_signal(int timeout_ms) {
  for (;;) {
    pollfd p{wake_pipe[0], POLLIN, 0};
    const int rc = ::poll(&p, 1, timeout_ms);
    if (rc < 0 && errno == EINTR) continue;
    if (rc <= 0) return 0;
    unsigned char b = 0;
    if (::read(wake_pipe[0], &b, 1) == 1) return b;
  }
}

void watchdog(std::string command, int grace_ms) {
  const int first = wait_signal(-1);
  if (first == 0) return;
  wait_signal(grace_ms);  // a second signal, or the grace period over
  int nobody = 0;
  if (!exit_owner.compare_exchange_strong(nobody, 2)) return;  // main is ending the command itself
  remove_temps_for_exit();
  const std::string line = fmt::format("lora {}: error: {}\n", command, interrupted_text(first));
  [[maybe_unused]] ssize_t w = ::write(STDERR_FILENO, line.data(), line.size());
  ::_exit(static_cast<int>(exit_code::interrupted));
}

}  // namespace

void claim_exit() noexcept {
  int nobody = 0;
  if (exit_owner.compare_exchange_strong(nobody, 1)) return;
  for (;;) ::pause();  // the watchdog is ending the process
}

void install_interrupt_handling(const std::string& command, double grace_seconds) noexcept {
  if (::pipe2(wake_pipe, O_CLOEXEC | O_NONBLOCK) != 0) return;
  try {
    std::thread(watchdog, command, static_cast<int>(grace_seconds * 1000)).detach();
  } catch (...) {
    return;  // no thread: signals keep their default action
  }
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int s : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(s, &sa, nullptr);
}

}  // namespace lora
