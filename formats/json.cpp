#include "formats/json.h"

#include <unordered_set>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "formats/error.h"

namespace lora {

namespace {

using json = nlohmann::json;

// nlohmann's messages may quote a whole token (up to the text's size): keep one short line.
std::string clip(std::string s, size_t max = 160) {
  if (s.size() > max) s = s.substr(0, max) + "...";
  return s;
}

// A SAX pass that builds nothing: it stops at the first level deeper than
// the limit (before a tree of that depth exists), records the syntax error
// and, when asked, the first duplicated key of any object. (nlohmann's parse
// callback could count depth too, but checking duplicates there rescans the
// parent object at every object end: quadratic in the number of keys.)
class json_checker final : public json::json_sax_t {
 public:
  json_checker(const std::string& label, std::string_view what, const json_limits& limits)
      : label_(label), what_(what), limits_(limits) {}

  std::string duplicate;  // the first duplicated key, if any
  std::string syntax_error;

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    enter();
    if (limits_.refuse_duplicate_keys) keys_.emplace_back();
    return true;
  }
  bool key(string_t& k) override {
    if (limits_.refuse_duplicate_keys && !keys_.back().insert(k).second && duplicate.empty()) duplicate = k;
    return true;
  }
  bool end_object() override {
    if (limits_.refuse_duplicate_keys) keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) override {
    enter();
    return true;
  }
  bool end_array() override {
    --depth_;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const json::exception& e) override {
    // nlohmann's message: "[json.exception.parse_error.101] parse error at line 1, column 5: ..."
    std::string text = e.what();
    auto pos = text.find("] ");
    syntax_error = pos == std::string::npos ? text : text.substr(pos + 2);
    return false;
  }

 private:
  void enter() {
    if (++depth_ > limits_.max_depth)
      throw errors::invalid(label_, "",
                            fmt::format("{} has JSON nested deeper than {} levels", what_, limits_.max_depth));
  }
  const std::string& label_;
  std::string_view what_;
  const json_limits& limits_;
  size_t depth_ = 0;
  std::vector<std::unordered_set<std::string>> keys_;
};

// Every check before any tree is built: NUL bytes, syntax, depth, duplicates.
void check_json(std::string_view text, const std::string& label, std::string_view what, const json_limits& limits) {
  // nlohmann stops reading at a NUL byte and would ignore whatever follows
  // it; JSON text never holds one (inside strings it must be escaped)
  if (auto nul = text.find('\0'); nul != std::string_view::npos)
    throw errors::invalid(label, "", fmt::format("{} is not valid JSON: NUL byte at byte {}", what, nul));
  json_checker checker(label, what, limits);
  json::sax_parse(text, &checker, json::input_format_t::json, /*strict=*/true, /*ignore_comments=*/false);
  if (!checker.syntax_error.empty())
    throw errors::invalid(label, "", fmt::format("{} is not valid JSON: {}", what, clip(checker.syntax_error)));
  if (!checker.duplicate.empty())
    throw errors::invalid(label, checker.duplicate, fmt::format("duplicate key in {}", what));
}

template <typename J>
J parse_checked(std::string_view text, const std::string& label, std::string_view what, const json_limits& limits) {
  check_json(text, label, what, limits);
  try {
    return J::parse(text);
  } catch (const typename J::exception& e) {  // not expected after the SAX pass
    throw errors::invalid(label, "", fmt::format("{} is not valid JSON: {}", what, clip(e.what())));
  }
}

}  // namespace

json parse_json_bounded(std::string_view text, const std::string& label, std::string_view what,
                        const json_limits& limits) {
  return parse_checked<json>(text, label, what, limits);
}

nlohmann::ordered_json parse_ordered_json_bounded(std::string_view text, const std::string& label,
                                                  std::string_view what, const json_limits& limits) {
  return parse_checked<nlohmann::ordered_json>(text, label, what, limits);
}

nlohmann::ordered_json json_or_text(std::string_view text) {
  try {
    return parse_ordered_json_bounded(text, "", "text");
  } catch (const error&) {
    // not JSON: the text as a string, its invalid UTF-8 bytes replaced by
    // U+FFFD (dump() throws on invalid UTF-8, so the value could not be printed)
    using ojson = nlohmann::ordered_json;
    return ojson::parse(ojson(std::string(text)).dump(-1, ' ', false, ojson::error_handler_t::replace));
  }
}

}  // namespace lora
