// lora extract (core/extract.h) on models built here in a temp folder:
// base + known low-rank deltas (U, V from the QR of seeded Gaussians, chosen
// singular values) + small noise. Extract-then-merge is checked in f64
// against the tuned model, errors against the optimal rank-r error of an
// exact double-precision SVD (Eigen BDCSVD).
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <Eigen/SVD>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <random>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/extract.h"
#include "core/kohya-format.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "tests/svd-testing.h"
#include "tests/test-support.h"

using namespace lora;
using namespace lora::testing;
namespace fs = std::filesystem;
using mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {
struct tensor {
  dtype type;
  std::vector<int64_t> shape;
  mat values;  // a 1-D tensor is one row
};
using model = std::map<std::string, tensor>;

// Writes a model folder (model.safetensors only) rounding once from f64.
void write_model(const std::string& folder, const model& m) {
  fs::create_directories(folder);
  std::vector<tensor_spec> specs;
  for (const auto& [name, t] : m) specs.push_back({name, t.type, t.shape});
  safetensors_writer w(folder + "/model.safetensors", plan_safetensors(specs, metadata_map{{"format", "pt"}}));
  for (const auto& [name, t] : m) {
    std::vector<double> v(t.values.data(), t.values.data() + t.values.size());
    std::vector<uint8_t> bytes(v.size() * math_dtype_size(t.type));
    from_f64(t.type, v, bytes);
    w.write(name, bytes);
  }
  w.commit();
}

// A tensor of a written file, read back in f64 (as stored).
mat read_tensor(const safetensors_file& f, const std::string& name, int64_t rows, int64_t cols) {
  const tensor_info& t = f.at(name);
  std::vector<double> v(t.n_elements);
  to_f64(t.type, f.data(t), v);
  REQUIRE(static_cast<int64_t>(v.size()) == rows * cols);
  return Eigen::Map<mat>(v.data(), rows, cols);
}

// Rounds like the file does, so tests see the values the tool sees.
mat stored(const mat& v, dtype type) {
  std::vector<double> in(v.data(), v.data() + v.size());
  std::vector<uint8_t> bytes(in.size() * math_dtype_size(type));
  from_f64(type, in, bytes);
  std::vector<double> out(in.size());
  to_f64(type, bytes, out);
  return Eigen::Map<mat>(out.data(), v.rows(), v.cols());
}

mat gaussian(int64_t rows, int64_t cols, double sd, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  mat g(rows, cols);
  for (int64_t i = 0; i < g.size(); ++i) g.data()[i] = sd * normal(rng);
  return g;
}

// U diag(s) V^T with s_i = first * ratio^i, i < k
mat low_rank(int64_t m, int64_t n, int64_t k, double first, double ratio, std::mt19937_64& rng) {
  mat u = orthonormal(m, k, rng), v = orthonormal(n, k, rng);
  Eigen::VectorXd s(k);
  for (int64_t i = 0; i < k; ++i) s(i) = first * std::pow(ratio, static_cast<double>(i));
  return u * s.asDiagonal() * v.transpose();
}

// The base and tuned models of these tests.
struct pair_of_models {
  model base, tuned;
};
pair_of_models make_models(dtype type) {
  std::mt19937_64 rng(99);
  pair_of_models p;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, const mat& delta) {
    const int64_t rows = shape.size() == 2 ? shape[0] : 1, cols = shape.back();
    mat w = stored(gaussian(rows, cols, 0.05, rng), type);
    p.base[name] = {type, shape, w};
    p.tuned[name] = {type, shape, stored(w + delta, type)};
  };
  auto noise = [&](int64_t m, int64_t n) { return gaussian(m, n, 1e-4, rng); };
  add("model.embed_tokens.weight", {96, 32}, low_rank(96, 32, 12, 0.5, 0.6, rng) + noise(96, 32));
  add("model.layers.0.self_attn.q_proj.weight", {32, 32}, low_rank(32, 32, 12, 1.0, 0.5, rng) + noise(32, 32));
  add("model.layers.0.self_attn.q_proj.bias", {32}, gaussian(1, 32, 0.01, rng));
  add("model.layers.0.self_attn.v_proj.weight", {16, 32}, low_rank(16, 32, 10, 1.0, 0.7, rng) + noise(16, 32));
  add("model.layers.0.mlp.up_proj.weight", {80, 32}, low_rank(80, 32, 20, 1.0, 0.85, rng) + noise(80, 32));
  add("model.layers.0.mlp.down_proj.weight", {32, 80}, low_rank(32, 80, 20, 1.0, 0.8, rng) + noise(32, 80));
  add("model.norm.weight", {32}, mat::Constant(1, 32, 0.01));
  add("lm_head.weight", {96, 32}, mat::Zero(96, 32));
  return p;
}

