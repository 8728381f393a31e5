// bench-forward MODEL [TOKENS RUNS THREADS BLOCK_ELEMENTS]: the forward pass's compute alone
// (model opened once, core's model_forward timed, best of RUNS) in tokens/s
// and GFLOP/s, against what cblas_sgemm reaches on the same matrix products
// (y[T, out] = x[T, in] W^T for every weight of the pass, W already f32 in
// memory, BLAS on THREADS threads). Built only with -DLORA_BENCH=ON; not a
// test. FLOPs counted: 2 T in out per weight product (the attention's own
// 2 T^2 d per head, about 1% here, is left out of both).
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/blas.h"
#include "core/llama.h"
#include "formats/hf-config.h"
#include "formats/model-files.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// (in, out) of every weight product of one forward pass (dense families).
std::vector<std::pair<int64_t, int64_t>> products(const lora::hf_config& c) {
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  std::vector<std::pair<int64_t, int64_t>> p;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (auto io : {std::pair{h, q},
                    {h, kv},
                    {h, kv},
                    {q, h},
                    {h, c.intermediate_size},
                    {h, c.intermediate_size},
                    {c.intermediate_size, h}})
      p.push_back(io);
  p.push_back({h, c.vocab_size});
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench-forward MODEL [TOKENS RUNS THREADS BLOCK_ELEMENTS]\n");
    return 2;
  }
  const int64_t n_tok = argc > 2 ? std::stoll(argv[2]) : 128;
  const int runs = argc > 3 ? std::stoi(argv[3]) : 3, threads = argc > 4 ? std::stoi(argv[4]) : 2;
  const int64_t block = argc > 5 ? std::stoll(argv[5]) : 0;  // elements per row block; 0: the default
  const lora::model_files model = lora::open_model(argv[1]);
  const lora::hf_config c = lora::read_hf_config(model.config_path);
  std::mt19937_64 rng(0);
  std::vector<int64_t> tokens;
  for (int64_t i = 0; i < n_tok; ++i) tokens.push_back(static_cast<int64_t>(rng() % c.vocab_size));
  const std::vector<std::pair<int64_t, int64_t>> shapes = products(c);
  double flops = 0;
  for (auto [in, out] : shapes) flops += 2.0 * static_cast<double>(n_tok * in * out);

  // the forward pass, compute only (the model's pages warm after the first run)
  double best_fwd = 1e30;
  for (int r = 0; r < runs + 1; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    lora::logits_result out = lora::model_forward(model, c, nullptr, tokens, threads, block);
    if (r > 0) best_fwd = std::min(best_fwd, seconds_since(t0));
  }

  // the same products as sgemm on f32 matrices already in memory, BLAS on `threads` threads
  int64_t max_in = 0, max_w = 0;
  for (auto [in, out] : shapes) max_in = std::max(max_in, in), max_w = std::max(max_w, in * out);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<size_t>(n_tok * max_in)), w(static_cast<size_t>(max_w));
  for (float& v : x) v = normal(rng);
  for (float& v : w) v = normal(rng) * 0.01f;
  std::vector<float> ybuf(static_cast<size_t>(n_tok * std::max<int64_t>(c.vocab_size, 4 * max_in)));
  lora::set_blas_threads(threads);
  double best_gemm = 1e30;
  for (int r = 0; r < runs + 1; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (auto [in, out] : shapes)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n_tok), static_cast<int>(out),
                  static_cast<int>(in), 1.0f, x.data(), static_cast<int>(in), w.data(), static_cast<int>(in), 0.0f,
                  ybuf.data(), static_cast<int>(out));
    if (r > 0) best_gemm = std::min(best_gemm, seconds_since(t0));
  }

  std::printf("model %s: %zu weight products, %.2f GFLOP per pass of %lld tokens, %d threads, best of %d\n",
              c.model_type.c_str(), shapes.size(), flops / 1e9, static_cast<long long>(n_tok), threads, runs);
  std::printf("forward (compute only): %.4f s  %.1f tokens/s  %.1f GFLOP/s\n", best_fwd,
              static_cast<double>(n_tok) / best_fwd, flops / best_fwd / 1e9);
  std::printf("sgemm of the same products (f32 in memory): %.4f s  %.1f GFLOP/s\n", best_gemm, flops / best_gemm / 1e9);
  std::printf("forward / sgemm GFLOP/s: %.2f\n", best_gemm / best_fwd);
  return 0;
}
