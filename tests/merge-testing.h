// Test helpers shared by test-delta.cpp and test-merge.cpp: temporary
// folders, deterministic tensors written as safetensors, exact decoding.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "formats/safetensors.h"
#include "tests/test-support.h"

namespace lora::testing {

// A tensor to write: values are rounded once (from double) to `type`.
struct test_tensor {
  std::string name;
  dtype type = dtype::F32;
  std::vector<int64_t> shape;
  std::vector<double> values;
};

inline uint64_t n_elements(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

// Uniform values in [lo, hi) from a fixed seed.
inline std::vector<double> random_values(uint64_t n, uint32_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

inline test_tensor random_tensor(std::string name, dtype type, std::vector<int64_t> shape, uint32_t seed,
                                 double lo = -1.0, double hi = 1.0) {
  test_tensor t{std::move(name), type, std::move(shape), {}};
  t.values = random_values(n_elements(t.shape), seed, lo, hi);
  return t;
}

inline std::vector<uint8_t> encode(const test_tensor& t) {
  std::vector<uint8_t> bytes(t.values.size() * static_cast<size_t>(math_dtype_size(t.type)));
  from_f64(t.type, t.values, bytes);
  return bytes;
}

inline void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + path);
}

// Writes the tensors as one safetensors file.
inline void write_safetensors(const std::string& path, const std::vector<test_tensor>& tensors,
                              const std::optional<metadata_map>& metadata = std::nullopt) {
  std::vector<tensor_spec> specs;
  std::map<std::string, std::vector<uint8_t>> data;
  for (const auto& t : tensors) {
    specs.push_back({t.name, t.type, t.shape});
    data[t.name] = encode(t);
  }
  safetensors_layout layout = plan_safetensors(specs, metadata);
  write_bytes(path, serialize_safetensors(layout, [&](const tensor_info& info) {
                const auto& d = data.at(info.name);
                return std::span<const uint8_t>(d.data(), d.size());
              }));
}

// A tensor of a file, decoded exactly to double.
inline std::vector<double> read_f64(const safetensors_file& f, const std::string& name) {
  const tensor_info& t = f.at(name);
  std::vector<double> v(t.n_elements);
  to_f64(t.type, f.data(t), v);
  return v;
}

// The value a tensor holds once stored as `type` (rounded once from double).
inline double stored(dtype type, double v) {
  uint8_t buf[8];
  from_f64(type, std::span<const double>(&v, 1), std::span<uint8_t>(buf, static_cast<size_t>(math_dtype_size(type))));
  double out;
  to_f64(type, std::span<const uint8_t>(buf, static_cast<size_t>(math_dtype_size(type))), std::span<double>(&out, 1));
  return out;
}

// Distance in units in the last place between two 16-bit floats of the same
// format (bf16 or f16), both finite: difference of their sign-magnitude
// ordinals.
inline int64_t ulp_distance16(uint16_t x, uint16_t y) {
  auto ordinal = [](uint16_t h) -> int64_t {
    const int64_t mag = h & 0x7fff;
    return (h & 0x8000) ? -mag : mag;
  };
  return std::llabs(ordinal(x) - ordinal(y));
}

}  // namespace lora::testing
