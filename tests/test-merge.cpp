// core/merge: merged models against a double-precision reference computed
// here, index by index, from the raw adapter tensors (not through
// core/delta). Tolerances: 16-bit outputs equal the once-rounded reference
// (f64_to_bf16 / f64_to_f16) in at least 99.99% of elements and are never
// more than 1 ulp off; f32 outputs are within 1e-6 of the reference relative
// to |W0| + the sum of |terms|; untouched tensors are bit-identical.
#include <doctest/doctest.h>

#include <sys/resource.h>

#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <functional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/adapter.h"
#include "core/merge.h"
#include "formats/error.h"
#include "formats/file-io.h"
#include "formats/model-files.h"
#include "tests/merge-testing.h"

using namespace lora;
using namespace lora::testing;
namespace fs = std::filesystem;

namespace {

const std::string testdata = std::string(LORA_SOURCE_DIR) + "/testdata";

// ------------------------------------------------------------ reference

struct reference {
  std::map<std::string, std::vector<double>> value;  // expected values of every changed tensor
  std::map<std::string, std::vector<double>> bound;  // |W0| + sum |terms| (f32 tolerance)
};

std::vector<double> decode(const tensor_ref& t) {
  std::vector<double> v(t.info->n_elements);
  to_f64(t.info->type, t.data(), v);
  return v;
}

// Applies one module to W (and its bound), from A and B directly:
// BA[o, j] = sum_k B[o, k] A[k, j]; placed as W[o, j] (linear, conv) or
// W[j, o] (fan_in_fan_out, embedding); DoRA rescales per output feature.
void reference_module(const lora_module& m, double weight, std::vector<double>& w, std::vector<double>& bound) {
  const std::vector<double> a = decode(m.a), b = decode(m.b);
  const size_t r = static_cast<size_t>(m.a.info->shape[0]);
  const size_t out = static_cast<size_t>(m.b.info->shape[0]);
  const size_t k = a.size() / r;
  REQUIRE(w.size() == out * k);
  const bool transposed = m.kind == module_kind::embedding || m.fan_in_fan_out;
  const double s = weight * m.scale;
  std::vector<double> term(w.size()), abs_term(w.size());
  for (size_t o = 0; o < out; ++o)
    for (size_t j = 0; j < k; ++j) {
      double acc = 0, abs_acc = 0;
      for (size_t q = 0; q < r; ++q) {
        acc += b[o * r + q] * a[q * k + j];
        abs_acc += std::fabs(b[o * r + q] * a[q * k + j]);
      }
      const size_t at = transposed ? j * out + o : o * k + j;
      term[at] = s * acc;
      abs_term[at] = std::fabs(s) * abs_acc;
    }
  for (size_t i = 0; i < w.size(); ++i) {
    w[i] += term[i];
    bound[i] += abs_term[i];
  }
  if (!m.dora) return;
  // W = m / ||V|| V, norm per output feature: rows [out, k], or columns of [k, out]
  const std::vector<double> mag = decode(*m.magnitude);
  REQUIRE(mag.size() == out);
  for (size_t o = 0; o < out; ++o) {
    double sq = 0;
    for (size_t j = 0; j < k; ++j) {
      const double v = w[transposed ? j * out + o : o * k + j];
      sq += v * v;
    }
    const double factor = mag[o] / std::sqrt(sq);
    for (size_t j = 0; j < k; ++j) {
      const size_t at = transposed ? j * out + o : o * k + j;
      w[at] *= factor;
      bound[at] *= std::fabs(factor);
    }
  }
}

// The expected merged model: W0 (or the modules_to_save replacement), then
// every adapter in order.
reference reference_merge(const model_files& base, const std::vector<std::pair<const adapter*, double>>& adapters,
                          double scale = 1.0) {
  reference ref;
  auto start = [&](const std::string& name) -> std::vector<double>& {
    auto it = ref.value.find(name);
    if (it != ref.value.end()) return it->second;
    std::vector<double> w0 = decode(base.at(name));
    std::vector<double> bound(w0.size());
    for (size_t i = 0; i < w0.size(); ++i) bound[i] = std::fabs(w0[i]);
    ref.bound[name] = std::move(bound);
    return ref.value[name] = std::move(w0);
  };
  for (const auto& [a, weight] : adapters)
    for (const saved_tensor& s : a->saved) {
      std::vector<double>& w = start(s.target);
      w = decode(s.tensor);
      for (size_t i = 0; i < w.size(); ++i) ref.bound[s.target][i] = std::fabs(w[i]);
    }
  for (const auto& [a, weight] : adapters)
    for (const lora_module& m : a->modules) {
      std::vector<double>& w = start(m.target);
      reference_module(m, weight * scale, w, ref.bound[m.target]);
      if (m.bias) {
        const std::string bias_name = m.name + ".bias";
        std::vector<double>& bw = start(bias_name);
        const std::vector<double> b = decode(*m.bias);
        for (size_t i = 0; i < bw.size(); ++i) {
          bw[i] += weight * scale * m.scale * b[i];
          ref.bound[bias_name][i] += std::fabs(weight * scale * m.scale * b[i]);
        }
      }
    }
  return ref;
}

// ------------------------------------------------------------ comparison

struct comparison {
  uint64_t n_changed = 0;    // elements of changed (or converted) tensors
  uint64_t n_off = 0;        // not equal to the once-rounded reference
  uint64_t max_ulp = 0;      // 16-bit outputs
  double max_rel = 0;        // f32 outputs: |got - want| / bound
  uint64_t n_untouched = 0;  // tensors expected bit-identical
  uint64_t n_identical = 0;
  uint64_t n_changed_tensors = 0;
};

// Compares every tensor of the merged model at `out` with the base and the
// reference. `out_type`: the --dtype given (nullopt: same).
comparison compare_output(const std::string& out, const model_files& base, const reference& ref,
                          std::optional<dtype> out_type = std::nullopt) {
  comparison c;
  model_files merged = open_model(out);
  REQUIRE(merged.tensor_names.size() == base.tensor_names.size());
  for (const std::string& name : base.tensor_names) {
    const tensor_ref b = base.at(name);
    const tensor_ref m = merged.at(name);
    CHECK(m.info->shape == b.info->shape);
    const dtype want_type = out_type && dtype_is_math(b.info->type) ? *out_type : b.info->type;
    CHECK(m.info->type == want_type);
    auto it = ref.value.find(name);
    if (it == ref.value.end() && want_type == b.info->type) {
      ++c.n_untouched;
      auto x = b.data(), y = m.data();
      if (x.size() == y.size() && std::equal(x.begin(), x.end(), y.begin())) ++c.n_identical;
      continue;
    }
    ++c.n_changed_tensors;
    std::vector<double> want = it != ref.value.end() ? it->second : decode(b);
    std::vector<double> bound;
    if (auto bt = ref.bound.find(name); bt != ref.bound.end())
      bound = bt->second;
    else
      for (double v : want) bound.push_back(std::fabs(v));
    const std::span<const uint8_t> got = m.data();
    for (size_t i = 0; i < want.size(); ++i) {
      ++c.n_changed;
      if (want_type == dtype::BF16 || want_type == dtype::F16) {
        uint16_t g;
        std::memcpy(&g, got.data() + 2 * i, 2);
        const uint16_t w = want_type == dtype::BF16 ? f64_to_bf16(want[i]) : f64_to_f16(want[i]);
        if (g != w) {
          ++c.n_off;
          c.max_ulp = std::max<uint64_t>(c.max_ulp, static_cast<uint64_t>(ulp_distance16(g, w)));
        }
      } else {
        REQUIRE(want_type == dtype::F32);
        float g;
        std::memcpy(&g, got.data() + 4 * i, 4);
        const double err = std::fabs(static_cast<double>(g) - want[i]);
        if (static_cast<double>(g) != static_cast<double>(static_cast<float>(want[i]))) ++c.n_off;
        c.max_rel = std::max(c.max_rel, err / std::max(bound[i], 1e-30));
      }
    }
  }
  return c;
}

// The tolerances stated at the top of this file.
void check_tolerances(const comparison& c, dtype type, const char* what) {
  MESSAGE(std::string(what) << ": " << c.n_off << " of " << c.n_changed
                            << " elements off the once-rounded reference, max ulp " << c.max_ulp << ", max rel "
                            << c.max_rel);
  INFO(std::string(what) << ": " << c.n_off << " of " << c.n_changed << " elements off, max ulp " << c.max_ulp
                         << ", max rel " << c.max_rel);
  CHECK(c.n_changed > 0);
  CHECK(c.n_identical == c.n_untouched);
  if (type == dtype::F32) {
    CHECK(c.max_rel <= 1e-6);
  } else {
    CHECK(c.n_off * 10000 <= c.n_changed);
    CHECK(c.max_ulp <= 1);
  }
}

// ------------------------------------------------------------ running

merge_report run(const std::string& base, const std::vector<merge_input>& adapters, const std::string& out,
                 double scale = 1.0, std::optional<dtype> out_type = std::nullopt) {
  merge_options o;
  o.base = base;
  o.adapters = adapters;
  o.out = out;
  o.scale = scale;
  o.out_type = out_type;
  o.threads = 2;
  return merge_model(o);
}

// Loads and fits an adapter the way merge does (for the reference).
adapter fitted(const std::string& path, const model_files& base) {
  adapter a = load_adapter(path);
  fit_report r = fit_adapter(a, base);
  REQUIRE(r.ok());
  return a;
}

// Nothing named out or out.tmp-* exists in the folder.
bool nothing_left(const temp_dir& dir, const std::string& out_name) {
  for (const auto& e : fs::directory_iterator(dir.path))
    if (e.path().filename().string().rfind(out_name, 0) == 0) return false;
  return true;
}

void write_peft_adapter(const std::string& dir, const nlohmann::json& config, const std::vector<test_tensor>& tensors) {
  fs::create_directories(dir);
  write_text(dir + "/adapter_config.json", config.dump(2));
  write_safetensors(dir + "/adapter_model.safetensors", tensors);
}

nlohmann::json peft_config_json(int r, double alpha, std::vector<std::string> targets) {
  return {{"peft_type", "LORA"},
          {"r", r},
          {"lora_alpha", alpha},
          {"target_modules", targets},
          {"fan_in_fan_out", false},
          {"use_dora", false},
          {"use_rslora", false},
          {"lora_bias", false},
          {"task_type", "CAUSAL_LM"},
          {"modules_to_save", nullptr},
          {"rank_pattern", nlohmann::json::object()},
          {"alpha_pattern", nlohmann::json::object()}};
}

void check_single_adapter(const std::string& base_name, const std::string& adapter_name, dtype type) {
  temp_dir dir;
  const std::string base_path = testdata + "/" + base_name;
  const std::string adapter_path = testdata + "/" + adapter_name;
  merge_report r = run(base_path, {{adapter_path, 1.0}}, dir / "out");
  model_files base = open_model(base_path);
  adapter a = fitted(adapter_path, base);
  reference ref = reference_merge(base, {{&a, 1.0}});
  comparison c = compare_output(dir / "out", base, ref);
  check_tolerances(c, type, (base_name + " + " + adapter_name).c_str());
  CHECK(r.n_merged == ref.value.size() - a.saved.size());
  CHECK(r.n_tensors == base.tensor_names.size());
  CHECK(c.n_untouched + c.n_changed_tensors == base.tensor_names.size());
  CHECK(c.n_untouched > 0);
}

}  // namespace

