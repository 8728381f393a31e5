// core/verify: a real merge (core/merge) verifies; copies of it with one
// element moved by a given number of bf16 ulps, or one tensor left unmerged,
// fail naming that tensor; 1 ulp (PEFT's double rounding) still passes.
// Layer level: every merge kind (linear, fan_in_fan_out, embedding, conv,
// DoRA, lora_bias) passes in BF16, F16 and F32; a weight element moved beyond
// the layer tolerance, or a merge at twice the scale, fails naming the
// module; the unmerged reference W0 x + s B (A x) equals W0 + s B A formed
// explicitly here (1e-12 relative).
#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <functional>

#include <fmt/format.h>

#include "core/adapter.h"
#include "core/delta.h"
#include "core/dtype.h"
#include "core/merge.h"
#include "core/verify.h"
#include "formats/error.h"
#include "formats/model-files.h"
#include "tests/merge-testing.h"

using namespace lora;
using namespace lora::testing;

namespace {
const std::string td = std::string(LORA_SOURCE_DIR) + "/testdata/";

// A copy of the model folder `src` with `edit` applied to its tensors (decoded to double, re-encoded exactly).
void edited_copy(const std::string& src, const std::string& dst,
                 const std::function<void(std::map<std::string, test_tensor>&)>& edit) {
  std::filesystem::create_directories(dst);
  std::filesystem::copy_file(src + "/config.json", dst + "/config.json");
  safetensors_file f(src + "/model.safetensors");
  std::map<std::string, test_tensor> ts;
  for (const auto& t : f.tensors()) ts[t.name] = {t.name, t.type, t.shape, read_f64(f, t.name)};
  edit(ts);
  std::vector<test_tensor> list;
  for (auto& [n, t] : ts) list.push_back(t);
  write_safetensors(dst + "/model.safetensors", list);
}

// A PEFT adapter folder: adapter_config.json (r, lora_alpha, targets, flags) + tensors.
void write_peft_adapter(const std::string& dir, int r, double alpha, const std::string& target, bool dora,
                        const std::vector<test_tensor>& tensors, bool fan_in_fan_out = true) {
  std::filesystem::create_directories(dir);
  write_text(dir + "/adapter_config.json",
             fmt::format(R"({{"peft_type": "LORA", "r": {}, "lora_alpha": {}, "target_modules": ["{}"],
                 "fan_in_fan_out": {}, "use_dora": {}, "use_rslora": false, "lora_bias": false,
                 "task_type": "CAUSAL_LM", "modules_to_save": null, "rank_pattern": {{}}, "alpha_pattern": {{}}}})",
                         r, alpha, target, fan_in_fan_out ? "true" : "false", dora ? "true" : "false"));
  write_safetensors(dir + "/adapter_model.safetensors", tensors);
}

// A GPT-2-like base (Conv1D c_attn stored [in, out] = [32, 96]) in `dir`/gpt2
// and a fan_in_fan_out adapter on it in `dir`/<name> (DoRA when asked).
void write_gpt2_case(const std::string& dir, const std::string& name, bool dora) {
  if (!std::filesystem::exists(dir + "/gpt2")) {
    std::filesystem::create_directories(dir + "/gpt2");
    write_text(dir + "/gpt2/config.json",
               R"({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4, "vocab_size": 64})");
    write_safetensors(dir + "/gpt2/model.safetensors",
                      {random_tensor("transformer.h.0.attn.c_attn.weight", dtype::F32, {32, 96}, 81),
                       random_tensor("transformer.h.0.ln_1.weight", dtype::F32, {32}, 82)});
  }
  const std::string p = "base_model.model.transformer.h.0.attn.c_attn.";
  std::vector<test_tensor> t = {random_tensor(p + "lora_A.weight", dtype::F32, {4, 32}, 83),
                                random_tensor(p + "lora_B.weight", dtype::F32, {96, 4}, 84)};
  if (dora) t.push_back(random_tensor(p + "lora_magnitude_vector", dtype::F32, {96}, 85, 1.0, 3.0));
  write_peft_adapter(dir + "/" + name, 4, 8, "c_attn", dora, t);
}

