// lora forward --model MODEL [--adapter ADAPTER] --tokens 1,2,3 --out logits.safetensors
//              [--top-k K] [--threads N]
// Runs the f32 reference forward pass (core/llama, every family of core/model-family) and writes the logits as
// one F32 tensor "logits" [tokens, vocab]; --top-k prints the best tokens of
// each position.
#include <memory>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "cli/commands.h"
#include "cli/token-list.h"
#include "core/llama.h"
#include "formats/error.h"
#include "formats/staged-folder.h"

namespace lora::cli {

namespace {

struct forward_cli_options {
  std::string model;
  std::string adapter;
  std::string tokens;
  std::string out;
  int64_t top_k = 0;
  int threads = 0;
};

int run_forward_cmd(const forward_cli_options& o) {
  forward_options opts;
  opts.model = o.model;
  if (!o.adapter.empty()) opts.adapter = o.adapter;
  opts.tokens = parse_token_list(o.tokens);
  opts.threads = o.threads;
  // the logits file never replaces an input (an existing other file is replaced)
  check_output(o.out, {{"model", o.model}, {"adapter", o.adapter}}, /*force=*/true);
  const logits_result r = run_forward(opts);
  save_logits(r, o.out);

  fmt::print("wrote logits [{}, {}] to {}{}\n", r.n_tokens, r.n_vocab, o.out,
             o.adapter.empty() ? "" : fmt::format(" (adapter {} applied unmerged)", o.adapter));
  for (int64_t p = 0; o.top_k > 0 && p < r.n_tokens; ++p) {
    std::string line = fmt::format("position {} (token {}):", p, opts.tokens[static_cast<size_t>(p)]);
    for (const auto& [id, logit] : top_k(r, p, o.top_k)) line += fmt::format(" {} ({:.4f})", id, logit);
    fmt::print("{}\n", line);
  }
  return 0;
}

}  // namespace

CLI::App* setup_forward(CLI::App& app, runner& run) {
  auto o = std::make_shared<forward_cli_options>();
  auto* sub = app.add_subcommand(
      "forward",
      "Run a decoder-only model (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, qwen3_moe, gpt2) "
      "over token ids on the CPU in f32, optionally with a LoRA adapter applied unmerged, and write the logits");
  sub->add_option("--model", o->model, "model folder with config.json (single file or shards)")->required();
  sub->add_option("--adapter", o->adapter, "PEFT adapter applied unmerged: y = W0 x + s B (A x) (DoRA as PEFT)");
  sub->add_option("--tokens", o->tokens, "comma-separated token ids, e.g. 1,2,3")->required();
  sub->add_option("--out", o->out, "output .safetensors holding one F32 tensor 'logits' [tokens, vocab]")->required();
  sub->add_option("--top-k", o->top_k, "print the K best tokens at each position")->check(CLI::NonNegativeNumber);
  sub->add_option("--threads", o->threads, "BLAS threads (default: all cores)")->check(CLI::NonNegativeNumber);
  sub->footer(
      "Exit codes: 0 done, 2 bad command line (bad token list, token id outside the vocabulary, --out inside an "
      "input), 3 unsupported\n"
      "model_type or config field, missing or misshapen tensor, adapter that does not fit, 4 I/O failure.");
  sub->callback([o, &run] { run = [o] { return run_forward_cmd(*o); }; });
  return sub;
}

}  // namespace lora::cli