TEST_CASE("bf16 single file: W0 + s B A rounded once") {
  check_single_adapter("tiny-llama", "lora-tiny-llama", dtype::BF16);
}

TEST_CASE("f32 single file, and the other files of the folder are copied") {
  check_single_adapter("tiny-llama-f32", "lora-tiny-llama", dtype::F32);
  temp_dir dir;
  run(testdata + "/tiny-llama", {{testdata + "/lora-tiny-llama", 1.0}}, dir / "out");
  for (const char* f : {"config.json", "generation_config.json"})
    CHECK(read_text_file(dir / ("out/" + std::string(f))) == read_text_file(testdata + "/tiny-llama/" + f));
  // base metadata kept, provenance added
  safetensors_file merged(dir / "out/model.safetensors");
  REQUIRE(merged.metadata());
  CHECK(merged.metadata()->at("format") == "pt");
  CHECK(merged.metadata()->at("lora.adapters") == "1");
  CHECK(merged.metadata()->at("lora.scale") == "1");
  CHECK(merged.metadata()->contains("lora.adapter.0.path_fnv1a64"));
  CHECK(merged.metadata()->at("lora.tool").find("lora ") == 0);
}

TEST_CASE("f16 sharded: same shards, fresh index") {
  check_single_adapter("tiny-llama-f16-sharded", "lora-tiny-llama", dtype::F16);
  temp_dir dir;
  run(testdata + "/tiny-llama-f16-sharded", {{testdata + "/lora-tiny-llama", 1.0}}, dir / "out");
  model_files base = open_model(testdata + "/tiny-llama-f16-sharded");
  model_files merged = open_model(dir / "out");
  CHECK(merged.shard_names == base.shard_names);
  CHECK(merged.index_total_size == base.index_total_size);
  for (const auto& name : base.tensor_names)
    CHECK(fs::path(merged.at(name).file->path()).filename() == fs::path(base.at(name).file->path()).filename());
}

