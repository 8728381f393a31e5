// staged_folder: output folders appear whole or not at all.
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

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

// ---------------------------------------------------------------- check_output

TEST_CASE("check_output: an --out that is, holds or lies inside an input is refused, --force or not") {
  temp_dir dir;
  fs::create_directories(dir / "model");
  write(dir / "model/model.safetensors", "x");
  write(dir / "adapter.safetensors", "y");
  fs::create_directory_symlink(dir / "model", dir / "link");
  const std::vector<named_input> inputs{{"base model", dir / "model"}, {"adapter", dir / "adapter.safetensors"}};
  struct refusal {
    std::string out;
    std::string text;
  };
  const refusal cases[] = {
      {dir / "model", "would replace the base model"},
      {dir / "model/", "would replace the base model"},
      {dir.path, "would replace the base model"},
      {dir / "model/merged", "lies inside the base model"},
      {dir / "model/model.safetensors", "lies inside the base model"},
      {dir / "adapter.safetensors", "would replace the adapter"},
      {dir / "link", "would replace the base model"},
      {dir / "link/sub/deeper", "lies inside the base model"},
      {dir / "model/../model/x", "lies inside the base model"},
  };
  for (const refusal& r : cases)
    for (const bool force : {false, true}) {
      CAPTURE(r.out);
      const error e = thrown([&] { check_output(r.out, inputs, force); });
      CHECK(e.code() == exit_code::usage);
      CHECK(has(e.what(), r.text));
    }
  // beside the inputs is fine; an existing output needs --force
  check_output(dir / "merged", inputs, false);
  write(dir / "taken", "z");
  CHECK(
      has(thrown([&] { check_output(dir / "taken", inputs, false); }).what(), "already exists (--force replaces it)"));
  check_output(dir / "taken", inputs, true);
  CHECK(read(dir / "adapter.safetensors") == "y");  // nothing was touched
}

TEST_CASE("check_output: temps of a killed run are named, removed by --force; a held one never") {
  temp_dir dir;
  fs::create_directory(dir / "out.tmp-AAAAAA");
  write(dir / "out.tmp-AAAAAA/model.safetensors", "partial");
  write(dir / "out.tmp-BBBBBB", "partial file");
  size_t live = 0;
  CHECK(stale_temps(dir / "out", live) == std::vector<std::string>{dir / "out.tmp-AAAAAA", dir / "out.tmp-BBBBBB"});
  CHECK(live == 0);
  const error e = thrown([&] { check_output(dir / "out", {}, false); });
  CHECK(e.code() == exit_code::usage);
  CHECK(has(e.what(),
            dir / "out.tmp-AAAAAA was left by an interrupted run (and 1 more): remove it, or --force removes it"));
  CHECK(dir.entries().size() == 2);
  check_output(dir / "out", {}, true);
  CHECK(dir.entries().empty());
  // a staged folder that lives is held (flock): refused even with --force, and kept
  {
    staged_folder running(dir / "out");
    CHECK(stale_temps(dir / "out", live).empty());
    CHECK(live == 1);
    CHECK(has(thrown([&] { check_output(dir / "out", {}, true); }).what(), "another lora run is writing"));
    CHECK(fs::exists(running.path()));
  }
  CHECK(dir.entries().empty());
  // other names beside are not temps of this output
  write(dir / "out2.tmp-CCCCCC", "");
  write(dir / "outx", "");
  CHECK(stale_temps(dir / "out", live).empty());
}

TEST_CASE("registered temps: a forced exit removes them, a committed output is kept") {
  temp_dir dir;
  // the forced exit runs in a child: it keeps the registry locked and _exits
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    staged_folder a(dir / "a");
    write(a.path() + "/x", "x");
    staged_folder b(dir / "b");
    b.commit(false);
    remove_temps_for_exit();
    ::_exit(7);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WEXITSTATUS(status) == 7);
  CHECK(dir.entries() == std::vector<std::string>{"b"});
}