// Singular values of the exact f64 delta of a 2-D tensor.
Eigen::VectorXd spectrum(const pair_of_models& p, const std::string& name) {
  mat d = p.tuned.at(name).values - p.base.at(name).values;
  return Eigen::BDCSVD<Eigen::MatrixXd>(Eigen::MatrixXd(d)).singularValues();
}
double optimal_error(const Eigen::VectorXd& s, int64_t r) {
  return std::sqrt(s.tail(s.size() - r).squaredNorm()) / s.norm();
}

extract_options options_for(const temp_dir& dir, const std::string& out, rank_rule rule) {
  extract_options o;
  o.base = dir.path + "/base";
  o.tuned = dir.path + "/tuned";
  o.out = dir.path + "/" + out;
  o.rule = rule;
  o.threads = 1;
  return o;
}

const extracted_module& find_module(const extract_report& r, const std::string& name) {
  for (const auto& m : r.modules)
    if (m.name == name) return m;
  FAIL("module not in the report: " << name);
  throw 0;
}

const std::vector<std::string> linear_modules = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                                 "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"};

// Extract-then-merge in f64: W_base + B A against W_tuned, relative to ||dW||.
double merged_error(const pair_of_models& p, const safetensors_file& f, const std::string& path, int64_t rank) {
  const tensor& base = p.base.at(path + ".weight");
  const tensor& tuned = p.tuned.at(path + ".weight");
  const int64_t m = base.shape[0], n = base.shape[1];
  mat a = read_tensor(f, "base_model.model." + path + ".lora_A.weight", rank, n);
  mat b = read_tensor(f, "base_model.model." + path + ".lora_B.weight", m, rank);
  return (base.values + b * a - tuned.values).norm() / (tuned.values - base.values).norm();
}

}  // namespace

TEST_CASE("randomized extract: within 1% of optimal; merge(extract) reproduces tuned within the reported error") {
  temp_dir dir;
  pair_of_models p = make_models(dtype::F32);
  write_model(dir.path + "/base", p.base);
  write_model(dir.path + "/tuned", p.tuned);

  const int64_t r = 6;
  extract_options o = options_for(dir, "out", {rank_rule::kind::fixed, r, 0});
  o.targets = "q_proj|v_proj|up_proj|down_proj|embed_tokens";
  const extract_report rep = run_extract(o, {});
  REQUIRE(rep.modules.size() == 5);
  CHECK(rep.config_rank == r);

  safetensors_file f(o.out + "/adapter_model.safetensors");
  for (const auto& path : linear_modules) {
    CAPTURE(path);
    const extracted_module& m = find_module(rep, path);
    CHECK(m.rank == r);
    CHECK(f.at("base_model.model." + path + ".lora_A.weight").type == dtype::F32);
    const double err = merged_error(p, f, path, r);
    const double best = optimal_error(spectrum(p, path + ".weight"), r);
    CAPTURE(err / best);
    CHECK(err <= 1.01 * best);
    CHECK(std::abs(err - m.error) <= 1e-4 * m.error);  // the report is measured, not estimated
  }
  // embedding: lora_embedding_A [r, vocab], lora_embedding_B [dim, r], dW = (B A)^T
  const extracted_module& e = find_module(rep, "model.embed_tokens");
  CHECK(e.embedding);
  mat ea = read_tensor(f, "base_model.model.model.embed_tokens.lora_embedding_A", r, 96);
  mat eb = read_tensor(f, "base_model.model.model.embed_tokens.lora_embedding_B", 32, r);
  const mat& w0 = p.base.at("model.embed_tokens.weight").values;
  const mat& w1 = p.tuned.at("model.embed_tokens.weight").values;
  const double eerr = (w0 + (eb * ea).transpose() - w1).norm() / (w1 - w0).norm();
  CHECK(eerr <= 1.01 * optimal_error(spectrum(p, "model.embed_tokens.weight"), r));
  CHECK(std::abs(eerr - e.error) <= 1e-4 * e.error + 1e-7);

  // the config: r = lora_alpha, every extracted module a target
  nlohmann::json cfg = nlohmann::json::parse(read_text_file(o.out + "/adapter_config.json"));
  CHECK(cfg["r"] == r);
  CHECK(cfg["lora_alpha"] == r);
  CHECK(cfg["target_modules"].size() == 5);
  // not extracted: q bias, norm (1-D); lm_head did not change
  CHECK(rep.others.size() == 2);
  CHECK(rep.n_unchanged == 1);
  const double total_best = [&] {
    double d2 = 0, o2 = 0;
    for (const auto& m : rep.modules) {
      Eigen::VectorXd s = spectrum(p, m.tensor);
      d2 += s.squaredNorm();
      o2 += s.tail(s.size() - r).squaredNorm();
    }
    return std::sqrt(o2 / d2);
  }();
  CHECK(rep.total_error <= 1.01 * total_best);
}

