// libFuzzer target on the in-memory safetensors reader.
//
// Every input must either parse or be refused with lora::error (exit 3);
// anything else (a crash, a sanitizer report, another exception, a broken
// invariant) is a finding. What parses must satisfy the header invariants and
// survive a write + re-read unchanged.
//
// Build: cmake -DLORA_FUZZ=ON with CC=clang CXX=clang++, target fuzz-safetensors.
// Run:   fuzz-safetensors -max_len=4096 -max_total_time=60 <work-dir> tests/corpus/safetensors
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "formats/error.h"
#include "formats/safetensors.h"

namespace {

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz-safetensors: invariant broken: %s\n", what);
    std::abort();
  }
}

// A parsed header must tile the data buffer exactly, in data order.
void check_header(const lora::safetensors_header& h, uint64_t file_size) {
  uint64_t expect = 0;
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const lora::tensor_info& t = h.tensors[i];
    require(t.begin == expect, "tensors are contiguous from 0");
    require(t.end >= t.begin, "end >= begin");
    auto bytes = lora::dtype_bytes(t.type, t.n_elements);
    require(bytes && *bytes == t.n_bytes(), "byte count matches dtype x shape");
    uint64_t n = 1;
    for (int64_t d : t.shape) {
      require(d >= 0, "dimensions are non-negative");
      require(!__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n), "element count fits");
    }
    require(n == t.n_elements, "n_elements is the product of the shape");
    require(h.find(t.name) == &t, "index finds each tensor");
    expect = t.end;
  }
  require(h.index.size() == h.tensors.size(), "names are unique");
  require(h.data_start() + expect == file_size, "buffer ends at end of file");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> file(data, size);
  lora::safetensors_header h;
  try {
    h = lora::parse_safetensors_header(file, size, "fuzz");
  } catch (const lora::error& e) {
    require(e.code() == lora::exit_code::invalid_input, "refusals are exit 3");
    return 0;
  }
  check_header(h, size);

  // write it again the reference way, read it back: same tensors, same bytes
  std::vector<lora::tensor_spec> specs;
  for (const auto& t : h.tensors) specs.push_back({t.name, t.type, t.shape});
  lora::safetensors_layout layout = lora::plan_safetensors(specs, h.metadata);
  std::vector<uint8_t> out = lora::serialize_safetensors(layout, [&](const lora::tensor_info& t) {
    const lora::tensor_info* src = h.find(t.name);
    return file.subspan(h.data_start() + src->begin, src->n_bytes());
  });
  lora::safetensors_header h2 = lora::parse_safetensors_header(out, out.size(), "fuzz-rewritten");
  check_header(h2, out.size());
  require(h2.tensors.size() == h.tensors.size(), "same tensor count");
  require(h2.metadata == h.metadata, "same metadata");
  for (const auto& t2 : h2.tensors) {
    const lora::tensor_info* t = h.find(t2.name);
    require(t != nullptr, "same names");
    require(t->type == t2.type && t->shape == t2.shape, "same dtype and shape");
    require(std::memcmp(data + h.data_start() + t->begin, out.data() + h2.data_start() + t2.begin, t->n_bytes()) == 0,
            "same bytes");
  }
  return 0;
}