// The bf16 value k units in the last place above v.
double bf16_step(double v, int k) {
  uint16_t h = f64_to_bf16(v);
  h = static_cast<uint16_t>(v >= 0 ? h + k : h - k);
  return bf16_to_f32(h);
}
}  // namespace

TEST_CASE("a merge verifies; an edited merge fails naming the tensor") {
  temp_dir dir;
  merge_options mo;
  mo.base = td + "tiny-llama";
  mo.adapters = {{td + "lora-tiny-llama", 1.0}};
  mo.out = dir / "merged";
  merge_model(mo);
  verify_options vo{td + "tiny-llama", {{td + "lora-tiny-llama"}}, dir / "merged", {}, 1};
  verify_report ok = verify_merge(vo);
  CHECK(ok.equivalent);
  CHECK(ok.n_checked == 21);
  CHECK(ok.model.ran);
  CHECK(ok.model.top1_agreement == 1.0);
  CHECK(ok.layers.size() == 14);  // 7 modules x 2 layers
  CHECK(ok.n_layers_failed == 0);

  const std::string target = "model.layers.0.self_attn.q_proj.weight";
  for (int ulps : {1, 4}) {
    CAPTURE(ulps);
    const std::string out = dir / ("ulp" + std::to_string(ulps));
    edited_copy(dir / "merged", out,
                [&](auto& ts) { ts[target].values[100] = bf16_step(ts[target].values[100], ulps); });
    vo.merged = out;
    verify_report r = verify_merge(vo);
    if (ulps == 1) {
      CHECK(r.equivalent);
    } else {
      CHECK(!r.equivalent);
      REQUIRE(r.n_failed == 1);
      CHECK(r.tensors.front().name == target);
      CHECK(r.tensors.front().n_bad == 1);
    }
  }

  const std::string unmerged = "model.layers.1.mlp.down_proj.weight";
  safetensors_file base(td + "tiny-llama/model.safetensors");
  edited_copy(dir / "merged", dir / "unmerged", [&](auto& ts) { ts[unmerged].values = read_f64(base, unmerged); });
  vo.merged = dir / "unmerged";
  verify_report r = verify_merge(vo);
  CHECK(!r.equivalent);
  REQUIRE(r.n_failed == 1);
  CHECK(r.tensors.front().name == unmerged);
  CHECK(!r.model.ok);
  REQUIRE(r.n_layers_failed == 1);
  CHECK(r.layers.front().name == "model.layers.1.mlp.down_proj");
  CHECK(r.layers.front().ratio > 1);

  // an untouched tensor that changed fails as "untouched"
  edited_copy(dir / "merged", dir / "norm", [&](auto& ts) { ts["model.norm.weight"].values[0] += 0.5; });
  vo.merged = dir / "norm";
  r = verify_merge(vo);
  REQUIRE(r.n_failed == 1);
  CHECK(r.tensors.front().name == "model.norm.weight");
  CHECK(r.tensors.front().kind == tensor_kind::untouched);
}

namespace {

struct merge_case {
  std::string base, adapter;  // under testdata/, or absolute
  size_t n_modules;
  std::vector<std::string> kinds;  // layer kinds that must appear
};

// Merges `c` into dir/<out> as `type` (nullopt: the base's dtypes) at `scale`.
std::string merge_into(const temp_dir& dir, const merge_case& c, std::optional<dtype> type, const std::string& out,
                       double scale = 1.0) {
  merge_options mo;
  mo.base = c.base;
  mo.adapters = {{c.adapter, 1.0}};
  mo.out = dir / out;
  mo.out_type = type;
  mo.scale = scale;
  mo.threads = 1;
  merge_model(mo);
  return mo.out;
}

std::vector<merge_case> all_cases(const temp_dir& dir) {
  write_gpt2_case(dir.path, "ffo", false);
  write_gpt2_case(dir.path, "ffo-dora", true);
  return {
      {td + "tiny-llama", td + "lora-tiny-llama", 14, {"linear"}},
      {td + "tiny-llama", td + "lora-tiny-llama-dora", 6, {"linear+dora"}},
      {td + "tiny-llama", td + "lora-tiny-llama-extras", 5, {"embedding", "linear"}},
      {td + "tiny-llama", td + "lora-tiny-llama-patterns", 14, {"linear"}},
      {td + "tiny-llama-f16-sharded", td + "lora-tiny-llama-kohya.safetensors", 14, {"linear"}},
      {td + "tiny-qwen2", td + "lora-tiny-qwen2-bias", 6, {"linear+bias"}},
      {td + "tiny-unet", td + "lora-tiny-unet-kohya.safetensors", 4, {"conv", "linear"}},
      {dir / "gpt2", dir / "ffo", 1, {"fan_in_fan_out"}},
      {dir / "gpt2", dir / "ffo-dora", 1, {"fan_in_fan_out+dora"}},
  };
}

}  // namespace

