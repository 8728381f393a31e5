#include "core/resize.h"

#include <cmath>

#include <fmt/format.h>

#include "core/adapter-write.h"
#include "core/delta.h"
#include "core/kohya-format.h"
#include "core/thread-pool.h"
#include "formats/error.h"
#include "formats/staged-folder.h"

namespace lora {

resize_report resize_adapter(const resize_options& o) {
  check_output(o.out, {{"adapter", o.adapter}}, o.force);
  adapter in = load_adapter(o.adapter);
  require_low_rank(in, "resize");
  adapter_data out = adapter_to_data(in);
  resize_report report;
  report.format = in.format;
  report.out = o.out;
  report.modules.resize(out.modules.size());
  const std::string& file = in.weights_path;
  for (const lora_module& m : in.modules) check_finite_factors(m, file);

  // every module on its own: recompress s B A, round once to the input dtypes
  parallel_for(out.modules.size(), 0, [&](size_t i) {
    module_data& md = out.modules[i];
    const double scale = in.modules[i].scale;
    const factors f = read_factors(md.a, md.b, md.rank);
    recompressed rc =
        named_svd_errors(file, md.name, [&] { return recompress(f.b, f.a, f.m, f.n, f.r, scale, o.rule); });
    const int64_t k = rc.rank;

    module_rank_report& line = report.modules[i];
    line.name = md.name;
    line.rank_in = md.rank;
    line.rank_out = k;
    line.energy_kept = rc.energy_fraction();
    line.relative_error = rc.relative_error();
    line.target_reached = rc.target_reached;
    line.singular_values = rc.s;
    line.rows = rc.rows;
    line.cols = rc.cols;
    if (k == md.rank) {
      // nothing dropped: the factors stay as they are, bytes and all (new
      // factors would be rounded again to a 16-bit dtype), and so does the
      // scale, as alpha = s r (rsLoRA is off in the output)
      md.alpha = alpha_for_scale(scale, k, false);
      if (!std::isfinite(md.alpha))
        throw errors::invalid(file, md.name,
                              fmt::format("the new alpha = s * r = {:.3g} * {} overflows f64", scale, k));
      // the written delta is s' B A, s' = alpha / r: off by |s' - s| / |s| (an ulp at most)
      const double written = lora_scale(md.alpha, k, false);
      line.measured_error = scale != 0 ? std::fabs(written - scale) / std::fabs(scale) : 0.0;
      return;
    }
    tensor_data a_new = make_finite_tensor(md.a.type, a_shape(md.a.shape, k), rc.a, file, md.name, "lora_A");
    tensor_data b_new = make_finite_tensor(md.b.type, b_shape(md.b.shape, k), rc.b, file, md.name, "lora_B");
    line.measured_error = measured_error(f, scale, a_new, b_new, k, rc.total_energy);

    // the scale is now 1: a lora_B bias takes the old scale (bias' = s b)
    if (md.bias && scale != 1.0) {
      std::vector<double> v = values_f64(md.bias->type, md.bias->bytes, n_elements(md.bias->shape));
      for (double& x : v) x *= scale;
      md.bias = make_finite_tensor(md.bias->type, md.bias->shape, v, file, md.name, "lora_B bias");
    }
    md.a = std::move(a_new);
    md.b = std::move(b_new);
    md.rank = k;
    md.alpha = static_cast<double>(k);
  });
  out.use_rslora = false;
  if (out.format == adapter_format::kohya) out.metadata = kohya::metadata_after_rerank(out.metadata, out.modules);
  write_adapter(out, o.out, o.force);
  return report;
}

}  // namespace lora
