// Model folders: single files, shards with their index, and every way an
// index can disagree with the shards, built in temporary folders; plus the
// third-party 6-shard fixture.
#include <doctest/doctest.h>

#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "formats/error.h"
#include "formats/json.h"
#include "formats/model-files.h"
#include "formats/safetensors.h"
#include "tests/test-support.h"

namespace fs = std::filesystem;
using namespace lora;
using namespace lora::testing;
using namespace std::string_literals;

namespace {
void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// Writes a safetensors file holding F32 tensors of the given element counts;
// element i of tensor k is k + i / 1000.
void write_shard(const std::string& path, const std::vector<std::pair<std::string, int64_t>>& tensors) {
  std::vector<tensor_spec> specs;
  for (const auto& [name, n] : tensors) specs.push_back({name, dtype::F32, {n}});
  safetensors_layout layout = plan_safetensors(specs, metadata_map{{"format", "pt"}});
  std::vector<std::vector<float>> store;
  auto bytes = serialize_safetensors(layout, [&](const tensor_info& t) {
    std::vector<float> v(t.n_elements);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(store.size()) + static_cast<float>(i) / 1000.0f;
    store.push_back(std::move(v));
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(store.back().data()), store.back().size() * 4);
  });
  write_file_atomic(path, std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

const char* k_shard1 = "model-00001-of-00002.safetensors";
const char* k_shard2 = "model-00002-of-00002.safetensors";

// A valid two-shard model: a, b (3 and 4 floats) in shard 1, c (5 floats) in shard 2.
void write_sharded_model(const temp_dir& dir, bool with_config = true) {
  write_shard(dir / k_shard1, {{"a", 3}, {"b", 4}});
  write_shard(dir / k_shard2, {{"c", 5}});
  write_text(dir / "model.safetensors.index.json",
             make_safetensors_index(48, {{"a", k_shard1}, {"b", k_shard1}, {"c", k_shard2}}));
  if (with_config) write_text(dir / "config.json", "{\"model_type\": \"test\"}\n");
}

// The index of write_sharded_model, as JSON, for tests to break.
nlohmann::json good_index() {
  return nlohmann::json{{"metadata", {{"total_size", 48}}},
                        {"weight_map", {{"a", k_shard1}, {"b", k_shard1}, {"c", k_shard2}}}};
}

struct refusal {
  int code;
  std::string what;
  std::string tensor;
};

// Opens `path`, which must be refused with `want`.
void check_refused(const std::string& path, const refusal& want) {
  try {
    model_files m = open_model(path);
    FAIL_CHECK("opened: ", path);
  } catch (const lora::error& e) {
    INFO("message: ", std::string(e.what()));
    CHECK(static_cast<int>(e.code()) == want.code);
    CHECK(e.detail().find(want.what) != std::string::npos);
    CHECK(e.tensor() == want.tensor);
    CHECK(std::string(e.what()).find('\n') == std::string::npos);
  }
}

}  // namespace

TEST_CASE("a valid sharded model opens, from the folder or the index path") {
  temp_dir dir;
  write_sharded_model(dir);
  for (const std::string& path : {dir.path, dir / "model.safetensors.index.json"}) {
    CAPTURE(path);
    model_files m = open_model(path);
    CHECK(m.path == path);
    CHECK(fs::equivalent(m.folder, dir.path));
    CHECK(m.config_path == (fs::path(m.folder) / "config.json").string());
    CHECK(m.index_path == (fs::path(m.folder) / "model.safetensors.index.json").string());
    CHECK(m.index_total_size == uint64_t{48});
    CHECK(m.total_tensor_bytes() == 48);
    CHECK(m.shard_names == std::vector<std::string>{k_shard1, k_shard2});
    REQUIRE(m.shards.size() == 2);
    CHECK(m.tensor_names == std::vector<std::string>{"a", "b", "c"});
    tensor_ref c = m.at("c");
    CHECK(c.file == &m.shards[1]);
    CHECK(c.info->shape == std::vector<int64_t>{5});
    REQUIRE(c.data().size() == 20);
    float v[5];
    std::memcpy(v, c.data().data(), 20);
    CHECK(v[0] == 0.0f);  // c is the only tensor of its shard: k = 0
    CHECK(v[4] == 0.004f);
    CHECK(m.find("b").has_value());
    CHECK(!m.find("zz").has_value());
    CHECK(m.find_ref("a")->file == &m.shards[0]);
    try {
      (void)m.at("zz");
      FAIL_CHECK("found zz");
    } catch (const lora::error& e) {
      CHECK(e.code() == exit_code::invalid_input);
      CHECK(e.tensor() == "zz");
      CHECK(e.file() == path);
    }
  }
}

TEST_CASE("an opened model can be moved: references stay valid") {
  temp_dir dir;
  write_sharded_model(dir);
  std::vector<model_files> models;
  models.push_back(open_model(dir.path));
  models.push_back(open_model(dir.path));
  models.push_back(open_model(dir.path));  // reallocates: models move
  for (const auto& m : models) {
    tensor_ref a = m.at("a");
    CHECK(a.file == &m.shards[0]);
    CHECK(a.info == a.file->find("a"));
    CHECK(a.data().size() == 12);
  }
}

TEST_CASE("single-file models: folder with model.safetensors, bare file, config.json pickup") {
  temp_dir dir;
  write_shard(dir / "model.safetensors", {{"w", 6}, {"v", 2}});
  SUBCASE("folder without config.json") {
    model_files m = open_model(dir.path);
    CHECK(m.config_path.empty());
    CHECK(m.index_path.empty());
    CHECK(!m.index_total_size);
    CHECK(m.shard_names == std::vector<std::string>{"model.safetensors"});
    CHECK(m.tensor_names == std::vector<std::string>{"v", "w"});
    CHECK(m.total_tensor_bytes() == 32);
  }
  SUBCASE("folder with config.json") {
    write_text(dir / "config.json", "{}");
    model_files m = open_model(dir.path);
    CHECK(m.config_path == dir / "config.json");
  }
  SUBCASE("bare file path, config.json beside it") {
    write_shard(dir / "adapter.safetensors", {{"x", 1}});
    write_text(dir / "config.json", "{}");
    model_files m = open_model(dir / "adapter.safetensors");
    CHECK(m.shard_names == std::vector<std::string>{"adapter.safetensors"});
    CHECK(m.tensor_names == std::vector<std::string>{"x"});
    CHECK(m.config_path == dir / "config.json");
    CHECK(m.shards[0].path() == dir / "adapter.safetensors");
  }
  SUBCASE("bare file path without a folder part") {
    const fs::path old = fs::current_path();
    fs::current_path(dir.path);
    model_files m = open_model("model.safetensors");
    fs::current_path(old);
    CHECK(m.folder == ".");
    CHECK(m.tensor_names.size() == 2);
  }
}

TEST_CASE("sharded models: every disagreement between the index and the shards is refused") {
  temp_dir dir;
  write_sharded_model(dir);
  const std::string index = dir / "model.safetensors.index.json";
  auto with_index = [&](const nlohmann::json& j) { write_text(index, j.dump(2)); };

  SUBCASE("missing shard") {
    fs::remove(dir / k_shard2);
    try {
      open_model(dir.path);
      FAIL_CHECK("opened");
    } catch (const lora::error& e) {
      CHECK(e.code() == exit_code::io);
      CHECK(e.file() == dir / k_shard2);
      CHECK(e.detail().find("cannot open") != std::string::npos);
    }
  }
  SUBCASE("malformed shard: refused naming the shard") {
    write_text(dir / k_shard2, "not a safetensors file");
    try {
      open_model(dir.path);
      FAIL_CHECK("opened");
    } catch (const lora::error& e) {
      CHECK(e.code() == exit_code::invalid_input);
      CHECK(e.file() == dir / k_shard2);
    }
  }
  SUBCASE("tensor in two shards") {
    write_shard(dir / k_shard2, {{"c", 5}, {"a", 3}});
    check_refused(dir.path, {3, "tensor is in two shards", "a"});
  }
  SUBCASE("weight_map names the wrong shard") {
    auto j = good_index();
    j["weight_map"]["c"] = k_shard1;
    j["weight_map"]["a"] = k_shard2;  // keep both files listed
    with_index(j);
    check_refused(dir.path, {3, "weight_map says", "a"});
  }
  SUBCASE("weight_map names a tensor no shard holds") {
    auto j = good_index();
    j["weight_map"]["ghost"] = k_shard2;
    with_index(j);
    check_refused(dir.path, {3, "does not hold it", "ghost"});
  }
  SUBCASE("tensor missing from weight_map") {
    auto j = good_index();
    j["weight_map"].erase("b");
    with_index(j);
    check_refused(dir.path, {3, "missing from weight_map", "b"});
  }
  SUBCASE("shard missing from weight_map altogether") {
    auto j = good_index();
    j["weight_map"].erase("c");
    j["metadata"]["total_size"] = 28;
    with_index(j);
    // shard 2 is never opened: its tensor is not part of the model
    model_files m = open_model(dir.path);
    CHECK(m.shards.size() == 1);
    CHECK(!m.find("c"));
  }
  SUBCASE("total_size mismatch") {
    auto j = good_index();
    j["metadata"]["total_size"] = 49;
    with_index(j);
    check_refused(dir.path, {3, "total_size is 49 but the shards hold 48 bytes", ""});
  }
  SUBCASE("total_size as a whole float is accepted") {
    write_text(index, R"({"metadata": {"total_size": 48.0}, "weight_map": {"a": ")" + std::string(k_shard1) +
                          R"(", "b": ")" + k_shard1 + R"(", "c": ")" + k_shard2 + R"("}})");
    CHECK(open_model(dir.path).index_total_size == uint64_t{48});
  }
  SUBCASE("total_size of the wrong kind") {
    for (const char* ts : {"-1", "48.5", "\"48\"", "1e30", "1e300", "null", "[48]"}) {
      CAPTURE(ts);
      write_text(index, std::string(R"({"metadata": {"total_size": )") + ts + R"(}, "weight_map": {"a": ")" + k_shard1 +
                            R"(", "b": ")" + k_shard1 + R"(", "c": ")" + k_shard2 + R"("}})");
      check_refused(dir.path, {3, "total_size is not a non-negative integer", ""});
    }
  }
  SUBCASE("no total_size is fine") {
    auto j = good_index();
    j.erase("metadata");
    with_index(j);
    CHECK(!open_model(dir.path).index_total_size);
  }
  SUBCASE("index nesting is bounded") {
    // an extra field nesting max_json_depth - 1 arrays in the top object passes
    auto with_nested = [&](size_t levels, bool closed) {
      std::string text = good_index().dump();
      text.pop_back();
      write_text(index, nested_json(text + R"(,"x":)", levels, "}", closed));
    };
    with_nested(max_json_depth - 1, true);
    CHECK(open_model(dir.path).tensor_names.size() == 3);
    const std::string deeper = "index has JSON nested deeper than " + std::to_string(max_json_depth) + " levels";
    for (auto [levels, closed] :
         {std::pair{size_t{max_json_depth}, true}, {size_t{100000}, true}, {size_t{100000}, false}}) {
      CAPTURE(levels);
      with_nested(levels, closed);
      check_refused(dir.path, {3, deeper, ""});
    }
    write_text(index, nested_json("", 100000, ""));
    check_refused(dir.path, {3, deeper, ""});
    CHECK(thrown([&] { open_model(dir.path); }).file() == index);
  }
  SUBCASE("bad JSON index") {
    for (const std::string& text : {std::string("{\"weight_map\": {"), std::string("{} {}"), std::string(""),
                                    "{\"weight_map\": {}}\0 trailing"s, std::string("\xFF")}) {
      CAPTURE(text);
      write_text(index, text);
      check_refused(dir.path, {3, "index is not valid JSON", ""});
    }
  }
  SUBCASE("index without a weight_map object") {
    for (const char* text : {"[]", "{}", "{\"weight_map\": []}", "{\"weight_map\": \"x\"}"}) {
      CAPTURE(text);
      write_text(index, text);
      check_refused(dir.path, {3, "no \"weight_map\" object", ""});
    }
  }
  SUBCASE("weight_map value that is not a file name") {
    auto j = good_index();
    j["weight_map"]["c"] = 2;
    with_index(j);
    check_refused(dir.path, {3, "weight_map value is not a file name", "c"});
  }
  SUBCASE("path escapes in weight_map") {
    for (const char* bad : {"../x.safetensors", "/etc/passwd", "..", ".", "", "sub/model.safetensors",
                            "./model-00002-of-00002.safetensors"}) {
      CAPTURE(bad);
      auto j = good_index();
      j["weight_map"]["c"] = bad;
      with_index(j);
      check_refused(dir.path, {3, "not a file in the model folder", "c"});
    }
  }
}