TEST_CASE("layer level: every merge kind passes in BF16, F16 and F32") {
  temp_dir dir;
  double worst[3] = {0, 0, 0};
  const dtype types[3] = {dtype::BF16, dtype::F16, dtype::F32};
  int n = 0;
  for (const merge_case& c : all_cases(dir))
    for (int t = 0; t < 3; ++t) {
      CAPTURE(c.adapter);
      CAPTURE(dtype_name(types[t]));
      const std::string out = merge_into(dir, c, types[t], fmt::format("m{}", n++));
      verify_options vo{c.base, {{c.adapter}}, out, {}, 1};
      const verify_report r = verify_merge(vo);
      CHECK(r.equivalent);
      CHECK(r.n_layers_failed == 0);
      REQUIRE(r.layers.size() == c.n_modules);
      for (const std::string& k : c.kinds)
        CHECK(std::any_of(r.layers.begin(), r.layers.end(),
                          [&](const layer_check& l) { return layer_kind_text(l) == k; }));
      for (const layer_check& l : r.layers) {
        CHECK(l.ok);
        CHECK(l.ratio < 1);
        CHECK(l.max_abs > 0);  // the merged outputs are not the reference bit for bit
        CHECK(l.tolerance > 0);
      }
      // sorted worst first
      for (size_t i = 1; i < r.layers.size(); ++i) CHECK(r.layers[i - 1].ratio >= r.layers[i].ratio);
      worst[t] = std::max(worst[t], r.layers.front().ratio);
    }
  MESSAGE("worst layer ratio over every merge kind: bf16 " << worst[0] << ", f16 " << worst[1] << ", f32 " << worst[2]);
}

TEST_CASE("layer level: a weight moved beyond tolerance, or a merge at twice the scale, fails naming the module") {
  temp_dir dir;
  const std::vector<merge_case> cases = all_cases(dir);
  struct tamper {
    size_t case_index;
    std::string tensor, module;
    size_t element;
  };
  // linear (bf16 as merged), conv (f32), fan_in_fan_out (f32: [in, out], element (3, 40) feeds output 40)
  for (const tamper& t :
       {tamper{0, "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj", 100},
        tamper{6, "down_blocks.0.resnets.0.conv1.weight", "down_blocks.0.resnets.0.conv1", 17},
        tamper{7, "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn", 3 * 96 + 40}}) {
    const merge_case& c = cases[t.case_index];
    CAPTURE(t.module);
    const std::string good = merge_into(dir, c, std::nullopt, "good" + std::to_string(t.case_index));
    // move the element by a tenth of an average output feature's sum |W|
    const std::string bad = dir / ("bad" + std::to_string(t.case_index));
    edited_copy(good, bad, [&](auto& ts) {
      auto& v = ts[t.tensor].values;
      double row = 0;
      for (double w : v) row += std::fabs(w);
      v[t.element] += 0.1 * row / static_cast<double>(ts[t.tensor].shape[t.case_index == 7 ? 1 : 0]);
    });
    verify_options vo{c.base, {{c.adapter}}, bad, {}, 1};
    verify_report r = verify_merge(vo);
    CHECK(!r.equivalent);
    REQUIRE(r.n_layers_failed == 1);
    CHECK(r.layers.front().name == t.module);
    CHECK(!r.layers.front().ok);
    CHECK(r.layers.front().ratio > 1);
    CHECK(r.layers.front().n_bad >= 1);
    CHECK(r.layers.front().n_bad <= 4);  // one output element per input vector
    // the good merge passes with the same inputs
    vo.merged = good;
    CHECK(verify_merge(vo).n_layers_failed == 0);
  }

  // twice the scale: every module fails (plain, DoRA, bias, conv, fan_in_fan_out)
  for (size_t i : {size_t{0}, size_t{1}, size_t{5}, size_t{6}, size_t{7}}) {
    const merge_case& c = cases[i];
    CAPTURE(c.adapter);
    const std::string out = merge_into(dir, c, dtype::F32, "x2-" + std::to_string(i), 2.0);
    verify_options vo{c.base, {{c.adapter}}, out, {}, 1};
    verify_report r = verify_merge(vo);
    CHECK(!r.equivalent);
    CHECK(r.n_layers_failed == c.n_modules);
    for (const layer_check& l : r.layers) CHECK(l.ratio > 100);
  }
}

