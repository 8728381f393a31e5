// core/llama: each building block against a double-precision reference, and
// whole tiny models against (1) an independent double forward pass written
// here and (2) logits PyTorch computed (tests/reference/llama_reference.py,
// committed as tests/reference/llama-logits.safetensors).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/adapter.h"
#include "core/dtype.h"
#include "core/llama.h"
#include "core/stored-gemm.h"
#include "formats/error.h"
#include "formats/model-files.h"
#include "formats/safetensors.h"
#include "test-support.h"

using namespace lora;
using lora::testing::randf;

namespace {

const std::string td = std::string(LORA_SOURCE_DIR) + "/testdata/";
const std::vector<int64_t> ref_tokens{1, 17, 42, 255, 0, 128, 7, 99, 3, 200, 64, 5};

std::vector<double> to_d(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// ---- double-precision reference (index by index) ----
void ref_rms(std::vector<double>& x, int64_t T, int64_t D, const std::vector<double>& w, double eps) {
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += x[t * D + i] * x[t * D + i];
    const double inv = 1.0 / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) x[t * D + i] = x[t * D + i] * inv * w[i];
  }
}
void ref_rope(std::vector<double>& x, int64_t T, int64_t H, int64_t d, double theta) {
  for (int64_t p = 0; p < T; ++p)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < d / 2; ++j) {
        const double ang = p * std::pow(theta, -2.0 * j / d);
        double& a = x[(p * H + h) * d + j];
        double& b = x[(p * H + h) * d + j + d / 2];
        const double a0 = a, b0 = b;
        a = a0 * std::cos(ang) - b0 * std::sin(ang);
        b = b0 * std::cos(ang) + a0 * std::sin(ang);
      }
}
std::vector<double> ref_attn(const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
                             int64_t T, int64_t H, int64_t KV, int64_t d) {
  std::vector<double> out(static_cast<size_t>(T * H * d), 0.0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < T; ++i) {
      const int64_t kh = h / (H / KV);
      std::vector<double> s(static_cast<size_t>(i + 1));
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (int64_t e = 0; e < d; ++e) dot += q[(i * H + h) * d + e] * k[(j * KV + kh) * d + e];
        s[j] = dot / std::sqrt(double(d));
        mx = std::max(mx, s[j]);
      }
      for (auto& x : s) sum += (x = std::exp(x - mx));
      for (int64_t j = 0; j <= i; ++j)
        for (int64_t e = 0; e < d; ++e) out[(i * H + h) * d + e] += s[j] / sum * v[(j * KV + kh) * d + e];
    }
  return out;
}

struct ref_model {
  const model_files& m;
  std::vector<double> get(const std::string& n) const {
    tensor_ref t = m.at(n);
    std::vector<double> v(t.info->n_elements);
    to_f64(t.info->type, t.data(), v);
    return v;
  }
  // y[T, out] = x W^T (+ b)
  std::vector<double> lin(const std::vector<double>& x, int64_t T, const std::string& p, int64_t in, int64_t out,
                          bool bias) const {
    std::vector<double> W = get(p + ".weight"), y(static_cast<size_t>(T * out), 0.0);
    std::vector<double> b = bias ? get(p + ".bias") : std::vector<double>(static_cast<size_t>(out), 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < out; ++o) {
        double acc = b[o];
        for (int64_t i = 0; i < in; ++i) acc += x[t * in + i] * W[o * in + i];
        y[t * out + o] = acc;
      }
    return y;
  }
};

