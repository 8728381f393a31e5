// lora merge --base MODEL --adapter ADAPTER [--adapter ADAPTER2 --weight W ...]
//            --out DIR [--dtype same|bf16|f16|f32] [--scale S] [--threads N]
//            [--dry-run] [--force] [--sync] [--quiet] [--allow-nonfinite]
// Writes the base model with every adapter's delta merged in (core/merge), a
// progress bar on stderr while it runs (terminal only), one summary line.
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/options.h"
#include "cli/progress.h"
#include "core/merge.h"
#include "formats/error.h"

namespace lora::cli {

namespace {

struct merge_cli_options {
  std::string base;
  weighted_adapters adapters;
  std::string out;
  std::string dtype = "same";
  double scale = 1.0;
  int threads = 0;
  bool dry_run = false;
  bool force = false;
  bool quiet = false;
  bool allow_nonfinite = false;
  bool sync = false;
  bool skip_unmatched = false;
  bool json = false;
};

// The report as JSON (--json).
void print_json(const merge_report& r, size_t n_adapters) {
  nlohmann::json j;
  j["out"] = r.out;
  j["dry_run"] = r.dry_run;
  j["adapters"] = n_adapters;
  j["modules"] = r.n_modules;
  j["tensors"] = {{"total", r.n_tensors},
                  {"merged", r.n_merged},
                  {"replaced", r.n_replaced},
                  {"converted", r.n_converted},
                  {"copied", r.n_copied}};
  j["skipped_modules"] = nlohmann::json::array();
  for (const auto& [adapter, module] : r.skipped_modules)
    j["skipped_modules"].push_back({{"adapter", adapter}, {"module", module}});
  j["skipped_files"] = nlohmann::json::array();
  for (const auto& [name, why] : r.skipped_files) j["skipped_files"].push_back({{"name", name}, {"reason", why}});
  j["added"] = r.added;
  j["config_changes"] = r.config_changes;
  j["files"] = r.files;
  j["bytes_written"] = r.bytes_written;
  j["seconds"] = r.seconds;
  fmt::print("{}\n", j.dump(2));
}

int run_merge(const merge_cli_options& o) {
  merge_options opts;
  opts.base = o.base;
  opts.adapters = weighted_inputs<merge_input>(o.adapters);
  opts.out = o.out;
  opts.out_type = parse_out_dtype(o.dtype);
  opts.scale = o.scale;
  opts.threads = o.threads;
  opts.dry_run = o.dry_run;
  opts.force = o.force;
  opts.allow_nonfinite = o.allow_nonfinite;
  opts.sync = o.sync;
  opts.skip_unmatched = o.skip_unmatched;

  progress_bar bar("merge", o.quiet || o.dry_run || o.json);
  opts.progress = bar.callback();
  const merge_report r = merge_model(opts);
  bar.finish();
  if (o.json) {
    print_json(r, opts.adapters.size());
    return 0;
  }
  if (o.quiet) return 0;

  if (!r.skipped_files.empty()) {
    std::vector<std::string> items;
    for (const auto& [name, why] : r.skipped_files) items.push_back(fmt::format("{} ({})", name, why));
    fmt::print(stderr, "lora merge: note: not copied from the base folder: {}\n", fmt::join(items, ", "));
  }
  if (!r.skipped_modules.empty()) {
    fmt::print("skipped {} adapter modules that match no base tensor (--skip-unmatched):\n", r.skipped_modules.size());
    for (const auto& [adapter, module] : r.skipped_modules) fmt::print("  {}: {}\n", adapter, module);
  }
  const std::string tensors =
      fmt::format("{} tensors: {} merged, {} replaced, {} converted, {} copied{}", r.n_tensors, r.n_merged,
                  r.n_replaced, r.n_converted, r.n_copied,
                  r.n_rescaled > 0 ? fmt::format(", {} FP8 scales rewritten", r.n_rescaled) : "");
  auto print_heads = [&] {
    if (!r.fp8.empty()) {
      if (opts.out_type)
        fmt::print("fp8 base ({}): dequantized to {}; {} block scale tensors (weight_scale_inv) dropped\n", r.fp8,
                   dtype_name(*opts.out_type), r.n_dropped_scales);
      else if (r.n_rescaled == 0)
        fmt::print("fp8 base ({}): output stays FP8; no FP8 weight changed: every FP8 weight and scale copied byte "
                   "for byte\n",
                   r.fp8);
      else
        fmt::print("fp8 base ({}): output stays FP8; {} merged weights requantized to E4M3 with new block "
                   "scales (their weight_scale_inv rewritten), the other FP8 weights and scales copied\n",
                   r.fp8, r.n_rescaled);
    }
    if (!r.added.empty()) fmt::print("added tensors: {}\n", fmt::join(r.added, ", "));
    if (!r.config_changes.empty()) fmt::print("config.json: {}\n", fmt::join(r.config_changes, ", "));
    if (r.n_token_rows > 0) fmt::print("trainable tokens: {} rows replaced\n", r.n_token_rows);
  };
  if (r.dry_run) {
    fmt::print(
        "dry run: {} LoRA modules from {} adapter{}; would write {} ({} files) to {}, {} free; {}; nothing "
        "written\n",
        r.n_modules, opts.adapters.size(), opts.adapters.size() == 1 ? "" : "s", human_bytes(r.bytes_written),
        r.files.size(), r.out, human_bytes(r.bytes_free), tensors);
    print_heads();
    return 0;
  }
  const double gbps = r.seconds > 0 ? static_cast<double>(r.bytes_written) / r.seconds / 1e9 : 0.0;
  fmt::print("merged {} LoRA modules from {} adapter{} into {}: {}; {} written in {:.2f} s ({:.2f} GB/s)\n",
             r.n_modules, opts.adapters.size(), opts.adapters.size() == 1 ? "" : "s", r.out, tensors,
             human_bytes(r.bytes_written), r.seconds, gbps);
  print_heads();
  return 0;
}

}  // namespace

CLI::App* setup_merge(CLI::App& app, runner& run) {
  auto o = std::make_shared<merge_cli_options>();
  auto* sub = app.add_subcommand(
      "merge",
      "Merge LoRA adapters into a base model: W = W0 + sum_k weight_k * scale * s_k B_k A_k, computed in f32 (f64 for "
      "F64 tensors and FP8 weights) and rounded once, written as a complete model folder (same tensors, sharding and files as the base)");
  sub->add_option("--base", o->base,
                  "base model: a Hugging Face folder, a diffusers pipeline folder (model_index.json: the output is "
                  "the same folder tree), or a bare .safetensors file (--out is then a folder holding "
                  "that file name and config.json when one sits beside it, or with --out NAME.safetensors that one "
                  "file)")
      ->required();
  add_weighted_adapter_options(sub, o->adapters,
                               "adapter: PEFT folder, PEFT .safetensors (config beside it), kohya / LyCORIS "
                               "(LoCon, LoHa, LoKr, full) .safetensors or a diffusers LoRA "
                               "(pytorch_lora_weights.safetensors); repeat for several (their deltas are summed, in "
                               "order)");
  sub->add_option("--out", o->out,
                  "output folder (or NAME.safetensors for a bare-file base); written beside it as "
                  "<out>.tmp-XXXXXX and renamed when complete; missing parent folders are created")
      ->required();
  sub->add_option("--dtype", o->dtype, "dtype of the floating-point tensors written (default: same as the base; an FP8 base stays FP8, "
                  "its merged blocks requantized, and is dequantized whole with bf16|f16|f32)")
      ->check(CLI::IsMember({"same", "bf16", "f16", "f32"}))
      ->default_str("same");
  sub->add_option("--scale", o->scale, "multiplies every delta (default 1)");
  sub->add_option("--threads", o->threads, "worker threads (default: all cores)")->check(CLI::NonNegativeNumber);
  sub->add_flag("--dry-run", o->dry_run, "check keys, shapes, dtypes and free space; write nothing");
  sub->add_flag("--force", o->force, "replace --out when it exists (without it, an existing --out is refused: exit 2)");
  sub->add_flag("--sync", o->sync,
                "flush the output to disk (fsync) before moving it into place, so that it also survives a power "
                "loss right after (default: like cp, leave the writing back to the kernel)");
  sub->add_flag("--quiet", o->quiet, "no progress bar, no summary");
  sub->add_flag("--json", o->json, "the report as one JSON object on stdout (no progress bar)");
  sub->add_flag("--skip-unmatched", o->skip_unmatched,
                "merge the modules that match a base tensor and list the ones that match none (without it such a "
                "module is an error, exit 3); a module whose name matches two tensors, or whose shape does not fit "
                "its tensor, is still an error");
  sub->add_flag("--allow-nonfinite", o->allow_nonfinite,
                "write NaN / Inf values a merge produces (refused by default: exit 3)");
  sub->footer(
      "Modules_to_save tensors replace the base tensor whole, and trainable_token_indices rows replace those rows "
      "whole\n(PEFT's TrainableTokensLayer.merge has no scale): --weight and --scale do not apply to either.\n"
      "Exit codes: 0 merged, 2 bad command line, existing --out or an --out over an input, 3 the adapter does not fit "
      "the base or a\n"
      "merged value is not finite, 4 I/O failure (unreadable input, disk full). Nothing is left behind on error.");
  sub->callback([o, &run] { run = [o] { return run_merge(*o); }; });
  return sub;
}

}  // namespace lora::cli
