// lora extract --base MODEL --tuned MODEL --out DIR (--rank R | --energy F | --max-error E)
//              [--max-rank R] [--targets REGEX] [--method randomized|exact]
//              [--dtype same|bf16|f16|f32] [--format peft|kohya] [--save-modules]
//              [--json] [--threads N] [--seed S] [--quiet]
// A LoRA adapter from the difference of two models (core/extract): one line
// per module (rank, energy kept, measured relative error), the deltas that
// were not extracted, a total; --json for machines; a progress bar on stderr.
#include <cstdio>
#include <memory>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/options.h"
#include "cli/progress.h"
#include "cli/rank-report.h"
#include "core/extract.h"
#include "formats/error.h"

namespace lora::cli {

namespace {

struct extract_cli_options {
  std::string base;
  std::string tuned;
  std::string out;
  rank_cli_options rank;
  std::string targets;
  std::string method = "randomized";
  std::string dtype = "same";
  std::string format = "peft";
  bool save_modules = false;
  bool json = false;
  bool quiet = false;
  bool force = false;
  int threads = 0;
  uint64_t seed = 0;
};

nlohmann::ordered_json report_json(const extract_report& r, const extract_options& opts) {
  nlohmann::ordered_json j;
  j["out"] = r.out;
  j["format"] = r.format == extract_format::kohya ? "kohya" : "peft";
  j["method"] = std::string(svd_method_name(opts.svd.method));
  j["seed"] = opts.svd.seed;
  j["rank"] = r.config_rank;
  j["scale"] = 1.0;
  j["bytes"] = r.out_bytes;
  j["total"] = {{"modules", r.modules.size()},
                {"delta_norm", r.total_delta_norm},
                {"energy_kept", r.total_energy},
                {"relative_error", r.total_error}};
  auto modules = nlohmann::ordered_json::array();
  for (const auto& m : r.modules)
    modules.push_back({{"module", m.name},
                       {"tensor", m.tensor},
                       {"kind", m.embedding ? "embedding" : "linear"},
                       {"shape", {m.rows, m.cols}},
                       {"rank", m.rank},
                       {"method", std::string(svd_method_name(m.method))},
                       {"sketch", m.sketch},
                       {"delta_norm", m.delta_norm},
                       {"energy_kept", m.energy},
                       {"relative_error", m.error},
                       {"target_reached", m.target_reached}});
  j["modules"] = modules;
  auto others = nlohmann::ordered_json::array();
  for (const auto& o : r.others)
    others.push_back(
        {{"tensor", o.tensor},
         {"shape", o.shape},
         {"reason", o.reason},
         {"delta_norm", o.delta_norm},
         {"saved_as", o.saved_as.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(o.saved_as)}});
  j["not_extracted"] = others;
  j["unchanged"] = r.n_unchanged;
  j["tensors"] = r.n_tensors;
  return j;
}

void print_report(const extract_report& r) {
  size_t width = 6;
  for (const auto& m : r.modules) width = std::max(width, m.name.size());
  fmt::print("{:<{}}  {:>12}  {:>5}  {:>10}  {:>10}  {}\n", "module", width, "shape", "rank", "energy", "rel error",
             "method");
  size_t capped = 0;
  for (const auto& m : r.modules) {
    fmt::print("{:<{}}  {:>12}  {:>5}  {:>10.6f}  {:>10.3e}  {}{}\n", m.name, width,
               fmt::format("{}x{}", m.rows, m.cols), m.rank, m.energy, m.error, svd_method_name(m.method),
               m.target_reached ? "" : "  (capped by --max-rank)");
    capped += m.target_reached ? 0 : 1;
  }
  for (const auto& o : r.others)
    fmt::print("not extracted: {} [{}]: {}{}\n", o.tensor, fmt::join(o.shape, ", "), o.reason,
               o.saved_as.empty() ? std::string(" (--save-modules writes it)") : " -> saved as " + o.saved_as);
  fmt::print(
      "extracted {} modules into {} ({}, r {}, scale 1, {}): energy kept {:.6f}, relative error {:.3e}; {} of {} "
      "tensors unchanged{}\n",
      r.modules.size(), r.out, r.format == extract_format::kohya ? "kohya" : "peft", r.config_rank,
      human_bytes(r.out_bytes), r.total_energy, r.total_error, r.n_unchanged, r.n_tensors,
      capped ? fmt::format("; {} modules capped before reaching the target", capped) : std::string());
}

int run_extract_cmd(const extract_cli_options& o) {
  std::optional<rank_rule> rule = make_rank_rule(o.rank);
  if (!rule) throw errors::usage("give one of --rank R, --energy F or --max-error E");
  extract_options opts;
  opts.base = o.base;
  opts.tuned = o.tuned;
  opts.out = o.out;
  opts.rule = *rule;
  opts.svd.method = o.method == "exact" ? svd_method::exact : svd_method::randomized;
  opts.svd.seed = o.seed;
  opts.targets = o.targets;
  opts.out_dtype = parse_out_dtype(o.dtype);
  opts.format = o.format == "kohya" ? extract_format::kohya : extract_format::peft;
  opts.save_modules = o.save_modules;
  opts.threads = o.threads;
  opts.force = o.force;

  progress_bar bar("extract", o.quiet || o.json);
  const extract_report r = run_extract(opts, bar.callback());
  bar.finish();
  if (o.json) {
    fmt::print("{}\n", report_json(r, opts).dump(2));
  } else if (!o.quiet) {
    print_report(r);
  }
  return 0;
}

}  // namespace

CLI::App* setup_extract(CLI::App& app, runner& run) {
  auto o = std::make_shared<extract_cli_options>();
  auto* sub = app.add_subcommand(
      "extract",
      "Extract a LoRA adapter from a fine-tuned model: dW = W_tuned - W_base per 2-D weight, truncated SVD, "
      "B = U sqrt(S), A = sqrt(S) V^T (alpha = r: scale 1)");
  sub->add_option("--base", o->base, "base model: Hugging Face folder or .safetensors file")->required();
  sub->add_option("--tuned", o->tuned, "fine-tuned model with the same tensors and shapes")->required();
  sub->add_option("--out", o->out,
                  "output: a PEFT folder, or with --format kohya one .safetensors file; must not exist")
      ->required();
  add_rank_options(sub, o->rank);
  sub->get_option("--rank")->description("rank of every extracted module (capped at min(rows, cols) and --max-rank)");
  sub->add_option("--targets", o->targets,
                  "regex (RE2 syntax: no backreferences or lookaround) on module paths, matched as ^(.*\\.)?(REGEX)$ "
                  "(default: every 2-D linear weight; "
                  "embeddings and lm_head only when selected here)");
  sub->add_option("--method", o->method,
                  "randomized (default: range finder, 10 oversamples, 2 power iterations, f32 BLAS) or exact "
                  "(LAPACK dgesdd on the f64 delta)")
      ->check(CLI::IsMember({"randomized", "exact"}));
  sub->add_option("--dtype", o->dtype, "dtype of the factors (default: same as the base weight)")
      ->check(CLI::IsMember({"same", "bf16", "f16", "f32"}));
  sub->add_option("--format", o->format, "peft (default) or kohya (lora_te_ / lora_unet_ names, .alpha = r)")
      ->check(CLI::IsMember({"peft", "kohya"}));
  sub->add_flag("--save-modules", o->save_modules,
                "write deltas that are not extracted (norms, biases, excluded weights) whole as modules_to_save; "
                "the bias of an extracted module as lora_B.bias (PEFT only)");
  sub->add_flag("--force", o->force, "replace --out when it exists (without it, an existing --out is refused: exit 2)");
  sub->add_flag("--json", o->json, "print the report as JSON");
  sub->add_flag("--quiet", o->quiet, "no progress bar, no report");
  sub->add_option("--threads", o->threads, "BLAS threads (default: all cores)")->check(CLI::NonNegativeNumber);
  sub->add_option("--seed", o->seed, "seed of the randomized sketch (default 0; same seed, same adapter)");
  sub->footer(
      "Errors are measured on the factors as written: ||dW - B A||_F / ||dW||_F.\n"
      "Exit codes: 0 extracted, 2 bad command line, existing --out or an --out over an input, 3 the models do not "
      "match (a tensor\n"
      "missing, shapes, dtypes that cannot be subtracted) or are identical, 4 I/O failure. Nothing is left\n"
      "behind on error.");
  sub->callback([o, &run] { run = [o] { return run_extract_cmd(*o); }; });
  return sub;
}

}  // namespace lora::cli