std::vector<double> ref_forward(const model_files& mf, const hf_config& c, const std::vector<int64_t>& toks) {
  ref_model r{mf};
  const int64_t T = static_cast<int64_t>(toks.size()), D = c.hidden_size, H = c.num_attention_heads,
                KV = c.num_key_value_heads, d = c.head_dim, F = c.intermediate_size;
  std::vector<double> E = r.get("model.embed_tokens.weight"), x(static_cast<size_t>(T * D));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < D; ++i) x[t * D + i] = E[toks[t] * D + i];
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    std::vector<double> h = x;
    ref_rms(h, T, D, r.get(p + "input_layernorm.weight"), c.rms_norm_eps);
    auto q = r.lin(h, T, p + "self_attn.q_proj", D, H * d, c.qkv_bias);
    auto k = r.lin(h, T, p + "self_attn.k_proj", D, KV * d, c.qkv_bias);
    auto v = r.lin(h, T, p + "self_attn.v_proj", D, KV * d, c.qkv_bias);
    ref_rope(q, T, H, d, c.layers[0].rope.theta);
    ref_rope(k, T, KV, d, c.layers[0].rope.theta);
    auto o = r.lin(ref_attn(q, k, v, T, H, KV, d), T, p + "self_attn.o_proj", H * d, D, c.o_bias);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = x;
    ref_rms(h, T, D, r.get(p + "post_attention_layernorm.weight"), c.rms_norm_eps);
    auto g = r.lin(h, T, p + "mlp.gate_proj", D, F, false);
    auto u = r.lin(h, T, p + "mlp.up_proj", D, F, false);
    for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
    auto dn = r.lin(g, T, p + "mlp.down_proj", F, D, false);
    for (size_t i = 0; i < x.size(); ++i) x[i] += dn[i];
  }
  ref_rms(x, T, D, r.get("model.norm.weight"), c.rms_norm_eps);
  return r.lin(x, T, c.tie_word_embeddings ? "model.embed_tokens" : "lm_head", D, c.vocab_size, false);
}

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

}  // namespace

TEST_CASE("rms_norm matches the double reference") {
  const int64_t T = 5, D = 48;
  auto x = randf(T * D, 1), w = randf(D, 2);
  std::vector<float> out(x.size());
  rms_norm(x.data(), T, D, w.data(), 1e-5, out.data());
  auto rx = to_d(x);
  ref_rms(rx, T, D, to_d(w), 1e-5);
  CHECK(max_abs_diff(out, rx) < 1e-6);
}

TEST_CASE("apply_rope pairs the first half of each head with the second half") {
  const int64_t T = 9, H = 3, d = 16;
  auto x = randf(T * H * d, 3);
  auto rx = to_d(x);
  apply_rope(x.data(), T, H, d, 10000.0);
  ref_rope(rx, T, H, d, 10000.0);
  CHECK(max_abs_diff(x, rx) < 1e-6);
  // position 0 is the identity; position 1 rotates element 0 with element d/2 by 1 radian
  auto y = randf(2 * d, 4);
  auto y0 = y;
  apply_rope(y.data(), 2, 1, d, 10000.0);
  CHECK(y[0] == y0[0]);
  CHECK(y[d + 0] == doctest::Approx(y0[d] * std::cos(1.0) - y0[d + d / 2] * std::sin(1.0)).epsilon(1e-6));
}

TEST_CASE("causal_attention with grouped-query heads and the causal mask") {
  const int64_t T = 7, H = 4, KV = 2, d = 8;
  auto q = randf(T * H * d, 5), k = randf(T * KV * d, 6), v = randf(T * KV * d, 7);
  std::vector<float> out(q.size());
  causal_attention(q.data(), k.data(), v.data(), T, H, KV, d, out.data());
  CHECK(max_abs_diff(out, ref_attn(to_d(q), to_d(k), to_d(v), T, H, KV, d)) < 1e-6);
  // the first position sees only itself: out = v_0 of its kv head
  for (int64_t e = 0; e < d; ++e) CHECK(out[3 * d + e] == doctest::Approx(v[1 * d + e]).epsilon(1e-6));
  // changing a later key/value does not change earlier outputs
  auto v2 = v;
  v2[(T - 1) * KV * d] += 5.0f;
  std::vector<float> out2(q.size());
  causal_attention(q.data(), k.data(), v2.data(), T, H, KV, d, out2.data());
  for (int64_t i = 0; i < (T - 1) * H * d; ++i) CHECK(out2[i] == out[i]);
}