TEST_CASE("DoRA: W = m / ||W0 + s B A||_row (W0 + s B A)") {
  check_single_adapter("tiny-llama", "lora-tiny-llama-dora", dtype::BF16);
  check_single_adapter("tiny-llama-f32", "lora-tiny-llama-dora", dtype::F32);
}

TEST_CASE("rsLoRA with rank and alpha patterns, .default. keys, BF16 adapter") {
  model_files base = open_model(testdata + "/tiny-llama");
  adapter a = fitted(testdata + "/lora-tiny-llama-patterns", base);
  // the scales testdata/README.md states, as load_adapter computed them
  for (const lora_module& m : a.modules) {
    double want = 8.0 / std::sqrt(4.0);
    if (m.name.find("q_proj") != std::string::npos) want = 8.0 / std::sqrt(8.0);
    if (m.name.find("v_proj") != std::string::npos) want = 32.0 / std::sqrt(4.0);
    if (m.name == "model.layers.1.mlp.down_proj") want = 8.0 / std::sqrt(2.0);
    CHECK_MESSAGE(m.scale == doctest::Approx(want), m.name);
  }
  check_single_adapter("tiny-llama", "lora-tiny-llama-patterns", dtype::BF16);
  check_single_adapter("tiny-llama-f32", "lora-tiny-llama-patterns", dtype::F32);
}

