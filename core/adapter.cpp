#include "core/adapter.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <unordered_map>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/diffusers-format.h"
#include "core/kohya-format.h"
#include "core/lycoris-format.h"
#include "core/mlx-format.h"
#include "core/peft-format.h"
#include "core/dtype.h"
#include "formats/error.h"

namespace lora {

namespace fs = std::filesystem;

std::string_view adapter_format_name(adapter_format f) noexcept {
  switch (f) {
    case adapter_format::peft: return "peft";
    case adapter_format::kohya: return "kohya";
    case adapter_format::diffusers: return "diffusers";
  }
  return "peft";
}

std::string_view module_kind_name(module_kind k) noexcept {
  switch (k) {
    case module_kind::linear: return "linear";
    case module_kind::embedding: return "embedding";
    case module_kind::conv: return "conv";
    case module_kind::parameter: return "parameter";
  }
  return "linear";
}

std::string_view delta_form_name(delta_form f) noexcept {
  switch (f) {
    case delta_form::low_rank: return "LoRA";
    case delta_form::loha: return "LoHa";
    case delta_form::lokr: return "LoKr";
    case delta_form::tucker: return "LoCon+Tucker";
  }
  return "LoRA";
}

std::string adapter_kind_name(const adapter& a) {
  std::set<std::string_view> forms;
  bool lycoris = false;
  for (const lora_module& m : a.modules) {
    lycoris = lycoris || m.form != delta_form::low_rank;
    forms.insert(m.form == delta_form::low_rank ? "LoCon" : delta_form_name(m.form));
  }
  if (!lycoris) return fmt::format("{} LoRA", adapter_format_name(a.format));
  return fmt::format("LyCORIS {}", fmt::join(forms, " + "));
}

void require_low_rank(const adapter& a, std::string_view command) {
  if (a.format == adapter_format::diffusers)
    throw errors::invalid(
        a.weights_path, "",
        fmt::format("{} does not take a diffusers LoRA file yet (no writer for its format)", command));
  for (const lora_module& m : a.modules) {
    if (m.dora_scale)
      throw errors::invalid(a.weights_path, m.dora_scale->info->name,
                            fmt::format("{} does not take LyCORIS weight decomposition (dora_scale) yet", command));
    if (m.form != delta_form::low_rank)
      throw errors::invalid(
          a.weights_path, m.name,
          fmt::format("{} works on LoRA factors (B A); this module is {}", command, delta_form_name(m.form)));
  }
  for (const lora_module& m : a.modules)
    if (m.kind == module_kind::parameter)
      throw errors::invalid(a.weights_path, m.a.info->name,
                            fmt::format("{} does not take target_parameters modules (lora.ParamWrapper on {}) yet",
                                        command, m.name));
  if (!a.tokens.empty())
    throw errors::invalid(a.weights_path, a.tokens.front().values.info->name,
                          fmt::format("{} does not take trainable_token_indices (rows of {}) yet", command,
                                      a.tokens.front().target));
}

// s = alpha / r (LoRA), s = alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023).
double lora_scale(double alpha, int64_t rank, bool rslora) noexcept {
  const double r = static_cast<double>(rank);
  return rslora ? alpha / std::sqrt(r) : alpha / r;
}

// alpha = s * r (LoRA), s * sqrt(r) (rsLoRA).
double alpha_for_scale(double scale, int64_t rank, bool rslora) noexcept {
  const double r = static_cast<double>(rank);
  return rslora ? scale * std::sqrt(r) : scale * r;
}

namespace {

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}
bool contains(std::string_view s, std::string_view part) { return s.find(part) != std::string_view::npos; }

// ---------------------------------------------------------------------------
// classification

// `<prefix>:<N>:up|down` (cloneofsimo/lora).
bool is_cloneofsimo_key(std::string_view k) {
  size_t c1 = k.find(':');
  if (c1 == std::string_view::npos || c1 == 0) return false;
  size_t c2 = k.find(':', c1 + 1);
  if (c2 == std::string_view::npos || c2 == c1 + 1) return false;
  for (size_t i = c1 + 1; i < c2; ++i)
    if (k[i] < '0' || k[i] > '9') return false;
  std::string_view tail = k.substr(c2 + 1);
  return tail == "up" || tail == "down";
}

struct other_kind {
  std::string_view label;
  bool (*match)(std::string_view);
};

// Adapter kinds that are not plain LoRA, each recognised by a key form.
const other_kind other_kinds[] = {
    {"LyCORIS full weight difference (diff, diff_b)",
     [](std::string_view k) { return ends_with(k, ".diff") || ends_with(k, ".diff_b"); }},
    {"LyCORIS norm adapter (w_norm, b_norm)",
     [](std::string_view k) { return ends_with(k, ".w_norm") || ends_with(k, ".b_norm"); }},
    {"MLX LoRA (lora_a [in, r], lora_b [r, out])", mlx::is_lora_key},
    {"cloneofsimo LoRA (<module>:<N>:up / :down)", is_cloneofsimo_key},
    {"IA3 ((IA)^3 ia3_l scaling vectors)", [](std::string_view k) { return contains(k, "ia3_l"); }},
    {"VeRA (vera_lambda_b, vera_lambda_d)",
     [](std::string_view k) { return contains(k, "vera_lambda") || contains(k, "vera_A"); }},
    {"OFT (oft_r)",
     [](std::string_view k) { return contains(k, ".oft_r") || contains(k, ".oft_blocks") || contains(k, ".oft_R"); }},
    {"BOFT (boft_R, boft_s)", [](std::string_view k) { return contains(k, ".boft_"); }},
    {"AdaLoRA (lora_E)", [](std::string_view k) { return contains(k, ".lora_E"); }},
    {"prompt tuning (prompt_embeddings)", [](std::string_view k) { return k == "prompt_embeddings"; }},
    {"adaption prompt (adaption_prompt, adaption_gate)",
     [](std::string_view k) { return contains(k, "adaption_prompt") || contains(k, "adaption_gate"); }},
};

}  // namespace

