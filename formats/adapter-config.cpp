#include "formats/adapter-config.h"

#include <cmath>
#include <limits>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "formats/error.h"
#include "formats/json.h"
#include "formats/safetensors.h"

namespace lora {

namespace {

// ordered_json keeps the file's key order: rank_pattern / alpha_pattern are
// tried in that order and the first key that matches wins.
using ojson = nlohmann::ordered_json;
using json = nlohmann::json;

// A JSON value as a short string for messages.
std::string show(const ojson& v) {
  std::string s = v.dump();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

// An integer, also written as 8.0 by some tools; nullopt for anything else.
std::optional<int64_t> as_int(const ojson& v) {
  if (v.is_number_unsigned()) {
    if (v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(v.get<uint64_t>());
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (std::isfinite(d) && std::trunc(d) == d && std::fabs(d) < 9.0e18) return static_cast<int64_t>(d);
  }
  return std::nullopt;
}

int64_t positive_int(const ojson& v, const std::string& label, const std::string& field) {
  std::optional<int64_t> i = as_int(v);
  if (!i || *i <= 0) throw errors::invalid(label, field, fmt::format("must be a positive integer, found {}", show(v)));
  return *i;
}

double finite_number(const ojson& v, const std::string& label, const std::string& field) {
  if (!v.is_number() || !std::isfinite(v.get<double>()))
    throw errors::invalid(label, field, fmt::format("must be a number, found {}", show(v)));
  return v.get<double>();
}

// true/false; null and absent read as false (PEFT's defaults).
bool flag(const ojson& j, const char* field, const std::string& label) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return false;
  if (!it->is_boolean()) throw errors::invalid(label, field, fmt::format("must be true or false, found {}", show(*it)));
  return it->get<bool>();
}

std::string text_field(const ojson& j, const char* field, const std::string& label) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return {};
  if (!it->is_string()) throw errors::invalid(label, field, fmt::format("must be a string, found {}", show(*it)));
  return it->get<std::string>();
}

std::vector<std::string> string_list(const ojson& v, const std::string& label, const std::string& field) {
  if (!v.is_array()) throw errors::invalid(label, field, fmt::format("must be a list of strings, found {}", show(v)));
  std::vector<std::string> out;
  for (const ojson& e : v) {
    if (!e.is_string())
      throw errors::invalid(label, field, fmt::format("must be a list of strings, found the element {}", show(e)));
    out.push_back(e.get<std::string>());
  }
  return out;
}

// Python's json.dumps writes 16 for an int and 16.0 for a float; PEFT's
// lora_alpha is usually an int. Integral values are written as integers.
json number(double d) {
  if (std::trunc(d) == d && std::fabs(d) < 9.0e15) return json(static_cast<int64_t>(d));
  return json(d);
}

}  // namespace

peft_config parse_peft_config(const std::string& text, const std::string& label) {
  // parse; the whole file must be one JSON object
  ojson j = parse_ordered_json_bounded(text, label, "adapter config");
  if (!j.is_object()) throw errors::invalid(label, "", "adapter config is not a JSON object");

  peft_config c;
  c.text = text;
  c.peft_type = text_field(j, "peft_type", label);

  // rank and alpha
  if (auto it = j.find("r"); it != j.end() && !it->is_null()) c.r = positive_int(*it, label, "r");
  if (auto it = j.find("lora_alpha"); it != j.end() && !it->is_null())
    c.lora_alpha = finite_number(*it, label, "lora_alpha");
  c.use_rslora = flag(j, "use_rslora", label);
  c.use_dora = flag(j, "use_dora", label);
  c.fan_in_fan_out = flag(j, "fan_in_fan_out", label);
  c.lora_bias = flag(j, "lora_bias", label);

  // patterns, in file order
  if (auto it = j.find("rank_pattern"); it != j.end() && !it->is_null()) {
    if (!it->is_object())
      throw errors::invalid(label, "rank_pattern", fmt::format("must be an object, found {}", show(*it)));
    for (auto p = it->begin(); p != it->end(); ++p)
      c.rank_pattern.emplace_back(p.key(), positive_int(p.value(), label, "rank_pattern." + p.key()));
  }
  if (auto it = j.find("alpha_pattern"); it != j.end() && !it->is_null()) {
    if (!it->is_object())
      throw errors::invalid(label, "alpha_pattern", fmt::format("must be an object, found {}", show(*it)));
    for (auto p = it->begin(); p != it->end(); ++p)
      c.alpha_pattern.emplace_back(p.key(), finite_number(p.value(), label, "alpha_pattern." + p.key()));
  }

  // module lists: target_modules is a list or a single regex string
  if (auto it = j.find("target_modules"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      c.target_modules = {it->get<std::string>()};
      c.target_modules_is_regex = true;
    } else {
      c.target_modules = string_list(*it, label, "target_modules");
    }
  }
  if (auto it = j.find("modules_to_save"); it != j.end() && !it->is_null())
    c.modules_to_save = string_list(*it, label, "modules_to_save");
  if (auto it = j.find("target_parameters"); it != j.end() && !it->is_null())
    c.target_parameters = string_list(*it, label, "target_parameters");

  // trainable_token_indices: [i, ...] or {"module": [i, ...], ...}
  if (auto it = j.find("trainable_token_indices"); it != j.end() && !it->is_null()) {
    auto indices = [&](const ojson& v, const std::string& field) {
      if (!v.is_array())
        throw errors::invalid(label, field, fmt::format("must be a list of token indices, found {}", show(v)));
      std::vector<int64_t> out;
      for (const ojson& e : v) {
        const std::optional<int64_t> i = as_int(e);
        if (!i || *i < 0)
          throw errors::invalid(label, field, fmt::format("must hold non-negative integers, found {}", show(e)));
        out.push_back(*i);
      }
      return out;
    };
    if (it->is_object()) {
      for (auto p = it->begin(); p != it->end(); ++p)
        c.trainable_token_indices.emplace_back(p.key(), indices(p.value(), "trainable_token_indices." + p.key()));
    } else {
      c.trainable_token_indices.emplace_back("", indices(*it, "trainable_token_indices"));
      c.trainable_tokens_is_list = true;
    }
  }

  if (auto it = j.find("init_lora_weights"); it != j.end() && !it->is_null()) {
    if (it->is_boolean())
      c.init_lora_weights = it->get<bool>() ? "true" : "false";
    else if (it->is_string())
      c.init_lora_weights = it->get<std::string>();
    else
      throw errors::invalid(label, "init_lora_weights",
                            fmt::format("must be true, false or a method name, found {}", show(*it)));
  }
  if (auto it = j.find("layer_replication"); it != j.end() && !it->is_null()) {
    if (!it->is_array())
      throw errors::invalid(label, "layer_replication", fmt::format("must be a list, found {}", show(*it)));
    c.layer_replication = !it->empty();
  }
  c.base_model_name_or_path = text_field(j, "base_model_name_or_path", label);
  c.task_type = text_field(j, "task_type", label);
  return c;
}

std::string render_peft_config(const peft_config& c) {
  // nlohmann::json keeps keys in a std::map: sorted at every level, as
  // json.dumps(sort_keys=True) does
  json j;
  json alpha_pattern = json::object();
  for (const auto& [k, v] : c.alpha_pattern) alpha_pattern[k] = number(v);
  json rank_pattern = json::object();
  for (const auto& [k, v] : c.rank_pattern) rank_pattern[k] = v;

  j["alpha_pattern"] = std::move(alpha_pattern);
  j["auto_mapping"] = nullptr;
  j["base_model_name_or_path"] = c.base_model_name_or_path.empty() ? json(nullptr) : json(c.base_model_name_or_path);
  j["bias"] = "none";
  j["fan_in_fan_out"] = c.fan_in_fan_out;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["lora_alpha"] = number(c.lora_alpha.value_or(8.0));
  j["lora_bias"] = c.lora_bias;
  j["lora_dropout"] = 0.0;
  j["modules_to_save"] = c.modules_to_save.empty() ? json(nullptr) : json(c.modules_to_save);
  j["peft_type"] = c.peft_type.empty() ? std::string("LORA") : c.peft_type;
  j["r"] = c.r.value_or(8);
  j["rank_pattern"] = std::move(rank_pattern);
  j["revision"] = nullptr;
  if (c.target_modules.empty())
    j["target_modules"] = nullptr;
  else if (c.target_modules_is_regex && c.target_modules.size() == 1)
    j["target_modules"] = c.target_modules[0];
  else
    j["target_modules"] = c.target_modules;
  j["task_type"] = c.task_type.empty() ? json(nullptr) : json(c.task_type);
  j["use_dora"] = c.use_dora;
  j["use_rslora"] = c.use_rslora;
  // json.dumps(indent=2) with ensure_ascii=True
  return j.dump(2, ' ', true);
}

std::optional<std::string> read_model_type(const std::string& config_path) {
  const std::string text = read_text_file(config_path);
  json j = parse_json_bounded(text, config_path, "config");
  if (!j.is_object()) throw errors::invalid(config_path, "", "config is not a JSON object");
  auto it = j.find("model_type");
  if (it == j.end() || !it->is_string()) return std::nullopt;
  return it->get<std::string>();
}

}  // namespace lora