TEST_CASE("embedding LoRA and modules_to_save") {
  check_single_adapter("tiny-llama", "lora-tiny-llama-extras", dtype::BF16);
  check_single_adapter("tiny-llama-f32", "lora-tiny-llama-extras", dtype::F32);
  // lm_head is the adapter's saved tensor, byte for byte (same dtype)
  temp_dir dir;
  merge_report r = run(testdata + "/tiny-llama-f32", {{testdata + "/lora-tiny-llama-extras", 1.0}}, dir / "out");
  CHECK(r.n_replaced == 1);
  safetensors_file merged(dir / "out/model.safetensors");
  safetensors_file saved(testdata + "/lora-tiny-llama-extras/adapter_model.safetensors");
  auto x = merged.data(merged.at("lm_head.weight"));
  auto y = saved.data(saved.at("base_model.model.lm_head.weight"));
  CHECK(std::equal(x.begin(), x.end(), y.begin(), y.end()));
}

TEST_CASE("lora_bias: bias + s b") { check_single_adapter("tiny-qwen2", "lora-tiny-qwen2-bias", dtype::F32); }

TEST_CASE("kohya conv (3x3, 1x1) and linear on a UNet") {
  check_single_adapter("tiny-unet", "lora-tiny-unet-kohya.safetensors", dtype::F32);
  // the merged conv really changed
  temp_dir dir;
  run(testdata + "/tiny-unet", {{testdata + "/lora-tiny-unet-kohya.safetensors", 1.0}}, dir / "out");
  safetensors_file base(testdata + "/tiny-unet/model.safetensors");
  safetensors_file merged(dir / "out/model.safetensors");
  const std::string conv = "down_blocks.0.resnets.0.conv1.weight";
  CHECK(read_f64(base, conv) != read_f64(merged, conv));
}

TEST_CASE("kohya file and PEFT folder with the same A, B give the same tensors") {
  temp_dir dir;
  run(testdata + "/tiny-llama", {{testdata + "/lora-tiny-llama", 1.0}}, dir / "peft");
  run(testdata + "/tiny-llama", {{testdata + "/lora-tiny-llama-kohya.safetensors", 1.0}}, dir / "kohya");
  safetensors_file p(dir / "peft/model.safetensors"), k(dir / "kohya/model.safetensors");
  REQUIRE(p.tensors().size() == k.tensors().size());
  for (const tensor_info& t : p.tensors()) {
    auto x = p.data(t), y = k.data(k.at(t.name));
    CHECK_MESSAGE(std::equal(x.begin(), x.end(), y.begin(), y.end()), t.name);
  }
}

