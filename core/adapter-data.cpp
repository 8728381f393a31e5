#include "core/adapter-data.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "core/dtype.h"
#include "formats/error.h"

namespace lora {

void keyed_tensors::add(const std::string& key, const tensor_data& t, const std::string& label) {
  uint64_t n = 1;
  for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
  std::optional<uint64_t> want = dtype_bytes(t.type, n);
  if (!want || *want != t.bytes.size())
    throw errors::invalid(
        label, key, fmt::format("internal: {} bytes for {} elements of {}", t.bytes.size(), n, dtype_name(t.type)));
  if (!data.emplace(key, &t).second) throw errors::invalid(label, key, "two tensors with this key");
  specs.push_back({key, t.type, t.shape});
}

void keyed_tensors::add_owned(const std::string& key, std::unique_ptr<tensor_data> t, const std::string& label) {
  add(key, *t, label);
  owned.push_back(std::move(t));
}

int64_t n_elements(const std::vector<int64_t>& shape) noexcept {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<double> values_f64(dtype type, std::span<const uint8_t> bytes, int64_t n) {
  std::vector<double> out(static_cast<size_t>(n));
  to_f64(type, bytes, out);
  return out;
}

tensor_data make_tensor(dtype type, std::vector<int64_t> shape, std::span<const double> values) {
  tensor_data t;
  t.type = type;
  t.shape = std::move(shape);
  t.bytes.resize(values.size() * static_cast<size_t>(math_dtype_size(type)));
  from_f64(type, values, t.bytes);
  return t;
}

tensor_data make_finite_tensor(dtype type, std::vector<int64_t> shape, std::span<const double> values,
                               const std::string& file, const std::string& module, std::string_view what) {
  tensor_data t = make_tensor(type, std::move(shape), values);
  if (count_nonfinite(type, t.bytes) == 0) return t;
  double largest = 0;
  for (double v : values) largest = std::max(largest, std::fabs(v));
  throw errors::invalid(file, module,
                        fmt::format("the new {} overflows {}: a value of magnitude {:.3g} (largest finite {:.3g})",
                                    what, dtype_name(type), largest, max_finite(type)));
}

tensor_data copy_tensor(const tensor_ref& r) {
  tensor_data t;
  t.type = r.info->type;
  t.shape = r.info->shape;
  auto bytes = r.data();
  t.bytes.assign(bytes.begin(), bytes.end());
  return t;
}

factors read_factors(const tensor_data& a, const tensor_data& b, int64_t rank) {
  factors f;
  f.r = rank;
  f.n = n_elements(a.shape) / rank;
  f.m = b.shape[0];
  f.a = values_f64(a.type, a.bytes, rank * f.n);
  f.b = values_f64(b.type, b.bytes, f.m * rank);
  return f;
}

std::vector<int64_t> a_shape(const std::vector<int64_t>& like, int64_t k) {
  std::vector<int64_t> s = like;
  s[0] = k;
  return s;
}

std::vector<int64_t> b_shape(const std::vector<int64_t>& like, int64_t k) {
  std::vector<int64_t> s = like;
  s[1] = k;
  return s;
}

void reshape_to_kind(module_data& m) {
  if (m.kind == module_kind::conv) {
    if (m.a.shape.size() == 2) m.a.shape = {m.a.shape[0], m.a.shape[1], 1, 1};
    if (m.b.shape.size() == 2) m.b.shape = {m.b.shape[0], m.b.shape[1], 1, 1};
  } else {
    if (m.a.shape.size() == 4) m.a.shape = {m.a.shape[0], n_elements(m.a.shape) / m.a.shape[0]};
    if (m.b.shape.size() == 4) m.b.shape = {m.b.shape[0], m.b.shape[1]};
  }
}

std::vector<std::string> sorted_names(const std::vector<module_data>& modules) {
  std::vector<std::string> names;
  for (const module_data& m : modules) names.push_back(m.name);
  std::sort(names.begin(), names.end());
  return names;
}

adapter_data adapter_to_data(const adapter& a) {
  adapter_data d;
  d.format = a.format;
  if (a.config) {
    d.config = *a.config;
    d.use_rslora = a.config->use_rslora;
  }
  d.metadata = a.file->metadata();
  for (const lora_module& m : a.modules) {
    module_data md;
    md.name = m.name;
    md.kind = m.kind;
    md.a = copy_tensor(m.a);
    md.b = copy_tensor(m.b);
    if (m.magnitude) md.magnitude = copy_tensor(*m.magnitude);
    if (m.bias) md.bias = copy_tensor(*m.bias);
    md.rank = m.rank;
    md.alpha = m.alpha;
    d.modules.push_back(std::move(md));
  }
  for (const saved_tensor& s : a.saved) d.saved.push_back({s.target, copy_tensor(s.tensor)});
  return d;
}

}  // namespace lora
