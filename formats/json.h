// Bounded JSON parsing: the one way formats/ turns JSON text into a tree.
//
// nlohmann/json 3.11 parses and destroys iteratively, but dump(), the copy
// constructor and operator== recurse once per nesting level: a value nested
// 100,000 levels deep, once parsed, overflows the stack as soon as a message
// shows it or `inspect --json` prints it. Every parse site therefore goes
// through parse_json_bounded, which refuses such text before a tree exists.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

namespace lora {

// Deeper than any real config.json, adapter_config.json or index (they nest
// 2 to 5 levels); shallow enough that recursing once per level is safe.
inline constexpr size_t max_json_depth = 64;

struct json_limits {
  size_t max_depth = max_json_depth;   // arrays + objects open at once
  bool refuse_duplicate_keys = false;  // safetensors headers refuse them
};

// Parses `text` as one JSON value (surrounding whitespace allowed). `label`
// names the file in messages, `what` the document ("adapter config",
// "index", "header"). Throws lora::error (exit 3) naming `label`:
//   "<what> is not valid JSON: NUL byte at byte N" (nlohmann would stop there
//   and ignore what follows), "<what> has JSON nested deeper than D levels",
//   "<what> is not valid JSON: <parser message>", and, with
//   refuse_duplicate_keys, "duplicate key in <what>" with the key as tensor.
// One checking SAX pass that builds nothing, then the DOM parse: linear in
// the text. Borrows nothing; the result owns its data.
nlohmann::json parse_json_bounded(std::string_view text, const std::string& label, std::string_view what,
                                  const json_limits& limits = {});
// The same, keeping each object's keys in file order.
nlohmann::ordered_json parse_ordered_json_bounded(std::string_view text, const std::string& label,
                                                  std::string_view what, const json_limits& limits = {});

// For display (inspect --json): the value of `text` when it parses within
// the default limits, else the text itself as a JSON string (invalid UTF-8
// replaced by U+FFFD, so that dump() cannot throw). Never throws lora::error.
nlohmann::ordered_json json_or_text(std::string_view text);

}  // namespace lora