TEST_CASE("tied embeddings: an embedding LoRA on a model without lm_head") {
  temp_dir dir;
  const std::string base_path = testdata + "/tiny-llama-tied";
  model_files base = open_model(base_path);
  REQUIRE_FALSE(base.find("lm_head.weight"));
  nlohmann::json cfg = peft_config_json(4, 4, {"embed_tokens", "q_proj"});
  write_peft_adapter(
      dir / "adapter", cfg,
      {random_tensor("base_model.model.model.embed_tokens.lora_embedding_A", dtype::F32, {4, 256}, 71),
       random_tensor("base_model.model.model.embed_tokens.lora_embedding_B", dtype::F32, {64, 4}, 72),
       random_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", dtype::F32, {4, 64}, 73),
       random_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", dtype::F32, {64, 4}, 74)});
  run(base_path, {{dir / "adapter", 1.0}}, dir / "out");
  adapter a = fitted(dir / "adapter", base);
  reference ref = reference_merge(base, {{&a, 1.0}});
  CHECK(ref.value.contains("model.embed_tokens.weight"));
  comparison c = compare_output(dir / "out", base, ref);
  check_tolerances(c, dtype::F32, "tied");
  model_files merged = open_model(dir / "out");
  CHECK_FALSE(merged.find("lm_head.weight"));
}

TEST_CASE("tied embeddings: a LoRA on lm_head gives the merged model its own head") {
  temp_dir dir;
  const std::string base_path = testdata + "/tiny-llama-tied";
  model_files base = open_model(base_path);
  const test_tensor a = random_tensor("base_model.model.lm_head.lora_A.weight", dtype::F32, {4, 64}, 81);
  const test_tensor b = random_tensor("base_model.model.lm_head.lora_B.weight", dtype::F32, {256, 4}, 82);
  write_peft_adapter(dir / "adapter", peft_config_json(4, 8, {"lm_head"}), {a, b});
  const merge_report r = run(base_path, {{dir / "adapter", 1.0}}, dir / "out");
  CHECK(r.added == std::vector<std::string>{"lm_head.weight"});
  CHECK(r.config_changes == std::vector<std::string>{"tie_word_embeddings: false"});
  // lm_head = E + (8 / 4) B A, rounded once to F32; the embedding untouched
  model_files merged = open_model(dir / "out");
  const std::vector<double> e = read_f64(base.shards[0], "model.embed_tokens.weight");
  const std::vector<double> h = read_f64(merged.shards[0], "lm_head.weight");
  REQUIRE(h.size() == e.size());
  size_t n_bad = 0;
  for (size_t o = 0; o < 256; ++o)
    for (size_t i = 0; i < 64; ++i) {
      double d = 0, bound = 0;
      for (size_t k = 0; k < 4; ++k) {
        d += b.values[o * 4 + k] * a.values[k * 64 + i];
        bound += std::fabs(b.values[o * 4 + k] * a.values[k * 64 + i]);
      }
      const double want = e[o * 64 + i] + 2 * d;
      n_bad += std::fabs(h[o * 64 + i] - want) > 1e-6 * (std::fabs(e[o * 64 + i]) + 2 * bound);
    }
  CHECK(n_bad == 0);
  CHECK(read_f64(merged.shards[0], "model.embed_tokens.weight") == e);
  const nlohmann::json cfg = nlohmann::json::parse(read_text_file(dir / "out/config.json"));
  CHECK(cfg["tie_word_embeddings"] == false);
  CHECK(cfg["vocab_size"] == 256);
}

TEST_CASE("modules_to_save: a new head is added, added tokens grow the vocabulary, others refused") {
  temp_dir dir;
  const std::string base_path = testdata + "/tiny-llama-tied";
  nlohmann::json cfg = peft_config_json(4, 8, {"q_proj"});
  const test_tensor qa =
      random_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", dtype::F32, {4, 64}, 91);
  const test_tensor qb =
      random_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", dtype::F32, {64, 4}, 92);
  write_peft_adapter(dir / "seqcls", cfg,
                     {qa, qb, random_tensor("base_model.model.score.weight", dtype::F32, {2, 64}, 93)});
  merge_report r = run(base_path, {{dir / "seqcls", 1.0}}, dir / "out-seqcls");
  CHECK(r.added == std::vector<std::string>{"score.weight"});
  CHECK(r.config_changes.empty());
  CHECK(open_model(dir / "out-seqcls").find("score.weight"));

  write_peft_adapter(dir / "tokens", cfg,
                     {qa, qb, random_tensor("base_model.model.model.embed_tokens.weight", dtype::F32, {260, 64}, 94)});
  r = run(base_path, {{dir / "tokens", 1.0}}, dir / "out-tokens");
  CHECK(r.n_replaced == 1);
  CHECK(r.config_changes == std::vector<std::string>{"vocab_size: 260"});
  CHECK(open_model(dir / "out-tokens").at("model.embed_tokens.weight").info->shape == std::vector<int64_t>{260, 64});

  write_peft_adapter(dir / "cols", cfg,
                     {qa, qb, random_tensor("base_model.model.model.embed_tokens.weight", dtype::F32, {256, 65}, 95)});
  CHECK_THROWS_WITH(run(base_path, {{dir / "cols", 1.0}}, dir / "out-cols"),
                    doctest::Contains("base model.embed_tokens.weight is [256, 64], the saved module is [256, 65]"));
  CHECK_FALSE(std::filesystem::exists(dir / "out-cols"));
}

TEST_CASE("two adapters with weights and --scale sum their deltas") {
  temp_dir dir;
  const std::string base_path = testdata + "/tiny-llama";
  merge_report r =
      run(base_path, {{testdata + "/lora-tiny-llama", 0.7}, {testdata + "/lora-tiny-llama-patterns", -0.3}},
          dir / "out", 1.5);
  model_files base = open_model(base_path);
  adapter a = fitted(testdata + "/lora-tiny-llama", base);
  adapter b = fitted(testdata + "/lora-tiny-llama-patterns", base);
  CHECK(r.n_modules == a.modules.size() + b.modules.size());
  reference ref = reference_merge(base, {{&a, 0.7}, {&b, -0.3}}, 1.5);
  check_tolerances(compare_output(dir / "out", base, ref), dtype::BF16, "two adapters");
  // the weights matter: a reference with weight 1 disagrees
  reference wrong = reference_merge(base, {{&a, 1.0}, {&b, 1.0}}, 1.0);
  CHECK(compare_output(dir / "out", base, wrong).n_off > 1000);
  safetensors_file merged(dir / "out/model.safetensors");
  CHECK(merged.metadata()->at("lora.adapter.1.weight") == "-0.3");
  CHECK(merged.metadata()->at("lora.scale") == "1.5");
}

TEST_CASE("--dtype: every float tensor rounded once to the new dtype") {
  for (dtype type : {dtype::BF16, dtype::F16}) {
    temp_dir dir;
    const std::string base_path = testdata + "/tiny-llama-f32";
    merge_report r = run(base_path, {{testdata + "/lora-tiny-llama", 1.0}}, dir / "out", 1.0, type);
    CHECK(r.n_converted == 7);
    model_files base = open_model(base_path);
    adapter a = fitted(testdata + "/lora-tiny-llama", base);
    reference ref = reference_merge(base, {{&a, 1.0}});
    comparison c = compare_output(dir / "out", base, ref, type);
    CHECK(c.n_untouched == 0);
    check_tolerances(c, type, "dtype");
  }
  // bf16 -> f32 is exact for untouched tensors, merged ones within f32 rounding
  temp_dir dir;
  run(testdata + "/tiny-llama", {{testdata + "/lora-tiny-llama", 1.0}}, dir / "out", 1.0, dtype::F32);
  model_files base = open_model(testdata + "/tiny-llama");
  adapter a = fitted(testdata + "/lora-tiny-llama", base);
  comparison c = compare_output(dir / "out", base, reference_merge(base, {{&a, 1.0}}), dtype::F32);
  CHECK(c.max_rel <= 1e-6);
}

TEST_CASE("GPT-2 Conv1D base [in, out]: the real gradience adapter (fan_in_fan_out forced)") {
  const std::string fixture = std::string(LORA_FIXTURES_DIR) + "/gradience_tiny_lora";
  if (!fs::exists(fixture + "/adapter_model.safetensors")) {
    MESSAGE("skipped: fixture " << fixture << " is absent");
    return;
  }
  // the base: the tensors the adapter touches (Conv1D layout [in, out]) and a few it does not
  temp_dir dir;
  fs::create_directories(dir / "gpt2");
  write_text(dir / "gpt2/config.json",
             R"({"model_type": "gpt2", "n_embd": 768, "n_layer": 6, "n_head": 12, "vocab_size": 50257})");
  std::vector<test_tensor> tensors;
  for (int l = 0; l < 6; ++l) {
    const std::string p = fmt::format("transformer.h.{}.", l);
    tensors.push_back(random_tensor(p + "attn.c_attn.weight", dtype::BF16, {768, 2304}, 100 + l, -0.2, 0.2));
    tensors.push_back(random_tensor(p + "attn.c_proj.weight", dtype::BF16, {768, 768}, 200 + l, -0.2, 0.2));
    tensors.push_back(random_tensor(p + "attn.c_attn.bias", dtype::BF16, {2304}, 300 + l));
  }
  tensors.push_back(random_tensor("transformer.ln_f.weight", dtype::BF16, {768}, 400));
  tensors.push_back(random_tensor("transformer.wpe.weight", dtype::F32, {64, 768}, 401));
  write_safetensors(dir / "gpt2/model.safetensors", tensors, metadata_map{{"format", "pt"}});
  run(dir / "gpt2", {{fixture, 1.0}}, dir / "out");

  // reference written out for the Conv1D layout: W[i, o] += s sum_k B[o, k] A[k, i]
  model_files base = open_model(dir / "gpt2");
  safetensors_file ad(fixture + "/adapter_model.safetensors");
  reference ref;
  const double s = 16.0 / 8.0;  // lora_alpha / r of the fixture's config
  for (int l = 0; l < 6; ++l)
    for (const char* mod : {"c_attn", "c_proj"}) {
      const std::string p = fmt::format("transformer.h.{}.attn.{}", l, mod);
      std::vector<double> w = decode(base.at(p + ".weight"));
      const std::vector<double> A = read_f64(ad, "base_model.model." + p + ".lora_A.weight");
      const std::vector<double> B = read_f64(ad, "base_model.model." + p + ".lora_B.weight");
      const size_t in = 768, out = w.size() / in, r = 8;
      REQUIRE(A.size() == r * in);
      REQUIRE(B.size() == out * r);
      for (size_t i = 0; i < in; ++i)
        for (size_t o = 0; o < out; ++o) {
          double acc = 0;
          for (size_t k = 0; k < r; ++k) acc += B[o * r + k] * A[k * in + i];
          w[i * out + o] += s * acc;
        }
      ref.value[p + ".weight"] = std::move(w);
    }
  comparison c = compare_output(dir / "out", base, ref);
  check_tolerances(c, dtype::BF16, "gradience");
  CHECK(c.n_untouched == 8);
}

TEST_CASE("DoRA on a GPT-2 Conv1D base: norm per output column of [in, out]") {
  temp_dir dir;
  fs::create_directories(dir / "gpt2");
  write_text(dir / "gpt2/config.json", R"({"model_type": "gpt2", "n_embd": 32, "n_layer": 1})");
  write_safetensors(dir / "gpt2/model.safetensors",
                    {random_tensor("transformer.h.0.attn.c_attn.weight", dtype::F32, {32, 96}, 81),
                     random_tensor("transformer.h.0.ln_1.weight", dtype::F32, {32}, 82)});
  nlohmann::json cfg = peft_config_json(4, 8, {"c_attn"});
  cfg["use_dora"] = true;
  cfg["fan_in_fan_out"] = true;
  write_peft_adapter(
      dir / "adapter", cfg,
      {random_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", dtype::F32, {4, 32}, 83),
       random_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight", dtype::F32, {96, 4}, 84),
       random_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector", dtype::F32, {96}, 85, 1.0,
                     3.0)});
  run(dir / "gpt2", {{dir / "adapter", 1.0}}, dir / "out");
  model_files base = open_model(dir / "gpt2");
  adapter a = fitted(dir / "adapter", base);
  REQUIRE(a.modules.size() == 1);
  CHECK(a.modules[0].fan_in_fan_out);
  reference ref = reference_merge(base, {{&a, 1.0}});
  check_tolerances(compare_output(dir / "out", base, ref), dtype::F32, "dora fan_in_fan_out");
  // the columns' norms are the magnitudes
  model_files merged = open_model(dir / "out");
  const std::vector<double> w = decode(merged.at("transformer.h.0.attn.c_attn.weight"));
  const std::vector<double> m = decode(*a.modules[0].magnitude);
  for (size_t o = 0; o < 96; o += 19) {
    double sq = 0;
    for (size_t i = 0; i < 32; ++i) sq += w[i * 96 + o] * w[i * 96 + o];
    CHECK(std::sqrt(sq) == doctest::Approx(m[o]).epsilon(1e-5));
  }
}

TEST_CASE("refusals leave nothing behind") {
  temp_dir dir;
  const std::string base = testdata + "/tiny-llama";
  auto expect = [&](const std::function<void()>& f, exit_code code, const std::string& text) {
    try {
      f();
      FAIL("no error, expected: " << text);
    } catch (const lora::error& e) {
      CHECK_MESSAGE(e.code() == code, std::string(e.what()));
      CHECK_MESSAGE(std::string(e.what()).find(text) != std::string::npos, std::string(e.what()));
    }
    CHECK(nothing_left(dir, "out"));
  };
  // an adapter for another model: exit 3, the key and a hint
  expect(
      [&] {
        run(base, {{testdata + "/lora-tiny-llama-mismatch", 1.0}}, dir / "out");
      },
      exit_code::invalid_input, "does the adapter belong to this base model?");
  // no adapter, non-finite weight: exit 2
  expect([&] { run(base, {}, dir / "out"); }, exit_code::usage, "no --adapter");
  expect([&] { run(base, {{testdata + "/lora-tiny-llama", NAN}}, dir / "out"); }, exit_code::usage, "not finite");
  // --out is the base
  expect([&] { run(base, {{testdata + "/lora-tiny-llama", 1.0}}, base); }, exit_code::usage, "would replace the base");

  // a merge that overflows to Inf: exit 3 naming the tensor; allowed on request
  nlohmann::json cfg = peft_config_json(1, 1, {"q_proj"});
  write_peft_adapter(dir / "huge", cfg,
                     {test_tensor{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                  dtype::F32,
                                  {1, 64},
                                  std::vector<double>(64, 1e30)},
                      test_tensor{"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                                  dtype::F32,
                                  {64, 1},
                                  std::vector<double>(64, 1e30)}});
  expect(
      [&] {
        run(base, {{dir / "huge", 1.0}}, dir / "out");
      },
      exit_code::invalid_input, "model.layers.0.self_attn.q_proj.weight");
  merge_options o;
  o.base = base;
  o.adapters = {{dir / "huge", 1.0}};
  o.out = dir / "out";
  o.allow_nonfinite = true;
  CHECK_NOTHROW(merge_model(o));
  CHECK(fs::exists(dir / "out/model.safetensors"));

  // an existing --out: exit 2 without force
  try {
    run(base, {{testdata + "/lora-tiny-llama", 1.0}}, dir / "out");
    FAIL("an existing --out was replaced without force");
  } catch (const lora::error& e) {
    CHECK(e.code() == exit_code::usage);
    CHECK(std::string(e.what()).find("already exists") != std::string::npos);
  }
}

TEST_CASE("existing --out: refused, replaced with force; dry run writes nothing") {
  temp_dir dir;
  const std::string base = testdata + "/tiny-llama";
  fs::create_directories(dir / "out");
  write_text(dir / "out/old.txt", "old");
  merge_options o;
  o.base = base;
  o.adapters = {{testdata + "/lora-tiny-llama", 1.0}};
  o.out = dir / "out/";
  CHECK_THROWS_AS(merge_model(o), lora::error);
  CHECK(fs::exists(dir / "out/old.txt"));

  o.dry_run = true;
  o.force = true;
  merge_report dry = merge_model(o);
  CHECK(dry.dry_run);
  CHECK(dry.bytes_written > 250000);
  CHECK(dry.bytes_free > dry.bytes_written);
  CHECK(dry.files == std::vector<std::string>{"config.json", "generation_config.json", "model.safetensors"});
  CHECK(fs::exists(dir / "out/old.txt"));
  CHECK_FALSE(fs::exists(dir / "out/model.safetensors"));

  o.dry_run = false;
  merge_report r = merge_model(o);
  CHECK_FALSE(fs::exists(dir / "out/old.txt"));
  CHECK(fs::exists(dir / "out/model.safetensors"));
  CHECK(fs::file_size(dir / "out/model.safetensors") + 467 + 75 == r.bytes_written);
  // only out itself in the folder: no temp folder, no old copy
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path)) ++n;
  CHECK(n == 1);
}

