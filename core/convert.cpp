#include "core/convert.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>

#include <fmt/format.h>

#include "core/adapter-data.h"
#include "core/adapter-write.h"
#include "core/delta.h"
#include "core/dtype.h"
#include "core/kohya-format.h"
#include "core/mlx-format.h"
#include "formats/error.h"
#include "formats/staged-folder.h"

namespace lora {

namespace {

// An mlx_lm adapter as PEFT data, its factors checked for NaN / Inf (named as
// mlx_lm wrote them).
adapter_data read_mlx(const convert_options& o, const model_files* base) {
  adapter_data d = mlx::load(o.adapter, base);
  for (const module_data& m : d.modules)
    for (const auto& [t, key] : {std::pair{&m.a, mlx::a_suffix}, std::pair{&m.b, mlx::b_suffix}})
      if (const uint64_t bad = count_nonfinite(t->type, t->bytes); bad > 0)
        throw errors::invalid(o.adapter, m.name + std::string(key),
                              fmt::format("{} of its values are NaN or infinite", bad));
  return d;
}

// A PEFT or kohya adapter as data, fitted to the base when there is one.
adapter_data read_lora(const convert_options& o, const model_files* base, std::string& from) {
  adapter a = load_adapter(o.adapter);
  require_low_rank(a, "convert");
  for (const lora_module& m : a.modules) check_finite_factors(m, a.weights_path);
  from = std::string(adapter_format_name(a.format));
  if (a.format == adapter_format::kohya && o.to == adapter_format::peft && base == nullptr)
    throw errors::usage(
        fmt::format("converting the kohya adapter {} to PEFT needs --base MODEL: kohya names (\"{}\") "
                    "lose the dots of the module paths, the base's tensor names give them back",
                    o.adapter, a.modules.empty() ? "" : a.modules.front().name));
  std::map<const tensor_info*, std::string> kohya_name;  // kept for kohya -> kohya
  for (const lora_module& m : a.modules) kohya_name[m.a.info] = m.name;
  if (base != nullptr) require_fit(a, *base);
  if (base != nullptr) require_whole_targets(a, "convert");
  // what kohya cannot hold (fan_in_fan_out: kohya keeps A [r, in], B [out, r] for W [out, in])
  if (o.to == adapter_format::kohya)
    for (const lora_module& m : a.modules)
      if (m.fan_in_fan_out)
        throw errors::invalid(a.weights_path, m.a.info->name,
                              fmt::format("module {} is fan_in_fan_out (GPT-2 Conv1D, weight [in, out]): kohya files "
                                          "have no such layout",
                                          m.name));
  adapter_data d = adapter_to_data(a);
  if (base != nullptr && o.to == adapter_format::peft)
    for (module_data& m : d.modules) reshape_to_kind(m);
  if (a.format == adapter_format::kohya && o.to == adapter_format::kohya)
    for (size_t i = 0; i < a.modules.size(); ++i) d.modules[i].name = kohya_name[a.modules[i].a.info];
  if (a.format == adapter_format::kohya) {
    // kohya -> PEFT: the base's module paths, one entry per module
    d.config = peft_config{};
    d.config.peft_type = "LORA";
    d.config.target_modules = sorted_names(d.modules);
    d.config.base_model_name_or_path = o.base;
  }
  return d;
}

// The target format's scale convention, prefix and metadata.
void to_target(adapter_data& d, const convert_options& o) {
  if (o.to == adapter_format::kohya) {
    if (d.use_rslora) {
      // kohya s = alpha / r: alpha = s * r with s = alpha_peft / sqrt(r)
      for (module_data& m : d.modules) {
        m.alpha = alpha_for_scale(lora_scale(m.alpha, m.rank, true), m.rank, false);
        if (!std::isfinite(m.alpha))
          throw errors::invalid(o.adapter, m.name,
                                fmt::format("the kohya alpha = s * r (rsLoRA) overflows f64 at rank {}", m.rank));
      }
      d.use_rslora = false;
    }
    d.kohya_prefix = kohya::resolve_prefix(o.kohya_prefix, sorted_names(d.modules));
    d.metadata = kohya::metadata_after_rerank(d.format == adapter_format::kohya ? d.metadata : std::nullopt, d.modules);
  } else {
    d.metadata = metadata_map{{"format", "pt"}};
  }
  d.format = o.to;
}

}  // namespace

convert_report convert_adapter(const convert_options& o) {
  convert_report report;
  report.to = o.to;
  report.out = o.out;
  check_output(o.out, {{"adapter", o.adapter}, {"base model", o.base}}, o.force);
  std::optional<model_files> base;
  if (!o.base.empty()) base = open_model(o.base);
  const model_files* base_ptr = base ? &*base : nullptr;

  adapter_data d;
  if (mlx::is_adapter(o.adapter)) {
    report.from = "mlx";
    d = read_mlx(o, base_ptr);
  } else {
    d = read_lora(o, base_ptr, report.from);
  }
  to_target(d, o);
  write_adapter(d, o.out, o.force);

  // what was written
  report.n_modules = d.modules.size();
  report.n_saved = d.saved.size();
  bool first = true;
  for (const module_data& m : d.modules) {
    const double s = lora_scale(m.alpha, m.rank, d.use_rslora);
    report.min_rank = first ? m.rank : std::min(report.min_rank, m.rank);
    report.max_rank = first ? m.rank : std::max(report.max_rank, m.rank);
    report.min_scale = first ? s : std::min(report.min_scale, s);
    report.max_scale = first ? s : std::max(report.max_scale, s);
    first = false;
  }
  return report;
}

}  // namespace lora
