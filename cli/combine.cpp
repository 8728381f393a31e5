// lora combine --adapter A1 --weight w1 --adapter A2 --weight w2 ... --out OUT
//              [--rank R | --energy F | --max-error E] [--max-rank R]
//              [--format peft|kohya] [--base MODEL] [--force] [--json]
// One adapter whose delta is the weighted sum of the inputs' deltas
// (core/combine combine_adapters).
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cli/commands.h"
#include "cli/options.h"
#include "cli/rank-report.h"

namespace lora::cli {

namespace {

struct combine_cli_options {
  weighted_adapters adapters;
  std::string out;
  rank_cli_options rank;
  std::string format;
  std::string base;
  std::string kohya_prefix = "auto";
  bool force = false;
  bool json = false;
};

int run_combine(const combine_cli_options& o) {
  combine_options opts;
  opts.adapters = weighted_inputs<combine_input>(o.adapters);
  opts.out = o.out;
  opts.rule = make_rank_rule(o.rank);
  if (o.format == "peft") opts.format = adapter_format::peft;
  if (o.format == "kohya") opts.format = adapter_format::kohya;
  opts.base = o.base;
  opts.kohya_prefix = o.kohya_prefix;
  opts.force = o.force;
  const combine_report r = combine_adapters(opts);
  if (o.json) {
    nlohmann::ordered_json j;
    j["out"] = r.out;
    j["format"] = std::string(adapter_format_name(r.format));
    j["exact"] = r.exact;
    j["dtype"] = std::string(dtype_name(r.out_type));
    j["scale"] = 1.0;
    j["modules"] = rank_report_json(r.modules);
    fmt::print("{}\n", j.dump(2));
    return 0;
  }
  print_rank_table(r.modules);
  fmt::print("wrote {} adapter {} combining {} adapters ({}, {}, alpha = rank: scale 1)\n",
             adapter_format_name(r.format), r.out, opts.adapters.size(),
             r.exact ? "exact: ranks concatenated" : "recompressed", dtype_name(r.out_type));
  return 0;
}

}  // namespace

CLI::App* setup_combine(CLI::App& app, runner& run) {
  auto o = std::make_shared<combine_cli_options>();
  auto* sub =
      app.add_subcommand("combine",
                         "Combine adapters into one whose delta is sum_i w_i s_i B_i A_i: exact by default (B = [w1 s1 "
                         "B1 | w2 s2 B2 ...], "
                         "A = [A1; A2; ...], scale 1), recompressed to a rank or energy target without forming B A");
  add_weighted_adapter_options(sub, o->adapters, "adapter (PEFT folder / file or kohya file); repeat for each");
  sub->add_option("--out", o->out, "output: a PEFT folder or a kohya .safetensors file")->required();
  add_rank_options(sub, o->rank);
  sub->add_option("--format", o->format, "output format (default: the first adapter's)")
      ->check(CLI::IsMember({"peft", "kohya"}));
  sub->add_option("--base", o->base,
                  "base model: needed to combine PEFT with kohya adapters (resolves kohya names); checks every fit");
  sub->add_option("--kohya-prefix", o->kohya_prefix,
                  "kohya output: prefix for module paths (auto: lora_unet_ for UNet / DiT names, else lora_te_)");
  sub->add_flag("--force", o->force, "replace --out when it exists (without it, an existing --out is refused: exit 2)");
  sub->add_flag("--json", o->json, "print the per-module report as JSON");
  sub->footer(
      "Modules present in some adapters only take those. DoRA and modules_to_save are refused (not sums of deltas).\n"
      "Factors keep the inputs' dtype when they all share one, else F32. Exit codes: 0 written, 2 bad command\n"
      "line, existing --out or an --out over an input, 3 invalid or incompatible adapters (the module is named), 4 I/O "
      "failure.");
  sub->callback([o, &run] { run = [o] { return run_combine(*o); }; });
  return sub;
}

}  // namespace lora::cli