TEST_CASE("bare .safetensors base: --out is a folder holding that file") {
  temp_dir dir;
  fs::create_directories(dir / "bare");
  fs::copy_file(testdata + "/tiny-llama/model.safetensors", dir / "bare/weights.safetensors");
  write_text(dir / "bare/notes.txt", "not copied: only config.json beside a bare file");
  run(dir / "bare/weights.safetensors", {{testdata + "/lora-tiny-llama", 1.0}}, dir / "out");
  CHECK(fs::exists(dir / "out/weights.safetensors"));
  CHECK_FALSE(fs::exists(dir / "out/notes.txt"));
  model_files base = open_model(dir / "bare/weights.safetensors");
  adapter a = fitted(testdata + "/lora-tiny-llama", base);
  check_tolerances(compare_output(dir / "out/weights.safetensors", base, reference_merge(base, {{&a, 1.0}})),
                   dtype::BF16, "bare");
}

TEST_CASE("a write failure (file size limit) exits 4 and leaves nothing") {
  temp_dir dir;
  // SIGXFSZ ignored: write() fails with EFBIG instead of killing the process
  struct rlimit old {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = 100 * 1024;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &lim) == 0);
  int code = 0;
  try {
    run(testdata + "/tiny-llama", {{testdata + "/lora-tiny-llama", 1.0}}, dir / "out");
  } catch (const lora::error& e) {
    code = static_cast<int>(e.code());
    MESSAGE(std::string(e.what()));
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  CHECK(code == 4);
  CHECK(nothing_left(dir, "out"));
}
