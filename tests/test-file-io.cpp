// formats/file-io (unique_fd, temp_file, write_behind) and mapped-file's
// read_pass: the page-cache hints never change a byte read or written.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "formats/error.h"
#include "formats/file-io.h"
#include "formats/mapped-file.h"
#include "tests/test-support.h"

using namespace lora;
using lora::testing::temp_dir;
using lora::testing::thrown;

namespace {

std::vector<uint8_t> pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

std::vector<uint8_t> file_bytes(const std::string& path) {
  const std::string text = read_text_file(path);
  return {text.begin(), text.end()};
}

}  // namespace

TEST_CASE("unique_fd closes once, moves, and reports close errors") {
  temp_dir dir;
  unique_fd a(::open((dir / "x").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600));
  REQUIRE(a);
  const int raw = a.get();
  unique_fd b(std::move(a));
  CHECK(!a);
  CHECK(b.get() == raw);
  unique_fd c;
  c = std::move(b);
  CHECK(c.get() == raw);
  c.close(dir / "x");
  CHECK(!c);
  CHECK(::fcntl(raw, F_GETFD) == -1);  // closed
  c.close(dir / "x");                  // nothing held: no-op
}

TEST_CASE("temp_file: removed unless committed, renamed onto its target when committed") {
  temp_dir dir;
  {
    temp_file t(dir / "out.bin");
    pwrite_all(t.fd(), std::vector<uint8_t>{1, 2, 3}, 0, t.target());
    CHECK(dir.entries().size() == 1);  // out.bin.tmp-XXXXXX
  }
  CHECK(dir.entries().empty());
  for (durability mode : {durability::durable, durability::visible}) {
    temp_file t(dir / "out.bin");
    pwrite_all(t.fd(), std::vector<uint8_t>{4, 5, 6}, 0, t.target());
    t.commit(mode);
    CHECK(dir.entries() == std::vector<std::string>{"out.bin"});
    CHECK(file_bytes(dir / "out.bin") == std::vector<uint8_t>{4, 5, 6});
  }
  CHECK(thrown([&] { temp_file t(dir / "no/such/folder/x"); }).code() == exit_code::io);
}

TEST_CASE("write_behind: pieces written out of order by two threads, windows dropped, bytes intact") {
  temp_dir dir;
  const std::string path = dir / "big.bin";
  const size_t size = (3u << 20) + 12345;  // not a whole number of windows
  const std::vector<uint8_t> want = pattern(size, 7);
  unique_fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(size)) == 0);
  // 64 KiB windows, 2 kept: most windows are sent to disk and dropped while writing goes on
  write_behind behind(fd.get(), size, uint64_t{64} << 10, 2);
  // pieces of uneven sizes straddling windows, in a shuffled order
  std::vector<std::pair<size_t, size_t>> pieces;
  for (size_t at = 0, k = 0; at < size; ++k) {
    const size_t n = std::min(size - at, size_t{1000} + (k * 7919) % 50000);
    pieces.push_back({at, n});
    at += n;
  }
  std::shuffle(pieces.begin(), pieces.end(), std::mt19937(3));
  auto worker = [&](size_t first) {
    for (size_t i = first; i < pieces.size(); i += 2) {
      const auto [at, n] = pieces[i];
      pwrite_all(fd.get(), std::span<const uint8_t>(want.data() + at, n), at, path);
      behind.written(at, n);
    }
  };
  std::thread t1(worker, 0), t2(worker, 1);
  t1.join();
  t2.join();
  behind.written(size - 1, 10);  // past the end: clipped, no effect
  fd.close(path);
  CHECK(file_bytes(path) == want);
}

TEST_CASE("read_pass: reads the same bytes whether the file is cached or streamed") {
  temp_dir dir;
  const std::string path = dir / "in.bin";
  const size_t size = (2u << 20) + 333;
  const std::vector<uint8_t> want = pattern(size, 11);
  {
    temp_file t(path);
    pwrite_all(t.fd(), want, 0, path);
    t.commit(durability::durable);  // clean pages: DONTNEED can drop them
  }
  mapped_file map(path);
  for (bool drop : {false, true}) {
    if (drop) ::posix_fadvise(map.fd(), 0, 0, POSIX_FADV_DONTNEED);
    const double cached = map.cached_fraction(0, size);
    CHECK(cached >= 0.0);
    CHECK(cached <= 1.0);
    const uint64_t begin = 100, end = size - 50;
    read_pass pass(map, begin, end, uint64_t{256} << 10);
    // a file system that keeps every page (tmpfs) never streams
    CHECK(pass.streaming() == (cached < 0.5));
    std::vector<uint8_t> got(end - begin), block(70000);
    for (uint64_t at = begin; at < end; at += block.size()) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(block.size(), end - at));
      pass.reading(at + n);
      map.read(at, std::span<uint8_t>(block.data(), n));
      pass.consumed(at + n);
      std::copy_n(block.begin(), n, got.begin() + static_cast<std::ptrdiff_t>(at - begin));
    }
    CHECK(std::equal(got.begin(), got.end(), want.begin() + static_cast<std::ptrdiff_t>(begin)));
  }
  // borrowed bytes: always "cached", never streamed
  mapped_file borrowed = mapped_file::borrow("mem", want);
  CHECK(borrowed.cached_fraction(0, size) == 1.0);
  CHECK(!read_pass(borrowed, 0, size).streaming());
}
