// lora verify --base MODEL --adapter ADAPTER [--weight W] [--adapter A2 --weight W2 ...] [--scale S]
//             --merged MODEL [--tokens 1,2,3] [--seed N] [--json] [--threads N] [--quiet]
// Checks that MERGED is BASE with the ADAPTERs merged in (core/verify); exit 0
// when equivalent, 1 when not; the report names the worst tensors and layers;
// a progress bar with an ETA on stderr (a terminal only).
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/progress.h"
#include "cli/options.h"
#include "cli/token-list.h"
#include "core/verify.h"
#include "formats/error.h"

namespace lora::cli {

namespace {

struct verify_cli_options {
  std::string base, merged, tokens;
  weighted_adapters adapters;
  double scale = 1.0;
  bool json = false;
  bool quiet = false;
  bool skip_unmatched = false;
  int threads = 0;
  int worst = 5;
  uint64_t seed = verify_options{}.seed;
};

double finite_or(double v, double fallback) { return std::isfinite(v) ? v : fallback; }

// The report as JSON (--json).
void print_json(const verify_report& r, const verify_cli_options& o, int n_inputs) {
  nlohmann::json j;
  j["equivalent"] = r.equivalent;
  j["skipped_modules"] = nlohmann::json::array();
  for (const auto& [adapter, module] : r.skipped_modules)
    j["skipped_modules"].push_back({{"adapter", adapter}, {"module", module}});
  j["tensors_checked"] = r.n_checked;
  j["tensors_failed"] = r.n_failed;
  j["worst"] = nlohmann::json::array();
  for (size_t i = 0; i < r.tensors.size() && i < static_cast<size_t>(o.worst); ++i) {
    const auto& c = r.tensors[i];
    j["worst"].push_back({{"name", c.name},
                          {"kind", tensor_kind_name(c.kind)},
                          {"ok", c.ok},
                          {"max_error", c.max_error},
                          {"tolerance", c.tolerance},
                          {"ratio", finite_or(c.ratio, 1e300)},
                          {"bad_elements", c.n_bad}});
    if (c.kind == tensor_kind::shape) {
      j["worst"].back()["base_shape"] = c.base_shape;
      j["worst"].back()["merged_shape"] = c.merged_shape;
    }
  }
  j["failed"] = nlohmann::json::array();
  for (const auto& c : r.tensors)
    if (!c.ok) j["failed"].push_back(c.name);
  j["layers_checked"] = r.layers.size();
  j["layers_failed"] = r.n_layers_failed;
  j["layer_seed"] = o.seed;
  j["layer_inputs"] = n_inputs;
  j["layers_skipped"] = r.layers_skipped;
  j["layers"] = nlohmann::json::array();
  for (const auto& c : r.layers)
    j["layers"].push_back({{"name", c.name},
                           {"kind", layer_kind_text(c)},
                           {"adapters", c.n_adapters},
                           {"ok", c.ok},
                           {"max_abs", finite_or(c.max_abs, 1e300)},
                           {"max_rel", finite_or(c.max_rel, 1e300)},
                           {"tolerance", c.tolerance},
                           {"ratio", finite_or(c.ratio, 1e300)},
                           {"bad_outputs", c.n_bad}});
  if (r.model.ran)
    j["model"] = {{"tokens", r.model.n_tokens},
                  {"max_abs", r.model.max_abs},
                  {"max_rel", r.model.max_rel},
                  {"tolerance", r.model.tolerance},
                  {"top1_agreement", r.model.top1_agreement},
                  {"ok", r.model.ok}};
  else
    j["model"] = {{"skipped", r.model.skipped}};
  if (r.model.ran && r.model.base_rounded_to) {
    j["model"]["base_rounded_to"] = dtype_name(*r.model.base_rounded_to);
    j["model"]["conversion_rel"] = r.model.conversion_rel;
  }
  fmt::print("{}\n", j.dump(2));
}

// The report as text: the verdict, the worst tensors and layers, the model level.
void print_text(const verify_report& r, const verify_cli_options& o, int n_inputs) {
  if (!r.skipped_modules.empty()) {
    fmt::print("skipped {} adapter modules that match no base tensor (--skip-unmatched):\n", r.skipped_modules.size());
    for (const auto& [adapter, module] : r.skipped_modules) fmt::print("  {}: {}\n", adapter, module);
  }
  // checked: every tensor looked at; failed: those not ok, among them the
  // ones that could not be compared value by value (listed first)
  uint64_t n_missing = 0, n_shape = 0, n_extra = 0;
  for (const auto& c : r.tensors) {
    n_missing += c.kind == tensor_kind::missing;
    n_shape += c.kind == tensor_kind::shape;
    n_extra += c.kind == tensor_kind::extra;
  }
  std::vector<std::string> unmatched;
  if (n_missing) unmatched.push_back(fmt::format("{} missing from the merged model", n_missing));
  if (n_shape) unmatched.push_back(fmt::format("{} with a different shape", n_shape));
  if (n_extra) unmatched.push_back(fmt::format("{} only in the merged model", n_extra));
  fmt::print("{}: {} tensors checked, {} failed{}\n", r.equivalent ? "equivalent" : "NOT equivalent", r.n_checked,
             r.n_failed, unmatched.empty() ? "" : fmt::format(" ({})", fmt::join(unmatched, ", ")));
  for (size_t i = 0; i < r.tensors.size() && i < static_cast<size_t>(o.worst); ++i) {
    const auto& c = r.tensors[i];
    if (c.kind == tensor_kind::missing)
      fmt::print("  FAIL {}: missing from the merged model\n", c.name);
    else if (c.kind == tensor_kind::shape)
      fmt::print("  FAIL {}: shape differs: base [{}] merged [{}]\n", c.name, fmt::join(c.base_shape, ", "),
                 fmt::join(c.merged_shape, ", "));
    else if (c.kind == tensor_kind::extra)
      fmt::print("  FAIL {}: only in the merged model, not in the base\n", c.name);
    else
      fmt::print("  {} {} ({}): max error {:.3g}, tolerance {:.3g}, {} elements over\n", c.ok ? "ok  " : "FAIL",
                 c.name, tensor_kind_name(c.kind), c.max_error, c.tolerance, c.n_bad);
  }
  fmt::print("layers: {} adapted modules checked on {} seeded inputs (seed {}), {} failed\n", r.layers.size(), n_inputs,
             o.seed, r.n_layers_failed);
  for (size_t i = 0; i < r.layers.size() && i < static_cast<size_t>(o.worst); ++i) {
    const auto& c = r.layers[i];
    fmt::print("  {} {} ({}): max |dy| {:.3g} (relative {:.3g}), tolerance {:.3g}, ratio {:.3g}, {} outputs over\n",
               c.ok ? "ok  " : "FAIL", c.name, layer_kind_text(c), c.max_abs, c.max_rel, c.tolerance, c.ratio, c.n_bad);
  }
  if (!r.layers_skipped.empty())
    fmt::print("  not run for {} fused-experts parameter(s) (target_parameters, first {}): no single layer; the weight "
               "level checks every expert\n",
               r.layers_skipped.size(), r.layers_skipped.front());
  if (r.model.ran)
    fmt::print(
        "model: {} tokens, max |dlogit| {:.3g} (relative {:.3g}, tolerance {:.3g}), top-1 agreement {:.0f}% {}\n",
        r.model.n_tokens, r.model.max_abs, r.model.max_rel, r.model.tolerance, 100 * r.model.top1_agreement,
        r.model.ok ? "ok" : "FAIL");
  else
    fmt::print("model: skipped ({})\n", r.model.skipped);
  if (r.model.ran && r.model.base_rounded_to)
    fmt::print(
        "  (the unmerged side ran on the base weights rounded to {}, the merged model's dtype, so that the "
        "comparison measures the merge, not the conversion; that rounding alone moves the logits by relative "
        "{:.3g})\n",
        dtype_name(*r.model.base_rounded_to), r.model.conversion_rel);
}

int run_verify(const verify_cli_options& o) {
  verify_options opts{o.base, weighted_inputs<verify_input>(o.adapters), o.merged, {}, o.threads};
  opts.seed = o.seed;
  opts.scale = o.scale;
  opts.skip_unmatched = o.skip_unmatched;
  if (!o.tokens.empty()) opts.tokens = parse_token_list(o.tokens);
  progress_bar bar("verify", o.quiet);
  const verify_report r = verify_merge(opts, bar.callback());
  bar.finish();
  if (o.json)
    print_json(r, o, opts.n_inputs);
  else
    print_text(r, o, opts.n_inputs);
  return r.equivalent ? 0 : 1;
}

}  // namespace

CLI::App* setup_verify(CLI::App& app, runner& run) {
  auto o = std::make_shared<verify_cli_options>();
  auto* sub =
      app.add_subcommand("verify",
                         "Check that a merged model equals base + adapters: every tensor against W0 + sum w s B A "
                         "(tolerance from the merged dtype), every adapted layer on seeded inputs (W_merged x "
                         "against W0 x + s B (A x)), and the logits of both through the forward pass");
  sub->add_option("--base", o->base, "base model")->required();
  add_weighted_adapter_options(sub, o->adapters, "an adapter that was merged; repeat as given to lora merge");
  sub->add_option("--scale", o->scale, "the --scale given to lora merge (default 1)");
  sub->add_option("--merged", o->merged, "the merged model to check")->required();
  sub->add_option("--tokens", o->tokens, "token ids for the model-level check (default: 16 seeded ids)");
  sub->add_option("--seed", o->seed, "seed of the layer-level input vectors (default 1234)");
  sub->add_flag("--json", o->json, "machine-readable report on stdout");
  sub->add_flag("--skip-unmatched", o->skip_unmatched,
                "as given to lora merge: adapter modules that match no base tensor are skipped and listed (an "
                "ambiguous name or a shape that does not fit is still an error)");
  sub->add_option("--threads", o->threads, "BLAS threads (default: all cores)")->check(CLI::NonNegativeNumber);
  sub->add_flag("--quiet", o->quiet, "no progress bar (it is drawn on stderr only when stderr is a terminal)");
  sub->add_option("--worst", o->worst, "how many of the worst tensors and layers to list (default 5)")
      ->check(CLI::NonNegativeNumber);
  sub->footer("Exit codes: 0 equivalent, 1 not equivalent, 2 bad command line, 3 invalid input, 4 I/O failure.");
  sub->callback([o, &run] { run = [o] { return run_verify(*o); }; });
  return sub;
}

}  // namespace lora::cli
