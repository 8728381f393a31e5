#include "formats/mlx-config.h"

#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "formats/error.h"
#include "formats/json.h"

namespace lora {

mlx_adapter_config parse_mlx_adapter_config(const std::string& text, const std::string& label) {
  using json = nlohmann::json;
  json j = parse_json_bounded(text, label, "adapter config");
  if (!j.is_object()) throw errors::invalid(label, "", "adapter config is not a JSON object");

  mlx_adapter_config c;
  auto text_field = [&](const json& obj, const char* field, std::string& out) {
    auto it = obj.find(field);
    if (it == obj.end() || it->is_null()) return;
    if (!it->is_string()) throw errors::invalid(label, field, fmt::format("must be a string, found {}", it->dump()));
    out = it->get<std::string>();
  };
  text_field(j, "fine_tune_type", c.fine_tune_type);
  text_field(j, "model", c.model);
  if (auto it = j.find("use_dora"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean())
      throw errors::invalid(label, "use_dora", fmt::format("must be true or false, found {}", it->dump()));
    c.use_dora = it->get<bool>();
  }

  // lora_parameters: scale (required), rank, keys
  auto lp = j.find("lora_parameters");
  if (lp == j.end() || !lp->is_object())
    throw errors::invalid(label, "lora_parameters", "missing or not an object (mlx_lm keeps the LoRA scale there)");
  auto scale = lp->find("scale");
  if (scale == lp->end() || !scale->is_number() || !std::isfinite(scale->get<double>()))
    throw errors::invalid(
        label, "lora_parameters.scale",
        scale == lp->end() ? std::string("missing") : fmt::format("must be a number, found {}", scale->dump()));
  c.scale = scale->get<double>();
  if (auto it = lp->find("rank"); it != lp->end() && !it->is_null()) {
    const bool integral =
        it->is_number_integer() || (it->is_number_float() && std::trunc(it->get<double>()) == it->get<double>());
    if (!integral || it->get<double>() <= 0)
      throw errors::invalid(label, "lora_parameters.rank",
                            fmt::format("must be a positive integer, found {}", it->dump()));
    c.rank = static_cast<int64_t>(it->get<double>());
  }
  if (auto it = lp->find("keys"); it != lp->end() && !it->is_null()) {
    if (!it->is_array()) throw errors::invalid(label, "lora_parameters.keys", "must be a list of strings");
    for (const json& k : *it) {
      if (!k.is_string()) throw errors::invalid(label, "lora_parameters.keys", "must be a list of strings");
      c.keys.push_back(k.get<std::string>());
    }
  }
  return c;
}

}  // namespace lora