TEST_CASE("exact extract matches the optimal error to rounding") {
  temp_dir dir;
  pair_of_models p = make_models(dtype::F32);
  write_model(dir.path + "/base", p.base);
  write_model(dir.path + "/tuned", p.tuned);
  const int64_t r = 5;
  extract_options o = options_for(dir, "out", {rank_rule::kind::fixed, r, 0});
  o.svd.method = svd_method::exact;
  const extract_report rep = run_extract(o, {});
  safetensors_file f(o.out + "/adapter_model.safetensors");
  REQUIRE(rep.modules.size() == linear_modules.size());
  for (const auto& path : linear_modules) {
    CAPTURE(path);
    CHECK(find_module(rep, path).method == svd_method::exact);
    const double err = merged_error(p, f, path, r);
    // factors rounded once to f32: relative 2^-24 per element
    CHECK(std::abs(err - optimal_error(spectrum(p, path + ".weight"), r)) <= 1e-6);
  }
}

TEST_CASE("energy and error targets choose each module's rank; patterns carry it") {
  temp_dir dir;
  pair_of_models p = make_models(dtype::F32);
  write_model(dir.path + "/base", p.base);
  write_model(dir.path + "/tuned", p.tuned);
  for (const rank_rule rule :
       {rank_rule{rank_rule::kind::energy, 0.97, 0}, rank_rule{rank_rule::kind::max_error, 0.1, 0}}) {
    const double fraction = rule.type == rank_rule::kind::energy ? rule.value : 1 - rule.value * rule.value;
    CAPTURE(fraction);
    extract_options o = options_for(dir, rule.type == rank_rule::kind::energy ? "energy" : "error", rule);
    const extract_report rep = run_extract(o, {});
    nlohmann::json cfg = nlohmann::json::parse(read_text_file(o.out + "/adapter_config.json"));
    std::set<int64_t> ranks;
    for (const auto& path : linear_modules) {
      CAPTURE(path);
      Eigen::VectorXd s = spectrum(p, path + ".weight");
      int64_t want = 0;
      double kept = 0;
      while (kept < fraction * s.squaredNorm()) kept += s(want) * s(want), ++want;
      const extracted_module& m = find_module(rep, path);
      CHECK(m.rank == want);
      ranks.insert(m.rank);
      // PEFT's lookup: the first pattern key matching ^(.*\.)?(KEY)$, else r / lora_alpha
      int64_t cfg_rank = cfg["r"], cfg_alpha = cfg["lora_alpha"];
      for (auto& [k, v] : cfg["rank_pattern"].items())
        if (std::regex_match(path, std::regex("^(.*\\.)?(" + k + ")$"))) {
          cfg_rank = v;
          break;
        }
      for (auto& [k, v] : cfg["alpha_pattern"].items())
        if (std::regex_match(path, std::regex("^(.*\\.)?(" + k + ")$"))) {
          cfg_alpha = v;
          break;
        }
      CHECK(cfg_rank == m.rank);
      CHECK(cfg_alpha == m.rank);  // scale 1
    }
    CHECK(ranks.size() > 1);  // the spectra differ: so do the ranks
  }
}

