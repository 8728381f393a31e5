// staged_folder: output folders appear whole or not at all.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>

#include "formats/staged-folder.h"
#include "tests/test-support.h"

namespace fs = std::filesystem;
using namespace lora;
using namespace lora::testing;

namespace {
void write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }
std::string read(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
}  // namespace

TEST_CASE("staged_folder: dropped without commit, nothing is left") {
  temp_dir dir;
  {
    staged_folder tmp(dir / "out");
    CHECK(tmp.path().rfind(dir / "out.tmp-", 0) == 0);
    write(tmp.path() + "/a.json", "{}");
    CHECK(dir.entries().size() == 1);
  }
  CHECK(dir.entries().empty());
}

TEST_CASE("staged_folder: commit moves the folder into place (durable or not)") {
  for (const durability mode : {durability::durable, durability::visible}) {
    temp_dir dir;
    {
      staged_folder tmp(dir / "out", mode);
      write(tmp.path() + "/a.json", "new");
      tmp.commit(false);
      CHECK(tmp.path().empty());
    }
    CHECK(dir.entries() == std::vector<std::string>{"out"});
    CHECK(read(dir / "out/a.json") == "new");
  }
}

TEST_CASE("staged_folder: an existing output is refused unless replaced, then swapped and the old removed") {
  temp_dir dir;
  fs::create_directory(dir / "out");
  write(dir / "out/old.json", "old");
  {
    staged_folder tmp(dir / "out");
    write(tmp.path() + "/a.json", "new");
    lora::error e = thrown([&] { tmp.commit(false); });
    CHECK(e.code() == exit_code::io);
    CHECK(e.file() == dir / "out");
    CHECK(has(e.detail(), "cannot move the finished output into place"));
  }
  // the refused attempt left the old output as it was, and nothing else
  CHECK(dir.entries() == std::vector<std::string>{"out"});
  CHECK(read(dir / "out/old.json") == "old");
  {
    staged_folder tmp(dir / "out");
    write(tmp.path() + "/a.json", "new");
    tmp.commit(true);
  }
  CHECK(dir.entries() == std::vector<std::string>{"out"});
  CHECK(read(dir / "out/a.json") == "new");
  CHECK(!fs::exists(dir / "out/old.json"));
}

TEST_CASE("staged_folder: a parent that does not exist is an I/O error naming it") {
  temp_dir dir;
  lora::error e = thrown([&] { staged_folder tmp(dir / "missing/out"); });
  CHECK(e.code() == exit_code::io);
  CHECK(e.file() == dir / "missing");
  CHECK(has(e.detail(), "cannot create the temporary output folder"));
  lora::error s = thrown([&] { fsync_path(dir / "nothing-here"); });
  CHECK(s.code() == exit_code::io);
}