file_classification classify_tensors(const std::vector<std::string>& names) {
  // other adapter kinds first: their files may also hold lora_down / lora_A keys
  for (const other_kind& kind : other_kinds)
    for (const std::string& n : names)
      if (kind.match(n)) return {file_kind::other_adapter, fmt::format("{}, e.g. \"{}\"", kind.label, n)};
  // LyCORIS: name the algorithms present
  std::vector<std::string> forms;
  const std::string* example = nullptr;
  auto note = [&](const std::string& n, std::string_view part, const char* form) {
    if (!contains(n, part)) return;
    if (std::find(forms.begin(), forms.end(), form) == forms.end()) forms.push_back(form);
    if (!example) example = &n;
  };
  for (const std::string& n : names) {
    note(n, ".hada_", "LoHa");
    note(n, ".lokr_", "LoKr");
    note(n, ".lora_mid.", "LoCon+Tucker");
  }
  if (example) {
    std::sort(forms.begin(), forms.end());
    return {file_kind::lycoris, fmt::format("LyCORIS {}, e.g. \"{}\"", fmt::join(forms, " + "), *example)};
  }
  if (diffusers::is_diffusers_file(names)) {
    const auto it = std::find_if(names.begin(), names.end(), [](const std::string& n) {
      return contains(n, "lora_A") || contains(n, "lora_B") || contains(n, ".down.") || contains(n, ".up.");
    });
    return {file_kind::diffusers_lora,
            fmt::format("diffusers LoRA (pytorch_lora_weights: unet. / text_encoder. lora_A / lora_B, .lora.down / "
                        ".lora.up, attention processors), e.g. \"{}\"",
                        it == names.end() ? names.front() : *it)};
  }
  for (const std::string& n : names)
    if (peft::is_lora_key(n)) return {file_kind::peft_lora, fmt::format("PEFT LoRA (lora_A / lora_B), e.g. \"{}\"", n)};
  // PEFT LoRA with trainable_token_indices alone (no lora_A / lora_B)
  for (const std::string& n : names)
    if (n.starts_with(peft::prefix) && contains(n, ".token_adapter.trainable_tokens_delta"))
      return {file_kind::peft_lora, fmt::format("PEFT LoRA (trainable tokens), e.g. \"{}\"", n)};
  for (const std::string& n : names)
    if (kohya::is_lora_key(n))
      return {file_kind::kohya_lora, fmt::format("kohya / sd-scripts LoRA (lora_down / lora_up), e.g. \"{}\"", n)};
  return {file_kind::model, "no adapter tensors (a model)"};
}