TEST_CASE("folders and paths that are not models") {
  temp_dir dir;
  SUBCASE("folder without weights") {
    write_text(dir / "config.json", "{}");
    write_text(dir / "README.md", "hello");
    check_refused(dir.path, {3, "neither model.safetensors, diffusion_pytorch_model.safetensors nor their .safetensors.index.json", ""});
  }
  SUBCASE("empty folder") { check_refused(dir.path, {3, "neither", ""}); }
  SUBCASE("path that does not exist") { check_refused(dir / "nothing-here", {4, "no such file or folder", ""}); }
  SUBCASE("bare file that is not safetensors") {
    write_text(dir / "x.safetensors", "1234567");
    check_refused(dir / "x.safetensors", {3, "too small", ""});
  }
}

TEST_CASE("make_safetensors_index writes what transformers writes and open_model reads it") {
  const std::string text = make_safetensors_index(
      4305, {{"b", "model-00002-of-00002.safetensors"}, {"a", "model-00001-of-00002.safetensors"}});
  CHECK(text ==
        "{\n"
        "  \"metadata\": {\n"
        "    \"total_size\": 4305\n"
        "  },\n"
        "  \"weight_map\": {\n"
        "    \"a\": \"model-00001-of-00002.safetensors\",\n"
        "    \"b\": \"model-00002-of-00002.safetensors\"\n"
        "  }\n"
        "}\n");
}

