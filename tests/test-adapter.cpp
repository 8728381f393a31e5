// The adapter model: PEFT and kohya key forms, pairing, rank / alpha / scale,
// every refusal (exit code and message), classification of real files, and
// fitting to a base model (kohya names, fan_in_fan_out, shapes).
#include <doctest/doctest.h>

#include <fmt/format.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/adapter.h"
#include "core/kohya-format.h"
#include "core/peft-format.h"
#include "core/dtype.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "tests/test-support.h"

namespace fs = std::filesystem;
using namespace lora;
using namespace lora::testing;

namespace {

// ---------------------------------------------------------------------------
// helpers: files built in a temp folder with the project's own writer

struct tdef {
  std::string name;
  std::vector<int64_t> shape;
  dtype type = dtype::F32;
  std::vector<double> values = {};  // empty: a fixed pattern
};

uint64_t count(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

std::vector<uint8_t> tensor_bytes(const tdef& d) {
  const uint64_t n = count(d.shape);
  if (!dtype_is_math(d.type)) return std::vector<uint8_t>(*dtype_bytes(d.type, n), 0);
  std::vector<double> v = d.values;
  if (v.empty())
    for (uint64_t i = 0; i < n; ++i) v.push_back(static_cast<double>(static_cast<int>(i % 7) - 3) * 0.125);
  REQUIRE(v.size() == n);
  std::vector<uint8_t> out(n * static_cast<uint64_t>(math_dtype_size(d.type)));
  from_f64(d.type, v, out);
  return out;
}

void write_safetensors(const fs::path& path, const std::vector<tdef>& defs) {
  std::vector<tensor_spec> specs;
  std::map<std::string, std::vector<uint8_t>> data;
  for (const tdef& d : defs) {
    specs.push_back({d.name, d.type, d.shape});
    data[d.name] = tensor_bytes(d);
  }
  safetensors_layout layout = plan_safetensors(specs, std::nullopt);
  std::vector<uint8_t> bytes =
      serialize_safetensors(layout, [&](const tensor_info& t) { return std::span<const uint8_t>(data.at(t.name)); });
  write_file_atomic(path.string(), std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

void write_text(const fs::path& path, const std::string& text) { write_file_atomic(path.string(), text); }
std::string pk(const std::string& module, const std::string& suffix) {
  return "base_model.model." + module + "." + suffix;
}

// A linear PEFT pair: A [r, in], B [out, r].
std::vector<tdef> peft_linear(const std::string& module, int64_t r, int64_t in, int64_t out) {
  return {{pk(module, "lora_A.weight"), {r, in}}, {pk(module, "lora_B.weight"), {out, r}}};
}

std::vector<tdef> join(std::vector<tdef> a, const std::vector<tdef>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::string config(const std::string& extra = "") {
  return R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8)" + (extra.empty() ? "" : ", " + extra) + "}";
}

// A PEFT folder <dir>/<sub> with adapter_config.json and adapter_model.safetensors.
std::string peft_folder(const temp_dir& d, const std::string& config_json, const std::vector<tdef>& defs,
                        const std::string& sub = "adapter") {
  fs::path p = fs::path(d.path) / sub;
  fs::create_directories(p);
  write_text(p / "adapter_config.json", config_json);
  write_safetensors(p / "adapter_model.safetensors", defs);
  return p.string();
}

// A model folder with model.safetensors and, when model_type is given, config.json.
std::string model_folder(const temp_dir& d, const std::vector<tdef>& defs, const std::string& model_type = "",
                         const std::string& sub = "base") {
  fs::path p = fs::path(d.path) / sub;
  fs::create_directories(p);
  if (!model_type.empty()) write_text(p / "config.json", R"({"model_type": ")" + model_type + R"("})");
  write_safetensors(p / "model.safetensors", defs);
  return p.string();
}

const lora_module& module_named(const adapter& a, const std::string& name) {
  for (const lora_module& m : a.modules)
    if (m.name == name) return m;
  FAIL("no module " << name);
  throw std::logic_error("unreachable");
}

std::string problems_text(const fit_report& r) {
  std::string s;
  for (const fit_problem& p : r.problems) s += p.key + ": " + p.what + "\n";
  return s;
}

std::string fixtures_dir() {
#ifdef LORA_FIXTURES_DIR
  return LORA_FIXTURES_DIR;
#else
  return "";
#endif
}

}  // namespace

// ---------------------------------------------------------------------------
// scale

TEST_CASE("lora_scale: alpha / r, and alpha / sqrt(r) with rsLoRA") {
  CHECK(lora_scale(16, 8, false) == 2.0);
  CHECK(lora_scale(8, 16, false) == 0.5);
  CHECK(lora_scale(16, 16, true) == 4.0);
  CHECK(lora_scale(8, 2, true) == doctest::Approx(8.0 / std::sqrt(2.0)).epsilon(1e-15));
  CHECK(lora_scale(3, 7, false) == 3.0 / 7.0);
}

// ---------------------------------------------------------------------------
// PEFT key forms

TEST_CASE("PEFT linear: pairs A with B, rank from shapes, scale alpha / r") {
  temp_dir d;
  auto defs = join(peft_linear("model.layers.1.self_attn.v_proj", 4, 16, 12),
                   peft_linear("model.layers.0.self_attn.q_proj", 4, 16, 16));
  adapter a = load_adapter(peft_folder(d, config(), defs));
  CHECK(a.format == adapter_format::peft);
  CHECK(adapter_format_name(a.format) == "peft");
  REQUIRE(a.config);
  REQUIRE(a.modules.size() == 2);
  CHECK(a.saved.empty());
  // sorted by name
  CHECK(a.modules[0].name == "model.layers.0.self_attn.q_proj");
  const lora_module& m = a.modules[1];
  CHECK(m.name == "model.layers.1.self_attn.v_proj");
  CHECK(m.target == "model.layers.1.self_attn.v_proj.weight");
  CHECK(m.kind == module_kind::linear);
  CHECK(module_kind_name(m.kind) == "linear");
  CHECK(m.rank == 4);
  CHECK(m.alpha == 8.0);
  CHECK(m.scale == 2.0);
  CHECK_FALSE(m.dora);
  CHECK_FALSE(m.magnitude);
  CHECK_FALSE(m.bias);
  CHECK_FALSE(m.fan_in_fan_out);
  CHECK(m.a.info->name == pk(m.name, "lora_A.weight"));
  CHECK(m.a.info->shape == std::vector<int64_t>{4, 16});
  CHECK(m.b.info->shape == std::vector<int64_t>{12, 4});
  // the refs borrow from the adapter's own map
  CHECK(m.a.file == a.file.get());
  CHECK(m.a.data().size() == 4 * 16 * 4);
  CHECK(a.weights_path == (fs::path(a.path) / "adapter_model.safetensors").string());
}

TEST_CASE("PEFT: the .default. forms of every key") {
  temp_dir d;
  std::vector<tdef> defs = {
      {pk("q", "lora_A.default.weight"), {2, 6}},
      {pk("q", "lora_B.default.weight"), {5, 2}},
      {pk("q", "lora_B.default.bias"), {5}},
      {pk("q", "lora_magnitude_vector.default.weight"), {5}},
      {pk("emb", "lora_embedding_A.default"), {2, 10}},
      {pk("emb", "lora_embedding_B.default"), {3, 2}},
      {pk("k", "lora_A.weight"), {2, 6}},
      {pk("k", "lora_B.weight"), {5, 2}},
      {pk("k", "lora_B.bias"), {5}},
      {pk("k", "lora_magnitude_vector.default"), {5}},
      {pk("emb", "lora_magnitude_vector"), {3}},
  };
  adapter a = load_adapter(peft_folder(d, config(R"("r": 2, "use_dora": true, "lora_bias": true)"), defs));
  REQUIRE(a.modules.size() == 3);
  const lora_module& q = module_named(a, "q");
  CHECK(q.a.info->name == pk("q", "lora_A.default.weight"));
  CHECK(q.b.info->name == pk("q", "lora_B.default.weight"));
  REQUIRE(q.bias);
  CHECK(q.bias->info->name == pk("q", "lora_B.default.bias"));
  REQUIRE(q.magnitude);
  CHECK(q.dora);
  CHECK(module_named(a, "k").magnitude->info->name == pk("k", "lora_magnitude_vector.default"));
  const lora_module& e = module_named(a, "emb");
  CHECK(e.kind == module_kind::embedding);
  CHECK(e.a.info->name == pk("emb", "lora_embedding_A.default"));
  CHECK(e.magnitude->info->shape ==
        std::vector<int64_t>{3});  // [dim]: PEFT's DoraEmbeddingLayer scales the output features
}

TEST_CASE("PEFT embedding: lora_embedding_A [r, vocab], lora_embedding_B [dim, r]") {
  temp_dir d;
  std::vector<tdef> defs = {{pk("model.embed_tokens", "lora_embedding_A"), {4, 50}},
                            {pk("model.embed_tokens", "lora_embedding_B"), {8, 4}}};
  adapter a = load_adapter(peft_folder(d, config(), defs));
  REQUIRE(a.modules.size() == 1);
  const lora_module& m = a.modules[0];
  CHECK(m.kind == module_kind::embedding);
  CHECK(module_kind_name(m.kind) == "embedding");
  CHECK(m.target == "model.embed_tokens.weight");
  CHECK(m.rank == 4);
  CHECK(m.scale == 2.0);
}

TEST_CASE("PEFT DoRA: every magnitude key form PEFT has written") {
  for (const char* suffix : {"lora_magnitude_vector", "lora_magnitude_vector.weight", "lora_magnitude_vector.default",
                             "lora_magnitude_vector.default.weight"}) {
    CAPTURE(suffix);
    temp_dir d;
    auto defs = join(peft_linear("m.q", 4, 6, 5), {{pk("m.q", suffix), {5}}});
    adapter a = load_adapter(peft_folder(d, config(R"("use_dora": true)"), defs));
    REQUIRE(a.modules.size() == 1);
    CHECK(a.modules[0].dora);
    REQUIRE(a.modules[0].magnitude);
    CHECK(a.modules[0].magnitude->info->name == pk("m.q", suffix));
  }
}

TEST_CASE("PEFT DoRA refusals") {
  temp_dir d;
  auto with_m = join(peft_linear("m.q", 4, 6, 5), {{pk("m.q", "lora_magnitude_vector"), {5}}});
  lora::error e = thrown([&] { load_adapter(peft_folder(d, config(), with_m, "a1")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.tensor() == pk("m.q", "lora_magnitude_vector"));
  CHECK(has(e.detail(), "DoRA magnitude, but"));
  CHECK(has(e.detail(), "use_dora false"));

  e = thrown([&] { load_adapter(peft_folder(d, config(R"("use_dora": true)"), peft_linear("m.q", 4, 6, 5), "a2")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.tensor() == pk("m.q", "lora_A.weight"));
  CHECK(has(e.detail(), "use_dora true, but module m.q has no lora_magnitude_vector"));

  auto bad_m = join(peft_linear("m.q", 4, 6, 5), {{pk("m.q", "lora_magnitude_vector"), {6}}});
  e = thrown([&] { load_adapter(peft_folder(d, config(R"("use_dora": true)"), bad_m, "a3")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.tensor() == pk("m.q", "lora_magnitude_vector"));
  CHECK(e.detail() == "shape mismatch: expected [5], found [6]");

  auto square_m = join(peft_linear("m.q", 4, 6, 5), {{pk("m.q", "lora_magnitude_vector"), {5, 5}}});
  e = thrown([&] { load_adapter(peft_folder(d, config(R"("use_dora": true)"), square_m, "a5")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.detail() == "shape mismatch: expected [5], found [5, 5]");

  auto only_m = std::vector<tdef>{{pk("m.q", "lora_magnitude_vector"), {5}},
                                  {pk("m.k", "lora_A.weight"), {4, 6}},
                                  {pk("m.k", "lora_B.weight"), {5, 4}},
                                  {pk("m.k", "lora_magnitude_vector"), {5}}};
  e = thrown([&] { load_adapter(peft_folder(d, config(R"("use_dora": true)"), only_m, "a4")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.detail() == "lora_magnitude_vector without lora_A and lora_B for module m.q");
}

TEST_CASE("PEFT conv: A [r, in, kh, kw], B [out, r, 1, 1]") {
  temp_dir d;
  std::vector<tdef> defs = {{pk("unet.conv_in", "lora_A.weight"), {4, 3, 3, 3}},
                            {pk("unet.conv_in", "lora_B.weight"), {8, 4, 1, 1}},
                            {pk("unet.conv_in", "lora_magnitude_vector"), {1, 8, 1, 1}}};
  adapter a = load_adapter(peft_folder(d, config(R"("use_dora": true)"), defs));
  REQUIRE(a.modules.size() == 1);
  CHECK(a.modules[0].kind == module_kind::conv);
  CHECK(module_kind_name(a.modules[0].kind) == "conv");
  CHECK(a.modules[0].rank == 4);

  std::vector<tdef> bad = {{pk("c", "lora_A.weight"), {4, 3, 3, 3}}, {pk("c", "lora_B.weight"), {8, 4, 3, 3}}};
  lora::error e = thrown([&] { load_adapter(peft_folder(d, config(), bad, "bad")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.tensor() == pk("c", "lora_B.weight"));
  CHECK(e.detail() == "conv lora_B must be [out, r, 1, 1], found [8, 4, 3, 3] (lora_A is [4, 3, 3, 3])");

  std::vector<tdef> three_d = {{pk("c", "lora_A.weight"), {4, 3, 3}}, {pk("c", "lora_B.weight"), {8, 4, 1}}};
  e = thrown([&] { load_adapter(peft_folder(d, config(), three_d, "c1d")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.detail(), "unsupported shapes [4, 3, 3] and [8, 4, 1]"));
}

TEST_CASE("PEFT lora_bias: lora_B.bias is a bias delta") {
  temp_dir d;
  auto defs = join(peft_linear("m.o", 4, 6, 5), {{pk("m.o", "lora_B.bias"), {5}}});
  adapter a = load_adapter(peft_folder(d, config(R"("lora_bias": true)"), defs));
  REQUIRE(a.modules[0].bias);
  CHECK(a.modules[0].bias->info->shape == std::vector<int64_t>{5});

  lora::error e = thrown([&] { load_adapter(peft_folder(d, config(), defs, "nobias")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.tensor() == pk("m.o", "lora_B.bias"));
  CHECK(has(e.detail(), "lora_B bias, but"));
  CHECK(has(e.detail(), "lora_bias false"));

  auto bad = join(peft_linear("m.o", 4, 6, 5), {{pk("m.o", "lora_B.bias"), {6}}});
  e = thrown([&] { load_adapter(peft_folder(d, config(R"("lora_bias": true)"), bad, "badbias")); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.detail() == "shape mismatch: expected [5], found [6]");
}

TEST_CASE("PEFT modules_to_save: other base_model.model.<P>.weight / .bias keys replace base tensors") {
  temp_dir d;
  auto defs = join(peft_linear("model.q", 4, 6, 5), {{pk("score", "weight"), {3, 6}}, {pk("score", "bias"), {3}}});
  adapter a = load_adapter(peft_folder(d, config(R"("modules_to_save": ["score"])"), defs));
  REQUIRE(a.saved.size() == 2);
  CHECK(a.saved[0].target == "score.bias");
  CHECK(a.saved[1].target == "score.weight");
  CHECK(a.saved[1].tensor.info->name == pk("score", "weight"));
  CHECK(a.modules.size() == 1);
}

TEST_CASE("PEFT: a .safetensors path with adapter_config.json beside it") {
  temp_dir d;
  std::string folder = peft_folder(d, config(), peft_linear("m.q", 4, 6, 5));
  adapter a = load_adapter(folder + "/adapter_model.safetensors");
  CHECK(a.format == adapter_format::peft);
  CHECK(a.modules.size() == 1);
  CHECK(a.weights_path == folder + "/adapter_model.safetensors");
}

TEST_CASE("PEFT refusals name the key") {
  temp_dir d;
  struct bad_case {
    const char* label;
    std::vector<tdef> defs;
    std::string config;
    std::string tensor;
    std::string detail;
  };
  const std::string q = "model.q";
  std::vector<bad_case> cases = {
      {"missing B", {{pk(q, "lora_A.weight"), {4, 6}}}, config(), pk(q, "lora_A.weight"), "lora_A without its lora_B"},
      {"missing A", {{pk(q, "lora_B.weight"), {5, 4}}}, config(), pk(q, "lora_B.weight"), "lora_B without its lora_A"},
      {"missing embedding B",
       {{pk("e", "lora_embedding_A"), {4, 6}}},
       config(),
       pk("e", "lora_embedding_A"),
       "lora_embedding_A without its lora_embedding_B"},
      {"rank disagrees",
       {{pk(q, "lora_A.weight"), {4, 6}}, {pk(q, "lora_B.weight"), {5, 3}}},
       config(),
       pk(q, "lora_B.weight"),
       "rank disagrees: " + pk(q, "lora_A.weight") + " is [4, 6] (rank 4), " + pk(q, "lora_B.weight") +
           " is [5, 3] (rank 3)"},
      {"config r disagrees", peft_linear(q, 4, 6, 5), R"({"peft_type": "LORA", "r": 8, "lora_alpha": 8})",
       pk(q, "lora_A.weight"), ""},
      {"unknown lora key", join(peft_linear(q, 4, 6, 5), {{pk(q, "lora_C.weight"), {4}}}), config(),
       pk(q, "lora_C.weight"),
       "unknown LoRA key (expected lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A/B or "
       "lora_magnitude_vector)"},
      {"lora_A bias", join(peft_linear(q, 4, 6, 5), {{pk(q, "lora_A.bias"), {4}}}), config(), pk(q, "lora_A.bias"),
       "unknown LoRA key (expected lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A/B or "
       "lora_magnitude_vector)"},
      {"unknown non-lora key", join(peft_linear(q, 4, 6, 5), {{pk(q, "scales"), {4}}}), config(), pk(q, "scales"),
       "unknown key: neither a LoRA tensor nor a module weight or bias"},
      {"trainable tokens: rows and indices disagree",
       join(peft_linear(q, 4, 6, 5), {{pk("model.embed_tokens", "token_adapter.trainable_tokens_delta"), {2, 6}}}),
       config(R"("trainable_token_indices": [1, 2, 3])"),
       pk("model.embed_tokens", "token_adapter.trainable_tokens_delta"),
       "shape mismatch: expected [3, dim] (trainable_token_indices lists 3 tokens), found [2, 6]"},
      {"no prefix",
       {{"model.q.lora_A.weight", {4, 6}}, {"model.q.lora_B.weight", {5, 4}}},
       config(),
       "model.q.lora_A.weight",
       "PEFT key does not start with \"base_model.model.\""},
      {"two A forms", join(peft_linear(q, 4, 6, 5), {{pk(q, "lora_A.default.weight"), {4, 6}}}), config(),
       pk(q, "lora_A.weight"), ""},
      {"linear and embedding", join(peft_linear(q, 4, 6, 5), {{pk(q, "lora_embedding_A"), {4, 6}}}), config(), "", ""},
      {"rank 0",
       {{pk(q, "lora_A.weight"), {0, 6}}, {pk(q, "lora_B.weight"), {5, 0}}},
       config(),
       pk(q, "lora_A.weight"),
       "rank 0"},
      {"empty module path", join(peft_linear(q, 4, 6, 5), {{"base_model.model..weight", {2}}}), config(),
       "base_model.model..weight", "unknown key: neither a LoRA tensor nor a module weight or bias"},
      {"1-D A",
       {{pk(q, "lora_A.weight"), {4}}, {pk(q, "lora_B.weight"), {5, 4}}},
       config(),
       pk(q, "lora_A.weight"),
       "unsupported shapes [4] and [5, 4]: expected A [r, in] and B [out, r] (or 4-D conv)"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const bad_case& c = cases[i];
    CAPTURE(c.label);
    std::string folder = peft_folder(d, c.config, c.defs, fmt::format("case{}", i));
    lora::error e = thrown([&] { load_adapter(folder); });
    CHECK(e.code() == exit_code::invalid_input);
    CHECK(e.file() == folder + "/adapter_model.safetensors");
    if (!c.tensor.empty()) CHECK(e.tensor() == c.tensor);
    if (!c.detail.empty()) CHECK(e.detail() == c.detail);
    const std::string label = c.label;
    if (label == "config r disagrees")
      CHECK(e.detail() == "rank 4 from the shapes, but " + folder + "/adapter_config.json says r = 8");
    if (label == "two A forms") CHECK(has(e.detail(), "second lora_A tensor for module model.q"));
    if (label == "linear and embedding")
      CHECK(e.detail() == "module model.q has both lora_A/lora_B and lora_embedding_A/B");
  }
}

TEST_CASE("PEFT: config problems") {
  temp_dir d;
  auto defs = peft_linear("m.q", 4, 6, 5);

  std::string folder = peft_folder(d, R"({"peft_type": "ADALORA", "r": 4})", defs, "adalora");
  lora::error e = thrown([&] { load_adapter(folder); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.file() == folder + "/adapter_config.json");
  CHECK(e.tensor() == "peft_type");
  CHECK(e.detail() == "\"ADALORA\" is not supported: only LORA adapters are read");

  folder = peft_folder(d, R"({"r": 4})", defs, "notype");
  e = thrown([&] { load_adapter(folder); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.detail() == "missing: only LORA adapters are read");

  folder = peft_folder(d, R"({"peft_type": "LORA", "r": "4"})", defs, "badtype");
  e = thrown([&] { load_adapter(folder); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.tensor() == "r");

  // weights alone: alpha unknown
  fs::create_directories(fs::path(d.path) / "bare");
  write_safetensors(fs::path(d.path) / "bare" / "adapter_model.safetensors", defs);
  e = thrown([&] { load_adapter((fs::path(d.path) / "bare" / "adapter_model.safetensors").string()); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.detail() == "PEFT LoRA weights without adapter_config.json beside them (alpha and options unknown)");
  e = thrown([&] { load_adapter((fs::path(d.path) / "bare").string()); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.detail(), "without adapter_config.json"));

  folder = peft_folder(d, config(R"("layer_replication": [[0, 2], [1, 3]])"), defs, "replication");
  e = thrown([&] { load_adapter(folder); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.tensor() == "layer_replication");
  CHECK(has(e.detail(), "merging it into the base is not supported"));

  // an invalid regex in a pattern
  folder = peft_folder(d, config(R"("rank_pattern": {"q(": 4})"), defs, "badregex");
  e = thrown([&] { load_adapter(folder); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.tensor() == "rank_pattern.q(");
  CHECK(has(e.detail(), "not a valid regular expression"));

  // a construct RE2 does not have, in alpha_pattern: refused by key, with the construct named
  folder = peft_folder(d, config(R"("alpha_pattern": {"q_proj": 4, "(q)_\\1": 8})"), defs, "backref");
  e = thrown([&] { load_adapter(folder); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.file() == folder + "/adapter_config.json");
  CHECK(e.tensor() == "alpha_pattern.(q)_\\1");
  CHECK(e.detail() ==
        "not a valid regular expression: invalid escape sequence: \\1 (a backreference is not supported: "
        "patterns are matched by RE2, in linear time)");
}

TEST_CASE("load_adapter: missing paths and folders") {
  temp_dir d;
  lora::error e = thrown([&] { load_adapter((fs::path(d.path) / "nope").string()); });
  CHECK(e.code() == exit_code::io);
  CHECK(has(e.what(), "no such file or folder"));

  fs::create_directories(fs::path(d.path) / "empty");
  e = thrown([&] { load_adapter((fs::path(d.path) / "empty").string()); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.detail() == "folder has no adapter_model.safetensors");

  fs::create_directories(fs::path(d.path) / "pickle");
  write_text(fs::path(d.path) / "pickle" / "adapter_model.bin", "not read");
  e = thrown([&] { load_adapter((fs::path(d.path) / "pickle").string()); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.detail(), "adapter_model.bin (pickle) is not read"));

  write_safetensors(fs::path(d.path) / "model.safetensors", {{"model.layers.0.q.weight", {4, 4}}});
  e = thrown([&] { load_adapter((fs::path(d.path) / "model.safetensors").string()); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.detail(), "holds no LoRA tensors"));

  write_text(fs::path(d.path) / "garbage.safetensors", "not a safetensors file at all");
  e = thrown([&] { load_adapter((fs::path(d.path) / "garbage.safetensors").string()); });
  CHECK(e.code() == exit_code::invalid_input);
}

TEST_CASE("rank_pattern / alpha_pattern: regex ^(.*\\.)?(KEY)$, first match in file order wins") {
  temp_dir d;
  auto defs = join(join(join(peft_linear("model.layers.0.self_attn.q_proj", 2, 6, 6),
                             peft_linear("model.layers.1.self_attn.q_proj", 8, 6, 6)),
                        peft_linear("model.layers.0.self_attn.xq_proj", 4, 6, 6)),
                   peft_linear("model.layers.0.mlp.up_proj", 3, 6, 6));
  // "layers\.0\.self_attn\.q_proj" comes first and wins over "q_proj" for layer 0;
  // "q_proj" must not match "xq_proj" (a dot must precede the key);
  // "mlp\..*" matches a middle part through the regex.
  const std::string cfg = R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
    "rank_pattern": {"layers\\.0\\.self_attn\\.q_proj": 2, "q_proj": 8, "mlp\\..*": 3},
    "alpha_pattern": {"q_proj": 32, "layers.0.self_attn.q_proj": 1, "up_proj": 6}})";
  adapter a = load_adapter(peft_folder(d, cfg, defs));
  const lora_module& q0 = module_named(a, "model.layers.0.self_attn.q_proj");
  CHECK(q0.rank == 2);
  CHECK(q0.alpha == 32.0);  // "q_proj" comes first in alpha_pattern
  CHECK(q0.scale == 16.0);
  const lora_module& q1 = module_named(a, "model.layers.1.self_attn.q_proj");
  CHECK(q1.rank == 8);
  CHECK(q1.alpha == 32.0);
  CHECK(q1.scale == 4.0);
  const lora_module& xq = module_named(a, "model.layers.0.self_attn.xq_proj");
  CHECK(xq.rank == 4);  // config r
  CHECK(xq.alpha == 8.0);
  CHECK(xq.scale == 2.0);
  const lora_module& up = module_named(a, "model.layers.0.mlp.up_proj");
  CHECK(up.rank == 3);
  CHECK(up.alpha == 6.0);
  CHECK(up.scale == 2.0);

  // a pattern that matches but disagrees with the shapes
  const std::string wrong = R"({"peft_type": "LORA", "r": 4, "rank_pattern": {"q_proj": 16}})";
  std::string folder = peft_folder(d, wrong, peft_linear("model.q_proj", 4, 6, 6), "wrong");
  lora::error e = thrown([&] { load_adapter(folder); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(e.tensor() == pk("model.q_proj", "lora_A.weight"));
  CHECK(e.detail() == "rank 4 from the shapes, but " + folder + "/adapter_config.json rank_pattern \"q_proj\" says 16");

  // the whole path must match: "proj" does not match "q_proj"
  const std::string partial = R"({"peft_type": "LORA", "r": 4, "rank_pattern": {"proj": 16}})";
  CHECK(load_adapter(peft_folder(d, partial, peft_linear("model.q_proj", 4, 6, 6), "partial")).modules[0].rank == 4);
}

TEST_CASE("scale: rsLoRA, default alpha, float alpha") {
  temp_dir d;
  adapter a = load_adapter(peft_folder(d, R"({"peft_type": "LORA", "r": 16, "lora_alpha": 8, "use_rslora": true})",
                                       peft_linear("q", 16, 4, 4), "rs"));
  CHECK(a.modules[0].scale == 2.0);  // 8 / sqrt(16)
  a = load_adapter(peft_folder(d, R"({"peft_type": "LORA"})", peft_linear("q", 4, 4, 4), "default"));
  CHECK(a.modules[0].alpha == 8.0);  // PEFT's default lora_alpha
  CHECK(a.modules[0].scale == 2.0);
  a = load_adapter(peft_folder(d, R"({"peft_type": "LORA", "r": 3, "lora_alpha": 1.5, "use_rslora": true,
                                     "alpha_pattern": {"q": 4.5}})",
                               join(peft_linear("q", 3, 4, 4), peft_linear("k", 3, 4, 4)), "float"));
  CHECK(module_named(a, "k").scale == 1.5 / std::sqrt(3.0));
  CHECK(module_named(a, "q").scale == 4.5 / std::sqrt(3.0));
}

// ---------------------------------------------------------------------------
// kohya / sd-scripts

TEST_CASE("kohya: lora_down / lora_up / alpha in any float dtype") {
  temp_dir d;
  std::vector<tdef> defs = {
      {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", {4, 8}, dtype::F16},
      {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", {6, 4}, dtype::F16},
      {"lora_unet_down_blocks_0_attentions_0_proj_in.alpha", {}, dtype::F16, {2.0}},
      {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", {8, 5}, dtype::BF16},
      {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", {5, 8}, dtype::BF16},
      {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha", {}, dtype::BF16, {4.0}},
      {"lora_te1_x.lora_down.weight", {2, 5}},
      {"lora_te1_x.lora_up.weight", {5, 2}},
      {"lora_te1_x.alpha", {}, dtype::F64, {3.0}},
      {"lora_te2_y.lora_down.weight", {2, 5}},
      {"lora_te2_y.lora_up.weight", {5, 2}},
      {"lora_te2_y.alpha", {}, dtype::F32, {0.5}},
  };
  write_safetensors(fs::path(d.path) / "k.safetensors", defs);
  adapter a = load_adapter((fs::path(d.path) / "k.safetensors").string());
  CHECK(a.format == adapter_format::kohya);
  CHECK(adapter_format_name(a.format) == "kohya");
  CHECK_FALSE(a.config);
  REQUIRE(a.modules.size() == 4);
  const lora_module& u = module_named(a, "lora_unet_down_blocks_0_attentions_0_proj_in");
  CHECK(u.target.empty());  // resolved by fit_adapter
  CHECK(u.kind == module_kind::linear);
  CHECK(u.rank == 4);
  CHECK(u.alpha == 2.0);
  CHECK(u.scale == 0.5);
  CHECK(module_named(a, "lora_te_text_model_encoder_layers_0_self_attn_q_proj").scale == 0.5);
  CHECK(module_named(a, "lora_te1_x").scale == 1.5);
  CHECK(module_named(a, "lora_te2_y").scale == 0.25);
}

TEST_CASE("kohya: no alpha means alpha = r (scale 1), and so does alpha 0 (sd-scripts LoRAModule)") {
  temp_dir d;
  write_safetensors(fs::path(d.path) / "k.safetensors", {{"lora_unet_a.lora_down.weight", {4, 8}},
                                                         {"lora_unet_a.lora_up.weight", {6, 4}},
                                                         {"lora_unet_b.lora_down.weight", {2, 8}},
                                                         {"lora_unet_b.lora_up.weight", {6, 2}},
                                                         {"lora_unet_b.alpha", {}, dtype::F32, {0.0}}});
  adapter a = load_adapter((fs::path(d.path) / "k.safetensors").string());
  CHECK(module_named(a, "lora_unet_a").alpha == 4.0);
  CHECK(module_named(a, "lora_unet_a").scale == 1.0);
  CHECK(module_named(a, "lora_unet_b").alpha == 2.0);
  CHECK(module_named(a, "lora_unet_b").scale == 1.0);
}

TEST_CASE("kohya conv: 3x3 down with 1x1 up, and 1x1") {
  temp_dir d;
  write_safetensors(fs::path(d.path) / "k.safetensors", {{"lora_unet_conv_in.lora_down.weight", {4, 3, 3, 3}},
                                                         {"lora_unet_conv_in.lora_up.weight", {8, 4, 1, 1}},
                                                         {"lora_unet_conv_in.alpha", {}, dtype::F32, {1.0}},
                                                         {"lora_unet_proj.lora_down.weight", {2, 8, 1, 1}},
                                                         {"lora_unet_proj.lora_up.weight", {8, 2, 1, 1}}});
  adapter a = load_adapter((fs::path(d.path) / "k.safetensors").string());
  CHECK(module_named(a, "lora_unet_conv_in").kind == module_kind::conv);
  CHECK(module_named(a, "lora_unet_conv_in").scale == 0.25);
  CHECK(module_named(a, "lora_unet_proj").kind == module_kind::conv);
  CHECK(module_named(a, "lora_unet_proj").rank == 2);
}

TEST_CASE("kohya refusals name the key") {
  temp_dir d;
  struct bad_case {
    const char* label;
    std::vector<tdef> defs;
    std::string tensor;
    std::string detail;
  };
  std::vector<bad_case> cases = {
      {"missing up",
       {{"lora_unet_a.lora_down.weight", {4, 8}}},
       "lora_unet_a.lora_down.weight",
       "lora_down without its lora_up"},
      {"missing down",
       {{"lora_unet_a.lora_up.weight", {8, 4}}},
       "lora_unet_a.lora_up.weight",
       "lora_up without its lora_down"},
      {"alpha alone",
       {{"lora_unet_a.lora_down.weight", {4, 8}}, {"lora_unet_a.lora_up.weight", {8, 4}}, {"lora_unet_b.alpha", {}}},
       "lora_unet_b.alpha",
       "alpha without lora_down and lora_up"},
      {"rank disagrees",
       {{"lora_unet_a.lora_down.weight", {4, 8}}, {"lora_unet_a.lora_up.weight", {8, 3}}},
       "lora_unet_a.lora_up.weight",
       "rank disagrees: lora_down is [4, 8] (rank 4), lora_up is [8, 3] (rank 3)"},
      {"unknown prefix",
       {{"lora_vae_a.lora_down.weight", {4, 8}}, {"lora_vae_a.lora_up.weight", {8, 4}}},
       "lora_vae_a.lora_down.weight",
       "kohya key without a known prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_, lora_te3_)"},
      {"unknown suffix",
       {{"lora_unet_a.lora_down.weight", {4, 8}}, {"lora_unet_a.lora_up.weight", {8, 4}}, {"lora_unet_a.scale", {}}},
       "lora_unet_a.scale",
       "unknown kohya key (expected .lora_down.weight, .lora_up.weight, .alpha or .dora_scale)"},
      {"dora_scale without its module",
       {{"lora_unet_a.lora_down.weight", {4, 8}},
        {"lora_unet_a.lora_up.weight", {8, 4}},
        {"lora_unet_b.dora_scale", {8, 1}}},
       "lora_unet_b.dora_scale",
       "dora_scale without lora_down and lora_up"},
      {"alpha not scalar",
       {{"lora_unet_a.lora_down.weight", {4, 8}}, {"lora_unet_a.lora_up.weight", {8, 4}}, {"lora_unet_a.alpha", {2}}},
       "lora_unet_a.alpha",
       "alpha must be a scalar, found shape [2]"},
      {"alpha integer",
       {{"lora_unet_a.lora_down.weight", {4, 8}},
        {"lora_unet_a.lora_up.weight", {8, 4}},
        {"lora_unet_a.alpha", {}, dtype::I64}},
       "lora_unet_a.alpha",
       "alpha must be a float, found dtype I64"},
      {"alpha NaN",
       {{"lora_unet_a.lora_down.weight", {4, 8}},
        {"lora_unet_a.lora_up.weight", {8, 4}},
        {"lora_unet_a.alpha", {}, dtype::F32, {NAN}}},
       "lora_unet_a.alpha",
       "alpha is not finite"},
      {"conv up not 1x1",
       {{"lora_unet_a.lora_down.weight", {4, 8, 3, 3}}, {"lora_unet_a.lora_up.weight", {8, 4, 3, 3}}},
       "lora_unet_a.lora_down.weight",
       "unsupported shapes: lora_down [4, 8, 3, 3], lora_up [8, 4, 3, 3] (expected [r, in] and [out, r], or [r, in, "
       "kh, kw] and [out, r, 1, 1])"},
      {"rank 0",
       {{"lora_unet_a.lora_down.weight", {0, 8}}, {"lora_unet_a.lora_up.weight", {8, 0}}},
       "lora_unet_a.lora_down.weight",
       "rank 0"},
      {"dotted module",
       {{"lora_unet_a.b.lora_down.weight", {4, 8}}, {"lora_unet_a.b.lora_up.weight", {8, 4}}},
       "lora_unet_a.b.lora_down.weight",
       "kohya module name contains '.'"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const bad_case& c = cases[i];
    CAPTURE(c.label);
    fs::path p = fs::path(d.path) / fmt::format("k{}.safetensors", i);
    write_safetensors(p, c.defs);
    lora::error e = thrown([&] { load_adapter(p.string()); });
    CHECK(e.code() == exit_code::invalid_input);
    CHECK(e.file() == p.string());
    CHECK(e.tensor() == c.tensor);
    CHECK(e.detail() == c.detail);
  }
}

// ---------------------------------------------------------------------------
// classification

TEST_CASE("classify_tensors names every kind") {
  struct kind_case {
    std::vector<std::string> names;
    file_kind kind;
    const char* description_part;
  };
  const kind_case cases[] = {
      {{"model.embed_tokens.weight", "lm_head.weight"}, file_kind::model, "no adapter tensors"},
      {{}, file_kind::model, "no adapter tensors"},
      {{"base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"}, file_kind::peft_lora, "PEFT LoRA"},
      {{"base_model.model.e.lora_embedding_A"}, file_kind::peft_lora, "PEFT LoRA"},
      {{"lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha"},
       file_kind::kohya_lora,
       "kohya"},
      {{"lora_unet_a.hada_w1_a", "lora_unet_a.hada_w1_b", "lora_unet_a.hada_w2_a", "lora_unet_a.hada_w2_b",
        "lora_unet_a.alpha"},
       file_kind::lycoris,
       "LyCORIS LoHa"},
      {{"lora_unet_a.lokr_w1", "lora_unet_a.lokr_w2_a", "lora_unet_a.lokr_w2_b"}, file_kind::lycoris, "LyCORIS LoKr"},
      {{"lora_unet_b.lora_down.weight", "lora_unet_b.lora_mid.weight", "lora_unet_b.lora_up.weight"},
       file_kind::lycoris,
       "LyCORIS LoCon+Tucker"},
      {{"lora_unet_a.hada_w1_a", "lora_unet_b.lokr_w1"}, file_kind::lycoris, "LyCORIS LoHa + LoKr"},
      {{"model.layers.0.q.lora_a", "model.layers.0.q.lora_b"}, file_kind::other_adapter, "MLX"},
      {{"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.down.weight"},
       file_kind::diffusers_lora,
       "diffusers LoRA"},
      {{"unet.mid_block.attentions.0.proj_in.lora_A.weight", "unet.mid_block.attentions.0.proj_in.lora_B.weight"},
       file_kind::diffusers_lora,
       "diffusers LoRA"},
      {{"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"},
       file_kind::diffusers_lora,
       "diffusers LoRA"},
      {{"unet:0:down", "unet:0:up"}, file_kind::other_adapter, "cloneofsimo"},
      {{"base_model.model.q.ia3_l"}, file_kind::other_adapter, "IA3"},
      {{"base_model.model.q.vera_lambda_b"}, file_kind::other_adapter, "VeRA"},
      {{"base_model.model.q.oft_r"}, file_kind::other_adapter, "OFT"},
      {{"base_model.model.q.boft_R"}, file_kind::other_adapter, "BOFT"},
      {{"base_model.model.q.lora_A.weight", "base_model.model.q.lora_E"}, file_kind::other_adapter, "AdaLoRA"},
      {{"lora_unet_a.diff", "lora_unet_a.diff_b"}, file_kind::other_adapter, "full weight difference"},
      {{"prompt_embeddings"}, file_kind::other_adapter, "prompt tuning"},
  };
  for (const kind_case& c : cases) {
    CAPTURE(c.description_part);
    file_classification fc = classify_tensors(c.names);
    CHECK(fc.kind == c.kind);
    CHECK(has(fc.description, c.description_part));
  }
  // the example key is named
  CHECK(has(classify_tensors({"unet:12:up"}).description, "\"unet:12:up\""));
  // "a:b:c" is not cloneofsimo; ":N:" must be digits
  CHECK(classify_tensors({"unet:x:up"}).kind == file_kind::model);
}

TEST_CASE("load_adapter refuses other adapter kinds with their description") {
  temp_dir d;
  write_safetensors(fs::path(d.path) / "diff.safetensors", {{"lora_unet_a.diff", {8, 2}}});
  lora::error e = thrown([&] { load_adapter((fs::path(d.path) / "diff.safetensors").string()); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.detail(), "not a LoRA adapter lora can read: LyCORIS full weight difference"));
  // a LoHa module missing its second product
  write_safetensors(fs::path(d.path) / "loha.safetensors",
                    {{"lora_unet_a.hada_w1_a", {8, 2}}, {"lora_unet_a.hada_w1_b", {2, 8}}});
  e = thrown([&] { load_adapter((fs::path(d.path) / "loha.safetensors").string()); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.detail(), "LoHa module without its hada_w2_a"));
}

TEST_CASE("LyCORIS: forms, ranks and scales as LyCORIS's modules set them") {
  temp_dir d;
  const fs::path p = fs::path(d.path) / "lycoris.safetensors";
  auto alpha = [](const std::string& name, double v) { return tdef{name, {}, dtype::F32, {v}}; };
  write_safetensors(p, {
                           // LoHa: r = hada_w1_b.shape[0] = 2, alpha 3 -> 1.5
                           {"lora_unet_a.hada_w1_a", {8, 2}},
                           {"lora_unet_a.hada_w1_b", {2, 6}},
                           {"lora_unet_a.hada_w2_a", {8, 3}},
                           {"lora_unet_a.hada_w2_b", {3, 6}},
                           alpha("lora_unet_a.alpha", 3),
                           // LoHa without alpha: scale 1
                           {"lora_unet_b.hada_w1_a", {8, 2}},
                           {"lora_unet_b.hada_w1_b", {2, 6}},
                           {"lora_unet_b.hada_w2_a", {8, 2}},
                           {"lora_unet_b.hada_w2_b", {2, 6}},
                           // LoKr, both factors full: scale 1 whatever alpha says
                           {"lora_unet_c.lokr_w1", {2, 2}},
                           {"lora_unet_c.lokr_w2", {4, 3}},
                           alpha("lora_unet_c.alpha", 7),
                           // LoKr, w2 decomposed: r = lokr_w2_b.shape[0] = 2, alpha 1 -> 0.5
                           {"lora_unet_d.lokr_w1", {2, 2}},
                           {"lora_unet_d.lokr_w2_a", {4, 2}},
                           {"lora_unet_d.lokr_w2_b", {2, 3}},
                           alpha("lora_unet_d.alpha", 1),
                           // LoCon + Tucker: r = lora_down.shape[0] = 2, alpha 0 read as r -> 1
                           {"lora_unet_e.lora_down.weight", {2, 4, 1, 1}},
                           {"lora_unet_e.lora_mid.weight", {2, 2, 3, 3}},
                           {"lora_unet_e.lora_up.weight", {8, 2, 1, 1}},
                           alpha("lora_unet_e.alpha", 0),
                           // plain LoCon in the same file
                           {"lora_unet_f.lora_down.weight", {2, 6}},
                           {"lora_unet_f.lora_up.weight", {8, 2}},
                       });
  adapter a = load_adapter(p.string());
  CHECK(a.format == adapter_format::kohya);
  CHECK(adapter_kind_name(a) == "LyCORIS LoCon + LoCon+Tucker + LoHa + LoKr");
  REQUIRE(a.modules.size() == 6);
  struct want {
    delta_form form;
    module_kind kind;
    int64_t rank;
    double scale;
  };
  const want w[] = {
      {delta_form::loha, module_kind::linear, 2, 1.5}, {delta_form::loha, module_kind::linear, 2, 1.0},
      {delta_form::lokr, module_kind::linear, 1, 1.0}, {delta_form::lokr, module_kind::linear, 2, 0.5},
      {delta_form::tucker, module_kind::conv, 2, 1.0}, {delta_form::low_rank, module_kind::linear, 2, 1.0}};
  for (size_t i = 0; i < 6; ++i) {
    CAPTURE(a.modules[i].name);
    CHECK(a.modules[i].form == w[i].form);
    CHECK(a.modules[i].kind == w[i].kind);
    CHECK(a.modules[i].rank == w[i].rank);
    CHECK(a.modules[i].scale == w[i].scale);
  }
  lora::error e = thrown([&] { require_low_rank(a, "resize"); });
  CHECK(has(e.detail(), "resize works on LoRA factors (B A); this module is LoHa"));

  // tensors of two algorithms in one module, and shapes that disagree
  write_safetensors(p, {{"lora_unet_a.hada_w1_a", {8, 2}}, {"lora_unet_a.lokr_w1", {2, 2}}});
  e = thrown([&] { load_adapter(p.string()); });
  CHECK(has(e.detail(), "mixes the tensors of two LyCORIS algorithms"));
  write_safetensors(p, {{"lora_unet_a.hada_w1_a", {8, 2}},
                        {"lora_unet_a.hada_w1_b", {2, 6}},
                        {"lora_unet_a.hada_w2_a", {8, 2}},
                        {"lora_unet_a.hada_w2_b", {2, 5}}});
  e = thrown([&] { load_adapter(p.string()); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.detail(), "[8, 5]"));
}

TEST_CASE("diffusers LoRA: keys converted as diffusers converts them, scale 1") {
  temp_dir d;
  const fs::path p = fs::path(d.path) / "pytorch_lora_weights.safetensors";
  write_safetensors(p,
                    {
                        {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", {2, 6}},
                        {"unet.down_blocks.0.attentions.0.proj_in.lora_B.weight", {8, 2}},
                        {"unet.conv_in.lora.down.weight", {3, 4, 3, 3}},
                        {"unet.conv_in.lora.up.weight", {8, 3, 1, 1}},
                        {"mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight", {2, 6}},
                        {"mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight", {6, 2}},
                        {"text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight", {4, 6}},
                        {"text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight", {6, 4}},
                        {"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight", {2, 6}},
                        {"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight", {9, 2}},
                    });
  // the folder holding the file is the adapter too (the file rule)
  for (const fs::path& path : {p, fs::path(d.path)}) {
    adapter a = load_adapter(path.string());
    CHECK(a.format == adapter_format::diffusers);
    CHECK(a.weights_path == p.string());
    REQUIRE(a.modules.size() == 5);
    CHECK(a.modules[0].name == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj");
    CHECK(a.modules[1].name == "text_encoder_2.text_model.encoder.layers.0.mlp.fc1");
    CHECK(a.modules[2].name == "unet.conv_in");
    CHECK(a.modules[2].kind == module_kind::conv);
    CHECK(a.modules[3].name == "unet.down_blocks.0.attentions.0.proj_in");
    CHECK(a.modules[4].name == "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0");
    for (const lora_module& m : a.modules) CHECK(m.scale == 1.0);
  }
  // network alphas (Flux files): s = alpha / r per module
  write_safetensors(p, {{"transformer.a.lora_A.weight", {2, 6}},
                        {"transformer.a.lora_B.weight", {8, 2}},
                        {"transformer.a.alpha", {}, dtype::F32, {3.0}},
                        {"transformer.b.lora_A.weight", {4, 6}},
                        {"transformer.b.lora_B.weight", {8, 4}}});
  adapter a = load_adapter(p.string());
  REQUIRE(a.modules.size() == 2);
  CHECK(a.modules[0].scale == 1.5);
  CHECK(a.modules[1].scale == 1.0);
  write_safetensors(
      p,
      {{"transformer.a.lora_A.weight", {2, 6}}, {"transformer.a.lora_B.weight", {8, 2}}, {"transformer.c.alpha", {}}});
  lora::error e = thrown([&] { load_adapter(p.string()); });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(has(e.detail(), "alpha without its lora_A / lora_B pair"));
}

TEST_CASE("classification of the real fixtures") {
  const fs::path fx = fixtures_dir();
  struct fixture_case {
    const char* file;
    file_kind kind;
    const char* description_part;
  };
  const fixture_case cases[] = {
      {"gradience_tiny_lora/adapter_model.safetensors", file_kind::peft_lora, "PEFT LoRA"},
      {"mlx_examples_minicpm_adapter/adapters.safetensors", file_kind::other_adapter, "MLX"},
      {"diffusers_sd15_lora/pytorch_lora_weights.safetensors", file_kind::diffusers_lora, "diffusers LoRA"},
      {"cloneofsimo_lora/lora_disney.safetensors", file_kind::other_adapter, "cloneofsimo"},
      {"cloneofsimo_lora/analog_svd_rank4.safetensors", file_kind::other_adapter, "cloneofsimo"},
      {"fluxml_safetensors_jl/non_sharded/model.safetensors", file_kind::model, "no adapter"},
      {"syoyo_safetensors_cpp/model.safetensors", file_kind::model, "no adapter"},
  };
  for (const fixture_case& c : cases) {
    CAPTURE(c.file);
    fs::path p = fx / c.file;
    if (fx.empty() || !fs::exists(p)) {
      MESSAGE("fixture absent, skipped: " << p.string());
      continue;
    }
    safetensors_file f(p.string());
    std::vector<std::string> names;
    for (const tensor_info& t : f.tensors()) names.push_back(t.name);
    file_classification fc = classify_tensors(names);
    CHECK(fc.kind == c.kind);
    CHECK(has(fc.description, c.description_part));
    if (c.kind == file_kind::diffusers_lora) CHECK(load_adapter(p.string()).modules.size() == 128);
    if (c.kind == file_kind::other_adapter) {
      lora::error e = thrown([&] { load_adapter(p.string()); });
      CHECK(e.code() == exit_code::invalid_input);
      CHECK(has(e.detail(), c.description_part));
    }
  }
}

// ---------------------------------------------------------------------------
// fitting

TEST_CASE("fit: PEFT linear, embedding, conv, bias, DoRA, modules_to_save fit their base") {
  temp_dir d;
  std::vector<tdef> adapter_defs = {
      {pk("model.q", "lora_A.weight"), {2, 6}},
      {pk("model.q", "lora_B.weight"), {5, 2}},
      {pk("model.q", "lora_B.bias"), {5}},
      {pk("model.q", "lora_magnitude_vector"), {5}},
      {pk("model.embed", "lora_embedding_A"), {2, 10}},
      {pk("model.embed", "lora_embedding_B"), {6, 2}},
      {pk("model.embed", "lora_magnitude_vector"), {6}},
      {pk("model.conv", "lora_A.weight"), {2, 3, 3, 3}},
      {pk("model.conv", "lora_B.weight"), {4, 2, 1, 1}},
      {pk("model.conv", "lora_magnitude_vector"), {1, 4, 1, 1}},
      {pk("score", "weight"), {3, 6}},
  };
  adapter a = load_adapter(peft_folder(d, config(R"("r": 2, "use_dora": true, "lora_bias": true)"), adapter_defs));
  std::vector<tdef> base_defs = {{"model.q.weight", {5, 6}},      {"model.q.bias", {5}},
                                 {"model.embed.weight", {10, 6}}, {"model.conv.weight", {4, 3, 3, 3}},
                                 {"score.weight", {3, 6}},        {"other.weight", {2, 2}}};
  model_files base = open_model(model_folder(d, base_defs, "llama"));
  fit_report r = fit_adapter(a, base);
  CHECK_MESSAGE(r.ok(), problems_text(r));
  CHECK_FALSE(module_named(a, "model.q").fan_in_fan_out);

  // the same adapter against a base that differs everywhere
  std::vector<tdef> wrong_defs = {{"model.q.weight", {5, 7}},
                                  {"model.embed.weight", {11, 6}},
                                  {"model.conv.weight", {4, 3, 5, 5}},
                                  {"score.weight", {3, 7}}};
  model_files wrong = open_model(model_folder(d, wrong_defs, "llama", "wrong"));
  a = load_adapter(peft_folder(d, config(R"("r": 2, "use_dora": true, "lora_bias": true)"), adapter_defs, "again"));
  r = fit_adapter(a, wrong);
  std::string text = problems_text(r);
  CHECK(r.problems.size() == 5);
  CHECK(has(text, pk("model.q", "lora_A.weight") + ": base model.q.weight is [5, 7], the LoRA makes [5, 6]\n"));
  CHECK(has(text, pk("model.q", "lora_B.bias") + ": the base has no model.q.bias for the lora_B bias"));
  CHECK(has(text, "base model.embed.weight is [11, 6], the embedding LoRA makes [10, 6]"));
  CHECK(has(text, "base model.conv.weight is [4, 3, 5, 5], the LoRA makes [4, 3, 3, 3]"));
  CHECK(has(text, pk("score", "weight") + ": base score.weight is [3, 7], the saved module is [3, 6]"));

  // a base without the tensors at all
  model_files unrelated = open_model(model_folder(d, {{"x.weight", {2, 2}}}, "", "unrelated"));
  a = load_adapter(peft_folder(d, config(R"("r": 2, "use_dora": true, "lora_bias": true)"), adapter_defs, "third"));
  r = fit_adapter(a, unrelated);
  text = problems_text(r);
  // a modules_to_save tensor the base lacks is a new head (merge adds it), not a problem
  CHECK(r.problems.size() == 3);
  CHECK(has(text, "the base has no tensor model.q.weight\n"));
  CHECK_FALSE(has(text, "score.weight"));
}

TEST_CASE("fit: bias shape against the base bias") {
  temp_dir d;
  auto defs = join(peft_linear("m.o", 4, 6, 5), {{pk("m.o", "lora_B.bias"), {5}}});
  adapter a = load_adapter(peft_folder(d, config(R"("lora_bias": true)"), defs));
  model_files base = open_model(model_folder(d, {{"m.o.weight", {5, 6}}, {"m.o.bias", {1, 5}}}, "llama"));
  fit_report r = fit_adapter(a, base);
  REQUIRE(r.problems.size() == 1);
  CHECK(r.problems[0].key == pk("m.o", "lora_B.bias"));
  CHECK(r.problems[0].what == "base m.o.bias is [1, 5], the lora_B bias is [5]");
}

TEST_CASE("fit: fan_in_fan_out follows the layer type as PEFT forces it") {
  temp_dir d;
  // c_attn: [in 6, out 18] (Conv1D), c_proj: square [6, 6], q: square Linear
  auto defs = join(
      join(peft_linear("transformer.h.0.attn.c_attn", 2, 6, 18), peft_linear("transformer.h.0.attn.c_proj", 2, 6, 6)),
      peft_linear("transformer.h.0.attn.q", 2, 6, 6));
  std::vector<tdef> base_defs = {{"transformer.h.0.attn.c_attn.weight", {6, 18}},
                                 {"transformer.h.0.attn.c_proj.weight", {6, 6}},
                                 {"transformer.h.0.attn.q.weight", {6, 6}}};
  const std::string cfg_false = config(R"("r": 2, "fan_in_fan_out": false)");
  const std::string cfg_true = config(R"("r": 2, "fan_in_fan_out": true)");

  SUBCASE("gpt2 model_type, config false: Conv1D layers forced true, the rest false") {
    adapter a = load_adapter(peft_folder(d, cfg_false, defs));
    fit_report r = fit_adapter(a, open_model(model_folder(d, base_defs, "gpt2")));
    CHECK_MESSAGE(r.ok(), problems_text(r));
    CHECK(module_named(a, "transformer.h.0.attn.c_attn").fan_in_fan_out);
    CHECK(module_named(a, "transformer.h.0.attn.c_proj").fan_in_fan_out);
    CHECK_FALSE(module_named(a, "transformer.h.0.attn.q").fan_in_fan_out);
  }
  SUBCASE("a known nn.Linear model_type, config true: square layers forced false") {
    adapter a = load_adapter(peft_folder(d, cfg_true, defs));
    REQUIRE(module_named(a, "transformer.h.0.attn.q").fan_in_fan_out);  // from the config until fitted
    fit_report r = fit_adapter(a, open_model(model_folder(d, base_defs, "llama")));
    CHECK_MESSAGE(r.ok(), problems_text(r));
    CHECK(module_named(a, "transformer.h.0.attn.c_attn").fan_in_fan_out);  // the layout [in, out] decides
    CHECK_FALSE(module_named(a, "transformer.h.0.attn.c_proj").fan_in_fan_out);
    CHECK_FALSE(module_named(a, "transformer.h.0.attn.q").fan_in_fan_out);
  }
  SUBCASE("no model_type, config false: non-square decides, square Conv1D-style name is ambiguous") {
    adapter a = load_adapter(peft_folder(d, cfg_false, defs));
    fit_report r = fit_adapter(a, open_model(model_folder(d, base_defs, "")));
    REQUIRE(r.problems.size() == 1);
    CHECK(r.problems[0].key == pk("transformer.h.0.attn.c_proj", "lora_A.weight"));
    CHECK(has(r.problems[0].what, "orientation ambiguous: transformer.h.0.attn.c_proj.weight is square [6, 6]"));
    CHECK(module_named(a, "transformer.h.0.attn.c_attn").fan_in_fan_out);
    CHECK_FALSE(module_named(a, "transformer.h.0.attn.q").fan_in_fan_out);
  }
  SUBCASE("no model_type, config true: the config stands for square layers") {
    adapter a = load_adapter(peft_folder(d, cfg_true, defs));
    fit_report r = fit_adapter(a, open_model(model_folder(d, base_defs, "")));
    CHECK_MESSAGE(r.ok(), problems_text(r));
    CHECK(module_named(a, "transformer.h.0.attn.c_proj").fan_in_fan_out);
    CHECK(module_named(a, "transformer.h.0.attn.q").fan_in_fan_out);
  }
  SUBCASE("a Linear base stored [out, in] with config true: forced false") {
    std::vector<tdef> linear_base = {{"transformer.h.0.attn.c_attn.weight", {18, 6}},
                                     {"transformer.h.0.attn.c_proj.weight", {6, 6}},
                                     {"transformer.h.0.attn.q.weight", {6, 6}}};
    adapter a = load_adapter(peft_folder(d, cfg_true, defs));
    fit_report r = fit_adapter(a, open_model(model_folder(d, linear_base, "mistral")));
    CHECK_MESSAGE(r.ok(), problems_text(r));
    CHECK_FALSE(module_named(a, "transformer.h.0.attn.c_attn").fan_in_fan_out);
  }
}

TEST_CASE("fit: kohya names resolved by '.' -> '_' over the base keys") {
  temp_dir d;
  write_safetensors(fs::path(d.path) / "k.safetensors",
                    {{"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", {2, 8}},
                     {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", {8, 2}},
                     {"lora_unet_conv_in.lora_down.weight", {2, 4, 3, 3}},
                     {"lora_unet_conv_in.lora_up.weight", {8, 2, 1, 1}},
                     {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", {2, 6}},
                     {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", {6, 2}}});
  SUBCASE("all found") {
    adapter a = load_adapter((fs::path(d.path) / "k.safetensors").string());
    model_files base = open_model(model_folder(d, {{"down_blocks.0.attentions.0.proj_in.weight", {8, 8}},
                                                   {"down_blocks.0.attentions.0.proj_in.bias", {8}},
                                                   {"conv_in.weight", {8, 4, 3, 3}},
                                                   {"text_model.encoder.layers.0.self_attn.q_proj.weight", {6, 6}}}));
    fit_report r = fit_adapter(a, base);
    CHECK_MESSAGE(r.ok(), problems_text(r));
    REQUIRE(a.modules.size() == 3);
    // renamed to the dotted base path and sorted again
    CHECK(a.modules[0].name == "conv_in");
    CHECK(a.modules[0].target == "conv_in.weight");
    CHECK(a.modules[0].kind == module_kind::conv);
    CHECK(a.modules[1].name == "down_blocks.0.attentions.0.proj_in");
    CHECK(a.modules[1].target == "down_blocks.0.attentions.0.proj_in.weight");
    CHECK(a.modules[2].target == "text_model.encoder.layers.0.self_attn.q_proj.weight");
    CHECK(a.modules[2].a.info->name == "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight");
  }
  SUBCASE("ambiguous and missing") {
    adapter a = load_adapter((fs::path(d.path) / "k.safetensors").string());
    model_files base = open_model(model_folder(d,
                                               {{"down_blocks.0.attentions.0.proj_in.weight", {8, 8}},
                                                {"down_blocks_0.attentions.0.proj_in.weight", {8, 8}},
                                                {"conv_in.weight", {8, 4, 3, 3}}},
                                               "", "amb"));
    fit_report r = fit_adapter(a, base);
    REQUIRE(r.problems.size() == 2);
    std::string text = problems_text(r);
    CHECK(has(text,
              "lora_unet_down_blocks_0_attentions_0_proj_in: ambiguous: matches both "
              "down_blocks.0.attentions.0.proj_in.weight and down_blocks_0.attentions.0.proj_in.weight"));
    CHECK(has(text, "lora_te_text_model_encoder_layers_0_self_attn_q_proj: no base tensor matches"));
    CHECK_FALSE(has(text, "does the adapter belong to this base model?"));  // the hint is fit_error's
    CHECK(has(fit_error("k.safetensors", "amb", r).what(), "(does the adapter belong to this base model?)"));
  }
}

TEST_CASE("fit: kohya names inside single-file checkpoint containers (as sd-scripts strips them)") {
  temp_dir d;
  write_safetensors(fs::path(d.path) / "k.safetensors",
                    {{"lora_unet_input_blocks_4_1_proj_in.lora_down.weight", {2, 8}},
                     {"lora_unet_input_blocks_4_1_proj_in.lora_up.weight", {8, 2}},
                     {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", {2, 6}},
                     {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", {12, 2}},
                     {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", {2, 6}},
                     {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", {12, 2}},
                     {"lora_unet_out.lora_down.weight", {2, 8}},
                     {"lora_unet_out.lora_up.weight", {8, 2}}});
  adapter a = load_adapter((fs::path(d.path) / "k.safetensors").string());
  model_files base = open_model(
      model_folder(d, {{"model.diffusion_model.input_blocks.4.1.proj_in.weight", {8, 8}},
                       {"conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", {12, 6}},
                       {"cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", {12, 6}},
                       // a direct match wins over the container
                       {"out.weight", {8, 8}},
                       {"model.diffusion_model.out.weight", {8, 8}}}));
  fit_report r = fit_adapter(a, base);
  CHECK_MESSAGE(r.ok(), problems_text(r));
  CHECK(module_named(a, "model.diffusion_model.input_blocks.4.1.proj_in").target ==
        "model.diffusion_model.input_blocks.4.1.proj_in.weight");
  CHECK(module_named(a, "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1").a.info->name ==
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight");
  CHECK(module_named(a, "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1").a.info->name ==
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight");
  CHECK(module_named(a, "out").target == "out.weight");

  // a container applies to its own prefix only: lora_te2_ does not look in the te1 container
  write_safetensors(fs::path(d.path) / "k2.safetensors",
                    {{"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", {2, 6}},
                     {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", {12, 2}}});
  adapter b = load_adapter((fs::path(d.path) / "k2.safetensors").string());
  fit_report r2 = fit_adapter(b, base);
  REQUIRE(r2.problems.size() == 1);
  CHECK(has(r2.problems[0].what, "no base tensor matches lora_te2_text_model_encoder_layers_0_mlp_fc1"));
}

TEST_CASE("fit: kohya 1x1 conv LoRA on a Linear base and 2-D LoRA on a 1x1 conv base") {
  temp_dir d;
  write_safetensors(fs::path(d.path) / "k.safetensors", {{"lora_unet_proj_in.lora_down.weight", {2, 8, 1, 1}},
                                                         {"lora_unet_proj_in.lora_up.weight", {6, 2, 1, 1}},
                                                         {"lora_unet_proj_out.lora_down.weight", {2, 6}},
                                                         {"lora_unet_proj_out.lora_up.weight", {8, 2}}});
  adapter a = load_adapter((fs::path(d.path) / "k.safetensors").string());
  REQUIRE(module_named(a, "lora_unet_proj_in").kind == module_kind::conv);
  REQUIRE(module_named(a, "lora_unet_proj_out").kind == module_kind::linear);
  model_files base = open_model(model_folder(d, {{"proj_in.weight", {6, 8}}, {"proj_out.weight", {8, 6, 1, 1}}}));
  fit_report r = fit_adapter(a, base);
  CHECK_MESSAGE(r.ok(), problems_text(r));
  CHECK(module_named(a, "proj_in").kind == module_kind::linear);
  CHECK(module_named(a, "proj_out").kind == module_kind::conv);
}

TEST_CASE("fit: two modules on one target") {
  temp_dir d;
  write_safetensors(fs::path(d.path) / "k.safetensors", {{"lora_te1_text_model_q.lora_down.weight", {2, 6}},
                                                         {"lora_te1_text_model_q.lora_up.weight", {6, 2}},
                                                         {"lora_te2_text_model_q.lora_down.weight", {2, 6}},
                                                         {"lora_te2_text_model_q.lora_up.weight", {6, 2}}});
  adapter a = load_adapter((fs::path(d.path) / "k.safetensors").string());
  fit_report r = fit_adapter(a, open_model(model_folder(d, {{"text_model.q.weight", {6, 6}}})));
  REQUIRE(r.problems.size() == 1);
  CHECK(r.problems[0].key == "lora_te2_text_model_q.lora_down.weight");
  CHECK(r.problems[0].what == "text_model.q.weight is also the target of lora_te1_text_model_q.lora_down.weight");
}

// ---------------------------------------------------------------------------
// the real gradience adapter (PEFT, GPT-2 Conv1D, config fan_in_fan_out false)

TEST_CASE("the real gradience tiny LoRA loads and fits a synthetic GPT-2 base") {
  const fs::path folder = fs::path(fixtures_dir()) / "gradience_tiny_lora";
  if (fixtures_dir().empty() || !fs::exists(folder / "adapter_model.safetensors")) {
    MESSAGE("fixture absent, skipped: " << folder.string());
    return;
  }
  adapter a = load_adapter(folder.string());
  CHECK(a.format == adapter_format::peft);
  REQUIRE(a.config);
  CHECK_FALSE(a.config->fan_in_fan_out);
  CHECK(a.config->target_modules == std::vector<std::string>{"c_attn", "c_proj"});
  CHECK(a.modules.size() == 12);
  CHECK(a.saved.empty());
  for (const lora_module& m : a.modules) {
    CHECK(m.rank == 8);
    CHECK(m.alpha == 16.0);
    CHECK(m.scale == 2.0);
    CHECK(m.kind == module_kind::linear);
  }
  CHECK(a.modules[0].name == "transformer.h.0.attn.c_attn");

  // a GPT-2 base: Conv1D weights stored [in, out]
  temp_dir d;
  std::vector<tdef> base_defs;
  std::vector<int> layers;
  for (const lora_module& m : a.modules) {
    int64_t in = m.a.info->shape[1];
    int64_t out = m.b.info->shape[0];
    base_defs.push_back({m.target, {in, out}});
  }
  model_files base = open_model(model_folder(d, base_defs, "gpt2"));
  fit_report r = fit_adapter(a, base);
  CHECK_MESSAGE(r.ok(), problems_text(r));
  for (const lora_module& m : a.modules) {
    CAPTURE(m.name);
    CHECK(m.fan_in_fan_out);
  }

  // without config.json the square c_proj cannot be told apart: refused
  adapter b = load_adapter(folder.string());
  fit_report r2 = fit_adapter(b, open_model(model_folder(d, base_defs, "", "no-config")));
  CHECK(r2.problems.size() == 6);
  for (const fit_problem& p : r2.problems) CHECK(has(p.what, "orientation ambiguous"));
  CHECK(module_named(b, "transformer.h.0.attn.c_attn").fan_in_fan_out);
}

TEST_CASE("fit_error: one rendering, the count, the first problem, one hint") {
  const fit_problem shape{"a.lora_A.weight", "base a.weight is [4, 4], the LoRA makes [4, 5]", fit_issue::shape};
  const fit_problem gone{"b.lora_A.weight", "the base has no tensor b.weight", fit_issue::no_base_tensor};
  const fit_problem turn{"c.lora_A.weight", "orientation ambiguous: c.weight is square [6, 6]", fit_issue::orientation};
  const fit_problem both{"lora_unet_x", "ambiguous: matches both x.weight and x_.weight", fit_issue::ambiguous};
  const std::string hint = " (does the adapter belong to this base model?)";

  lora::error one = fit_error("ad", "base", {{shape}});
  CHECK(one.code() == exit_code::invalid_input);
  CHECK(one.file() == "ad");
  CHECK(one.tensor().empty());
  CHECK(one.detail() ==
        "does not fit base: 1 problem: a.lora_A.weight: base a.weight is [4, 4], the LoRA makes [4, 5]" + hint);

  // several problems: the count and the first; the hint once, from any of them
  lora::error two = fit_error("ad", "base", {{turn, gone}});
  CHECK(two.detail() ==
        "does not fit base: 2 problems, first c.lora_A.weight: orientation ambiguous: c.weight is square [6, 6]" +
            hint);

  // an orientation problem alone: its own hint; an ambiguity alone: none
  CHECK(has(fit_error("ad", "base", {{turn}}).detail(),
            "(set fan_in_fan_out in adapter_config.json, or give the base a config.json with its model_type)"));
  CHECK(fit_error("ad", "base", {{both}}).detail() ==
        "does not fit base: 1 problem: lora_unet_x: ambiguous: matches both x.weight and x_.weight");
}

TEST_CASE("alpha_for_scale inverts lora_scale") {
  CHECK(alpha_for_scale(0.5, 8, false) == 4.0);
  CHECK(alpha_for_scale(2.0, 16, true) == 8.0);
  for (bool rs : {false, true})
    for (int64_t r : {1, 3, 64})
      CHECK(lora_scale(alpha_for_scale(1.25, r, rs), r, rs) == doctest::Approx(1.25).epsilon(1e-15));
}

TEST_CASE("kohya names: one prefix rule for extract and convert") {
  CHECK(kohya::auto_prefix({"transformer_blocks.0.attn.to_q"}) == "lora_unet_");
  CHECK(kohya::auto_prefix({"model.diffusion_model.input_blocks.1.1.proj_in"}) == "lora_unet_");
  CHECK(kohya::auto_prefix({"text_model.encoder.layers.0.self_attn.q_proj", "down_blocks.0.resnets.0.conv1"}) ==
        "lora_unet_");
  CHECK(kohya::auto_prefix({"model.layers.0.self_attn.q_proj"}) == "lora_te_");
  CHECK(kohya::resolve_prefix("lora_te2_", {"transformer_blocks.0.x"}) == "lora_te2_");
  CHECK_THROWS_WITH(
      kohya::resolve_prefix("lora_x_", {}),
      doctest::Contains(
          "--kohya-prefix lora_x_ is not one of auto, lora_unet_, lora_te_, lora_te1_, lora_te2_, lora_te3_"));
  CHECK(kohya::module_name("transformer_blocks.0.attn.to_q", "lora_unet_") ==
        "lora_unet_transformer_blocks_0_attn_to_q");
  CHECK(kohya::module_name("lora_te1_text_model_q", "lora_unet_") == "lora_te1_text_model_q");
  CHECK(kohya::prefix_of("lora_te1_x") == "lora_te1_");
  CHECK(kohya::prefix_of("lora_tex") == "");
}

TEST_CASE("saved_shape_ok: same shape, or an embedding / head with more rows") {
  const std::vector<int64_t> base{256, 64};
  CHECK(saved_shape_ok("model.embed_tokens.weight", base, {256, 64}));
  CHECK(saved_shape_ok("model.embed_tokens.weight", base, {260, 64}));
  CHECK(saved_shape_ok("lm_head.weight", base, {260, 64}));
  CHECK(saved_shape_ok("transformer.wte.weight", base, {300, 64}));
  CHECK_FALSE(saved_shape_ok("model.embed_tokens.weight", base, {250, 64}));
  CHECK_FALSE(saved_shape_ok("model.embed_tokens.weight", base, {256, 65}));
  CHECK_FALSE(saved_shape_ok("model.layers.0.self_attn.q_proj.weight", {64, 64}, {68, 64}));
  CHECK_FALSE(saved_shape_ok("model.embed_tokens.bias", {256}, {260}));
}

TEST_CASE("tied_head_source: a tied base's missing lm_head reads the embedding") {
  const model_files tied = open_model(std::string(LORA_SOURCE_DIR) + "/testdata/tiny-llama-tied");
  CHECK(tied_head_source(tied, "lm_head.weight") == std::optional<std::string>("model.embed_tokens.weight"));
  CHECK_FALSE(tied_head_source(tied, "score.weight"));
  CHECK_FALSE(tied_head_source(tied, "lm_head.bias"));
  const model_files untied = open_model(std::string(LORA_SOURCE_DIR) + "/testdata/tiny-llama");
  CHECK_FALSE(tied_head_source(untied, "lm_head.weight"));
}

// ---------------------------------------------------------------------------
// target_parameters and trainable_token_indices

TEST_CASE("PEFT target_parameters: nested ParamWrapper keys resolved in registration order, r per expert") {
  temp_dir d;
  const std::string experts = "model.layers.0.mlp.experts";
  // gate_up_proj [E=4, 8, 12] (gpt-oss [E, in, out]) innermost, down_proj [4, 6, 8] outside it
  auto defs = join(peft_linear(experts + ".base_layer", 2 * 4, 8, 12), peft_linear(experts, 3 * 4, 6, 8));
  const std::string tp = R"("target_parameters": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])";
  adapter a = load_adapter(peft_folder(d, config(tp + R"(, "rank_pattern": {"down_proj": 3}, "use_rslora": true)"), defs));
  REQUIRE(a.modules.size() == 2);
  const lora_module& down = module_named(a, experts + ".down_proj");
  const lora_module& gate_up = module_named(a, experts + ".gate_up_proj");
  CHECK(down.kind == module_kind::parameter);
  CHECK(down.target == experts + ".down_proj");
  CHECK(down.a.info->name == pk(experts, "lora_A.weight"));
  CHECK(gate_up.a.info->name == pk(experts + ".base_layer", "lora_A.weight"));
  CHECK(down.rank == 3);
  CHECK(down.n_experts == 4);
  CHECK(gate_up.rank == 4);  // config r
  CHECK(gate_up.n_experts == 2);
  CHECK(gate_up.scale == doctest::Approx(8.0 / 2.0));  // rsLoRA: alpha / sqrt(r)

  // fit: the base's shapes decide [E, in, out] vs [E, out, in]
  temp_dir b;
  adapter one = load_adapter(peft_folder(d, config(R"("target_parameters": ["experts.gate_up_proj"])"),
                                         peft_linear(experts, 2 * 4, 8, 12), "one"));  // r 4: 2 experts
  const std::string gpt = model_folder(b, {{experts + ".gate_up_proj", {2, 8, 12}}}, "gpt_oss", "gpt");
  fit_report r = fit_adapter(one, open_model(gpt));
  CHECK(r.ok());
  CHECK(one.modules[0].fan_in_fan_out);
  const std::string qwen = model_folder(b, {{experts + ".gate_up_proj", {2, 12, 8}}}, "qwen3_moe", "qwen");
  r = fit_adapter(one, open_model(qwen));
  CHECK(r.ok());
  CHECK_FALSE(one.modules[0].fan_in_fan_out);
  const std::string other = model_folder(b, {{experts + ".gate_up_proj", {2, 12, 9}}}, "qwen3_moe", "other");
  r = fit_adapter(one, open_model(other));
  REQUIRE(r.problems.size() == 1);
  CHECK(has(r.problems[0].what, "is [2, 12, 9], the lora.ParamWrapper factors"));
  const std::string none = model_folder(b, {{"model.embed_tokens.weight", {4, 8}}}, "llama", "none");
  r = fit_adapter(one, open_model(none));
  REQUIRE(r.problems.size() == 1);
  CHECK(has(r.problems[0].what, "the base has no parameter model.layers.0.mlp.experts.gate_up_proj"));

  // refusals at load: nested keys without target_parameters, wrappers that cannot be told apart
  CHECK(has(thrown([&] { (void)load_adapter(peft_folder(d, config(), defs, "bare")); }).what(),
            "nested lora.ParamWrapper keys (.base_layer)"));
  CHECK(has(thrown([&] {
              (void)load_adapter(peft_folder(d, config(tp), peft_linear(experts, 8, 8, 12), "count"));
            }).what(),
            "holds 1 lora.ParamWrapper(s), but"));
  CHECK(has(thrown([&] {
              (void)load_adapter(peft_folder(d, config(tp + R"(, "use_dora": true)"), defs, "dora"));
            }).what(),
            "use_dora: true, but PEFT's lora.ParamWrapper"));
}

TEST_CASE("PEFT trainable_token_indices: list and dict forms, counts, duplicates") {
  temp_dir d;
  const std::string key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
  adapter a = load_adapter(peft_folder(d, config(R"("trainable_token_indices": [7, 2, 5])"), {{key, {3, 8}}}, "l"));
  REQUIRE(a.tokens.size() == 1);
  CHECK(a.tokens[0].target == "model.embed_tokens.weight");
  CHECK(a.tokens[0].indices == std::vector<int64_t>{7, 2, 5});
  CHECK(a.modules.empty());
  auto defs = join(peft_linear("model.layers.0.self_attn.q_proj", 4, 8, 8),
                   {{key, {2, 8}}, {"base_model.model.lm_head.token_adapter.trainable_tokens_delta", {1, 8}}});
  adapter b = load_adapter(peft_folder(
      d, config(R"("trainable_token_indices": {"embed_tokens": [1, 3], "lm_head": [0]})"), defs, "dict"));
  REQUIRE(b.tokens.size() == 2);
  CHECK(b.tokens[0].target == "lm_head.weight");
  CHECK(b.tokens[1].indices == std::vector<int64_t>{1, 3});
  CHECK(b.modules.size() == 1);
  CHECK(has(thrown([&] {
              (void)load_adapter(peft_folder(d, config(R"("trainable_token_indices": [1, 2])"), {{key, {3, 8}}}, "n"));
            }).what(),
            "expected [2, dim] (trainable_token_indices lists 2 tokens)"));
  CHECK(has(thrown([&] {
              (void)load_adapter(peft_folder(d, config(R"("trainable_token_indices": [1, 1])"), {{key, {2, 8}}}, "u"));
            }).what(),
            "token index 1 is listed twice"));
  CHECK(has(thrown([&] { (void)load_adapter(peft_folder(d, config(), {{key, {2, 8}}}, "c")); }).what(),
            "has no trainable_token_indices"));

  // fit: range, width, a LoRA on the same embedding
  temp_dir bd;
  const std::string base = model_folder(bd, {{"model.embed_tokens.weight", {6, 8}}}, "llama");
  CHECK(fit_adapter(a, open_model(base)).problems.size() == 1);  // index 7 of 6 rows
  CHECK(has(problems_text(fit_adapter(a, open_model(base))), "token index 7 is out of range"));
}
