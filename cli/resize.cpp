// lora resize --adapter ADAPTER --out OUT (--rank R | --energy F | --max-error E)
//             [--max-rank R] [--report FILE.svg] [--force] [--json]
// Re-ranks every module of a PEFT or kohya adapter without forming B A
// (core/resize resize_adapter) and prints one line per module.
#include <memory>
#include <string>

#include <fmt/format.h>

#include "cli/commands.h"
#include "cli/rank-report.h"
#include "core/report-svg.h"
#include "formats/safetensors.h"
#include "formats/staged-folder.h"

namespace lora::cli {

namespace {

struct resize_cli_options {
  std::string adapter;
  std::string out;
  rank_cli_options rank;
  std::string report;
  bool force = false;
  bool json = false;
};

int run_resize(const resize_cli_options& o) {
  std::optional<rank_rule> rule = make_rank_rule(o.rank);
  if (!rule) throw errors::usage("give one of --rank R, --energy F or --max-error E");
  resize_options opts;
  opts.adapter = o.adapter;
  opts.out = o.out;
  opts.rule = *rule;
  opts.force = o.force;
  if (!o.report.empty()) check_output(o.report, {{"adapter", o.adapter}, {"output", o.out}}, o.force);
  const resize_report r = resize_adapter(opts);
  if (!o.report.empty()) {
    // the same picture as extract --report (core/report-svg), rank in shown
    rank_figure fig;
    fig.title = fmt::format("lora resize: {} -> {}", o.adapter, o.out);
    int64_t in = 0, out = 0;
    for (const module_rank_report& m : r.modules) {
      double total = 0;
      for (double v : m.singular_values) total += v * v;
      fig.panels.push_back({m.name, m.singular_values, total, m.rank_out, m.rank_in, m.rows, m.cols,
                            m.rows + m.cols > 0 ? m.rows * m.cols / (m.rows + m.cols) : 0, m.relative_error});
      in += m.rank_in;
      out += m.rank_out;
    }
    fig.subtitle = fmt::format("{} modules, total rank {} -> {}", r.modules.size(), in, out);
    write_file_atomic(o.report, render_rank_svg(fig));
  }
  size_t kept = 0;  // modules at their rank already: factors and scale as they were
  for (const module_rank_report& m : r.modules) kept += m.rank_out == m.rank_in;
  if (o.json) {
    nlohmann::ordered_json j;
    j["out"] = r.out;
    j["format"] = std::string(adapter_format_name(r.format));
    j["scale"] = 1.0;  // of the re-ranked modules
    j["kept_unchanged"] = kept;
    j["modules"] = rank_report_json(r.modules);
    fmt::print("{}\n", j.dump(2));
    return 0;
  }
  print_rank_table(r.modules);
  fmt::print("wrote {} adapter {} (alpha = rank: scale 1{})\n", adapter_format_name(r.format), r.out,
             kept == 0 ? std::string()
                       : fmt::format("; {} of {} modules were already at that rank and are kept unchanged", kept,
                                     r.modules.size()));
  return 0;
}

}  // namespace

CLI::App* setup_resize(CLI::App& app, runner& run) {
  auto o = std::make_shared<resize_cli_options>();
  auto* sub = app.add_subcommand(
      "resize",
      "Re-rank every module of an adapter (PEFT or kohya) without forming B A: QR of B and A^T, SVD of the small core, "
      "balanced factors B' = Q_B U sqrt(S), A' = sqrt(S) V^T Q_A^T; writes alpha = new rank (scale 1)");
  sub->add_option("--adapter", o->adapter,
                  "adapter: PEFT folder, PEFT .safetensors (config beside it) or kohya .safetensors")
      ->required();
  sub->add_option("--out", o->out, "output (same format as the input: a PEFT folder or a kohya .safetensors file)")
      ->required();
  add_rank_options(sub, o->rank);
  sub->add_option("--report", o->report,
                  "write a picture of the re-rank (SVG): ranks and errors across the modules, then per module the "
                  "singular values of s B A (log scale) and the energy kept against rank, old and new rank shown");
  sub->add_flag("--force", o->force, "replace --out when it exists (without it, an existing --out is refused: exit 2)");
  sub->add_flag("--json", o->json, "print the per-module report as JSON");
  sub->footer(
      "Energy is sum of the kept s_i^2 over ||s B A||^2; rel error = ||s B A - B'A'|| / ||s B A|| (exact), written =\n"
      "the same for the factors as rounded to their dtype. Exit codes: 0 written, 2 bad command line, existing\n"
      "--out or an --out over an input, 3 invalid adapter, 4 I/O failure. Nothing is left behind on error.");
  sub->callback([o, &run] { run = [o] { return run_resize(*o); }; });
  return sub;
}

}  // namespace lora::cli