TEST_CASE("swiglu is silu(gate) * up") {
  auto g = randf(100, 8), u = randf(100, 9);
  std::vector<float> out(100);
  swiglu(g.data(), u.data(), 100, out.data());
  std::vector<double> r(100);
  for (size_t i = 0; i < 100; ++i) r[i] = double(g[i]) / (1 + std::exp(-double(g[i]))) * u[i];
  CHECK(max_abs_diff(out, r) < 1e-6);
}

TEST_CASE("whole models against the double-precision reference forward") {
  for (const char* name : {"tiny-llama-f32", "tiny-llama", "tiny-qwen2", "tiny-llama-tied", "tiny-llama-f16-sharded"}) {
    CAPTURE(name);
    model_files m = open_model(td + name);
    hf_config c = read_hf_config(m.config_path);
    logits_result r = model_forward(m, c, nullptr, ref_tokens, 1);
    std::vector<double> want = ref_forward(m, c, ref_tokens);
    // f32 accumulation over a 2-layer model: relative 1e-5 of the largest logit
    CHECK(max_abs_diff(r.logits, want) < 1e-5 * max_abs(want));
  }
}

TEST_CASE("whole models and adapters against PyTorch's logits") {
  safetensors_file ref(std::string(LORA_SOURCE_DIR) + "/tests/reference/llama-logits.safetensors");
  struct item {
    const char* key;
    const char* model;
    const char* adapter;
  };
  for (item it : std::vector<item>{{"tiny-llama", "tiny-llama", nullptr},
                                   {"tiny-llama-f16-sharded", "tiny-llama-f16-sharded", nullptr},
                                   {"tiny-llama-tied", "tiny-llama-tied", nullptr},
                                   {"tiny-qwen2", "tiny-qwen2", nullptr},
                                   {"tiny-llama+lora-tiny-llama", "tiny-llama", "lora-tiny-llama"},
                                   {"tiny-llama+lora-tiny-llama-dora", "tiny-llama", "lora-tiny-llama-dora"}}) {
    CAPTURE(it.key);
    forward_options o;
    o.model = td + it.model;
    if (it.adapter) o.adapter = td + it.adapter;
    o.tokens = ref_tokens;
    o.threads = 1;
    logits_result r = run_forward(o);
    const tensor_info& t = ref.at(it.key);
    std::vector<double> want(t.n_elements);
    to_f64(t.type, ref.data(t), want);
    CHECK(max_abs_diff(r.logits, want) < 2e-5 * max_abs(want));
  }
}

TEST_CASE("the adapter changes the logits; top_k orders them") {
  forward_options o;
  o.model = td + "tiny-llama";
  o.tokens = {3, 4, 5};
  logits_result base = run_forward(o);
  o.adapter = td + "lora-tiny-llama-extras";  // embedding LoRA + modules_to_save lm_head
  logits_result extra = run_forward(o);
  CHECK(max_abs_diff(extra.logits, to_d(base.logits)) > 1e-2);
  auto best = top_k(base, 1, 5);
  REQUIRE(best.size() == 5);
  for (size_t i = 1; i < best.size(); ++i) CHECK(best[i - 1].second >= best[i].second);
  for (int64_t j = 0; j < base.n_vocab; ++j) CHECK(base.logits[base.n_vocab + j] <= best[0].second);
}

TEST_CASE("bad inputs are refused with the right exit code") {
  forward_options o;
  o.model = td + "tiny-llama";
  auto code_of = [&] {
    try {
      run_forward(o);
    } catch (const lora::error& e) {
      return static_cast<int>(e.code());
    }
    return 0;
  };
  o.tokens = {1, 256};
  CHECK(code_of() == 2);
  o.tokens = {};
  CHECK(code_of() == 2);
  o.tokens = {1};
  o.model = td + "tiny-unet";
  CHECK(code_of() == 3);
  o.model = td + "tiny-llama";
  o.adapter = td + "lora-tiny-llama-mismatch";
  CHECK(code_of() == 3);
}

// ---- row-block products against the whole-matrix product ----