TEST_CASE("layer level: a lora_bias merged without its bias fails naming the module") {
  temp_dir dir;
  const merge_case c{td + "tiny-qwen2", td + "lora-tiny-qwen2-bias", 6, {}};
  const std::string good = merge_into(dir, c, std::nullopt, "good");
  const std::string bias = "model.layers.1.self_attn.k_proj.bias";
  safetensors_file base(td + "tiny-qwen2/model.safetensors");
  edited_copy(good, dir / "bad", [&](auto& ts) { ts[bias].values = read_f64(base, bias); });
  verify_options vo{c.base, {{c.adapter}}, dir / "bad", {}, 1};
  verify_report r = verify_merge(vo);
  REQUIRE(r.n_layers_failed == 1);
  CHECK(r.layers.front().name == "model.layers.1.self_attn.k_proj");
  CHECK(layer_kind_text(r.layers.front()) == "linear+bias");

  // a merged model without the module's weight: the layer cannot run and fails as "missing"
  // (a UNet: no forward pass, which would refuse the incomplete model with exit 3)
  const merge_case u{td + "tiny-unet", td + "lora-tiny-unet-kohya.safetensors", 4, {}};
  const std::string unet = merge_into(dir, u, std::nullopt, "unet");
  edited_copy(unet, dir / "gone", [&](auto& ts) { ts.erase("down_blocks.0.resnets.0.conv1.weight"); });
  vo = verify_options{u.base, {{u.adapter}}, dir / "gone", {}, 1};
  r = verify_merge(vo);
  REQUIRE(r.n_layers_failed == 1);
  CHECK(r.layers.front().name == "down_blocks.0.resnets.0.conv1");
  CHECK(layer_kind_text(r.layers.front()) == "missing");
  CHECK(!r.equivalent);
}

TEST_CASE("layer level: seeded inputs; a different seed gives other inputs, both pass") {
  temp_dir dir;
  const merge_case c{td + "tiny-llama", td + "lora-tiny-llama", 14, {}};
  const std::string out = merge_into(dir, c, std::nullopt, "m");
  verify_options vo{c.base, {{c.adapter}}, out, {}, 1};
  const verify_report a = verify_merge(vo), b = verify_merge(vo);
  vo.seed = 99;
  const verify_report d = verify_merge(vo);
  REQUIRE(a.layers.size() == d.layers.size());
  CHECK(d.n_layers_failed == 0);
  bool differs = false;
  for (size_t i = 0; i < a.layers.size(); ++i) {
    CHECK(a.layers[i].name == b.layers[i].name);
    CHECK(a.layers[i].max_abs == b.layers[i].max_abs);
    differs = differs || a.layers[i].max_abs != d.layers[i].max_abs;
  }
  CHECK(differs);
  vo.n_inputs = 0;
  try {
    verify_merge(vo);
    FAIL("n_inputs 0 accepted");
  } catch (const lora::error& e) {
    CHECK(e.code() == exit_code::usage);
  }
}

