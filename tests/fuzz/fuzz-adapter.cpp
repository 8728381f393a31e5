// libFuzzer target on the adapter loader, in memory: adapter_config.json
// parsing (PEFT, MLX, and config.json's), the safetensors header, the key
// classification (PEFT / kohya / MLX and other kinds), PEFT and kohya loading.
//
// Input: the config text, one NUL byte, then the safetensors file's bytes.
// An empty config means no adapter_config.json (kohya, MLX, a PEFT file
// without its config). An input without NUL is a config with no weights.
// (JSON never holds a NUL byte, and parse_json_bounded refuses one.)
//
// Every input must load or be refused with lora::error (exit 3); anything
// else (a crash, a sanitizer report, another exception, a hang, a broken
// invariant) is a finding. A loaded adapter must satisfy the invariants
// load_adapter documents.
//
// rank_pattern / alpha_pattern keys are compiled and matched too: RE2
// (core/module-pattern) is linear in time, so a slow input is a finding.
//
// Build: cmake -DLORA_FUZZ=ON with CC=clang CXX=clang++, target fuzz-adapter.
// Run:   fuzz-adapter -max_len=4096 -dict=tests/fuzz/adapter.dict <work-dir> tests/corpus/adapter
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <string>

#include <nlohmann/json.hpp>

#include "core/adapter.h"
#include "formats/error.h"
#include "formats/hf-config.h"
#include "formats/json.h"
#include "formats/mlx-config.h"

namespace {

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz-adapter: invariant broken: %s\n", what);
    std::abort();
  }
}

// Runs f; a lora::error must be exit 3.
template <typename F>
bool refused_or_ran(F&& f) {
  try {
    f();
    return true;
  } catch (const lora::error& e) {
    require(e.code() == lora::exit_code::invalid_input, "refusals are exit 3");
    return false;
  }
}

bool in_file(const lora::adapter& a, const lora::tensor_ref& r) {
  return r.file == a.file.get() && r.info != nullptr && a.file->find(r.info->name) == r.info;
}

void check_adapter(const lora::adapter& a) {
  require(a.format != lora::adapter_format::peft || a.config.has_value(), "a PEFT adapter has its config");
  for (size_t i = 0; i < a.modules.size(); ++i) {
    const lora::lora_module& m = a.modules[i];
    require(i == 0 || a.modules[i - 1].name < m.name, "modules sorted by name, unique");
    require(in_file(a, m.a) && in_file(a, m.b), "A and B are tensors of the file");
    require(m.rank > 0, "rank is positive");
    if (m.kind == lora::module_kind::parameter) {
      // target_parameters: lora_A [r E, in], lora_B [out, r E]
      require(m.n_experts > 0 && m.a.info->shape.size() == 2 && m.a.info->shape[0] == m.rank * m.n_experts,
              "a ParamWrapper's A has r * experts rows");
      require(m.b.info->shape.size() == 2 && m.b.info->shape[1] == m.rank * m.n_experts,
              "a ParamWrapper's B has r * experts columns");
    } else if (m.form == lora::delta_form::low_rank) {
      require(m.a.info->shape.size() >= 2 && m.a.info->shape[0] == m.rank, "rank is A's rows");
      require(m.b.info->shape.size() >= 2 && m.b.info->shape[1] == m.rank, "rank is B's columns");
    } else {
      // LyCORIS: a and b view two of its tensors; the rank comes from the decomposed factor
      const lora::lycoris_tensors& l = m.lycoris;
      for (const auto* t : {&l.w1, &l.w1_a, &l.w1_b, &l.w2, &l.w2_a, &l.w2_b, &l.t1, &l.t2, &l.mid})
        require(!*t || in_file(a, **t), "LyCORIS tensors are tensors of the file");
    }
    require(std::isfinite(m.alpha) && std::isfinite(m.scale), "alpha and scale are finite");
    require(!m.magnitude || (in_file(a, *m.magnitude) && m.dora), "magnitude only with DoRA");
    require(!m.bias || in_file(a, *m.bias), "bias is a tensor of the file");
  }
  for (size_t i = 0; i < a.saved.size(); ++i) {
    require(in_file(a, a.saved[i].tensor), "saved tensors are tensors of the file");
    require(i == 0 || a.saved[i - 1].target <= a.saved[i].target, "saved tensors sorted by target");
  }
  for (size_t i = 0; i < a.tokens.size(); ++i) {
    const lora::token_rows& t = a.tokens[i];
    require(in_file(a, t.values), "trainable tokens deltas are tensors of the file");
    require(t.values.info->shape.size() == 2 && t.values.info->shape[0] == static_cast<int64_t>(t.indices.size()),
            "a trainable tokens delta has one row per index");
    require(i == 0 || a.tokens[i - 1].target <= t.target, "trainable tokens sorted by target");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto* nul = static_cast<const uint8_t*>(std::memchr(data, 0, size));
  const size_t config_size = nul ? static_cast<size_t>(nul - data) : size;
  const std::string config(reinterpret_cast<const char*>(data), config_size);
  std::span<const uint8_t> weights;
  if (nul) weights = std::span<const uint8_t>(nul + 1, size - config_size - 1);

  // the config as each reader sees it
  std::optional<std::string> config_text;
  if (!config.empty()) {
    refused_or_ran([&] { lora::parse_peft_config(config, "fuzz-config"); });
    refused_or_ran([&] { lora::parse_mlx_adapter_config(config, "fuzz-config"); });
    refused_or_ran([&] { lora::parse_hf_config(config, "fuzz-config"); });
    refused_or_ran([&] { (void)lora::json_or_text(config).dump(); });
    config_text = config;
  }

  // the loader: classification, then PEFT or kohya loading
  lora::adapter a;
  if (refused_or_ran([&] { a = lora::load_adapter_bytes(weights, "fuzz-weights", config_text, "fuzz-config"); }))
    check_adapter(a);
  return 0;
}
