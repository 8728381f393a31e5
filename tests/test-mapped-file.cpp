// mapped_file: inputs are regular files, and a map whose file shrinks is an
// I/O error naming the file, not SIGBUS. The shrink cases run in a child:
// the record of a shrunk input lasts for the life of the process.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "formats/mapped-file.h"
#include "tests/test-support.h"

namespace fs = std::filesystem;
using namespace lora;
using namespace lora::testing;

namespace {
void write(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

// Runs `f` in a child; returns its exit code (128 + N when killed by signal N).
template <class F>
int in_child(F&& f) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) ::_exit(f());
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
}  // namespace

TEST_CASE("open_regular_file: FIFOs, folders and devices are refused at once") {
  temp_dir dir;
  REQUIRE(::mkfifo((dir / "fifo").c_str(), 0644) == 0);
  fs::create_directory(dir / "folder");
  write(dir / "file", "abc");
  uint64_t size = 0;
  const int fd = open_regular_file(dir / "file", &size);
  CHECK(size == 3);
  ::close(fd);
  const struct {
    std::string path, text;
  } cases[] = {{dir / "fifo", "is a FIFO, not a regular file"},
               {dir / "folder", "is a directory, not a regular file"},
               {"/dev/null", "is a device, not a regular file"},
               {dir / "missing", "cannot open"}};
  for (const auto& c : cases) {
    CAPTURE(c.path);
    const error e = thrown([&] { mapped_file m(c.path); });
    CHECK(e.code() == exit_code::io);
    CHECK(e.file() == c.path);
    CHECK(has(e.what(), c.text));
  }
}

TEST_CASE("a mapped input that shrinks: zeros instead of SIGBUS, then exit 4 naming the file") {
  temp_dir dir;
  const long page = ::sysconf(_SC_PAGESIZE);
  write(dir / "input", std::string(static_cast<size_t>(4 * page), 'x'));
  const int code = in_child([&] {
    mapped_file m(dir / "input");
    check_mapped_inputs();  // nothing yet
    if (::truncate((dir / "input").c_str(), page) != 0) return 10;
    const uint8_t* p = m.bytes().data();
    if (p[0] != 'x') return 11;           // still in the file
    if (p[3 * page + 5] != 0) return 12;  // past the new end: zeros, no signal
    if (p[2 * page] != 0) return 13;
    try {
      check_mapped_inputs();
    } catch (const error& e) {
      const bool named = e.file() == dir / "input" && has(e.what(), "file shrank while being read");
      return e.code() == exit_code::io && named ? 0 : 14;
    }
    return 15;
  });
  CHECK(code == 0);
}

TEST_CASE("a SIGBUS that is not about one of our maps keeps its default action") {
  temp_dir dir;
  const long page = ::sysconf(_SC_PAGESIZE);
  write(dir / "guarded", std::string(static_cast<size_t>(page), 'x'));
  write(dir / "other", std::string(static_cast<size_t>(2 * page), 'y'));
  const int code = in_child([&] {
    mapped_file m(dir / "guarded");  // installs the guard
    const int fd = ::open((dir / "other").c_str(), O_RDONLY);
    void* raw = ::mmap(nullptr, static_cast<size_t>(2 * page), PROT_READ, MAP_SHARED, fd, 0);
    if (::truncate((dir / "other").c_str(), 0) != 0) return 10;
    volatile uint8_t v = static_cast<const uint8_t*>(raw)[page];
    (void)v;
    return 0;  // not reached
  });
#if defined(__SANITIZE_ADDRESS__)
  CHECK(code != 0);  // AddressSanitizer's own SIGBUS report ends it
#else
  CHECK(code == 128 + SIGBUS);
#endif
}
