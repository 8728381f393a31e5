// core/inspect: what a path holds, on the generated testdata (testdata/README.md).
#include <doctest/doctest.h>

#include <filesystem>
#include <string>

#include "core/inspect.h"
#include "formats/error.h"
#include "test-support.h"

using namespace lora;
using namespace lora::testing;

namespace {
const std::string td = std::string(LORA_SOURCE_DIR) + "/testdata/";

int code_of(const std::string& path, const std::optional<std::string>& base = std::nullopt) {
  try {
    inspect_path(path, base);
  } catch (const error& e) {
    return static_cast<int>(e.code());
  }
  return 0;
}
}  // namespace

TEST_CASE("a single-file model: files, tensors in data order, totals") {
  inspect_report r = inspect_path(td + "tiny-llama", std::nullopt);
  CHECK(r.kind == inspect_kind::model);
  CHECK(r.model_type == std::optional<std::string>("llama"));
  REQUIRE(r.files.size() == 1);
  CHECK(r.files[0].name == "model.safetensors");
  CHECK(r.files[0].bytes == std::filesystem::file_size(td + "tiny-llama/model.safetensors"));
  CHECK(r.files[0].metadata == std::optional<metadata_map>(metadata_map{{"format", "pt"}}));
  REQUIRE(r.tensors.size() == 21);
  // the reference layout: one dtype, so sorted by name
  CHECK(r.tensors.front().name == "lm_head.weight");
  CHECK(r.tensors.back().name == "model.norm.weight");
  uint64_t params = 0;
  for (const inspect_tensor& t : r.tensors) {
    CHECK(t.type == dtype::BF16);
    CHECK(t.n_bytes == 2 * t.n_elements);
    params += t.n_elements;
  }
  CHECK(r.n_parameters == params);
  CHECK(r.n_bytes == 2 * params);
  CHECK_FALSE(r.lora.has_value());
}

TEST_CASE("a sharded model: every shard, index total_size equals the tensor bytes") {
  inspect_report r = inspect_path(td + "tiny-llama-f16-sharded", std::nullopt);
  CHECK(r.kind == inspect_kind::model);
  REQUIRE(r.files.size() == 3);
  CHECK(r.files[2].name == "model-00003-of-00003.safetensors");
  CHECK(r.tensors.size() == 21);
  REQUIRE(r.index_total_size.has_value());
  CHECK(*r.index_total_size == r.n_bytes);
  CHECK(r.tensors.back().file == "model-00003-of-00003.safetensors");
}

TEST_CASE("adapters: PEFT and kohya are loaded, fitted against a base") {
  inspect_report p = inspect_path(td + "lora-tiny-llama", std::nullopt);
  CHECK(p.kind == inspect_kind::adapter);
  REQUIRE(p.lora.has_value());
  CHECK(p.lora->format == adapter_format::peft);
  CHECK(p.lora->modules.size() == 14);
  CHECK(p.tensors.size() == 28);
  CHECK_FALSE(p.fit.has_value());
  CHECK(p.config_text.find("\"peft_type\": \"LORA\"") != std::string::npos);

  inspect_report k = inspect_path(td + "lora-tiny-llama-kohya.safetensors", td + "tiny-llama");
  CHECK(k.lora->format == adapter_format::kohya);
  REQUIRE(k.fit.has_value());
  CHECK(k.fit->ok());
  REQUIRE(k.base_matches.size() == k.lora->modules.size());
  for (size_t i = 0; i < k.base_matches.size(); ++i) {
    const lora_module& m = k.lora->modules[i];
    CHECK(k.base_matches[i].found);
    CHECK(k.base_matches[i].type == dtype::BF16);
    CHECK(k.base_matches[i].shape == std::vector<int64_t>{m.b.info->shape[0], m.a.info->shape[1]});
  }
}

TEST_CASE("a misfit is reported, not thrown; absent base tensors are not found") {
  inspect_report r = inspect_path(td + "lora-tiny-llama-mismatch", td + "tiny-llama");
  REQUIRE(r.fit.has_value());
  CHECK(r.fit->problems.size() == 2);
  size_t found = 0;
  for (const inspect_base_match& m : r.base_matches) found += m.found;
  CHECK(found == 2);  // layer-0 q and v exist; layer 2 does not
}

TEST_CASE("a model with a base is listed and not fitted (cli refuses the combination)") {
  inspect_report r = inspect_path(td + "tiny-llama", td + "tiny-llama");
  CHECK(r.kind == inspect_kind::model);
  CHECK_FALSE(r.fit.has_value());
}

TEST_CASE("errors: missing path exit 4, malformed exit 3") {
  CHECK(code_of(td + "no-such-file.safetensors") == 4);
  CHECK(code_of(td + "malformed/offsets-gap.safetensors") == 3);
  CHECK(code_of(td + "malformed/lora-missing-b") == 3);
  CHECK(code_of(td + "lora-tiny-llama", td + "no-such-base") == 4);
}

TEST_CASE("inspect and load_adapter follow one file rule: a folder's weights are adapter_model.safetensors") {
  // a folder with adapter_config.json and its weights under another name: inspect used
  // to accept it (the folder's only .safetensors file) while load_adapter refused it
  temp_dir d;
  namespace fs = std::filesystem;
  fs::copy_file(td + "lora-tiny-llama/adapter_config.json", fs::path(d.path) / "adapter_config.json");
  fs::copy_file(td + "lora-tiny-llama/adapter_model.safetensors", fs::path(d.path) / "renamed.safetensors");
  const error from_inspect = thrown([&] { inspect_path(d.path, std::nullopt); });
  const error from_load = thrown([&] { load_adapter(d.path); });
  CHECK(from_inspect.code() == exit_code::invalid_input);
  CHECK(from_inspect.detail() == from_load.detail());
  CHECK(from_inspect.detail() == "folder has no adapter_model.safetensors");
  CHECK(find_adapter_files(td + "lora-tiny-llama").weights == td + "lora-tiny-llama/adapter_model.safetensors");
  CHECK(find_adapter_files(td + "lora-tiny-llama").config == td + "lora-tiny-llama/adapter_config.json");
}