namespace {

struct named_tensor {
  std::string name;
  dtype type;
  std::vector<int64_t> shape;
  std::vector<float> values;  // rounded once to `type` on writing
};

void write_tensors(const std::string& path, const std::vector<named_tensor>& ts) {
  std::vector<tensor_spec> specs;
  for (const named_tensor& t : ts) specs.push_back({t.name, t.type, t.shape});
  safetensors_writer out(path, plan_safetensors(specs, std::nullopt), durability::visible);
  for (const named_tensor& t : ts) {
    std::vector<uint8_t> bytes(t.values.size() * static_cast<size_t>(math_dtype_size(t.type)));
    from_f32(t.type, t.values, bytes);
    out.write(t.name, bytes);
  }
  out.commit();
}

std::vector<float> scaled(size_t n, uint32_t seed, float s, float offset = 0) {
  std::vector<float> v = randf(n, seed);
  for (float& x : v) x = offset + s * x;
  return v;
}

// A BF16 Llama (hidden 512, 8 heads, 4 KV heads, intermediate 1408, 2 layers,
// vocab 4096) whose matrices span several default row blocks (gate/up: 6,
// down: 6, q/o: 2, lm_head and embed_tokens: 16), and a PEFT LoRA and DoRA
// adapter on q, v, down, lm_head and embed_tokens, under `dir`.
void write_block_model(const std::string& dir) {
  const int64_t H = 512, F = 1408, L = 2, NH = 8, KV = 4, V = 4096, hd = H / NH, r = 4;
  std::filesystem::create_directories(dir + "/model");
  std::ofstream(dir + "/model/config.json")
      << R"({"model_type": "llama", "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 2,
             "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "tie_word_embeddings": false, "hidden_act": "silu"})";
  std::vector<named_tensor> m;
  uint32_t seed = 100;
  auto mat = [&](const std::string& n, int64_t o, int64_t i) {
    m.push_back({n, dtype::BF16, {o, i}, scaled(static_cast<size_t>(o * i), seed++, 1.7f / std::sqrt(float(i)))});
  };
  m.push_back({"model.embed_tokens.weight", dtype::BF16, {V, H}, scaled(static_cast<size_t>(V * H), seed++, 1.0f)});
  mat("lm_head.weight", V, H);
  m.push_back({"model.norm.weight", dtype::BF16, {H}, scaled(H, seed++, 0.1f, 1.0f)});
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    m.push_back({p + "input_layernorm.weight", dtype::BF16, {H}, scaled(H, seed++, 0.1f, 1.0f)});
    m.push_back({p + "post_attention_layernorm.weight", dtype::BF16, {H}, scaled(H, seed++, 0.1f, 1.0f)});
    mat(p + "self_attn.q_proj.weight", NH * hd, H);
    mat(p + "self_attn.k_proj.weight", KV * hd, H);
    mat(p + "self_attn.v_proj.weight", KV * hd, H);
    mat(p + "self_attn.o_proj.weight", H, NH * hd);
    mat(p + "mlp.gate_proj.weight", F, H);
    mat(p + "mlp.up_proj.weight", F, H);
    mat(p + "mlp.down_proj.weight", H, F);
  }
  write_tensors(dir + "/model/model.safetensors", m);
  for (bool dora : {false, true}) {
    const std::string a = dir + (dora ? "/dora" : "/lora");
    std::filesystem::create_directories(a);
    std::ofstream(a + "/adapter_config.json")
        << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": )" << (dora ? "true" : "false")
        << R"(, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"]})";
    std::vector<named_tensor> t;
    auto module = [&](const std::string& p, int64_t o, int64_t i, float mag) {
      const std::string k = "base_model.model." + p;
      t.push_back({k + ".lora_A.weight", dtype::F32, {r, i}, scaled(static_cast<size_t>(r * i), seed++, 0.2f)});
      t.push_back({k + ".lora_B.weight", dtype::F32, {o, r}, scaled(static_cast<size_t>(o * r), seed++, 0.2f)});
      if (dora) t.push_back({k + ".lora_magnitude_vector", dtype::F32, {o}, scaled(o, seed++, 0.1f * mag, mag)});
    };
    for (int64_t l = 0; l < L; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      module(p + "self_attn.q_proj", NH * hd, H, 1.0f);
      module(p + "self_attn.v_proj", KV * hd, H, 1.0f);
      module(p + "mlp.down_proj", H, F, 1.0f);
    }
    module("lm_head", V, H, 1.0f);
    // embedding: A [r, vocab], B [dim, r]; DoRA m [dim], norms over the vocabulary (about 37 here)
    const std::string e = "base_model.model.model.embed_tokens.";
    t.push_back({e + "lora_embedding_A", dtype::F32, {r, V}, scaled(static_cast<size_t>(r * V), seed++, 0.2f)});
    t.push_back({e + "lora_embedding_B", dtype::F32, {H, r}, scaled(static_cast<size_t>(H * r), seed++, 0.2f)});
    if (dora) t.push_back({e + "lora_magnitude_vector", dtype::F32, {H}, scaled(H, seed++, 3.0f, 37.0f)});
    write_tensors(a + "/adapter_model.safetensors", t);
  }
}