namespace {

// Classifies the opened a.file and loads it with its format's reader.
// `config_label` names adapter_config.json (empty: there is none);
// `read_config` returns its text and is called only for a PEFT file (a kohya
// file ignores a config beside it).
void load_opened(adapter& a, const std::string& config_label, const std::function<std::string()>& read_config) {
  std::vector<std::string> names;
  names.reserve(a.file->tensors().size());
  for (const tensor_info& t : a.file->tensors()) names.push_back(t.name);
  file_classification c = classify_tensors(names);
  switch (c.kind) {
    case file_kind::model:
      throw errors::invalid(a.weights_path, "",
                            "holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up): is it a model?");
    case file_kind::other_adapter:
      throw errors::invalid(a.weights_path, "", fmt::format("not a LoRA adapter lora can read: {}", c.description));
    case file_kind::kohya_lora:
      a.format = adapter_format::kohya;
      kohya::load(a);
      break;
    case file_kind::lycoris:
      a.format = adapter_format::kohya;  // kohya names, resolved as kohya names
      lycoris::load(a);
      break;
    case file_kind::diffusers_lora:
      a.format = adapter_format::diffusers;
      diffusers::load(a);
      break;
    case file_kind::peft_lora:
      a.format = adapter_format::peft;
      peft::load(a, config_label, read_config);
      break;
  }
  std::sort(a.modules.begin(), a.modules.end(),
            [](const lora_module& x, const lora_module& y) { return x.name < y.name; });
  std::sort(a.saved.begin(), a.saved.end(),
            [](const saved_tensor& x, const saved_tensor& y) { return x.target < y.target; });
}

}  // namespace

adapter_files find_adapter_files(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw errors::io(path, "no such file or folder");
  adapter_files files;
  const fs::path p(path);
  if (fs::is_directory(p, ec)) {
    // the folder's weights file, by each format's name for it
    for (std::string_view name : {peft::weights_name, mlx::weights_name, diffusers::weights_name})
      if (fs::exists(p / name, ec)) {
        files.weights = (p / name).string();
        break;
      }
    if (files.weights.empty()) {
      if (fs::exists(p / peft::pickle_weights_name, ec))
        throw errors::invalid(
            path, "",
            fmt::format("{} (pickle) is not read: convert it to {}", peft::pickle_weights_name, peft::weights_name));
      throw errors::invalid(path, "", fmt::format("folder has no {}", peft::weights_name));
    }
  } else {
    files.weights = path;
  }
  const fs::path config = fs::path(files.weights).parent_path() / peft::config_name;
  if (fs::exists(config, ec)) files.config = config.string();
  return files;
}

adapter load_adapter(const std::string& path) {
  adapter a;
  a.path = path;
  const adapter_files files = find_adapter_files(path);
  a.weights_path = files.weights;
  a.file = std::make_unique<safetensors_file>(a.weights_path);
  load_opened(a, files.config, [&] { return read_text_file(files.config); });
  return a;
}

adapter load_adapter_bytes(std::span<const uint8_t> weights, const std::string& weights_label,
                           const std::optional<std::string>& config_text, const std::string& config_label) {
  adapter a;
  a.path = weights_label;
  a.weights_path = weights_label;
  a.file = std::make_unique<safetensors_file>(mapped_file::borrow(weights_label, weights));
  load_opened(a, config_text ? config_label : std::string(), [&] { return *config_text; });
  return a;
}

}  // namespace lora
