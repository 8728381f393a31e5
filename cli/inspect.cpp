// lora inspect PATH [--json] [--base MODEL]: what a model, an adapter or any
// safetensors file holds (files, metadata, every tensor, totals; for a LoRA
// adapter its modules with rank, alpha and scale), read from headers only.
// With --base, how the adapter fits that model: exit 3 when it does not.
#include <algorithm>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/progress.h"
#include "core/inspect.h"
#include "formats/error.h"
#include "formats/json.h"

namespace lora::cli {

namespace {

using ordered_json = nlohmann::ordered_json;

struct inspect_options {
  std::string path;
  std::string base;
  bool json = false;
};

// "12,345"
std::string grouped(uint64_t n) {
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

// A number for the screen: "8", "0.5", "2.82843".
std::string number_text(double v) { return fmt::format("{:.6g}", v); }

// --- JSON -----------------------------------------------------------------------

ordered_json metadata_json(const std::optional<metadata_map>& m) {
  if (!m) return nullptr;
  ordered_json j = ordered_json::object();
  for (const auto& [k, v] : *m) j[k] = v;
  return j;
}

ordered_json module_json(const lora_module& m, const inspect_base_match* base) {
  ordered_json j;
  j["name"] = m.name;
  j["target"] = m.target;
  // fused targets: the base tensors and rows the module's delta rows go to
  if (!m.slices.empty()) {
    j["rows"] = ordered_json::array();
    for (const row_slice& sl : m.slices)
      j["rows"].push_back({{"tensor", sl.tensor},
                           {"tensor_rows", {sl.tensor_row, sl.tensor_row + sl.n_rows}},
                           {"module_rows", {sl.module_row, sl.module_row + sl.n_rows}}});
  }
  j["kind"] = std::string(module_kind_name(m.kind));
  j["form"] = std::string(delta_form_name(m.form));
  j["rank"] = m.rank;
  j["alpha"] = m.alpha;
  j["scale"] = m.scale;
  j["dora"] = m.dora || m.dora_scale;
  j["fan_in_fan_out"] = m.fan_in_fan_out;
  if (m.kind == module_kind::parameter) j["experts"] = m.n_experts;
  j["a_shape"] = m.a.info->shape;
  j["b_shape"] = m.b.info->shape;
  j["dtype"] = std::string(dtype_name(m.a.info->type));
  if (m.magnitude) j["magnitude_shape"] = m.magnitude->info->shape;
  if (m.dora_scale) j["dora_scale_shape"] = m.dora_scale->info->shape;  // LyCORIS weight decomposition
  if (m.bias) j["bias_shape"] = m.bias->info->shape;
  if (base) {
    j["base_shape"] = base->found ? ordered_json(base->shape) : ordered_json(nullptr);
    j["base_dtype"] = base->found ? ordered_json(std::string(dtype_name(base->type))) : ordered_json(nullptr);
  }
  return j;
}

ordered_json report_json(const inspect_report& r) {
  ordered_json j;
  j["kind"] = std::string(inspect_kind_name(r.kind));
  j["path"] = r.path;
  if (r.kind == inspect_kind::adapter) j["format"] = std::string(adapter_format_name(r.lora->format));
  if (r.kind == inspect_kind::adapter) j["adapter_kind"] = r.adapter_kind;
  if (r.kind == inspect_kind::other_adapter) j["adapter_kind"] = r.other_description;
  if (r.kind == inspect_kind::model)
    j["model_type"] = r.model_type ? ordered_json(*r.model_type) : ordered_json(nullptr);
  if (r.kind != inspect_kind::model) {
    j["config"] = r.config_text.empty() ? ordered_json(nullptr) : json_or_text(r.config_text);
  }

  ordered_json files = ordered_json::array();
  for (const inspect_file& f : r.files)
    files.push_back({{"name", f.name},
                     {"path", f.path},
                     {"bytes", f.bytes},
                     {"header_bytes", f.header_bytes},
                     {"tensors", f.n_tensors},
                     {"metadata", metadata_json(f.metadata)}});
  j["files"] = std::move(files);
  if (!r.index_path.empty())
    j["index"] = {{"path", r.index_path},
                  {"total_size", r.index_total_size ? ordered_json(*r.index_total_size) : ordered_json(nullptr)}};
  j["metadata"] = r.files.empty() ? ordered_json(nullptr) : metadata_json(r.files.front().metadata);
  if (!r.pipeline_index_path.empty()) {
    ordered_json components = ordered_json::array();
    for (const inspect_component& c : r.components) {
      ordered_json types = ordered_json::object();
      for (const auto& [t, n] : c.dtype_counts) types[t] = n;
      components.push_back({{"name", c.name},
                            {"index", c.index_name.empty() ? ordered_json(nullptr) : ordered_json(c.index_name)},
                            {"files", c.n_files},
                            {"tensors", c.n_tensors},
                            {"parameters", c.n_parameters},
                            {"bytes", c.n_bytes},
                            {"dtypes", std::move(types)}});
    }
    j["pipeline"] = {{"model_index", r.pipeline_index_path}, {"components", std::move(components)}};
  }

  if (r.lora) {
    ordered_json modules = ordered_json::array();
    for (size_t i = 0; i < r.lora->modules.size(); ++i)
      modules.push_back(module_json(r.lora->modules[i], r.base_matches.empty() ? nullptr : &r.base_matches[i]));
    j["modules"] = std::move(modules);
    ordered_json saved = ordered_json::array();
    for (const saved_tensor& s : r.lora->saved)
      saved.push_back({{"target", s.target},
                       {"key", s.tensor.info->name},
                       {"dtype", std::string(dtype_name(s.tensor.info->type))},
                       {"shape", s.tensor.info->shape}});
    j["modules_to_save"] = std::move(saved);
    ordered_json tokens = ordered_json::array();
    for (const token_rows& t : r.lora->tokens)
      tokens.push_back({{"target", t.target},
                        {"indices", t.indices},
                        {"key", t.values.info->name},
                        {"dtype", std::string(dtype_name(t.values.info->type))},
                        {"shape", t.values.info->shape}});
    j["trainable_tokens"] = std::move(tokens);
  }

  ordered_json tensors = ordered_json::array();
  for (const inspect_tensor& t : r.tensors)
    tensors.push_back({{"name", t.name},
                       {"dtype", std::string(dtype_name(t.type))},
                       {"shape", t.shape},
                       {"bytes", t.n_bytes},
                       {"file", t.file}});
  j["tensors"] = std::move(tensors);
  j["totals"] = {{"tensors", r.tensors.size()}, {"parameters", r.n_parameters}, {"bytes", r.n_bytes}};

  auto quantization_json = [](const inspect_quantization& q) {
    ordered_json o = {{"supported", q.refused.empty()}};
    if (q.n_unscaled > 0) {
      o["scheme"] = q.scheme;
      o["unscaled_weights"] = q.n_unscaled;
      if (!q.refused.empty()) o["refused"] = q.refused;
      return o;
    }
    if (!q.refused.empty()) {
      o["refused"] = q.refused;
      return o;
    }
    o["scheme"] = q.scheme;
    o["block"] = {q.block_rows, q.block_cols};
    o["scaled_weights"] = q.n_scaled;
    return o;
  };
  if (r.quantization) j["quantization"] = quantization_json(*r.quantization);
  if (r.base_quantization) {
    j["base_quantization"] = quantization_json(*r.base_quantization);
    if (r.base_quantization->refused.empty() && r.base_quantization->n_unscaled == 0) j["base_quantization"]["adapted_weights"] = r.base_quantization->n_adapted;
    if (!r.base_quantization->needs_dtype.empty()) j["base_quantization"]["needs_dtype"] = r.base_quantization->needs_dtype;
  }
  if (r.fit) {
    ordered_json problems = ordered_json::array();
    for (const fit_problem& p : r.fit->problems) problems.push_back({{"key", p.key}, {"what", p.what}});
    j["fit"] = {{"ok", r.fit->ok()}, {"base", r.base_path}, {"problems", std::move(problems)}};
  }
  return j;
}

// --- text -----------------------------------------------------------------------

// Prints rows as aligned columns; `right[i]` right-aligns column i.
void print_table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows,
                 const std::vector<bool>& right) {
  std::vector<size_t> width(header.size());
  for (size_t c = 0; c < header.size(); ++c) width[c] = header[c].size();
  for (const auto& row : rows)
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  auto print_row = [&](const std::vector<std::string>& row) {
    std::string line = " ";
    for (size_t c = 0; c < row.size(); ++c) {
      const bool last = c + 1 == row.size();
      if (right[c])
        line += fmt::format(" {:>{}}", row[c], width[c]);
      else
        line += last ? " " + row[c] : fmt::format(" {:<{}}", row[c], width[c]);
    }
    fmt::print("{}\n", line);
  };
  print_row(header);
  for (const auto& row : rows) print_row(row);
}

// Long metadata values (kohya's ss_tag_frequency ...) are cut for the screen.
std::string screen_value(const std::string& v) {
  constexpr size_t k_max = 100;
  std::string one_line;
  for (char ch : v) one_line += (ch == '\n' || ch == '\r' || ch == '\t') ? ' ' : ch;
  if (one_line.size() <= k_max) return one_line;
  size_t cut = k_max;
  while (cut > 0 && (static_cast<unsigned char>(one_line[cut]) & 0xC0) == 0x80) --cut;  // whole UTF-8 characters
  return fmt::format("{}... ({} bytes)", one_line.substr(0, cut), v.size());
}

// The headline: what the path is.
void print_headline(const inspect_report& r) {
  switch (r.kind) {
    case inspect_kind::model:
      fmt::print("model: {}{}\n", r.path, r.model_type ? fmt::format(" (model_type {})", *r.model_type) : "");
      break;
    case inspect_kind::adapter:
      fmt::print("adapter: {} ({}, {} modules{})\n", r.path, r.adapter_kind, r.lora->modules.size(),
                 r.lora->saved.empty() ? "" : fmt::format(", {} saved tensors", r.lora->saved.size()));
      break;
    case inspect_kind::other_adapter:
      fmt::print("other adapter: {}: {} (not an adapter that lora can merge)\n", r.path, r.other_description);
      break;
  }
  if (r.quantization) {
    const inspect_quantization& q = *r.quantization;
    if (q.n_unscaled > 0)
      fmt::print("quantization: {}: {} tensors; merge refuses to merge into them\n", q.scheme, q.n_unscaled);
    else if (!q.refused.empty())
      fmt::print("quantization: not supported by merge: {}\n", q.refused);
    else
      fmt::print("quantization: {}; {} FP8 weights with block scales (weight_scale_inv)\n", q.scheme, q.n_scaled);
  }
  if (!r.index_path.empty())
    fmt::print("index: {} (total_size {})\n", r.index_path,
               r.index_total_size ? grouped(*r.index_total_size) : std::string("absent"));
  if (r.pipeline_index_path.empty()) return;
  fmt::print("diffusers pipeline: {} ({} components)\n", r.pipeline_index_path, r.components.size());
  for (const inspect_component& c : r.components) {
    std::vector<std::string> types;
    for (const auto& [t, n] : c.dtype_counts) types.push_back(fmt::format("{} {}", n, t));
    fmt::print("  {}/  {} file{}{}, {} tensors ({}), {} parameters, {} bytes\n", c.name, c.n_files,
               c.n_files == 1 ? "" : "s", c.index_name.empty() ? "" : fmt::format(" ({})", c.index_name), c.n_tensors,
               fmt::join(types, ", "), grouped(c.n_parameters), grouped(c.n_bytes));
  }
}

// Every file with its metadata.
void print_files(const inspect_report& r) {
  fmt::print("\nfiles:\n");
  for (const inspect_file& f : r.files) {
    fmt::print("  {}  {} bytes, header {} bytes, {} tensors\n", f.name, grouped(f.bytes), grouped(f.header_bytes),
               f.n_tensors);
    if (!f.metadata) {
      fmt::print("    metadata: none\n");
      continue;
    }
    fmt::print("    metadata:{}\n", f.metadata->empty() ? " {}" : "");
    for (const auto& [k, v] : *f.metadata) fmt::print("      {}: {}\n", k, screen_value(v));
  }
}

// The LoRA modules of an adapter: its config, one row per module, modules_to_save.
void print_modules(const inspect_report& r, const adapter& a) {
  if (a.config) {
    const peft_config& c = *a.config;
    fmt::print("\nconfig: r {}, lora_alpha {}, use_rslora {}, use_dora {}, fan_in_fan_out {}, lora_bias {}\n",
               c.r ? std::to_string(*c.r) : "-", c.lora_alpha ? number_text(*c.lora_alpha) : "-", c.use_rslora,
               c.use_dora, c.fan_in_fan_out, c.lora_bias);
    if (!c.target_modules.empty())
      fmt::print("  target_modules: {}{}\n", fmt::join(c.target_modules, ", "),
                 c.target_modules_is_regex ? " (regex)" : "");
    for (const auto& [name, indices] : c.trainable_token_indices)
      fmt::print("  trainable_token_indices{}: {}\n", name.empty() ? "" : " " + name, fmt::join(indices, ", "));
    if (!c.target_parameters.empty())
      fmt::print("  target_parameters: {} (lora.ParamWrapper)\n", fmt::join(c.target_parameters, ", "));
    for (const auto& [k, v] : c.rank_pattern) fmt::print("  rank_pattern: {} -> {}\n", k, v);
    for (const auto& [k, v] : c.alpha_pattern) fmt::print("  alpha_pattern: {} -> {}\n", k, number_text(v));
  }
  fmt::print("\nmodules:\n");
  const bool with_base = !r.base_matches.empty();
  std::vector<std::string> header = {"module", "kind", "rank", "alpha", "scale", "dora", "A", "B", "dtype"};
  std::vector<bool> right = {false, false, true, true, true, false, false, false, false};
  if (with_base) {
    header.insert(header.end(), {"base", "target"});
    right.insert(right.end(), {false, false});
  }
  std::vector<std::vector<std::string>> rows;
  // the base cell is "<shape> <dtype>": shapes padded to one width so that the dtypes line up
  size_t base_shape_width = 0;
  for (const inspect_base_match& b : r.base_matches)
    if (b.found) base_shape_width = std::max(base_shape_width, shape_text(b.shape).size());
  for (size_t i = 0; i < a.modules.size(); ++i) {
    const lora_module& m = a.modules[i];
    std::string kind(module_kind_name(m.kind));
    if (m.form != delta_form::low_rank) kind += fmt::format(" {}", delta_form_name(m.form));
    if (m.kind == module_kind::parameter)
      kind += fmt::format(" {} expert{}{}", m.n_experts, m.n_experts == 1 ? "" : "s",
                          m.fan_in_fan_out ? " [E, in, out]" : "");
    else if (m.fan_in_fan_out)
      kind += " (fan_in_fan_out)";
    if (m.bias) kind += " +bias";
    rows.push_back({m.name, kind, std::to_string(m.rank), number_text(m.alpha), number_text(m.scale),
                    m.dora         ? "yes"
                    : m.dora_scale ? "LyCORIS"
                                   : "no",
                    shape_text(m.a.info->shape), shape_text(m.b.info->shape), std::string(dtype_name(m.a.info->type))});
    if (with_base) {
      const inspect_base_match& b = r.base_matches[i];
      rows.back().push_back(b.found ? fmt::format("{:<{}} {}", shape_text(b.shape), base_shape_width, dtype_name(b.type))
                                    : "not found");
      std::string target = m.target.empty() ? "-" : m.target;
      if (!m.slices.empty())
        target += fmt::format(" rows [{}, {}){}", m.slices[0].tensor_row, m.slices[0].tensor_row + m.slices[0].n_rows,
                              m.slices.size() > 1 ? fmt::format(" (+{} more)", m.slices.size() - 1) : "");
      rows.back().push_back(target);
    }
  }
  print_table(header, rows, right);
  if (!a.tokens.empty()) {
    fmt::print("\ntrainable_token_indices (replace rows of the base tensor):\n");
    for (const token_rows& t : a.tokens)
      fmt::print("  {}  rows [{}]  <- {}  {} {}\n", t.target, fmt::join(t.indices, ", "), t.values.info->name,
                 dtype_name(t.values.info->type), shape_text(t.values.info->shape));
  }
  if (!a.saved.empty()) {
    fmt::print("\nmodules_to_save (replace the base tensor whole):\n");
    for (const saved_tensor& s : a.saved)
      fmt::print("  {}  <- {}  {} {}\n", s.target, s.tensor.info->name, dtype_name(s.tensor.info->type),
                 shape_text(s.tensor.info->shape));
  }
}

// Every tensor, then the totals.
void print_tensors(const inspect_report& r) {
  fmt::print("\ntensors:\n");
  const bool many_files = r.files.size() > 1;
  std::vector<std::string> header = {"name", "dtype", "shape", "bytes"};
  std::vector<bool> right = {false, false, false, true};
  if (many_files) {
    header.push_back("file");
    right.push_back(false);
  }
  std::vector<std::vector<std::string>> rows;
  for (const inspect_tensor& t : r.tensors) {
    rows.push_back({t.name, std::string(dtype_name(t.type)), shape_text(t.shape), grouped(t.n_bytes)});
    if (many_files) rows.back().push_back(t.file);
  }
  print_table(header, rows, right);
  fmt::print("\ntotals: {} tensors, {} parameters, {} bytes ({})\n", r.tensors.size(), grouped(r.n_parameters),
             grouped(r.n_bytes), human_bytes(r.n_bytes));
}

// The fit against a base model.
void print_fit(const inspect_report& r) {
  if (r.fit) {
    if (r.fit->ok()) {
      fmt::print("\nfit: ok: every module matches {}\n", r.base_path);
    } else {
      fmt::print("\nfit: {} problems against {}:\n", r.fit->problems.size(), r.base_path);
      for (const fit_problem& p : r.fit->problems) fmt::print("  {}: {}\n", p.key, p.what);
    }
  }
  if (r.base_quantization) {
    const inspect_quantization& q = *r.base_quantization;
    if (!q.refused.empty()) {
      fmt::print("\nquantization of the base: merge refuses it: {}\n", q.refused);
      return;
    }
    if (q.n_unscaled > 0) {
      fmt::print("\nquantization of the base: {}: {} tensors, none adapted (merge copies them)\n", q.scheme,
                 q.n_unscaled);
      return;
    }
    fmt::print("\nfp8 base: {}; {} FP8 weights with block scales (weight_scale_inv), {} of them adapted\n", q.scheme,
               q.n_scaled, q.n_adapted);
    if (!q.needs_dtype.empty())
      fmt::print("  merge: refused without --dtype: {}\n", q.needs_dtype);
    else
      fmt::print("  merge: the output stays FP8: the {} adapted weights dequantized, merged and requantized to E4M3 "
               "with new {}x{} block scales (max|w| / 448); the other FP8 weights and their scales copied byte for "
               "byte\n",
               q.n_adapted, q.block_rows, q.block_cols);
    fmt::print("  merge --dtype bf16|f16|f32: every FP8 weight dequantized with its block scales and rounded once; "
               "the {} weight_scale_inv tensors and quantization_config dropped\n",
               q.n_scaled);
  }
}

void print_report(const inspect_report& r) {
  print_headline(r);
  print_files(r);
  if (r.lora) print_modules(r, *r.lora);
  print_tensors(r);
  print_fit(r);
}

int run_inspect(const inspect_options& o) {
  std::optional<std::string> base;
  if (!o.base.empty()) base = o.base;
  inspect_report r = inspect_path(o.path, base);
  if (base && r.kind != inspect_kind::adapter)
    throw errors::usage(fmt::format("--base applies to a LoRA adapter, and {} is {}", o.path,
                                    r.kind == inspect_kind::model ? "a model" : "an adapter of another kind"));

  if (o.json)
    fmt::print("{}\n", report_json(r).dump(2));
  else
    print_report(r);
  std::fflush(stdout);

  if (r.fit && !r.fit->ok()) throw fit_error(o.path, r.base_path, *r.fit);
  // merge would refuse the base's quantization: so does the fit check
  if (r.base_quantization && !r.base_quantization->refused.empty())
    throw errors::invalid("", "", r.base_quantization->refused);
  return static_cast<int>(exit_code::ok);
}

}  // namespace

CLI::App* setup_inspect(CLI::App& app, runner& run) {
  auto opts = std::make_shared<inspect_options>();
  auto* sub = app.add_subcommand("inspect",
                                 "List the files, metadata and tensors of a model, an adapter or any "
                                 "safetensors file; for a LoRA adapter, its modules, ranks and scales");
  sub->add_option("path", opts->path, "model folder, adapter folder, or .safetensors file")->required();
  sub->add_flag("--json", opts->json, "print one JSON object instead of tables");
  sub->add_option("--base", opts->base, "check that the adapter fits this base model (exit 3 when it does not)");
  sub->callback([opts, &run] { run = [opts] { return run_inspect(*opts); }; });
  return sub;
}

}  // namespace lora::cli