logits_result forward_with(const model_files& m, const std::string& adapter_path, int threads, int64_t block) {
  const hf_config c = read_hf_config(m.config_path);
  if (adapter_path.empty()) return model_forward(m, c, nullptr, ref_tokens, threads, block);
  adapter a = load_adapter(adapter_path);
  REQUIRE(fit_adapter(a, m).ok());
  return model_forward(m, c, &a, ref_tokens, threads, block);
}

// Row blocks change only how the BLAS kernel partitions the output columns;
// each logit's dot products run over the same terms. Stated tolerance:
// relative 1e-6 of the largest logit (f32 carries 6e-8; the blocks may change
// the kernel's order of the n_cols-term sums, amplified through the layers).
void check_blocks_match_whole(const model_files& m, const std::string& adapter_path, int64_t block) {
  const logits_result whole = forward_with(m, adapter_path, 1, INT64_MAX);  // decode a whole matrix, one sgemm
  const std::vector<double> want = to_d(whole.logits);
  std::vector<float> first;
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    const logits_result blocks = forward_with(m, adapter_path, threads, block);
    const double diff = max_abs_diff(blocks.logits, want);
    MESSAGE("max |blocks - whole| = ", diff, " of max |logit| ", max_abs(want));
    CHECK(diff <= 1e-6 * max_abs(want));
    // the same blocks whatever the thread count: the same bits
    if (first.empty())
      first = blocks.logits;
    else
      CHECK(blocks.logits == first);
  }
}

}  // namespace

TEST_CASE("row-block products give the whole-matrix logits: testdata models, small blocks") {
  struct item {
    const char* model;
    const char* adapter;
  };
  for (item it : std::vector<item>{{"tiny-llama", ""},
                                   {"tiny-llama", "lora-tiny-llama"},
                                   {"tiny-llama", "lora-tiny-llama-dora"},
                                   {"tiny-llama", "lora-tiny-llama-extras"},
                                   {"tiny-llama-tied", ""},
                                   {"tiny-llama-f16-sharded", ""},
                                   {"tiny-llama-f32", ""}}) {
    CAPTURE(it.model);
    CAPTURE(it.adapter);
    model_files m = open_model(td + it.model);
    // 200 elements: 3 rows of 64 per block (the 176-column down_proj: 1 row), a boundary inside every matrix
    check_blocks_match_whole(m, *it.adapter ? td + it.adapter : std::string(), 200);
  }
}

TEST_CASE("row-block products give the whole-matrix logits: a BF16 model of several default blocks per matrix") {
  lora::testing::temp_dir dir;
  write_block_model(dir.path);
  CHECK(int64_t{1408} * 512 > 5 * stored_gemm_block_elements);  // gate/up/down: 6 blocks each
  model_files m = open_model(dir / "model");
  for (const char* a : {"", "lora", "dora"}) {
    CAPTURE(a);
    check_blocks_match_whole(m, *a ? dir / a : std::string(), 0);
  }
  // the adapters act (a test of equal logits that could not fail otherwise)
  const logits_result base = forward_with(m, "", 2, 0), lora = forward_with(m, dir / "lora", 2, 0),
                      dora = forward_with(m, dir / "dora", 2, 0);
  CHECK(max_abs_diff(lora.logits, to_d(base.logits)) > 1e-2);
  CHECK(max_abs_diff(dora.logits, to_d(lora.logits)) > 1e-2);
}

