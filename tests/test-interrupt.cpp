// What a signal does to a command that cannot reach its next step: the
// watchdog (formats/interrupt.h) removes the registered temp outputs and
// exits 130 with one line. Each case runs in a child process that blocks in
// read() on a pipe nobody writes, as a command blocked on a slow input does.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

#include "formats/interrupt.h"
#include "formats/staged-folder.h"
#include "tests/test-support.h"

namespace fs = std::filesystem;
using namespace lora;
using namespace lora::testing;

namespace {

struct child_result {
  int exit_code = -1;  // -1: did not exit by itself (killed after the deadline)
  std::string err;
  double seconds = 0;  // from the first signal to its exit
};

// Forks a child that installs the interrupt handling (grace `grace`), makes
// the temp folder `<out>.tmp-*` and blocks in read(); sends it `signals`
// SIGINTs once the folder exists, and waits at most 20 s.
child_result blocked_child(const std::string& out, double grace, int signals) {
  int err_pipe[2], block_pipe[2];
  REQUIRE(::pipe(err_pipe) == 0);
  REQUIRE(::pipe(block_pipe) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(err_pipe[1], STDERR_FILENO);
    install_interrupt_handling("test", grace);
    staged_folder tmp{fs::path(out)};
    char c;
    [[maybe_unused]] ssize_t r = ::read(block_pipe[0], &c, 1);  // never returns: nobody writes
    ::_exit(99);
  }
  ::close(err_pipe[1]);
  for (int i = 0; i < 2000; ++i) {
    size_t live = 0;
    stale_temps(fs::path(out), live);
    if (live > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < signals; ++i) {
    // a pending SIGINT absorbs a second one sent before it is handled
    if (i > 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    ::kill(pid, SIGINT);
  }
  child_result r;
  int status = 0;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(20)) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  char buf[512];
  ssize_t n;
  while ((n = ::read(err_pipe[0], buf, sizeof buf)) > 0) r.err.append(buf, static_cast<size_t>(n));
  ::close(err_pipe[0]);
  ::close(block_pipe[0]);
  ::close(block_pipe[1]);
  return r;
}

}  // namespace

TEST_CASE("one SIGINT while blocked in a read: 130 after the grace period, temp removed") {
  temp_dir dir;
  const child_result r = blocked_child(dir / "out", 0.3, 1);
  CHECK(r.exit_code == 130);
  CHECK(r.err == "lora test: error: interrupted by SIGINT; nothing was left behind\n");
  CHECK(r.seconds >= 0.25);
  CHECK(dir.entries().empty());
}

TEST_CASE("a second SIGINT does not wait for the grace period") {
  temp_dir dir;
  const child_result r = blocked_child(dir / "out", 60, 2);
  CHECK(r.exit_code == 130);
  CHECK(r.seconds < 10);
  CHECK(has(r.err, "interrupted by SIGINT"));
  CHECK(dir.entries().empty());
}
