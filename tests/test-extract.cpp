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

#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/extract.h"
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