TEST_CASE("causal_attention with a sliding window: key j seen by query i when i - window < j <= i") {
  const int64_t T = 9, H = 2, KV = 1, d = 4, W = 3;
  auto q = randf(T * H * d, 11), k = randf(T * KV * d, 12), v = randf(T * KV * d, 13);
  std::vector<float> out(q.size()), full(q.size());
  causal_attention(q.data(), k.data(), v.data(), T, H, KV, d, out.data(), W);
  causal_attention(q.data(), k.data(), v.data(), T, H, KV, d, full.data(), 0);
  // the first W positions see every earlier key: as full attention
  for (int64_t i = 0; i < W * H * d; ++i) CHECK(out[i] == full[i]);
  // query i against the double reference over keys i-W+1..i only
  const std::vector<double> qd = to_d(q);
  for (int64_t i = W; i < T; ++i) {
    const int64_t j0 = i - W + 1;
    std::vector<double> qs(qd.begin() + i * H * d, qd.begin() + (i + 1) * H * d);
    std::vector<double> ks, vs;
    for (int64_t j = j0; j <= i; ++j)
      for (int64_t e = 0; e < d; ++e) ks.push_back(k[j * d + e]), vs.push_back(v[j * d + e]);
    // put query i last in a window of W positions: the causal reference sees all W keys
    std::vector<double> qw(static_cast<size_t>(W * H * d), 0.0);
    std::copy(qs.begin(), qs.end(), qw.begin() + (W - 1) * H * d);
    const std::vector<double> r = ref_attn(qw, ks, vs, W, H, KV, d);
    for (int64_t e = 0; e < H * d; ++e)
      CHECK(out[i * H * d + e] == doctest::Approx(r[(W - 1) * H * d + e]).epsilon(1e-5));
  }
  // a key just outside the window does not matter
  auto v2 = v;
  v2[0] += 5.0f;
  std::vector<float> out2(q.size());
  causal_attention(q.data(), k.data(), v2.data(), T, H, KV, d, out2.data(), W);
  for (int64_t i = W * H * d; i < T * H * d; ++i) CHECK(out2[i] == out[i]);
}

TEST_CASE("norm_rows: Gemma's (1 + w) RMSNorm and GPT-2's LayerNorm against double") {
  const int64_t T = 5, D = 24;
  auto x = randf(T * D, 31), w = randf(D, 32), b = randf(D, 33);
  std::vector<float> out(x.size());
  std::vector<double> want(x.size());
  norm_rows(norm_kind::rms_offset_one, x.data(), T, D, w.data(), nullptr, 1e-6, out.data());
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += double(x[t * D + i]) * x[t * D + i];
    for (int64_t i = 0; i < D; ++i) want[t * D + i] = x[t * D + i] / std::sqrt(ss / D + 1e-6) * (1.0 + w[i]);
  }
  CHECK(max_abs_diff(out, want) < 1e-5);
  norm_rows(norm_kind::layer_norm, x.data(), T, D, w.data(), b.data(), 1e-5, out.data());
  for (int64_t t = 0; t < T; ++t) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < D; ++i) mean += x[t * D + i] / double(D);
    for (int64_t i = 0; i < D; ++i) var += (x[t * D + i] - mean) * (x[t * D + i] - mean) / D;
    for (int64_t i = 0; i < D; ++i) want[t * D + i] = (x[t * D + i] - mean) / std::sqrt(var + 1e-5) * w[i] + b[i];
  }
  CHECK(max_abs_diff(out, want) < 1e-5);
}