namespace {

// y = W x with W = W0 + w s B A formed explicitly from the module's raw A and
// B (decoded here, not through core/delta), DoRA-scaled per output feature.
std::vector<double> brute_force(const lora_module& m, const std::vector<double>& w0, const std::vector<int64_t>& shape,
                                double weight, const std::vector<double>& x) {
  std::vector<double> a(m.a.info->n_elements), b(m.b.info->n_elements);
  to_f64(m.a.info->type, m.a.data(), a);
  to_f64(m.b.info->type, m.b.data(), b);
  const size_t r = static_cast<size_t>(m.a.info->shape[0]);
  const size_t n_out = b.size() / r, n_in = a.size() / r;
  const size_t n_rows = static_cast<size_t>(shape[0]), n_cols = w0.size() / n_rows;
  const bool transposed = m.kind == module_kind::embedding || m.fan_in_fan_out;
  REQUIRE(n_out * n_in == w0.size());
  // W(o, j) = W0(o, j) + w s sum_k B[o, k] A[k, j], W(o, j) stored at [o, j] or [j, o]
  std::vector<double> w(n_out * n_in);
  for (size_t o = 0; o < n_out; ++o)
    for (size_t j = 0; j < n_in; ++j) {
      double acc = 0;
      for (size_t k = 0; k < r; ++k) acc += b[o * r + k] * a[k * n_in + j];
      w[o * n_in + j] = (transposed ? w0[j * n_cols + o] : w0[o * n_cols + j]) + weight * m.scale * acc;
    }
  if (m.dora) {
    std::vector<double> mag(m.magnitude->info->n_elements);
    to_f64(m.magnitude->info->type, m.magnitude->data(), mag);
    for (size_t o = 0; o < n_out; ++o) {
      double sq = 0;
      for (size_t j = 0; j < n_in; ++j) sq += w[o * n_in + j] * w[o * n_in + j];
      for (size_t j = 0; j < n_in; ++j) w[o * n_in + j] *= mag[o] / std::sqrt(sq);
    }
  }
  (void)n_rows;
  const size_t n = x.size() / n_in;
  std::vector<double> y(n * n_out, 0.0);
  for (size_t v = 0; v < n; ++v)
    for (size_t o = 0; o < n_out; ++o)
      for (size_t j = 0; j < n_in; ++j) y[v * n_out + o] += w[o * n_in + j] * x[v * n_in + j];
  return y;
}

}  // namespace

TEST_CASE("the unmerged reference W0 x + s B (A x) equals W0 + s B A formed explicitly") {
  temp_dir dir;
  int n_modules = 0;
  for (const merge_case& c : all_cases(dir)) {
    CAPTURE(c.adapter);
    model_files base = open_model(c.base);
    adapter a = load_adapter(c.adapter);
    REQUIRE(fit_adapter(a, base).ok());
    for (const lora_module& m : a.modules) {
      CAPTURE(m.name);
      const tensor_ref t = base.at(m.target);
      std::vector<double> w0(t.info->n_elements);
      to_f64(t.info->type, t.data(), w0);
      const delta_factors_f64 f = load_delta_factors_f64(m, t.info->shape, a.weights_path);
      const size_t n_in = static_cast<size_t>(f.transposed ? f.n_rows : f.n_cols);
      const std::vector<double> x = random_values(3 * n_in, 7 + static_cast<uint32_t>(n_modules), -2.0, 2.0);
      for (double weight : {1.0, -0.7}) {
        const std::vector<double> y = unmerged_layer_output(f, w0, x, weight);
        const std::vector<double> want = brute_force(m, w0, t.info->shape, weight, x);
        REQUIRE(y.size() == want.size());
        double big = 0, diff = 0;
        for (size_t i = 0; i < y.size(); ++i) {
          big = std::max(big, std::fabs(want[i]));
          diff = std::max(diff, std::fabs(y[i] - want[i]));
        }
        CHECK(big > 0);
        CHECK(diff <= 1e-12 * big);
      }
      ++n_modules;
    }
  }
  CHECK(n_modules == 14 + 6 + 5 + 14 + 14 + 6 + 4 + 1 + 1);
  // inputs that do not fit the weight are refused
  model_files base = open_model(td + "tiny-llama");
  adapter a = load_adapter(td + "lora-tiny-llama");
  REQUIRE(fit_adapter(a, base).ok());
  const tensor_ref t = base.at(a.modules[0].target);
  const delta_factors_f64 f = load_delta_factors_f64(a.modules[0], t.info->shape, a.weights_path);
  std::vector<double> w0(t.info->n_elements);
  to_f64(t.info->type, t.data(), w0);
  CHECK_THROWS_AS(unmerged_layer_output(f, w0, std::vector<double>(static_cast<size_t>(f.n_cols) + 1)), lora::error);
}

