// Regexes matched against module paths, the way PEFT matches rank_pattern /
// alpha_pattern keys, in linear time and bounded memory (RE2).
//
// PEFT (src/peft/utils/other.py, get_pattern_key, v0.20.0-47-g5d602fdbf):
//   for key in pattern_keys:
//       if re.match(rf"(.*\.)?({key})$", key_to_match): return key
// i.e. the key must match the whole module path or a suffix of it that starts
// right after a dot; the first key in file order wins. `lora extract --targets`
// uses the same rule. std::regex backtracks: `(a+)+b` took exponential time and
// a 50,000-character path overflowed its recursion, so RE2 does the matching.
// RE2 has no backreferences, lookaround, atomic groups or possessive
// quantifiers; a key using one is refused, never matched approximately.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace re2 {
class RE2;
}

namespace lora {

// Memory one compiled pattern may use (program plus DFA cache), bytes. RE2's
// own default; a key too large for it is refused, and a match that fills the
// DFA cache falls back to RE2's NFA, still linear in the path length.
inline constexpr int64_t module_pattern_max_mem = int64_t{8} << 20;

// Thrown by module_pattern when a key does not compile; what() is RE2's
// message, e.g. "invalid escape sequence: \1", followed by the name of the
// unsupported construct when there is one ("(a backreference: ...)").
class pattern_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class module_pattern {
 public:
  // Compiles `key` (RE2 syntax, UTF-8) as a full match of (?:.*\.)?(?:key).
  // The key is first compiled alone, so that `a)|(b` cannot escape its group.
  // Throws pattern_error when RE2 refuses it (syntax, unsupported construct,
  // larger than module_pattern_max_mem). Nothing is logged to stderr.
  explicit module_pattern(const std::string& key);

  // True when the whole `path` matches: the key matches the path, or the part
  // after one of its dots. Time linear in path.size(); thread-safe.
  bool matches(std::string_view path) const;

  const std::string& key() const noexcept { return key_; }

 private:
  std::string key_;
  std::shared_ptr<const re2::RE2> re_;  // shared: a module_pattern is cheap to copy
};

// The index of the first pattern (file order) that matches `path`, or none:
// the entry PEFT's get_pattern_key picks.
std::optional<size_t> first_match(const std::vector<module_pattern>& patterns, std::string_view path);

}  // namespace lora
