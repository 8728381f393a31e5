// core/thread-pool: parallel_for runs every job once, rethrows the first
// failure after the started jobs finish, and starts nothing after a failure
// or an interrupting signal (exit 130).
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <stdexcept>
#include <thread>
#include <vector>

#include "core/thread-pool.h"
#include "formats/error.h"
#include "tests/test-support.h"

using namespace lora;
using lora::testing::thrown;

TEST_CASE("parallel_for runs each job exactly once, on any number of threads") {
  for (int threads : {0, 1, 2, 7}) {
    CAPTURE(threads);
    std::vector<std::atomic<int>> runs(1000);
    parallel_for(runs.size(), threads, [&](size_t i) { runs[i].fetch_add(1); });
    for (const auto& r : runs) REQUIRE(r.load() == 1);
  }
  parallel_for(0, 4, [](size_t) { FAIL("a job ran for n = 0"); });
}

TEST_CASE("parallel_for rethrows the first failure and starts no job after it") {
  std::atomic<int> started{0};
  CHECK_THROWS_AS(parallel_for(100, 1,
                               [&](size_t i) {
                                 started.fetch_add(1);
                                 if (i == 10) throw std::runtime_error("job 10");
                               }),
                  std::runtime_error);
  CHECK(started.load() == 11);
}

TEST_CASE("parallel_for stops at an interrupting signal with exit 130") {
  // one thread: nothing starts after the job during which the signal came
  std::atomic<int> started{0};
  lora::error e = thrown([&] {
    parallel_for(100, 1, [&](size_t i) {
      started.fetch_add(1);
      if (i == 5) request_interrupt(SIGTERM);
    });
  });
  request_interrupt(0);
  CHECK(e.code() == exit_code::interrupted);
  CHECK(std::string(e.what()).find("SIGTERM") != std::string::npos);
  CHECK(started.load() == 6);
  // several threads: a signal that came before starts nothing
  started = 0;
  request_interrupt(SIGINT);
  e = thrown([&] { parallel_for(100, 4, [&](size_t) { started.fetch_add(1); }); });
  request_interrupt(0);
  CHECK(e.code() == exit_code::interrupted);
  CHECK(started.load() == 0);
}

TEST_CASE("parallel_for rethrows the lowest failed job's error, whatever finishes first") {
  // job 3 fails late, job 4 at once: on two threads job 4 fails first, but
  // one thread would have met job 3's error, so that is the one reported
  for (int round = 0; round < 20; ++round) {
    try {
      parallel_for(8, 2, [&](size_t i) {
        if (i == 3) {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
          throw std::runtime_error("job 3");
        }
        if (i == 4) throw std::runtime_error("job 4");
      });
      FAIL("no exception");
    } catch (const std::runtime_error& e) {
      REQUIRE(std::string(e.what()) == "job 3");
    }
  }
}