namespace {

// A GPT-2-like base whose weights span several of verify's row blocks (64K
// elements): Conv1D c_attn stored [in, out] = [4096, 48] (fan_in_fan_out:
// DoRA's norm runs per column, over all 4096 rows), c_proj [48, 4096]
// (linear: per row), wte [2048, 64] (untouched); and rank-4 PEFT adapters on
// c_attn or c_proj, LoRA or DoRA.
struct big_case {
  std::string base, adapter, tensor;
  bool fan_in_fan_out = false;
};

big_case write_big_case(const std::string& dir, bool ffo, bool dora) {
  if (!std::filesystem::exists(dir + "/big")) {
    std::filesystem::create_directories(dir + "/big");
    write_text(dir + "/big/config.json",
               R"({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 4, "vocab_size": 2048})");
    write_safetensors(dir + "/big/model.safetensors",
                      {random_tensor("transformer.h.0.attn.c_attn.weight", dtype::F32, {4096, 48}, 91),
                       random_tensor("transformer.h.0.mlp.c_proj.weight", dtype::F32, {48, 4096}, 92),
                       random_tensor("transformer.wte.weight", dtype::F32, {2048, 64}, 93)});
  }
  const std::string module = ffo ? "transformer.h.0.attn.c_attn" : "transformer.h.0.mlp.c_proj";
  const std::string p = "base_model.model." + module + ".";
  std::vector<test_tensor> t = {random_tensor(p + "lora_A.weight", dtype::F32, {4, 4096}, 94),
                                random_tensor(p + "lora_B.weight", dtype::F32, {48, 4}, 95, -0.1, 0.1)};
  if (dora) t.push_back(random_tensor(p + "lora_magnitude_vector", dtype::F32, {48}, 96, 1.0, 3.0));
  const std::string name = fmt::format("big-{}-{}", ffo ? "ffo" : "linear", dora ? "dora" : "lora");
  write_peft_adapter(dir + "/" + name, 4, 8, ffo ? "c_attn" : "c_proj", dora, t, ffo);
  return {dir + "/big", dir + "/" + name, module + ".weight", ffo};
}

// The expected merged weight in double, written out index by index from the
// files (not through core/delta): W(o, j) = W0(o, j) + s sum_k B[o, k] A[k, j],
// DoRA: W(o, :) *= m_o / ||V(o, :)||; W(o, j) stored at [o, j], or [j, o] for
// fan_in_fan_out. s = alpha / r = 2.
std::vector<double> reference_weight(const big_case& c, bool dora) {
  safetensors_file base(c.base + "/model.safetensors"), ad(c.adapter + "/adapter_model.safetensors");
  const std::string p = "base_model.model." + c.tensor.substr(0, c.tensor.size() - 7) + ".";
  const std::vector<double> w0 = read_f64(base, c.tensor), a = read_f64(ad, p + "lora_A.weight"),
                            b = read_f64(ad, p + "lora_B.weight");
  const size_t n_out = 48, n_in = 4096, r = 4;
  std::vector<double> w(w0.size());
  auto at = [&](size_t o, size_t j) { return c.fan_in_fan_out ? j * n_out + o : o * n_in + j; };
  for (size_t o = 0; o < n_out; ++o)
    for (size_t j = 0; j < n_in; ++j) {
      double acc = 0;
      for (size_t k = 0; k < r; ++k) acc += b[o * r + k] * a[k * n_in + j];
      w[at(o, j)] = w0[at(o, j)] + 2.0 * acc;
    }
  if (dora) {
    const std::vector<double> m = read_f64(ad, p + "lora_magnitude_vector");
    for (size_t o = 0; o < n_out; ++o) {
      double sq = 0;
      for (size_t j = 0; j < n_in; ++j) sq += w[at(o, j)] * w[at(o, j)];
      for (size_t j = 0; j < n_in; ++j) w[at(o, j)] *= m[o] / std::sqrt(sq);
    }
  }
  return w;
}

}  // namespace