TEST_CASE("bf16 models: factors in bf16 by default, --dtype f32 on request; --save-modules") {
  temp_dir dir;
  pair_of_models p = make_models(dtype::BF16);
  write_model(dir.path + "/base", p.base);
  write_model(dir.path + "/tuned", p.tuned);
  extract_options o = options_for(dir, "bf16", {rank_rule::kind::fixed, 4, 0});
  o.save_modules = true;
  const extract_report rep = run_extract(o, {});
  safetensors_file f(o.out + "/adapter_model.safetensors");
  CHECK(f.at("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight").type == dtype::BF16);
  for (const auto& path : linear_modules)
    CHECK(std::abs(merged_error(p, f, path, 4) - find_module(rep, path).error) <= 1e-4);
  // the bias of an extracted module: lora_B.bias = its delta; the rest whole
  nlohmann::json cfg = nlohmann::json::parse(read_text_file(o.out + "/adapter_config.json"));
  CHECK(cfg["lora_bias"] == true);
  CHECK(cfg["modules_to_save"] == nlohmann::json({"model.embed_tokens", "model.norm"}));
  mat bias = read_tensor(f, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", 1, 32);
  const mat dbias = p.tuned.at("model.layers.0.self_attn.q_proj.bias").values -
                    p.base.at("model.layers.0.self_attn.q_proj.bias").values;
  CHECK((bias - stored(dbias, dtype::BF16)).norm() == 0);
  CHECK((read_tensor(f, "base_model.model.model.norm.weight", 1, 32) - p.tuned.at("model.norm.weight").values).norm() ==
        0);
  CHECK(f.find("base_model.model.model.embed_tokens.weight") != nullptr);

  extract_options o32 = options_for(dir, "f32", {rank_rule::kind::fixed, 4, 0});
  o32.out_dtype = dtype::F32;
  run_extract(o32, {});
  safetensors_file f32(o32.out + "/adapter_model.safetensors");
  CHECK(f32.at("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight").type == dtype::F32);
}

TEST_CASE("refusals: exit code, message, nothing left behind") {
  temp_dir dir;
  pair_of_models p = make_models(dtype::F32);
  write_model(dir.path + "/base", p.base);
  auto expect = [&](const extract_options& o, exit_code code, const std::string& text) {
    try {
      run_extract(o, {});
      FAIL("no error; wanted: " << text);
    } catch (const lora::error& e) {
      CHECK(e.code() == code);
      CHECK_MESSAGE(std::string(e.what()).find(text) != std::string::npos, e.what());
    }
    for (const auto& name : dir.entries()) CHECK_MESSAGE((name == "base" || name == "tuned"), name);
  };
  // identical models
  write_model(dir.path + "/tuned", p.base);
  expect(options_for(dir, "out", {rank_rule::kind::fixed, 2, 0}), exit_code::invalid_input,
         "models are identical: nothing to extract");
  // NaN in a delta
  pair_of_models q = p;
  q.tuned = p.base;
  q.tuned["model.layers.0.mlp.up_proj.weight"].values(3, 4) = std::nan("");
  fs::remove_all(dir.path + "/tuned");
  write_model(dir.path + "/tuned", q.tuned);
  expect(options_for(dir, "out", {rank_rule::kind::fixed, 2, 0}), exit_code::invalid_input,
         "tuned: model.layers.0.mlp.up_proj.weight: 1 of its values are NaN or infinite");
  // only a 1-D tensor changed
  q.tuned = p.base;
  q.tuned["model.norm.weight"].values(0, 0) += 1;
  fs::remove_all(dir.path + "/tuned");
  write_model(dir.path + "/tuned", q.tuned);
  expect(options_for(dir, "out", {rank_rule::kind::fixed, 2, 0}), exit_code::invalid_input,
         "no selected 2-D weight differs from the base");
  // kohya cannot hold embeddings or modules_to_save
  extract_options k = options_for(dir, "k.safetensors", {rank_rule::kind::fixed, 2, 0});
  k.format = extract_format::kohya;
  k.save_modules = true;
  expect(k, exit_code::usage, "--save-modules needs --format peft");
  k.save_modules = false;
  k.targets = "embed_tokens";
  q.tuned["model.embed_tokens.weight"].values(0, 0) += 1;
  fs::remove_all(dir.path + "/tuned");
  write_model(dir.path + "/tuned", q.tuned);
  expect(k, exit_code::usage, "kohya files have no embedding LoRA");
}

namespace {

// A model of named tensors with chosen deltas (rank k spectra plus noise);
// 4-D tensors are held as their [out, in*kh*kw] flattening.
struct delta_spec {
  std::string name;
  std::vector<int64_t> shape;
  int64_t k;  // rank of the planted delta
  double ratio;
};
pair_of_models models_of(const std::vector<delta_spec>& specs, uint64_t seed) {
  std::mt19937_64 rng(seed);
  pair_of_models p;
  for (const auto& d : specs) {
    const int64_t rows = d.shape[0];
    int64_t cols = 1;
    for (size_t i = 1; i < d.shape.size(); ++i) cols *= d.shape[i];
    mat w = gaussian(rows, cols, 0.05, rng);
    mat delta = low_rank(rows, cols, d.k, 1.0, d.ratio, rng) + gaussian(rows, cols, 1e-3, rng);
    p.base[d.name] = {dtype::F32, d.shape, w};
    p.tuned[d.name] = {dtype::F32, d.shape, stored(w + delta, dtype::F32)};
  }
  return p;
}

void write_pair(const temp_dir& dir, const pair_of_models& p, const std::string& config = "") {
  write_model(dir.path + "/base", p.base);
  write_model(dir.path + "/tuned", p.tuned);
  if (!config.empty())
    for (const char* side : {"/base", "/tuned"}) write_file_atomic(dir.path + side + "/config.json", config);
}

}  // namespace

TEST_CASE("GPT-2 Conv1D: fan_in_fan_out, lora_A [r, in = weight.shape[0]], PEFT merge within 1.01x optimal") {
  temp_dir dir;
  // Conv1D weights are stored [in, out]: c_attn [32, 96] (not square), c_proj [32, 32] (square)
  pair_of_models p = models_of({{"h.0.attn.c_attn.weight", {32, 96}, 12, 0.7},
                                {"h.0.attn.c_proj.weight", {32, 32}, 12, 0.6},
                                {"h.0.mlp.c_fc.weight", {32, 128}, 14, 0.8}},
                               7);
  write_pair(dir, p, R"({"model_type": "gpt2"})");
  const int64_t r = 5;
  for (const auto format : {extract_format::peft, extract_format::kohya}) {
    const bool peft = format == extract_format::peft;
    extract_options o = options_for(dir, peft ? "peft" : "k.safetensors", {rank_rule::kind::fixed, r, 0});
    o.format = format;
    const extract_report rep = run_extract(o, {});
    safetensors_file f(peft ? o.out + "/adapter_model.safetensors" : o.out);
    for (const auto& [name, t] : p.base) {
      const std::string path = module_path(name);
      CAPTURE(path);
      const extracted_module& m = find_module(rep, path);
      CHECK(m.layout == delta_layout::conv1d);
      const int64_t in = t.shape[0], out = t.shape[1];
      const std::string key =
          peft ? "base_model.model." + path : "lora_te_" + std::regex_replace(path, std::regex("\\."), "_");
      mat a = read_tensor(f, key + (peft ? ".lora_A.weight" : ".lora_down.weight"), r, in);
      mat b = read_tensor(f, key + (peft ? ".lora_B.weight" : ".lora_up.weight"), out, r);
      // PEFT Conv1D: W = W0 + (B A)^T
      const mat& w0 = t.values;
      const mat& w1 = p.tuned.at(name).values;
      const double err = (w0 + (b * a).transpose() - w1).norm() / (w1 - w0).norm();
      CHECK(err <= 1.01 * optimal_error(spectrum(p, name), r));
      CHECK(std::abs(err - m.error) <= 1e-4 * m.error);
    }
    if (peft) {
      nlohmann::json cfg = nlohmann::json::parse(read_text_file(o.out + "/adapter_config.json"));
      CHECK(cfg["fan_in_fan_out"] == true);
    }
  }
  // without a GPT-2 model_type the same names are nn.Linear [out, in]
  write_pair(dir, p, R"({"model_type": "llama"})");
  extract_options o = options_for(dir, "linear", {rank_rule::kind::fixed, r, 0});
  CHECK(run_extract(o, {}).modules[0].layout == delta_layout::linear);
}

TEST_CASE("conv weights: the [out, in*kh*kw] flattening within 1.01x optimal, PEFT and kohya, --conv-rank") {
  temp_dir dir;
  pair_of_models p = models_of({{"down_blocks.0.resnets.0.conv1.weight", {16, 8, 3, 3}, 12, 0.7},
                                {"down_blocks.0.resnets.0.conv_shortcut.weight", {16, 8, 1, 1}, 6, 0.6},
                                {"down_blocks.0.attentions.0.proj_in.weight", {16, 16}, 8, 0.6}},
                               11);
  write_pair(dir, p);
  const int64_t r = 4, conv_r = 6;
  for (const auto format : {extract_format::peft, extract_format::kohya}) {
    const bool peft = format == extract_format::peft;
    extract_options o = options_for(dir, peft ? "peft" : "k.safetensors", {rank_rule::kind::fixed, r, 0});
    o.format = format;
    o.conv_rule = rank_rule{rank_rule::kind::fixed, conv_r, 0};
    const extract_report rep = run_extract(o, {});
    safetensors_file f(peft ? o.out + "/adapter_model.safetensors" : o.out);
    for (const std::string path : {"down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv_shortcut"}) {
      CAPTURE(path);
      const tensor& t = p.base.at(path + ".weight");
      const extracted_module& m = find_module(rep, path);
      CHECK(m.layout == delta_layout::conv);
      CHECK(m.rank == conv_r);
      const std::string key =
          peft ? "base_model.model." + path : "lora_unet_" + std::regex_replace(path, std::regex("\\."), "_");
      const std::string ak = key + (peft ? ".lora_A.weight" : ".lora_down.weight");
      const std::string bk = key + (peft ? ".lora_B.weight" : ".lora_up.weight");
      CHECK(f.at(ak).shape == std::vector<int64_t>{conv_r, t.shape[1], t.shape[2], t.shape[3]});
      CHECK(f.at(bk).shape == std::vector<int64_t>{t.shape[0], conv_r, 1, 1});
      mat a = read_tensor(f, ak, conv_r, t.values.cols());
      mat b = read_tensor(f, bk, t.shape[0], conv_r);
      const mat& w1 = p.tuned.at(path + ".weight").values;
      const double err = (t.values + b * a - w1).norm() / (w1 - t.values).norm();
      CHECK(err <= 1.01 * optimal_error(spectrum(p, path + ".weight"), conv_r));
    }
    CHECK(find_module(rep, "down_blocks.0.attentions.0.proj_in").rank == r);
    if (!peft) {
      // the ss_* keys sd-scripts' extract_lora_from_models.py writes
      const metadata_map& md = *f.metadata();
      CHECK(md.at("ss_network_module") == "networks.lora");
      CHECK(md.at("ss_network_dim") == "4");
      CHECK(md.at("ss_network_alpha") == "4.0");
      CHECK(md.at("ss_network_args") == R"({"conv_dim": "6", "conv_alpha": "6.0"})");
    }
  }
}

TEST_CASE("kohya names as sd-scripts writes them: SDXL, Flux, SD 1.x text encoder and UNet") {
  temp_dir dir;
  auto keys_of = [&](const std::vector<delta_spec>& specs) {
    fs::remove_all(dir.path + "/base");
    fs::remove_all(dir.path + "/tuned");
    fs::remove_all(dir.path + "/k.safetensors");
    write_pair(dir, models_of(specs, 5));
    extract_options o = options_for(dir, "k.safetensors", {rank_rule::kind::fixed, 2, 0});
    o.format = extract_format::kohya;
    const extract_report rep = run_extract(o, {});
    safetensors_file f(o.out);
    std::set<std::string> names;
    for (const auto& t : f.tensors())
      if (t.name.ends_with(".lora_down.weight")) names.insert(t.name.substr(0, t.name.size() - 17));
    return std::pair{names, *f.metadata()};
  };
  // SDXL (SGM names): the UNet by its LDM names, CLIP-L as lora_te1_, OpenCLIP-G
  // as lora_te2_ in the Hugging Face names sd-scripts converts it to
  auto [sdxl, sdxl_md] = keys_of(
      {{"model.diffusion_model.input_blocks.4.1.proj_in.weight", {16, 16}, 4, 0.5},
       {"model.diffusion_model.output_blocks.2.0.in_layers.2.weight", {16, 8, 3, 3}, 4, 0.5},
       {"conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", {16, 16}, 4, 0.5},
       {"conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight", {32, 16}, 4, 0.5},
       {"conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight", {16, 16}, 4, 0.5}});
  CHECK(sdxl == std::set<std::string>{"lora_unet_input_blocks_4_1_proj_in", "lora_unet_output_blocks_2_0_in_layers_2",
                                      "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                      "lora_te2_text_model_encoder_layers_0_mlp_fc1",
                                      "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"});
  CHECK(sdxl_md.at("ss_base_model_version") == "sdxl_base_v1-0");
  // Flux (BFL names), bare and inside a ComfyUI-style model.diffusion_model.
  auto [flux, flux_md] = keys_of({{"double_blocks.0.img_attn.qkv.weight", {48, 16}, 4, 0.5},
                                  {"single_blocks.0.linear1.weight", {32, 16}, 4, 0.5}});
  CHECK(flux == std::set<std::string>{"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"});
  CHECK(flux_md.at("ss_base_model_version") == "flux1");
  auto [comfy, comfy_md] = keys_of({{"model.diffusion_model.double_blocks.0.txt_mlp.0.weight", {32, 16}, 4, 0.5}});
  CHECK(comfy == std::set<std::string>{"lora_unet_double_blocks_0_txt_mlp_0"});
  // SD 1.x: the text encoder
  auto [sd1, sd1_md] =
      keys_of({{"cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.weight", {16, 32}, 4, 0.5}});
  CHECK(sd1 == std::set<std::string>{"lora_te_text_model_encoder_layers_3_mlp_fc2"});
  CHECK(sd1_md.at("ss_base_model_version") == "sd_v1");
  // SD 1.x UNet: sd-scripts names it by diffusers names (core/ldm-names), resnets and
  // down / upsamplers included
  auto [sd1u, sd1u_md] =
      keys_of({{"cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.weight", {16, 32}, 4, 0.5},
               {"model.diffusion_model.input_blocks.1.1.proj_in.weight", {16, 16}, 4, 0.5},
               {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", {16, 16}, 4, 0.5},
               {"model.diffusion_model.output_blocks.5.1.proj_out.weight", {16, 16}, 4, 0.5},
               {"model.diffusion_model.middle_block.2.emb_layers.1.weight", {16, 32}, 4, 0.5}});
  CHECK(sd1u == std::set<std::string>{
                    "lora_te_text_model_encoder_layers_3_mlp_fc2", "lora_unet_down_blocks_0_attentions_0_proj_in",
                    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                    "lora_unet_up_blocks_1_attentions_2_proj_out", "lora_unet_mid_block_resnets_1_time_emb_proj"});
  CHECK(sd1u_md.at("ss_base_model_version") == "sd_v1");
  // a key outside the LDM layout has no diffusers name: refused by name, not written under an unloadable one
  const lora::error e = thrown([] {
    kohya::checkpoint_name("model.diffusion_model.label_emb.0.0", kohya::checkpoint_family::sd1, "base.safetensors");
  });
  CHECK(e.code() == exit_code::invalid_input);
  CHECK(std::string(e.what()).find("model.diffusion_model.label_emb.0.0: --format kohya: the sd1 module") !=
        std::string::npos);
}

TEST_CASE("a bigger vocabulary: --save-modules writes embed_tokens / lm_head whole, bit-identical; totals cover it") {
  temp_dir dir;
  pair_of_models p = models_of({{"model.layers.0.self_attn.q_proj.weight", {32, 32}, 8, 0.6}}, 3);
  std::mt19937_64 rng(4);
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight"}) {
    mat w = gaussian(64, 32, 0.05, rng);
    mat grown(72, 32);
    grown << w + gaussian(64, 32, 0.01, rng), gaussian(8, 32, 0.05, rng);
    p.base[name] = {dtype::F32, {64, 32}, w};
    p.tuned[name] = {dtype::F32, {72, 32}, stored(grown, dtype::F32)};
  }
  write_pair(dir, p);
  extract_options o = options_for(dir, "out", {rank_rule::kind::fixed, 4, 0});
  try {
    run_extract(o, {});
    FAIL("a resized vocabulary without --save-modules");
  } catch (const lora::error& e) {
    CHECK(std::string(e.what()).find("has 72 rows, the base 64") != std::string::npos);
  }
  o.save_modules = true;
  const extract_report rep = run_extract(o, {});
  safetensors_file f(o.out + "/adapter_model.safetensors");
  safetensors_file tuned(dir.path + "/tuned/model.safetensors");
  double saved2 = 0;
  for (const std::string name : {"model.embed_tokens.weight", "lm_head.weight"}) {
    CAPTURE(name);
    const tensor_info& s = f.at("base_model.model." + name);
    CHECK(s.shape == std::vector<int64_t>{72, 32});
    CHECK(std::ranges::equal(f.data(s), tuned.data(tuned.at(name))));
    mat d = p.tuned.at(name).values;
    d.topRows(64) -= p.base.at(name).values;
    saved2 += d.squaredNorm();
  }
  nlohmann::json cfg = nlohmann::json::parse(read_text_file(o.out + "/adapter_config.json"));
  CHECK(cfg["modules_to_save"] == nlohmann::json({"lm_head", "model.embed_tokens"}));
  CHECK(std::abs(rep.saved_norm - std::sqrt(saved2)) <= 1e-9 * std::sqrt(saved2));
  CHECK(rep.left_out_norm == 0);
  const double ex2 = rep.total_delta_norm * rep.total_delta_norm;
  CHECK(std::abs(rep.model_energy - (rep.total_energy * ex2 + saved2) / (ex2 + saved2)) <= 1e-9);
  CHECK(rep.model_error < rep.total_error);
}

TEST_CASE("--budget: never exceeded, within 1.01x the greedy allocation on exact singular values") {
  temp_dir dir;
  pair_of_models p = make_models(dtype::F32);
  write_pair(dir, p);
  for (const auto method : {svd_method::randomized, svd_method::exact}) {
    for (const int64_t budget : {300, 1500, 4000}) {
      CAPTURE(budget);
      extract_options o =
          options_for(dir, fmt::format("b{}{}", budget, static_cast<int>(method)), {rank_rule::kind::fixed, 1, 0});
      o.budget = budget;
      o.svd.method = method;
      const extract_report rep = run_extract(o, {});
      CHECK(rep.params <= budget);
      // the reference: exact spectra, the same greedy, capped at break-even
      std::vector<Eigen::VectorXd> spectra;
      std::vector<std::vector<double>> values;
      std::vector<budget_module> items;
      for (const auto& path : linear_modules) {
        spectra.push_back(spectrum(p, path + ".weight"));
        values.emplace_back(spectra.back().data(), spectra.back().data() + spectra.back().size());
      }
      for (size_t i = 0; i < linear_modules.size(); ++i) {
        const auto& t = p.base.at(linear_modules[i] + ".weight");
        const int64_t m = t.shape[0], n = t.shape[1];
        items.push_back({values[i], m, n, m * n / (m + n)});
      }
      const std::vector<int64_t> ranks = allocate_budget(items, budget);
      double all2 = 0, lost2 = 0;
      for (size_t i = 0; i < spectra.size(); ++i) {
        all2 += spectra[i].squaredNorm();
        lost2 += spectra[i].tail(spectra[i].size() - ranks[i]).squaredNorm();
      }
      // ours: the residual of the modules written plus the deltas the budget left at rank 0
      double ours2 = 0;
      for (const auto& m : rep.modules) ours2 += m.error * m.error * m.delta_norm * m.delta_norm;
      for (const auto& o2 : rep.others)
        if (o2.reason == "--budget gave it no rank") ours2 += o2.delta_norm * o2.delta_norm;
      CAPTURE(std::sqrt(ours2 / all2) / std::sqrt(lost2 / all2));
      CHECK(std::sqrt(ours2) <= 1.01 * std::sqrt(lost2));
      for (const auto& m : rep.modules) CHECK(!m.larger_than_dense);
    }
  }
}

TEST_CASE("factors larger than the dense delta are flagged; --json spectra go past the rank") {
  temp_dir dir;
  pair_of_models p = make_models(dtype::F32);
  write_pair(dir, p);
  extract_options o = options_for(dir, "big", {rank_rule::kind::energy, 0.999999, 0});
  const extract_report rep = run_extract(o, {});
  const extracted_module& q = find_module(rep, "model.layers.0.self_attn.q_proj");  // 32x32: break-even 16
  CHECK(q.break_even == 16);
  CHECK(q.rank > 16);
  CHECK(q.larger_than_dense);
  const extracted_module& v = find_module(rep, "model.layers.0.self_attn.v_proj");
  CHECK(static_cast<int64_t>(v.singular_values.size()) >= v.rank);
  extract_options r2 = options_for(dir, "r2", {rank_rule::kind::fixed, 2, 0});
  const extract_report small = run_extract(r2, {});
  for (const auto& m : small.modules) {
    CHECK(!m.larger_than_dense);
    CHECK(static_cast<int64_t>(m.singular_values.size()) > m.rank);
  }
}

TEST_CASE("progress: the first scan reports its comparisons, 64 MiB at a time; totals add up, with and without "
          "--budget") {
  temp_dir dir;
  pair_of_models p = make_models(dtype::F32);
  // an unchanged tensor of more than 64 MiB (identical bytes in both models):
  // the scan compares it in two parts, each reported
  const uint64_t big_elements = (uint64_t{64} << 20) / 4 + 4096;
  std::vector<uint8_t> big(big_elements * 4);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<uint8_t>(i * 7 + i / 4096);
  uint64_t model_bytes = 0;
  for (const auto& [side, m] : {std::pair{"/base", &p.base}, std::pair{"/tuned", &p.tuned}}) {
    fs::create_directories(dir.path + side);
    std::vector<tensor_spec> specs{{"model.big_buffer", dtype::F32, {static_cast<int64_t>(big_elements)}}};
    for (const auto& [name, t] : *m) specs.push_back({name, t.type, t.shape});
    safetensors_writer w(dir.path + side + "/model.safetensors",
                         plan_safetensors(specs, metadata_map{{"format", "pt"}}));
    w.write("model.big_buffer", big);
    model_bytes += big.size();
    for (const auto& [name, t] : *m) {
      std::vector<double> v(t.values.data(), t.values.data() + t.values.size());
      std::vector<uint8_t> bytes(v.size() * 4);
      from_f64(t.type, v, bytes);
      w.write(name, bytes);
      model_bytes += bytes.size();
    }
    w.commit();
  }
  const uint64_t n_tensors = p.base.size() + 1;
  for (const bool budget : {false, true}) {
    CAPTURE(budget);
    extract_options o = options_for(dir, budget ? "budget" : "rank", {rank_rule::kind::fixed, 4, 0});
    if (budget) o.budget = 2000;
    std::vector<progress_event> events;
    run_extract(o, [&](const progress_event& e) { events.push_back(e); });
    REQUIRE(!events.empty());
    // the big buffer: two events for its parts (64 MiB, then the rest), before any module's
    std::vector<size_t> big_events;
    size_t first_module = events.size();
    for (size_t i = 0; i < events.size(); ++i) {
      if (events[i].current == "model.big_buffer") big_events.push_back(i);
      if (events[i].current.find("_proj.weight") != std::string::npos) first_module = std::min(first_module, i);
    }
    REQUIRE(big_events.size() == 3);  // two parts, then done (the rest of its share: none)
    CHECK(big_events.back() < first_module);
    CHECK(events[big_events[0]].done_bytes - (big_events[0] > 0 ? events[big_events[0] - 1].done_bytes : 0) ==
          2 * (uint64_t{64} << 20));
    CHECK(events[big_events[2]].done_items == events[big_events[1]].done_items + 1);
    // monotonic, totals fixed once the scan began, and reached by the last event
    for (size_t i = 1; i < events.size(); ++i) {
      CHECK(events[i].done_bytes >= events[i - 1].done_bytes);
      CHECK(events[i].done_items >= events[i - 1].done_items);
      CHECK(events[i].total_items == n_tensors);
    }
    // --budget reads every selected module once more (the q, v, up, down projections; both sides F32)
    uint64_t job_bytes = 0;
    for (const auto& [name, t] : p.base)
      if (name.ends_with("_proj.weight")) job_bytes += 2 * 4 * static_cast<uint64_t>(t.values.size());
    CHECK(job_bytes == 2 * 4 * (32 * 32 + 16 * 32 + 80 * 32 + 32 * 80));
    CHECK(events.back().total_bytes == model_bytes + (budget ? job_bytes : 0));
    CHECK(events.back().done_bytes == events.back().total_bytes);
    CHECK(events.back().done_items == n_tensors);
    CHECK(events.front().total_bytes == model_bytes);
  }
}