TEST_CASE("causal_attention with a scale and tanh soft-capping (Gemma 2) against double") {
  const int64_t T = 6, H = 2, KV = 1, d = 8;
  auto q = randf(T * H * d, 41), k = randf(T * KV * d, 42), v = randf(T * KV * d, 43);
  for (float& e : q) e *= 4;  // scores well past the cap: the cap bites
  const double scale = 0.3, cap = 0.5;
  std::vector<float> out(q.size()), plain(q.size());
  causal_attention(q.data(), k.data(), v.data(), T, H, KV, d, out.data(), 0, scale, cap);
  causal_attention(q.data(), k.data(), v.data(), T, H, KV, d, plain.data(), 0, scale, 0);
  std::vector<double> want(q.size(), 0.0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < T; ++i) {
      std::vector<double> s(static_cast<size_t>(i + 1));
      double sum = 0;
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (int64_t e = 0; e < d; ++e) dot += double(q[(i * H + h) * d + e]) * k[j * d + e];
        s[j] = std::exp(cap * std::tanh(dot * scale / cap));
        sum += s[j];
      }
      for (int64_t j = 0; j <= i; ++j)
        for (int64_t e = 0; e < d; ++e) want[(i * H + h) * d + e] += s[j] / sum * v[j * d + e];
    }
  CHECK(max_abs_diff(out, want) < 1e-5);
  CHECK(max_abs_diff(plain, want) > 1e-2);
}

TEST_CASE("activations: gelu_pytorch_tanh / gelu_new and exact gelu") {
  for (float x : {-3.0f, -0.5f, 0.0f, 0.7f, 2.5f}) {
    const double t = 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    CHECK(activate(activation_kind::gelu_tanh, x) == doctest::Approx(t).epsilon(1e-6));
    CHECK(activate(activation_kind::gelu, x) == doctest::Approx(0.5 * x * (1 + std::erf(x / std::sqrt(2.0)))));
  }
}

TEST_CASE("several weighted adapters: two halves of one adapter give the adapter's logits") {
  model_files m = open_model(td + "tiny-llama-f32");
  const hf_config c = read_hf_config(m.config_path);
  adapter a = load_adapter(td + "lora-tiny-llama");
  REQUIRE(fit_adapter(a, m).ok());
  const logits_result one = model_forward(m, c, &a, ref_tokens, 1);
  const std::vector<weighted_adapter> halves{{&a, 0.5}, {&a, 0.5}}, none{{&a, 0.0}};
  const logits_result two = model_forward(m, c, halves, ref_tokens, 1);
  double big = 0, diff = 0;
  for (size_t i = 0; i < one.logits.size(); ++i) {
    big = std::max(big, double(std::fabs(one.logits[i])));
    diff = std::max(diff, double(std::fabs(one.logits[i] - two.logits[i])));
  }
  CHECK(diff <= 1e-5 * big);
  // weight 0: the base's logits
  const logits_result base = model_forward(m, c, nullptr, ref_tokens, 1);
  const logits_result zero = model_forward(m, c, none, ref_tokens, 1);
  CHECK(max_abs_diff(zero.logits, to_d(base.logits)) < 1e-5 * big);
}

TEST_CASE("causal_attention over several chunks of query rows, with and without a window, against double") {
  const int64_t T = 600, H = 2, KV = 1, d = 8;  // 256-row chunks: three of them
  auto q = randf(T * H * d, 51), k = randf(T * KV * d, 52), v = randf(T * KV * d, 53);
  for (int64_t W : {int64_t{0}, int64_t{300}, int64_t{7}}) {
    CAPTURE(W);
    std::vector<float> out(q.size());
    causal_attention(q.data(), k.data(), v.data(), T, H, KV, d, out.data(), W);
    double worst = 0;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t lo = W > 0 ? std::max<int64_t>(0, i - W + 1) : 0;
        std::vector<double> p;
        double top = -1e300, sum = 0;
        for (int64_t j = lo; j <= i; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < d; ++e) dot += double(q[(i * H + h) * d + e]) * k[j * d + e];
          p.push_back(dot / std::sqrt(double(d)));
          top = std::max(top, p.back());
        }
        for (double& x : p) sum += x = std::exp(x - top);
        for (int64_t e = 0; e < d; ++e) {
          double o = 0;
          for (int64_t j = lo; j <= i; ++j) o += p[j - lo] / sum * v[j * d + e];
          worst = std::max(worst, std::fabs(o - out[(i * H + h) * d + e]));
        }
      }
    CHECK(worst < 1e-5);
  }
}
