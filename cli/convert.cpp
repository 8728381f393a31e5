// lora convert ADAPTER --to peft|kohya --out OUT [--base MODEL]
//              [--kohya-prefix P] [--force] [--json]
// Converts between PEFT folders and kohya files, and from mlx_lm adapters to
// PEFT (core/convert convert_adapter).
#include <memory>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/convert.h"
#include "formats/error.h"

namespace lora::cli {

namespace {

struct convert_cli_options {
  std::string adapter;
  std::string to;
  std::string out;
  std::string base;
  std::string kohya_prefix = "auto";
  bool force = false;
  bool json = false;
};

std::string range(double lo, double hi) { return lo == hi ? fmt::format("{}", lo) : fmt::format("{}..{}", lo, hi); }

int run_convert(const convert_cli_options& o) {
  convert_options opts;
  opts.adapter = o.adapter;
  opts.to = o.to == "kohya" ? adapter_format::kohya : adapter_format::peft;
  opts.out = o.out;
  opts.base = o.base;
  opts.kohya_prefix = o.kohya_prefix;
  opts.force = o.force;
  const convert_report r = convert_adapter(opts);
  if (o.json) {
    nlohmann::ordered_json j;
    j["from"] = r.from;
    j["to"] = std::string(adapter_format_name(r.to));
    j["out"] = r.out;
    j["modules"] = r.n_modules;
    j["modules_to_save"] = r.n_saved;
    j["rank"] = {r.min_rank, r.max_rank};
    j["scale"] = {r.min_scale, r.max_scale};
    fmt::print("{}\n", j.dump(2));
    return 0;
  }
  fmt::print("converted {} LoRA modules{} ({} -> {}) into {}: rank {}, scale {}\n", r.n_modules,
             r.n_saved ? fmt::format(" and {} modules_to_save tensors", r.n_saved) : std::string(), r.from,
             adapter_format_name(r.to), r.out, range(static_cast<double>(r.min_rank), static_cast<double>(r.max_rank)),
             range(r.min_scale, r.max_scale));
  return 0;
}

}  // namespace

CLI::App* setup_convert(CLI::App& app, runner& run) {
  auto o = std::make_shared<convert_cli_options>();
  auto* sub = app.add_subcommand(
      "convert",
      "Convert an adapter between PEFT folders and kohya .safetensors files, or from an mlx_lm adapter to PEFT; "
      "factor bytes are copied untouched, ranks and alphas carried per module");
  sub->add_option("adapter", o->adapter,
                  "adapter: PEFT folder / file, kohya .safetensors, or mlx_lm folder (adapters.safetensors + "
                  "adapter_config.json)")
      ->required();
  sub->add_option("--to", o->to, "output format")->required()->check(CLI::IsMember({"peft", "kohya"}));
  sub->add_option("--out", o->out, "output: a PEFT folder or a kohya .safetensors file")->required();
  sub->add_option("--base", o->base,
                  "base model (folder or .safetensors): required for kohya -> PEFT (gives back the dotted module "
                  "names); otherwise checks that the adapter fits");
  sub->add_option("--kohya-prefix", o->kohya_prefix,
                  "kohya output: prefix for module paths (auto: lora_unet_ for UNet / DiT names, else lora_te_)");
  sub->add_flag("--force", o->force, "replace --out when it exists (without it, an existing --out is refused: exit 2)");
  sub->add_flag("--json", o->json, "print the report as JSON");
  sub->footer(
      "Scales: PEFT alpha / r (rank_pattern, alpha_pattern) <-> kohya per-module .alpha / r; rsLoRA becomes kohya\n"
      "alpha = s * r; mlx_lm lora_parameters.scale becomes lora_alpha = scale * r. Exit codes: 0 written, 2 bad\n"
      "command line, existing --out, an --out over an input or kohya -> PEFT without --base, 3 what the target format "
      "cannot hold (DoRA,\n"
      "bias, embedding LoRA, modules_to_save into kohya) or invalid input, 4 I/O failure.");
  sub->callback([o, &run] { run = [o] { return run_convert(*o); }; });
  return sub;
}

}  // namespace lora::cli