TEST_CASE("fixture: the 6-shard model written by the Python reference") {
  const fs::path dir = fs::path(LORA_FIXTURES_DIR) / "fluxml_safetensors_jl" / "sharded";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    MESSAGE("skipped: fixture not found at " << dir.string());
    return;
  }
  model_files m = open_model(dir.string());
  CHECK(m.shards.size() == 6);
  CHECK(m.tensor_names.size() == 36);
  CHECK(m.by_name.size() == 36);
  CHECK(m.index_total_size == uint64_t{4305});
  CHECK(m.total_tensor_bytes() == 4305);
  for (size_t i = 0; i < 6; ++i)
    CHECK(m.shard_names[i] == "model-0000" + std::to_string(i + 1) + "-of-00006.safetensors");
  // every weight_map entry matches where the tensor is
  auto j = nlohmann::json::parse(read_text_file(m.index_path));
  CHECK(j["weight_map"].size() == 36);
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it)
    CHECK(fs::path(m.at(it.key()).file->path()).filename() == it.value().get<std::string>());
  tensor_ref f = m.at("float32_3");
  CHECK(f.info->type == dtype::F32);
  CHECK(f.info->shape == std::vector<int64_t>{3});
}

TEST_CASE("diffusers pipelines: components opened as model folders, tensors named <component>.<name>") {
  temp_dir dir;
  write_text(dir / "model_index.json", "{\"_class_name\": \"StableDiffusionPipeline\"}\n");
  for (const char* sub : {"unet", "text_encoder", "vae", "scheduler", "tokenizer"}) fs::create_directory(dir / sub);
  // unet sharded in diffusers' names, 70 shards (more than the first reservation of shards)
  std::map<std::string, std::string> weight_map;
  for (int i = 0; i < 70; ++i) {
    const std::string file = fmt::format("diffusion_pytorch_model-{:05d}-of-00070.safetensors", i + 1);
    write_shard(dir / ("unet/" + file), {{fmt::format("w{:02d}", i), 2}});
    weight_map[fmt::format("w{:02d}", i)] = file;
  }
  write_text(dir / "unet/diffusion_pytorch_model.safetensors.index.json", make_safetensors_index(560, weight_map));
  write_text(dir / "unet/config.json", "{}\n");
  write_shard(dir / "text_encoder/model.safetensors", {{"text_model.final_layer_norm.weight", 3}});
  write_shard(dir / "vae/diffusion_pytorch_model.safetensors", {{"decoder.conv_in.weight", 4}});
  write_text(dir / "scheduler/scheduler_config.json", "{}\n");
  write_text(dir / "tokenizer/vocab.json", "{}\n");

  model_files m = open_model(dir.path);
  CHECK(m.is_pipeline());
  CHECK(m.config_path.empty());
  REQUIRE(m.components.size() == 3);
  CHECK(m.components[0].name == "text_encoder");
  CHECK(m.components[1].name == "unet");
  CHECK(m.components[1].index_name == "diffusion_pytorch_model.safetensors.index.json");
  CHECK(m.components[1].n_shards == 70);
  CHECK(m.components[2].name == "vae");
  REQUIRE(m.shards.size() == 72);
  CHECK(m.shard_names[0] == "text_encoder/model.safetensors");
  CHECK(m.shard_names[1] == "unet/diffusion_pytorch_model-00001-of-00070.safetensors");
  CHECK(m.shard_prefixes[1] == "unet.");
  CHECK(m.tensor_names.front() == "text_encoder.text_model.final_layer_norm.weight");
  CHECK(m.tensor_names.back() == "vae.decoder.conv_in.weight");
  // every reference points into the shards as they are now
  for (size_t i = 0; i < m.shards.size(); ++i)
    for (const tensor_info& t : m.shards[i].tensors())
      CHECK(m.find_ref(m.shard_prefixes[i] + t.name)->file == &m.shards[i]);
  CHECK(m.file_tensor_name(1, "unet.w00") == "w00");
  CHECK(m.total_tensor_bytes() == 560 + 12 + 16);

  std::vector<std::string> folders;
  std::vector<std::string> names;
  for (const folder_file& f : list_pipeline_files(m, folders)) {
    CHECK(f.skip.empty());
    names.push_back(f.name);
  }
  CHECK(names == std::vector<std::string>{"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                                          "unet/config.json"});
  CHECK(folders == std::vector<std::string>{"scheduler", "text_encoder", "tokenizer", "unet", "vae"});

  // a component's index is validated as a model's: its total_size against its own shards
  write_text(dir / "unet/diffusion_pytorch_model.safetensors.index.json", make_safetensors_index(572, weight_map));
  check_refused(dir.path, {3, "metadata.total_size is 572 but the shards hold 560 bytes of tensors", ""});
  // a weight_map entry naming a shard that does not hold the tensor
  weight_map["w05"] = "diffusion_pytorch_model-00007-of-00070.safetensors";
  write_text(dir / "unet/diffusion_pytorch_model.safetensors.index.json", make_safetensors_index(560, weight_map));
  check_refused(dir.path,
                {3,
                 "weight_map puts the tensor in diffusion_pytorch_model-00007-of-00070.safetensors, which does not "
                 "hold it",
                 "w05"});
}

TEST_CASE("diffusers pipelines: a model_index.json without any component weights is refused") {
  temp_dir dir;
  write_text(dir / "model_index.json", "{}\n");
  fs::create_directory(dir / "unet");
  write_text(dir / "unet/config.json", "{}\n");
  check_refused(dir.path, {3, "without any component holding safetensors weights", ""});
}

TEST_CASE("diffusers pipelines: model_index.json is checked against the component folders") {
  temp_dir dir;
  fs::create_directory(dir / "unet");
  fs::create_directory(dir / "vae");
  write_shard(dir / "unet/diffusion_pytorch_model.safetensors", {{"conv_in.weight", 2}});
  write_shard(dir / "vae/diffusion_pytorch_model.safetensors", {{"decoder.conv_in.weight", 2}});
  // metadata keys, a [null, null] optional component and a scheduler without a folder are fine
  write_text(dir / "model_index.json",
             "{\"_class_name\": \"StableDiffusionPipeline\", \"_diffusers_version\": \"0.30.0\", "
             "\"unet\": [\"diffusers\", \"UNet2DConditionModel\"], \"vae\": [\"diffusers\", \"AutoencoderKL\"], "
             "\"safety_checker\": [null, null], \"scheduler\": [\"diffusers\", \"PNDMScheduler\"], "
             "\"tokenizer\": [\"transformers\", \"CLIPTokenizer\"], \"requires_safety_checker\": false}\n");
  CHECK(open_model(dir.path).components.size() == 2);
  // a model listed without its folder
  write_text(dir / "model_index.json",
             "{\"unet\": [\"diffusers\", \"UNet2DConditionModel\"], "
             "\"text_encoder_2\": [\"transformers\", \"CLIPTextModelWithProjection\"]}\n");
  check_refused(dir.path,
                {3, "model_index.json lists text_encoder_2 (CLIPTextModelWithProjection), but text_encoder_2/ is missing",
                 ""});
  // a model folder without safetensors weights
  fs::create_directory(dir / "text_encoder_2");
  write_text(dir / "text_encoder_2/config.json", "{}\n");
  check_refused(dir.path, {3, "text_encoder_2/ holds no safetensors weights", ""});
  fs::remove_all(dir / "text_encoder_2");
  // not an object, not JSON, not a file
  write_text(dir / "model_index.json", "[1, 2]\n");
  check_refused(dir.path, {3, "model_index.json is a JSON array, not an object", ""});
  write_text(dir / "model_index.json", "{\"unet\": [\"diffusers\", \n");
  check_refused(dir.path, {3, "is not valid JSON", ""});
  fs::remove(dir / "model_index.json");
  fs::create_directory(dir / "model_index.json");
  check_refused(dir.path, {3, "model_index.json is not a regular file", ""});
  fs::remove(dir / "model_index.json");
  // a component folder that is a symlink out of the pipeline is refused, not left out
  temp_dir outside;
  fs::rename(dir / "unet", outside / "unet");
  fs::create_directory_symlink(outside / "unet", dir / "unet");
  write_text(dir / "model_index.json", "{\"unet\": [\"diffusers\", \"UNet2DConditionModel\"]}\n");
  check_refused(dir.path, {3, "model_index.json lists unet, but unet/ is a symlink out of the pipeline folder", ""});
}

TEST_CASE("a diffusers component folder alone is a model folder; a JSON file is not safetensors") {
  temp_dir dir;
  write_shard(dir / "diffusion_pytorch_model.safetensors", {{"conv_in.weight", 2}});
  write_text(dir / "config.json", "{\"_class_name\": \"UNet2DConditionModel\"}\n");
  model_files m = open_model(dir.path);
  CHECK(m.shard_names == std::vector<std::string>{"diffusion_pytorch_model.safetensors"});
  CHECK(!m.config_path.empty());
  CHECK(m.find("conv_in.weight").has_value());
  check_refused(dir / "config.json",
                {3, "is a JSON file, not safetensors (pass the folder that holds it)", ""});
  fs::remove(dir / "diffusion_pytorch_model.safetensors");
  check_refused(dir.path, {3, "folder has neither model.safetensors, diffusion_pytorch_model.safetensors", ""});
}