TEST_CASE(
    "weight level in row blocks: tensors of several blocks against the double reference (DoRA per row and per "
    "column)") {
  temp_dir dir;
  for (bool ffo : {true, false})
    for (bool dora : {false, true}) {
      CAPTURE(ffo);
      CAPTURE(dora);
      const big_case c = write_big_case(dir.path, ffo, dora);
      const std::string good = merge_into(dir, {c.base, c.adapter, 1, {}}, dtype::F32,
                                          std::filesystem::path(c.adapter).filename().string() + "-merged");
      verify_options vo{c.base, {{c.adapter}}, good, {}, 1};
      const verify_report ok = verify_merge(vo);
      CHECK(ok.equivalent);
      CHECK(ok.n_checked == 3);
      REQUIRE(ok.layers.size() == 1);
      CHECK(layer_kind_text(ok.layers.front()) ==
            std::string(ffo ? "fan_in_fan_out" : "linear") + (dora ? "+dora" : ""));

      // one element of the last block moved by 1e-3: the reported error is
      // |merged - E| there, E from the double reference (1e-9 relative: the
      // f32 merge's own error is below 1e-6 of the move)
      const std::vector<double> want = reference_weight(c, dora);
      const size_t at = want.size() - 5;
      const std::string bad = good + "-moved";
      double moved = 0;
      edited_copy(good, bad, [&](auto& ts) {
        ts[c.tensor].values[at] += 1e-3;
        moved = static_cast<double>(static_cast<float>(ts[c.tensor].values[at]));
      });
      vo.merged = bad;
      const verify_report r = verify_merge(vo);
      CHECK(!r.equivalent);
      REQUIRE(r.n_failed == 1);
      const tensor_check& t = r.tensors.front();
      CHECK(t.name == c.tensor);
      CHECK(t.kind == tensor_kind::merged);
      CHECK(t.n_bad == 1);
      CHECK(t.max_error == doctest::Approx(std::fabs(moved - want[at])).epsilon(1e-9));
      CHECK(t.max_error > 9e-4);
    }

  // an untouched tensor of two blocks moved in its last element: its true error, one element
  const big_case c = write_big_case(dir.path, false, false);
  const std::string good = merge_into(dir, {c.base, c.adapter, 1, {}}, std::nullopt, "untouched-good");
  edited_copy(good, dir / "untouched-bad", [&](auto& ts) { ts["transformer.wte.weight"].values.back() += 0.125; });
  verify_options vo{c.base, {{c.adapter}}, dir / "untouched-bad", {}, 1};
  const verify_report r = verify_merge(vo);
  REQUIRE(r.n_failed == 1);
  const tensor_check& t = r.tensors.front();
  CHECK(t.name == "transformer.wte.weight");
  CHECK(t.kind == tensor_kind::untouched);
  CHECK(t.n_bad == 1);
  safetensors_file base(c.base + "/model.safetensors"), moved(dir / "untouched-bad" + "/model.safetensors");
  CHECK(t.max_error ==
        std::fabs(read_f64(moved, "transformer.wte.weight").back() - read_f64(base, "transformer.wte.weight").back()));
  CHECK(t.max_error == doctest::Approx(0.125).epsilon(1e-6));
}
