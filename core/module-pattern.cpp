#include "core/module-pattern.h"

#include <fmt/format.h>
#include <re2/re2.h>

namespace lora {

namespace {

RE2::Options pattern_options() {
  RE2::Options o;  // UTF-8, `.` does not match \n: Python's re defaults
  o.set_log_errors(false);
  o.set_max_mem(module_pattern_max_mem);
  o.set_never_capture(true);  // only a yes/no answer is needed
  return o;
}

// The name of the construct behind a compile error when it is one RE2 leaves
// out on purpose (the "NOT SUPPORTED" rows of RE2's Syntax wiki page), else "".
std::string unsupported_construct(const RE2& re, const std::string& key) {
  const std::string& arg = re.error_arg();
  switch (re.error_code()) {
    case RE2::ErrorBadEscape:
      if (arg.size() == 2 && arg[1] >= '1' && arg[1] <= '9') return "a backreference";
      break;
    case RE2::ErrorBadPerlOp:
      if (arg == "(?=" || arg == "(?!") return "a lookahead";
      if (arg == "(?>") return "an atomic group";
      if (arg == "(?<") {
        const size_t at = key.find("(?<");
        const char next = at + 3 < key.size() ? key[at + 3] : '\0';
        return next == '=' || next == '!' ? "a lookbehind" : "a (?<name>...) group (write (?P<name>...))";
      }
      break;
    case RE2::ErrorRepeatOp:
      if (arg.size() >= 2 && arg.back() == '+') return "a possessive quantifier";
      break;
    case RE2::ErrorPatternTooLarge:
      return fmt::format("a pattern larger than {} MiB compiled", module_pattern_max_mem >> 20);
    default: break;
  }
  return "";
}

[[noreturn]] void refuse(const RE2& re, const std::string& key) {
  const std::string construct = unsupported_construct(re, key);
  if (construct.empty()) throw pattern_error(re.error());
  throw pattern_error(
      fmt::format("{} ({} is not supported: patterns are matched by RE2, in linear time)", re.error(), construct));
}

}  // namespace

module_pattern::module_pattern(const std::string& key) : key_(key) {
  const RE2::Options options = pattern_options();
  // the key alone first: its own error message, and no `)` closing our group
  {
    const RE2 alone(key, options);
    if (!alone.ok()) refuse(alone, key);
  }
  // PEFT: re.match(rf"(.*\.)?({key})$", path), i.e. a full match of this
  auto re = std::make_shared<const RE2>("(?:.*\\.)?(?:" + key + ")", options);
  if (!re->ok()) refuse(*re, key);
  re_ = std::move(re);
}

bool module_pattern::matches(std::string_view path) const {
  return RE2::FullMatch(re2::StringPiece(path.data(), path.size()), *re_);
}

std::optional<size_t> first_match(const std::vector<module_pattern>& patterns, std::string_view path) {
  for (size_t i = 0; i < patterns.size(); ++i)
    if (patterns[i].matches(path)) return i;
  return std::nullopt;
}

}  // namespace lora
