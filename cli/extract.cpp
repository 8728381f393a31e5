// lora extract --base MODEL --tuned MODEL --out DIR (--rank R | --energy F | --max-error E | --budget N)
//              [--max-rank R] [--conv-rank R] [--targets REGEX] [--method randomized|exact]
//              [--dtype same|bf16|f16|f32] [--format peft|kohya] [--save-modules]
//              [--report FILE.svg] [--json] [--threads N] [--seed S] [--quiet]
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
#include "core/report-svg.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "formats/staged-folder.h"

namespace lora::cli {

namespace {

struct extract_cli_options {
  std::string base;
  std::string tuned;
  std::string out;
  rank_cli_options rank;
  std::optional<int64_t> conv_rank;
  std::optional<int64_t> budget;
  std::string report;
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
  j["family"] = r.family;
  j["params"] = r.params;
  j["budget"] = r.budget > 0 ? nlohmann::ordered_json(r.budget) : nlohmann::ordered_json();
  j["total"] = {{"modules", r.modules.size()},
                {"delta_norm", r.total_delta_norm},
                {"energy_kept", r.total_energy},
                {"relative_error", r.total_error}};
  j["model"] = {{"delta_norm", r.model_delta_norm},
                {"saved_norm", r.saved_norm},
                {"left_out_norm", r.left_out_norm},
                {"energy_kept", r.model_energy},
                {"relative_error", r.model_error}};
  auto modules = nlohmann::ordered_json::array();
  for (const auto& m : r.modules)
    modules.push_back({{"module", m.name},
                       {"tensor", m.tensor},
                       {"key", m.key},
                       {"kind", m.embedding                      ? "embedding"
                                : m.layout == delta_layout::conv ? "conv"
                                                                 : "linear"},
                       {"layout", std::string(delta_layout_name(m.layout))},
                       {"shape", m.shape},
                       {"matrix", {m.rows, m.cols}},
                       {"rank", m.rank},
                       {"params", m.params()},
                       {"break_even_rank", m.break_even},
                       {"larger_than_dense", m.larger_than_dense},
                       {"method", std::string(svd_method_name(m.method))},
                       {"sketch", m.sketch},
                       {"delta_norm", m.delta_norm},
                       {"energy_kept", m.energy},
                       {"relative_error", m.error},
                       {"target_reached", m.target_reached},
                       {"singular_values", m.singular_values}});
  j["modules"] = modules;
  auto others = nlohmann::ordered_json::array();
  for (const auto& o : r.others)
    others.push_back(
        {{"tensor", o.tensor},
         {"shape", o.shape},
         {"reason", o.reason},
         {"resized", o.resized},
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
  size_t capped = 0, larger = 0;
  for (const auto& m : r.modules) {
    fmt::print(
        "{:<{}}  {:>12}  {:>5}  {:>10.6f}  {:>10.3e}  {}{}{}\n", m.name, width, fmt::format("{}x{}", m.rows, m.cols),
        m.rank, m.energy, m.error, svd_method_name(m.method), m.target_reached ? "" : "  (capped by --max-rank)",
        m.larger_than_dense ? fmt::format("  (factors larger than the dense delta: break-even rank {})", m.break_even)
                            : std::string());
    capped += m.target_reached ? 0 : 1;
    larger += m.larger_than_dense ? 1 : 0;
  }
  for (const auto& o : r.others)
    fmt::print("not extracted: {} [{}]: {}{}\n", o.tensor, fmt::join(o.shape, ", "), o.reason,
               o.saved_as.empty() ? std::string(" (--save-modules writes it)") : " -> saved as " + o.saved_as);
  fmt::print(
      "extracted {} modules into {} ({}, r {}, scale 1, {}): over these modules energy kept {:.6f}, relative "
      "error {:.3e}; {} of {} tensors unchanged{}\n",
      r.modules.size(), r.out, r.format == extract_format::kohya ? "kohya" : "peft", r.config_rank,
      human_bytes(r.out_bytes), r.total_energy, r.total_error, r.n_unchanged, r.n_tensors,
      capped ? fmt::format("; {} modules capped before reaching the target", capped) : std::string());
  if (larger)
    fmt::print("{} modules hold factors larger than their dense delta (rank past rows*cols/(rows+cols))\n", larger);
  fmt::print(
      "whole model: ||dW|| {:.4g} (extracted {:.4g}, saved whole {:.4g}, left out {:.4g}): energy kept {:.6f}, "
      "relative error {:.3e}; {} factor parameters{}\n",
      r.model_delta_norm, r.total_delta_norm, r.saved_norm, r.left_out_norm, r.model_energy, r.model_error, r.params,
      r.budget > 0 ? fmt::format(" of a budget of {}", r.budget) : std::string());
}

// The picture of the report (core/report-svg): modules in base tensor order.
std::string report_svg(const extract_report& r, const extract_options& opts) {
  rank_figure fig;
  fig.title = fmt::format("lora extract: {} -> {}", opts.base, opts.tuned);
  fig.subtitle = fmt::format(
      "{} modules, {} factor parameters{}; extracted: energy kept {:.4f}, relative error {:.3e}\nwhole model "
      "(||dW|| saved whole {:.3g}, left out {:.3g}): energy kept {:.4f}, relative error {:.3e}",
      r.modules.size(), r.params, r.budget > 0 ? fmt::format(" of a budget of {}", r.budget) : std::string(),
      r.total_energy, r.total_error, r.saved_norm, r.left_out_norm, r.model_energy, r.model_error);
  for (const auto& m : r.modules)
    fig.panels.push_back(
        {m.name, m.singular_values, m.delta_norm * m.delta_norm, m.rank, 0, m.rows, m.cols, m.break_even, m.error});
  return render_rank_svg(fig);
}

int run_extract_cmd(const extract_cli_options& o) {
  std::optional<rank_rule> rule = make_rank_rule(o.rank);
  if (o.budget) {
    if (*o.budget < 1) throw errors::usage(fmt::format("--budget {} must be at least 1", *o.budget));
    if (o.rank.rank || o.rank.energy || o.rank.max_error)
      throw errors::usage("--budget sets every rank: give it without --rank, --energy or --max-error");
    rule = rank_rule{rank_rule::kind::fixed, 1, o.rank.max_rank};
  }
  if (!rule) throw errors::usage("give one of --rank R, --energy F, --max-error E or --budget N");
  extract_options opts;
  opts.base = o.base;
  opts.tuned = o.tuned;
  opts.out = o.out;
  opts.rule = *rule;
  if (o.conv_rank) {
    if (*o.conv_rank < 1) throw errors::usage(fmt::format("--conv-rank {} must be at least 1", *o.conv_rank));
    opts.conv_rule = rank_rule{rank_rule::kind::fixed, static_cast<double>(*o.conv_rank), o.rank.max_rank};
  }
  opts.budget = o.budget.value_or(0);
  opts.svd.method = o.method == "exact" ? svd_method::exact : svd_method::randomized;
  opts.svd.seed = o.seed;
  opts.targets = o.targets;
  opts.out_dtype = parse_out_dtype(o.dtype);
  opts.format = o.format == "kohya" ? extract_format::kohya : extract_format::peft;
  opts.save_modules = o.save_modules;
  opts.threads = o.threads;
  opts.force = o.force;
  if (!o.report.empty())
    check_output(o.report, {{"base model", o.base}, {"tuned model", o.tuned}, {"output", o.out}}, o.force);

  progress_bar bar("extract", o.quiet || o.json);
  const extract_report r = run_extract(opts, bar.callback());
  bar.finish();
  if (!o.report.empty()) write_file_atomic(o.report, report_svg(r, opts));
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
                  "output: a PEFT folder, or with --format kohya one .safetensors file; must not exist unless --force")
      ->required();
  add_rank_options(sub, o->rank);
  auto* budget = sub->add_option(
      "--budget", o->budget,
      "one total of factor parameters, sum of rank x (rows + cols), spread over the modules to minimise "
      "the total squared error (greedy on s_i^2 / (rows + cols); ranks go into rank_pattern)");
  auto* conv_rank = sub->add_option("--conv-rank", o->conv_rank,
                                    "rank of conv weights [out, in, kh, kw] (default: the linear rank rule)");
  conv_rank->excludes(budget);
  sub->get_option("--rank")->description("rank of every extracted module (capped at min(rows, cols) and --max-rank)");
  sub->add_option("--targets", o->targets,
                  "regex (RE2 syntax: no backreferences or lookaround) on module paths, matched as ^(.*\\.)?(REGEX)$ "
                  "(default: every 2-D linear and conv weight; "
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
                "write deltas that are not extracted (norms, biases, excluded weights, a resized embedding / lm_head) "
                "whole as modules_to_save; "
                "the bias of an extracted module as lora_B.bias (PEFT only)");
  sub->add_option("--report", o->report,
                  "write a picture of the result (SVG): ranks and errors across the modules, then per module the "
                  "singular-value spectrum (log scale) and the energy kept against rank, the chosen rank marked");
  sub->add_flag("--force", o->force, "replace --out when it exists (without it, an existing --out is refused: exit 2)");
  sub->add_flag("--json", o->json, "print the report as JSON");
  sub->add_flag("--quiet", o->quiet, "no progress bar, no report");
  sub->add_option("--threads", o->threads, "BLAS threads (default: all cores)")->check(CLI::NonNegativeNumber);
  sub->add_option("--seed", o->seed, "seed of the randomized sketch (default 0; same seed, same adapter)");
  sub->footer(
      "Errors are measured on the factors as written: ||dW - B A||_F / ||dW||_F.\n"
      "Exit codes: 0 extracted, 2 bad command line, existing --out or an --out over an input, 3 the models do not "
      "match (a tensor\n"
      "missing, shapes, dtypes that cannot be subtracted, a resized vocabulary without --save-modules) or are "
      "identical,\n"
      "or --format kohya on an SD 1.x UNet key outside the LDM layout, 4 I/O failure.\n"
      "Nothing is left behind on error.");
  sub->callback([o, &run] { run = [o] { return run_extract_cmd(*o); }; });
  return sub;
}

}  // namespace lora::cli
