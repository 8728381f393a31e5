// safetensors reader and writer: every refusal rule of DESIGN section 2 as an
// enumerated table of files built in memory, golden bytes for the writer
// (derived from the reference implementation's own unit tests), byte-identical
// round trips, all 22 dtypes, unaligned data, zero-size tensors, the streaming
// writer, and the replay of the committed fuzz corpus.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "tests/test-support.h"

namespace fs = std::filesystem;
using namespace lora;
using namespace lora::testing;

namespace {

using bytes_t = std::vector<uint8_t>;

void put_le64(bytes_t& out, uint64_t n) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
}

// A file whose first 8 bytes say `n`, followed by `header` and `n_data` data bytes.
bytes_t raw_file(uint64_t n, std::string_view header, size_t n_data = 0) {
  bytes_t out;
  put_le64(out, n);
  out.insert(out.end(), header.begin(), header.end());
  for (size_t i = 0; i < n_data; ++i) out.push_back(static_cast<uint8_t>(i * 7 + 1));
  return out;
}

// A file with the right N for `header`.
bytes_t file_of(std::string_view header, size_t n_data = 0) { return raw_file(header.size(), header, n_data); }

// One tensor entry: "name":{"dtype":..,"shape":..,"data_offsets":..}
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

bytes_t read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return bytes_t(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const bytes_t& b) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

bytes_t f32_bytes(std::initializer_list<float> v) {
  bytes_t out(v.size() * 4);
  std::memcpy(out.data(), std::data(v), out.size());
  return out;
}

// A malformed input and what its refusal must say.
struct bad_case {
  std::string name;
  bytes_t bytes;
  std::string what;    // substring of the detail
  std::string tensor;  // the tensor the message names ("" when none)
};

// "t<i>" (built without operator+, which trips a GCC 12 -Wrestrict false positive)
std::string name_of(int i) {
  std::string s = "t";
  s += std::to_string(i);
  return s;
}

std::string deep_array(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

std::string deep_object(size_t depth) {
  std::string s;
  for (size_t i = 0; i < depth; ++i) s += "{\"a\":";
  s += "1";
  s.append(depth, '}');
  return s;
}

std::vector<bad_case> malformed_cases() {
  const std::string ok_a = entry("a", "F32", "[1]", "[0,4]");
  std::vector<bad_case> c;
  // --- size of the length prefix and the header
  c.push_back({"empty file", {}, "too small", ""});
  c.push_back({"3-byte file", {1, 2, 3}, "too small", ""});
  c.push_back({"7-byte file", {8, 0, 0, 0, 0, 0, 0}, "too small", ""});
  c.push_back({"N just above 100,000,000", raw_file(100'000'001, "{}"), "exceeds the limit", ""});
  c.push_back({"N = UINT64_MAX", raw_file(std::numeric_limits<uint64_t>::max(), "{}"), "exceeds the limit", ""});
  c.push_back({"N = UINT64_MAX - 7 (8 + N wraps to 0)", raw_file(std::numeric_limits<uint64_t>::max() - 7, "{}"),
               "exceeds the limit", ""});
  c.push_back({"N = 100,000,000 past EOF", raw_file(100'000'000, "{}"), "past the end of the file", ""});
  c.push_back({"8 + N past EOF by one", raw_file(3, "{}"), "past the end of the file", ""});
  c.push_back({"N = 0 (empty header)", raw_file(0, ""), "not valid JSON", ""});
  // --- UTF-8
  auto in_meta = [](const std::string& s) { return file_of("{\"__metadata__\":{\"k\":\"" + s + "\"}}"); };
  c.push_back({"overlong 2-byte '/'", in_meta("\xC0\xAF"), "not valid UTF-8", ""});
  c.push_back({"overlong 3-byte", in_meta("\xE0\x80\xAF"), "not valid UTF-8", ""});
  c.push_back({"overlong 4-byte", in_meta("\xF0\x80\x80\xAF"), "not valid UTF-8", ""});
  c.push_back({"surrogate U+D800", in_meta("\xED\xA0\x80"), "not valid UTF-8", ""});
  c.push_back({"surrogate U+DFFF", in_meta("\xED\xBF\xBF"), "not valid UTF-8", ""});
  c.push_back({"above U+10FFFF", in_meta("\xF4\x90\x80\x80"), "not valid UTF-8", ""});
  c.push_back({"lone continuation byte", in_meta("\x80"), "not valid UTF-8", ""});
  c.push_back({"byte 0xFF", in_meta("\xFF"), "not valid UTF-8", ""});
  c.push_back({"truncated sequence inside a string", in_meta("\xE2\x82"), "not valid UTF-8", ""});
  c.push_back({"truncated sequence at the end of the header", file_of("{}\xE2\x82"), "not valid UTF-8", ""});
  c.push_back({"UTF-8 in a tensor name, truncated", file_of("{" + entry("w\xC3", "F32", "[1]", "[0,4]") + "}", 4),
               "not valid UTF-8", ""});
  // --- JSON
  c.push_back({"unterminated object", file_of("{\"a\":"), "not valid JSON", ""});
  c.push_back({"single quotes", file_of("{'a':1}"), "not valid JSON", ""});
  c.push_back({"trailing comma", file_of("{" + ok_a + ",}", 4), "not valid JSON", ""});
  c.push_back({"trailing non-whitespace", file_of("{} x"), "end of input", ""});
  c.push_back({"second object after the first", file_of("{}{}"), "end of input", ""});
  c.push_back({"NUL padding after the JSON", raw_file(4, std::string("{}\0\0", 4)), "NUL byte", ""});
  c.push_back({"NUL then garbage after the JSON", raw_file(6, std::string("{}\0 x]", 6)), "NUL byte", ""});
  c.push_back({"NUL inside a string", file_of(std::string("{\"__metadata__\":{\"k\":\"a\0b\"}}", 28)), "NUL byte", ""});
  c.push_back({"UTF-8 byte order mark before the JSON", file_of("\xEF\xBB\xBF{}      "), "byte order mark", ""});
  c.push_back({"byte order mark after a space", file_of(" \xEF\xBB\xBF{}     "), "not valid JSON", ""});
  c.push_back({"header is an array", file_of("[]"), "not a JSON object", ""});
  c.push_back({"header is a number", file_of("1"), "not a JSON object", ""});
  c.push_back({"header is a string", file_of("\"x\""), "not a JSON object", ""});
  c.push_back({"header is null", file_of("null"), "not a JSON object", ""});
  // --- tensor entries
  c.push_back({"entry is a number", file_of("{\"w\":1}"), "not an object", "w"});
  c.push_back({"entry is null", file_of("{\"w\":null}"), "not an object", "w"});
  c.push_back({"missing dtype", file_of("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4), "no \"dtype\"", "w"});
  c.push_back({"missing shape", file_of("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4), "no \"shape\"", "w"});
  c.push_back(
      {"missing data_offsets", file_of("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4), "no \"data_offsets\"", "w"});
  c.push_back({"extra field", file_of("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":0}}", 4),
               "unexpected field \"x\"", "w"});
  c.push_back({"dtype is a number", file_of("{\"w\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4),
               "dtype is not a string", "w"});
  c.push_back(
      {"shape is a string", file_of("{" + entry("w", "F32", "\"1\"", "[0,4]") + "}", 4), "shape is not an array", "w"});
  c.push_back(
      {"shape is an object", file_of("{" + entry("w", "F32", "{}", "[0,4]") + "}", 4), "shape is not an array", "w"});
  c.push_back({"data_offsets with one number", file_of("{" + entry("w", "F32", "[1]", "[4]") + "}", 4),
               "not an array of two integers", "w"});
  c.push_back({"data_offsets with three numbers", file_of("{" + entry("w", "F32", "[1]", "[0,4,4]") + "}", 4),
               "not an array of two integers", "w"});
  c.push_back({"data_offsets is an object", file_of("{" + entry("w", "F32", "[1]", "{\"a\":0,\"b\":4}") + "}", 4),
               "not an array of two integers", "w"});
  c.push_back(
      {"unknown dtype", file_of("{" + entry("w", "F128", "[1]", "[0,4]") + "}", 4), "unknown dtype \"F128\"", "w"});
  c.push_back(
      {"dtype in lower case", file_of("{" + entry("w", "f32", "[1]", "[0,4]") + "}", 4), "unknown dtype \"f32\"", "w"});
  // --- numbers
  c.push_back({"negative dimension", file_of("{" + entry("w", "F32", "[-1]", "[0,4]") + "}", 4),
               "shape must hold non-negative integers, found -1", "w"});
  c.push_back({"minus zero dimension", file_of("{" + entry("w", "F32", "[-0]", "[0,4]") + "}", 4),
               "shape must hold non-negative integers", "w"});
  c.push_back({"float dimension 1.0", file_of("{" + entry("w", "F32", "[1.0]", "[0,4]") + "}", 4),
               "shape must hold non-negative integers, found 1.0", "w"});
  c.push_back({"exponent dimension 1e0", file_of("{" + entry("w", "F32", "[1e0]", "[0,4]") + "}", 4),
               "shape must hold non-negative integers", "w"});
  c.push_back({"string dimension", file_of("{" + entry("w", "F32", "[\"1\"]", "[0,4]") + "}", 4),
               "shape must hold non-negative integers, found a JSON string", "w"});
  c.push_back(
      {"null dimension", file_of("{" + entry("w", "F32", "[null]", "[0,4]") + "}", 4), "found a JSON null", "w"});
  c.push_back({"nested array dimension", file_of("{" + entry("w", "F32", "[[1]]", "[0,4]") + "}", 4),
               "found a JSON array", "w"});
  c.push_back({"arrays in the shape down to depth 15: a JSON array, not a number",
               file_of("{" + entry("w", "F32", "[" + deep_array(13) + "]", "[0,4]") + "}", 4), "found a JSON array",
               "w"});
  c.push_back({"arrays in the shape down to depth 16: too deep",
               file_of("{" + entry("w", "F32", "[" + deep_array(14) + "]", "[0,4]") + "}", 4),
               "nested deeper than 16 levels", ""});
  c.push_back({"deeply nested dimension", file_of("{" + entry("w", "F32", deep_array(100000), "[0,4]") + "}", 4),
               "nested deeper than 16 levels", ""});
  c.push_back({"deeply nested metadata", file_of("{\"__metadata__\":" + deep_object(100000) + "}"),
               "nested deeper than 16 levels", ""});
  c.push_back({"dimension above 2^64", file_of("{" + entry("w", "F32", "[18446744073709551616]", "[0,4]") + "}", 4),
               "shape must hold non-negative integers", "w"});
  c.push_back({"dimension above INT64_MAX", file_of("{" + entry("w", "U8", "[9223372036854775808]", "[0,4]") + "}", 4),
               "dimension overflows 64 bits", "w"});
  c.push_back({"negative begin", file_of("{" + entry("w", "F32", "[1]", "[-4,0]") + "}", 4),
               "data_offsets must hold non-negative integers, found -4", "w"});
  c.push_back({"float end", file_of("{" + entry("w", "F32", "[1]", "[0,4.0]") + "}", 4),
               "data_offsets must hold non-negative integers, found 4.0", "w"});
  c.push_back({"end above 2^64", file_of("{" + entry("w", "F32", "[1]", "[0,18446744073709551620]") + "}", 4),
               "data_offsets must hold non-negative integers", "w"});
  c.push_back({"string offset", file_of("{" + entry("w", "F32", "[1]", "[\"0\",4]") + "}", 4),
               "data_offsets must hold non-negative integers", "w"});
  // --- sizes
  c.push_back({"element count overflow", file_of("{" + entry("w", "U8", "[4294967296,4294967296]", "[0,4]") + "}", 4),
               "element count of shape [4294967296, 4294967296] overflows 64 bits", "w"});
  c.push_back({"element count overflow, three dims",
               file_of("{" + entry("w", "U8", "[2097152,2097152,4194304]", "[0,4]") + "}", 4), "element count", "w"});
  c.push_back({"byte count overflow", file_of("{" + entry("w", "F64", "[4611686018427387904]", "[0,4]") + "}", 4),
               "byte count of F64 [4611686018427387904] overflows 64 bits", "w"});
  c.push_back({"byte count overflow, F32 2^62",
               file_of("{" + entry("w", "F32", "[1073741824,4294967296]", "[0,4]") + "}", 4), "overflows 64 bits",
               "w"});
  c.push_back({"end - begin too small", file_of("{" + entry("w", "F32", "[2]", "[0,4]") + "}", 4),
               "span 4 bytes but F32 [2] needs 8", "w"});
  c.push_back({"end - begin too large", file_of("{" + entry("w", "F32", "[1]", "[0,8]") + "}", 8),
               "span 8 bytes but F32 [1] needs 4", "w"});
  c.push_back(
      {"end before begin", file_of("{" + entry("w", "F32", "[1]", "[8,4]") + "}", 8), "end before they begin", "w"});
  c.push_back({"F4 x 3 elements (12 bits)", file_of("{" + entry("w", "F4", "[3]", "[0,2]") + "}", 2),
               "F4 [3] is 12 bits, not a whole number of bytes", "w"});
  c.push_back({"F6_E2M3 x 3 elements (18 bits)", file_of("{" + entry("w", "F6_E2M3", "[3]", "[0,3]") + "}", 3),
               "not a whole number of bytes", "w"});
  c.push_back({"F6_E3M2 x 1 element", file_of("{" + entry("w", "F6_E3M2", "[1]", "[0,1]") + "}", 1),
               "not a whole number of bytes", "w"});
  // --- layout of the data buffer
  c.push_back({"gap between tensors",
               file_of("{" + entry("a", "F32", "[1]", "[0,4]") + "," + entry("b", "F32", "[1]", "[8,12]") + "}", 12),
               "leave a gap: begins at 8, previous tensor ends at 4", "b"});
  c.push_back({"overlapping tensors",
               file_of("{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "F32", "[2]", "[4,12]") + "}", 12),
               "overlap: begins at 4, previous tensor ends at 8", "b"});
  c.push_back({"two tensors on the same range",
               file_of("{" + entry("a", "F32", "[1]", "[0,4]") + "," + entry("b", "F32", "[1]", "[0,4]") + "}", 4),
               "overlap", "b"});
  c.push_back(
      {"not starting at 0", file_of("{" + entry("a", "F32", "[1]", "[4,8]") + "}", 8), "do not start at 0", "a"});
  c.push_back({"trailing bytes after the last tensor", file_of("{" + ok_a + "}", 5), "trailing bytes", ""});
  c.push_back({"bytes but no tensors", file_of("{}", 1), "trailing bytes", ""});
  c.push_back({"truncated data", file_of("{" + entry("a", "F32", "[2]", "[0,8]") + "}", 7), "file is truncated", ""});
  c.push_back({"truncated data, no data at all", file_of("{" + ok_a + "}", 0), "file is truncated", ""});
  // --- names
  c.push_back({"duplicate tensor names",
               file_of("{" + entry("w", "F32", "[1]", "[0,4]") + "," + entry("w", "F32", "[1]", "[4,8]") + "}", 8),
               "duplicate key", "w"});
  c.push_back({"exact duplicate entries", file_of("{" + ok_a + "," + ok_a + "}", 4), "duplicate key", "a"});
  c.push_back({"duplicate __metadata__", file_of("{\"__metadata__\":{},\"__metadata__\":{}}"), "duplicate key",
               "__metadata__"});
  c.push_back({"duplicate key inside __metadata__", file_of("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}"),
               "duplicate key", "k"});
  // --- __metadata__
  c.push_back({"__metadata__ is an array", file_of("{\"__metadata__\":[\"a\"]}"), "is not a map of strings to strings",
               "__metadata__"});
  c.push_back({"__metadata__ is a string", file_of("{\"__metadata__\":\"pt\"}"), "is not a map of strings to strings",
               "__metadata__"});
  c.push_back({"__metadata__ value is a number", file_of("{\"__metadata__\":{\"n\":1}}"),
               "value of \"n\" is not a string", "__metadata__"});
  c.push_back({"__metadata__ value is null", file_of("{\"__metadata__\":{\"n\":null}}"),
               "value of \"n\" is not a string", "__metadata__"});
  c.push_back({"__metadata__ value is a bool", file_of("{\"__metadata__\":{\"n\":true}}"),
               "value of \"n\" is not a string", "__metadata__"});
  c.push_back({"__metadata__ value is an object", file_of("{\"__metadata__\":{\"n\":{\"a\":\"b\"}}}"),
               "value of \"n\" is not a string", "__metadata__"});
  return c;
}

void check_refused(const bad_case& bc) {
  CAPTURE(bc.name);
  try {
    parse_safetensors_header(bc.bytes, bc.bytes.size(), "mem.safetensors");
    FAIL_CHECK("accepted: ", bc.name);
  } catch (const lora::error& e) {
    CHECK(e.code() == exit_code::invalid_input);
    CHECK(e.file() == "mem.safetensors");
    CHECK(e.tensor() == bc.tensor);
    INFO("detail: ", e.detail());
    CHECK(e.detail().find(bc.what) != std::string::npos);
    CHECK(e.detail().size() < 400);  // one short line
    CHECK(e.detail().find('\n') == std::string::npos);
  }
}

// The tensors of a parsed file as specs, for re-writing it.
std::vector<tensor_spec> specs_of(const std::vector<tensor_info>& tensors) {
  std::vector<tensor_spec> out;
  for (const auto& t : tensors) out.push_back({t.name, t.type, t.shape});
  return out;
}

// Serialize `specs` with deterministic data bytes: byte i of tensor k is (k * 31 + i * 7) mod 251.
bytes_t make_file(const std::vector<tensor_spec>& specs, const std::optional<metadata_map>& metadata) {
  safetensors_layout layout = plan_safetensors(specs, metadata);
  std::vector<bytes_t> store;
  return serialize_safetensors(layout, [&](const tensor_info& t) {
    bytes_t b(t.n_bytes());
    const size_t k = store.size();
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>((k * 31 + i * 7) % 251);
    store.push_back(std::move(b));
    return std::span<const uint8_t>(store.back());
  });
}

bytes_t all_dtypes_file() {
  std::vector<tensor_spec> specs;
  for (int d = 0; d < n_dtypes; ++d) {
    const dtype t = static_cast<dtype>(d);
    // 4 elements is a whole number of bytes for every dtype (F6: 24 bits)
    specs.push_back({"t." + std::string(dtype_name(t)), t, {2, 2}});
  }
  return make_file(specs, metadata_map{{"format", "pt"}, {"note", "all dtypes"}});
}

// Reads back a file our writer made and writes it again in memory.
bytes_t rewrite(const bytes_t& file) {
  safetensors_header h = parse_safetensors_header(file, file.size(), "rewrite");
  safetensors_layout layout = plan_safetensors(specs_of(h.tensors), h.metadata);
  return serialize_safetensors(layout, [&](const tensor_info& t) {
    const tensor_info* src = h.find(t.name);
    return std::span<const uint8_t>(file).subspan(h.data_start() + src->begin, src->n_bytes());
  });
}

std::vector<std::string> corpus_files(const std::string& sub) {
  std::vector<std::string> out;
  fs::path dir = fs::path(LORA_SOURCE_DIR) / "tests" / "corpus" / sub;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

// ----------------------------------------------------------------------------
// refusals

TEST_CASE("every malformed header is refused with exit 3, naming the rule and the tensor") {
  auto cases = malformed_cases();
  CHECK(cases.size() > 80);
  for (const auto& bc : cases) check_refused(bc);
}

TEST_CASE("refusals through the file reader name the path; empty and missing files") {
  temp_dir dir;
  for (const auto& bc : malformed_cases()) {
    if (bc.bytes.size() > 4096) continue;
    CAPTURE(bc.name);
    const std::string path = dir / "bad.safetensors";
    write_bytes(path, bc.bytes);
    try {
      safetensors_file f(path);
      FAIL_CHECK("accepted");
    } catch (const lora::error& e) {
      CHECK(e.code() == exit_code::invalid_input);
      CHECK(e.file() == path);
      CHECK(e.detail().find(bc.what) != std::string::npos);
    }
  }
  try {
    safetensors_file f(dir / "absent.safetensors");
    FAIL_CHECK("opened a missing file");
  } catch (const lora::error& e) {
    CHECK(e.code() == exit_code::io);
    CHECK(std::string(e.what()).find("absent.safetensors") != std::string::npos);
  }
  try {
    safetensors_file f(dir.path);
    FAIL_CHECK("opened a folder");
  } catch (const lora::error& e) {
    CHECK(e.code() == exit_code::io);
  }
}

TEST_CASE("the bytes given must cover 8 + N even when the file is larger") {
  bytes_t f = file_of("{" + entry("a", "F32", "[1]", "[0,4]") + "}", 4);
  std::span<const uint8_t> head(f.data(), 20);  // shorter than 8 + N
  try {
    parse_safetensors_header(head, f.size(), "mem");
    FAIL_CHECK("accepted");
  } catch (const lora::error& e) {
    CHECK(e.code() == exit_code::invalid_input);
  }
  // the first 8 + N bytes are enough
  auto h = parse_safetensors_header(std::span<const uint8_t>(f.data(), f.size() - 4), f.size(), "mem");
  CHECK(h.tensors.size() == 1);
}

// ----------------------------------------------------------------------------
// accepted variants

TEST_CASE("accepted: whitespace around the JSON, null metadata, empty shapes, any entry order") {
  SUBCASE("leading and trailing spaces, tabs and newlines") {
    bytes_t f = file_of(" \t\n{" + entry("a", "F32", "[1]", "[0,4]") + "}\r\n   ", 4);
    auto h = parse_safetensors_header(f, f.size(), "mem");
    REQUIRE(h.tensors.size() == 1);
    CHECK(h.tensors[0].name == "a");
  }
  SUBCASE("__metadata__: null as MLX writes it") {
    bytes_t f = file_of("{\"__metadata__\":null," + entry("a", "F32", "[1]", "[0,4]") + "}", 4);
    auto h = parse_safetensors_header(f, f.size(), "mem");
    CHECK(!h.metadata.has_value());
    CHECK(h.tensors.size() == 1);
  }
  SUBCASE("__metadata__ strings, empty map") {
    bytes_t f = file_of("{\"__metadata__\":{\"format\":\"pt\",\"x\":\"{\\\"a\\\": 1}\"}}");
    auto h = parse_safetensors_header(f, f.size(), "mem");
    REQUIRE(h.metadata.has_value());
    CHECK(h.metadata->at("format") == "pt");
    CHECK(h.metadata->at("x") == "{\"a\": 1}");
    bytes_t g = file_of("{\"__metadata__\":{}}");
    auto hg = parse_safetensors_header(g, g.size(), "mem");
    REQUIRE(hg.metadata.has_value());
    CHECK(hg.metadata->empty());
  }
  SUBCASE("scalar (empty shape), zero-size tensors, header order unlike data order") {
    bytes_t f = file_of("{" + entry("z2", "F16", "[0,3]", "[8,8]") + "," + entry("b", "I64", "[]", "[0,8]") + "," +
                            entry("z1", "F32", "[2,0]", "[0,0]") + "," + entry("z3", "BOOL", "[0]", "[8,8]") + "}",
                        8);
    auto h = parse_safetensors_header(f, f.size(), "mem");
    REQUIRE(h.tensors.size() == 4);
    CHECK(h.tensors[0].name == "z1");
    CHECK(h.tensors[1].name == "b");
    CHECK(h.tensors[1].shape.empty());
    CHECK(h.tensors[1].n_elements == 1);
    CHECK(h.find("z2")->n_bytes() == 0);
    CHECK(h.find("z2")->n_elements == 0);
    CHECK(h.find("z3")->begin == 8);
    CHECK(h.find("missing") == nullptr);
  }
  SUBCASE("zero dimension next to huge ones does not overflow") {
    bytes_t f = file_of("{" + entry("z", "F64", "[0,4611686018427387904,4611686018427387904]", "[0,0]") + "}");
    auto h = parse_safetensors_header(f, f.size(), "mem");
    CHECK(h.tensors[0].n_elements == 0);
  }
  SUBCASE("sub-byte dtypes with whole bytes") {
    bytes_t f =
        file_of("{" + entry("a", "F4", "[2,3]", "[0,3]") + "," + entry("b", "F6_E2M3", "[4]", "[3,6]") + "}", 6);
    auto h = parse_safetensors_header(f, f.size(), "mem");
    CHECK(h.find("a")->n_bytes() == 3);
    CHECK(h.find("b")->n_bytes() == 3);
  }
  SUBCASE("escaped and non-ASCII names") {
    bytes_t f = file_of("{" + entry("caf\xC3\xA9.\\u00e9\\n", "U8", "[1]", "[0,1]") + "}", 1);
    auto h = parse_safetensors_header(f, f.size(), "mem");
    CHECK(h.tensors[0].name == "caf\xC3\xA9.\xC3\xA9\n");
  }
}

TEST_CASE("third-party fixtures: every file parses; the abuse attempt is refused") {
  fs::path dir = LORA_FIXTURES_DIR;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    MESSAGE("skipped: fixtures not found at " << dir.string());
    return;
  }
  int n_ok = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.path().extension() != ".safetensors") continue;
    const std::string p = e.path().string();
    CAPTURE(p);
    if (e.path().filename() == "safetensors_abuse_attempt_1.safetensors") {
      try {
        safetensors_file f(p);
        FAIL_CHECK("abuse attempt accepted");
      } catch (const lora::error& err) {
        CHECK(err.code() == exit_code::invalid_input);
        CHECK(err.detail().find("past the end of the file") != std::string::npos);
      }
      continue;
    }
    safetensors_file f(p);
    CHECK(!f.tensors().empty());
    // every tensor's bytes are inside the file and copy through untouched
    safetensors_layout layout = plan_safetensors(specs_of(f.tensors()), f.metadata());
    bytes_t out = serialize_safetensors(layout, [&](const tensor_info& t) { return f.data(*f.find(t.name)); });
    auto h2 = parse_safetensors_header(out, out.size(), "rewritten");
    CHECK(h2.tensors.size() == f.tensors().size());
    for (const auto& t : h2.tensors) {
      auto a = std::span<const uint8_t>(out).subspan(h2.data_start() + t.begin, t.n_bytes());
      auto b = f.data(*f.find(t.name));
      CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
    }
    ++n_ok;
  }
  CHECK(n_ok >= 10);
}

TEST_CASE("the writer reproduces files written by the Python reference byte for byte") {
  // FluxML's test files were written by huggingface/safetensors (Python)
  fs::path dir = fs::path(LORA_FIXTURES_DIR) / "fluxml_safetensors_jl" / "non_sharded";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    MESSAGE("skipped: fixtures not found at " << dir.string());
    return;
  }
  for (const char* name : {"model.safetensors", "model.with_metadata.safetensors", "model.numpy.safetensors"}) {
    CAPTURE(name);
    bytes_t original = read_bytes((dir / name).string());
    REQUIRE(!original.empty());
    CHECK(rewrite(original) == original);
  }
}

// ----------------------------------------------------------------------------
// writer: golden bytes

TEST_CASE("golden bytes: one F32 tensor attn.0 [1,2,3]") {
  const std::string header = R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
  REQUIRE(header.size() == 64);  // a multiple of 8: no padding
  bytes_t data = f32_bytes({0, 1, 2, 3, 4, 5});
  bytes_t want = file_of(header);
  want.insert(want.end(), data.begin(), data.end());
  // the reference's test spells the first bytes out: 64 as u64 LE, then '{'
  CHECK(want[0] == 64);
  CHECK(want[8] == '{');
  CHECK(want.size() == 96);

  safetensors_layout layout = plan_safetensors({{"attn.0", dtype::F32, {1, 2, 3}}}, std::nullopt);
  CHECK(layout.header == header);
  CHECK(layout.file_size() == want.size());
  bytes_t got = serialize_safetensors(layout, [&](const tensor_info&) { return std::span<const uint8_t>(data); });
  CHECK(got == want);
  CHECK(rewrite(got) == got);
}

TEST_CASE("golden bytes: header padded with spaces to a multiple of 8") {
  // "attn0" with shape [1,1,2,3] gives a 65-byte JSON: 7 spaces make 72
  const std::string json = R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}})";
  REQUIRE(json.size() == 65);
  safetensors_layout layout = plan_safetensors({{"attn0", dtype::F32, {1, 1, 2, 3}}}, std::nullopt);
  CHECK(layout.header == json + std::string(7, ' '));
  bytes_t data = f32_bytes({0, 1, 2, 3, 4, 5});
  bytes_t got = serialize_safetensors(layout, [&](const tensor_info&) { return std::span<const uint8_t>(data); });
  CHECK(got[0] == 72);
  CHECK(got.size() == 8 + 72 + 24);
  CHECK(std::equal(data.begin(), data.end(), got.begin() + 80));
}

TEST_CASE("golden bytes: empty file and metadata only") {
  SUBCASE("no tensors, no metadata: {} and six spaces") {
    safetensors_layout layout = plan_safetensors({}, std::nullopt);
    bytes_t got = serialize_safetensors(layout, [](const tensor_info&) { return std::span<const uint8_t>(); });
    CHECK(got == bytes_t({8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '}));
    auto h = parse_safetensors_header(got, got.size(), "empty");
    CHECK(h.tensors.empty());
    CHECK(!h.metadata);
  }
  SUBCASE("metadata {framework: pt}: a 40-byte header") {
    safetensors_layout layout = plan_safetensors({}, metadata_map{{"framework", "pt"}});
    bytes_t got = serialize_safetensors(layout, [](const tensor_info&) { return std::span<const uint8_t>(); });
    CHECK(got == raw_file(40, R"({"__metadata__":{"framework":"pt"}})" + std::string(5, ' ')));
  }
}

TEST_CASE("golden bytes: tensors by dtype descending, then by name; metadata first, keys sorted") {
  std::vector<tensor_spec> specs = {
      {"b", dtype::F16, {1}},  {"a", dtype::BOOL, {2}},        {"c", dtype::F16, {2}}, {"d", dtype::U64, {1}},
      {"e", dtype::BF16, {1}}, {"f", dtype::F4, {2}},          {"A", dtype::F16, {1}}, {"g", dtype::C64, {1}},
      {"h", dtype::F64, {1}},  {"i", dtype::F8_E4M3FNUZ, {1}}, {"j", dtype::F32, {0}},
  };
  safetensors_layout layout = plan_safetensors(specs, metadata_map{{"z", "1"}, {"a", "\"q\"\n"}});
  // U64 > F64 > C64 > F32 > BF16 > F16 > F8_E4M3FNUZ > F4 > BOOL; "A" < "b" < "c" (bytes)
  const std::string want = R"({"__metadata__":{"a":"\"q\"\n","z":"1"},)"
                           R"("d":{"dtype":"U64","shape":[1],"data_offsets":[0,8]},)"
                           R"("h":{"dtype":"F64","shape":[1],"data_offsets":[8,16]},)"
                           R"("g":{"dtype":"C64","shape":[1],"data_offsets":[16,24]},)"
                           R"("j":{"dtype":"F32","shape":[0],"data_offsets":[24,24]},)"
                           R"("e":{"dtype":"BF16","shape":[1],"data_offsets":[24,26]},)"
                           R"("A":{"dtype":"F16","shape":[1],"data_offsets":[26,28]},)"
                           R"("b":{"dtype":"F16","shape":[1],"data_offsets":[28,30]},)"
                           R"("c":{"dtype":"F16","shape":[2],"data_offsets":[30,34]},)"
                           R"("i":{"dtype":"F8_E4M3FNUZ","shape":[1],"data_offsets":[34,35]},)"
                           R"("f":{"dtype":"F4","shape":[2],"data_offsets":[35,36]},)"
                           R"("a":{"dtype":"BOOL","shape":[2],"data_offsets":[36,38]}})";
  std::string padded = want + std::string((8 - want.size() % 8) % 8, ' ');
  CHECK(layout.header == padded);
  CHECK(layout.header.size() % 8 == 0);
  CHECK(layout.data_size == 38);
  std::vector<std::string> order;
  for (const auto& t : layout.tensors) order.push_back(t.name);
  CHECK(order == std::vector<std::string>{"d", "h", "g", "j", "e", "A", "b", "c", "i", "f", "a"});
  CHECK(layout.find("c")->begin == 30);
  CHECK(layout.find("nope") == nullptr);
}

TEST_CASE("plan_safetensors refuses what it cannot write") {
  auto refused = [](std::vector<tensor_spec> specs, const std::string& what, const std::string& tensor,
                    std::optional<metadata_map> meta = std::nullopt) {
    CAPTURE(what);
    try {
      plan_safetensors(std::move(specs), meta);
      FAIL_CHECK("accepted");
    } catch (const lora::error& e) {
      CHECK(e.code() == exit_code::invalid_input);
      CHECK(e.tensor() == tensor);
      CHECK(e.detail().find(what) != std::string::npos);
    }
  };
  refused({{"w", dtype::F32, {1}}, {"w", dtype::F32, {2}}}, "duplicate tensor name", "w");
  refused({{"w", dtype::F32, {1}}, {"w", dtype::F16, {1}}}, "duplicate tensor name", "w");
  refused({{"__metadata__", dtype::F32, {1}}}, "reserved", "__metadata__");
  refused({{"w", dtype::F32, {-1}}}, "negative dimension", "w");
  refused({{"w", dtype::F32, {INT64_MAX, INT64_MAX}}}, "element count overflows", "w");
  refused({{"w", dtype::F4, {3}}}, "not a whole number of bytes", "w");
  refused({{"w", dtype::F64, {INT64_MAX / 2}}}, "byte count overflows", "w");
  // nine tensors of 2^61 - 1 bytes (each below the 2^64-bit limit) overflow the offsets at the ninth
  std::vector<tensor_spec> huge;
  for (int i = 0; i < 9; ++i) huge.push_back({name_of(i), dtype::U8, {(int64_t{1} << 61) - 1}});
  refused(huge, "file size overflows", "t8");
  refused({{"w\xC3", dtype::F32, {1}}}, "not valid UTF-8", "");
  refused({{"w", dtype::F32, {1}}}, "not valid UTF-8", "", metadata_map{{"k", "\xFF"}});
}

// ----------------------------------------------------------------------------
// round trips and dtypes

TEST_CASE("read then write reproduces our writer's files byte for byte") {
  std::vector<std::vector<tensor_spec>> sets = {
      {},
      {{"x", dtype::F32, {3, 5}}},
      {{"layers.0.w", dtype::BF16, {4, 3}},
       {"layers.0.b", dtype::F16, {3}},
       {"layers.1.w", dtype::BF16, {4, 3}},
       {"scale", dtype::F64, {}},
       {"mask", dtype::BOOL, {7}},
       {"ids", dtype::I64, {2, 2}}},
      {{"z0", dtype::F32, {0}}, {"z1", dtype::F16, {3, 0}}, {"a", dtype::U8, {1}}, {"z2", dtype::U8, {0, 0}}},
      {{"q", dtype::F4, {2, 4}}, {"r", dtype::F6_E3M2, {8}}, {"s", dtype::F8_E8M0, {5}}},
  };
  int i = 0;
  for (const auto& specs : sets) {
    CAPTURE(i++);
    for (bool with_meta : {false, true}) {
      std::optional<metadata_map> meta;
      if (with_meta) meta = metadata_map{{"format", "pt"}, {"lora.scale", "0.5"}, {"\xC3\xA9", "\t"}};
      bytes_t f = make_file(specs, meta);
      CHECK(rewrite(f) == f);
      auto h = parse_safetensors_header(f, f.size(), "mem");
      CHECK(h.metadata == meta);
    }
  }
  bytes_t all = all_dtypes_file();
  CHECK(rewrite(all) == all);
}

TEST_CASE("all 22 dtypes are read and copied through untouched (write and copy_from)") {
  temp_dir dir;
  bytes_t src_bytes = all_dtypes_file();
  const std::string src_path = dir / "src.safetensors";
  write_bytes(src_path, src_bytes);
  safetensors_file src(src_path);
  REQUIRE(src.tensors().size() == static_cast<size_t>(n_dtypes));
  std::vector<bool> seen(n_dtypes, false);
  for (const auto& t : src.tensors()) {
    seen[static_cast<size_t>(t.type)] = true;
    CHECK(t.name == "t." + std::string(dtype_name(t.type)));
    CHECK(t.n_bytes() == 4 * static_cast<uint64_t>(dtype_bits(t.type)) / 8);
  }
  CHECK(std::count(seen.begin(), seen.end(), true) == n_dtypes);

  for (bool use_copy : {false, true}) {
    CAPTURE(use_copy);
    const std::string out_path = dir / (use_copy ? "copied.safetensors" : "written.safetensors");
    {
      safetensors_writer w(out_path, plan_safetensors(specs_of(src.tensors()), src.metadata()));
      for (const auto& t : src.tensors()) {
        if (use_copy)
          w.copy_from(t.name, src.map().fd(), src.file_offset(t));
        else
          w.write(t.name, src.data(t));
      }
      w.commit();
    }
    CHECK(read_bytes(out_path) == src_bytes);
    safetensors_file back(out_path);
    for (const auto& t : back.tensors()) {
      auto a = back.data(t);
      auto b = src.data(src.at(t.name));
      CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
    }
  }
}

TEST_CASE("unaligned data (header not padded) reads correctly") {
  // N = 61: the buffer starts at byte 69, so no F32/F64 is 4- or 8-byte aligned
  std::string header = "{" + entry("f", "F32", "[3]", "[0,12]") + "," + entry("d", "F64", "[2]", "[12,28]") + "}";
  while ((8 + header.size()) % 2 == 0) header += " ";
  bytes_t file = file_of(header);
  const float fv[3] = {1.5f, -2.25f, 1e-30f};
  const double dv[2] = {3.141592653589793, -1e300};
  const auto* fp = reinterpret_cast<const uint8_t*>(fv);
  const auto* dp = reinterpret_cast<const uint8_t*>(dv);
  file.insert(file.end(), fp, fp + 12);
  file.insert(file.end(), dp, dp + 16);
  temp_dir dir;
  write_bytes(dir / "u.safetensors", file);
  safetensors_file f(dir / "u.safetensors");
  auto fs_ = f.data(f.at("f"));
  auto ds = f.data(f.at("d"));
  CHECK(reinterpret_cast<uintptr_t>(fs_.data()) % 2 == 1);
  std::vector<float> got_f(3);
  std::vector<double> got_d(2);
  to_f32(dtype::F32, fs_, got_f);
  to_f64(dtype::F64, ds, got_d);
  CHECK(got_f == std::vector<float>(fv, fv + 3));
  CHECK(got_d == std::vector<double>(dv, dv + 2));
  try {
    (void)f.at("absent");
    FAIL_CHECK("found an absent tensor");
  } catch (const lora::error& e) {
    CHECK(e.code() == exit_code::invalid_input);
    CHECK(e.tensor() == "absent");
  }
  f.release(f.at("f"));  // best effort; the data stays readable
  to_f32(dtype::F32, f.data(f.at("f")), got_f);
  CHECK(got_f[1] == -2.25f);
  // read(): the same bytes by pread; past the end is an I/O error
  const tensor_info& t = f.at("f");
  std::vector<uint8_t> copy(t.n_bytes());
  f.map().read(f.file_offset(t), copy);
  CHECK(std::equal(copy.begin(), copy.end(), f.data(t).begin()));
  std::vector<uint8_t> past(16);
  lora::error e = thrown([&] { f.map().read(f.map().size() - 8, past); });
  CHECK(e.code() == exit_code::io);
  CHECK(e.detail() == "file shrank while being read");
}

// ----------------------------------------------------------------------------
// streaming writer

TEST_CASE("streaming writer: out-of-order and partial writes, zero-size tensors, commit renames") {
  // the same bytes whether commit() fsyncs first (durable) or not (visible)
  for (const durability mode : {durability::durable, durability::visible}) {
    CAPTURE(static_cast<int>(mode));
    temp_dir dir;
    std::vector<tensor_spec> specs = {{"a", dtype::F32, {4}},
                                      {"b", dtype::F16, {3}},
                                      {"z", dtype::F16, {0}},
                                      {"c", dtype::U8, {5}},
                                      {"zz", dtype::BOOL, {0, 2}}};
    bytes_t want = make_file(specs, metadata_map{{"k", "v"}});
    auto h = parse_safetensors_header(want, want.size(), "want");
    auto bytes_of = [&](const std::string& name) {
      const tensor_info* t = h.find(name);
      return std::span<const uint8_t>(want).subspan(h.data_start() + t->begin, t->n_bytes());
    };
    const std::string out = dir / "out.safetensors";
    {
      safetensors_writer w(out, plan_safetensors(specs, metadata_map{{"k", "v"}}), mode);
      CHECK(w.path() == out);
      // the temp file sits beside the target; the target does not exist yet
      auto names = dir.entries();
      REQUIRE(names.size() == 1);
      CHECK(names[0].rfind("out.safetensors.tmp-", 0) == 0);
      w.write("c", bytes_of("c"));
      auto a = bytes_of("a");
      w.write_part("a", 8, a.subspan(8));
      w.write("b", bytes_of("b"));
      w.write_part("a", 0, a.subspan(0, 8));
      w.write("z", {});
      // "zz" (zero bytes, last in the file) is never written
      CHECK(!fs::exists(out));
      w.commit();
    }
    CHECK(read_bytes(out) == want);
    CHECK(dir.entries() == std::vector<std::string>{"out.safetensors"});
    CHECK((fs::status(out).permissions() & fs::perms::others_read) != fs::perms::none);
  }
}

TEST_CASE("streaming writer: parallel writers of distinct tensors") {
  temp_dir dir;
  std::vector<tensor_spec> specs;
  for (int i = 0; i < 16; ++i) specs.push_back({name_of(i), dtype::F32, {1000 + i}});
  bytes_t want = make_file(specs, std::nullopt);
  auto h = parse_safetensors_header(want, want.size(), "want");
  const std::string out = dir / "par.safetensors";
  safetensors_writer w(out, plan_safetensors(specs, std::nullopt), durability::visible);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([&, k] {
      for (size_t i = static_cast<size_t>(k); i < h.tensors.size(); i += 4) {
        const auto& t = h.tensors[i];
        w.write(t.name, std::span<const uint8_t>(want).subspan(h.data_start() + t.begin, t.n_bytes()));
      }
    });
  for (auto& t : threads) t.join();
  w.commit();
  CHECK(read_bytes(out) == want);
}

TEST_CASE("streaming writer: background sync while parallel writers write parts") {
  temp_dir dir;
  std::vector<tensor_spec> specs;
  for (int i = 0; i < 8; ++i) specs.push_back({name_of(i), dtype::F32, {40000 + i}});
  bytes_t want = make_file(specs, std::nullopt);
  auto h = parse_safetensors_header(want, want.size(), "want");
  const std::string out = dir / "synced.safetensors";
  safetensors_writer w(out, plan_safetensors(specs, std::nullopt));
  w.sync_in_background(64 << 10);  // a sync every 64 KiB: many while the threads write
  std::vector<std::thread> threads;
  for (int k = 0; k < 2; ++k)
    threads.emplace_back([&, k] {
      for (size_t i = static_cast<size_t>(k); i < h.tensors.size(); i += 2) {
        const auto& t = h.tensors[i];
        const auto bytes = std::span<const uint8_t>(want).subspan(h.data_start() + t.begin, t.n_bytes());
        for (uint64_t at = 0; at < t.n_bytes(); at += 4096)
          w.write_part(t.name, at, bytes.subspan(at, std::min<uint64_t>(4096, t.n_bytes() - at)));
      }
    });
  for (auto& t : threads) t.join();
  w.commit();
  CHECK(read_bytes(out) == want);
  // dropped while syncing in the background: the thread stops, nothing is left
  {
    safetensors_writer d(dir / "dropped.safetensors", plan_safetensors(specs, std::nullopt));
    d.sync_in_background(1);
    d.write(h.tensors[0].name, std::span<const uint8_t>(want).subspan(h.data_start(), h.tensors[0].n_bytes()));
  }
  CHECK(dir.entries() == std::vector<std::string>{"synced.safetensors"});
}

TEST_CASE("streaming writer: an uncommitted writer leaves nothing behind") {
  temp_dir dir;
  const std::string out = dir / "gone.safetensors";
  {
    safetensors_writer w(out, plan_safetensors({{"a", dtype::F32, {2}}}, std::nullopt));
    w.write("a", f32_bytes({1, 2}));
    CHECK(dir.entries().size() == 1);
  }
  CHECK(dir.entries().empty());
  // an exception between create and commit: same
  try {
    safetensors_writer w(out, plan_safetensors({{"a", dtype::F32, {2}}}, std::nullopt));
    w.write("a", f32_bytes({1}));  // wrong size
    FAIL_CHECK("wrong size accepted");
  } catch (const lora::error& e) {
    CHECK(e.code() == exit_code::invalid_input);
    CHECK(e.tensor() == "a");
    CHECK(e.detail().find("4 bytes given, 8 expected") != std::string::npos);
  }
  CHECK(dir.entries().empty());
}

TEST_CASE("streaming writer: misuse is refused") {
  temp_dir dir;
  safetensors_writer w(dir / "m.safetensors", plan_safetensors({{"a", dtype::U8, {4}}}, std::nullopt));
  bytes_t four = {1, 2, 3, 4};
  auto code_of = [](auto&& fn) {
    try {
      fn();
    } catch (const lora::error& e) {
      return static_cast<int>(e.code());
    }
    return 0;
  };
  CHECK(code_of([&] { w.write("b", four); }) == 3);
  CHECK(code_of([&] { w.write_part("a", 2, std::span<const uint8_t>(four).subspan(0, 3)); }) == 3);
  CHECK(code_of([&] { w.write_part("a", 5, {}); }) == 3);
  CHECK(code_of([&] { w.copy_from("b", 0, 0); }) == 3);
  CHECK(code_of([&] { w.write_part("a", 4, {}); }) == 0);
  // copying from a source that ends early is an I/O error
  write_bytes(dir / "short.bin", {9, 9});
  int fd = ::open((dir / "short.bin").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  CHECK(code_of([&] { w.copy_from("a", fd, 0); }) == 4);
  CHECK(code_of([&] { w.copy_from("a", -1, 0); }) == 4);
  ::close(fd);
  // serialize_safetensors checks sizes too
  auto layout = plan_safetensors({{"a", dtype::U8, {4}}}, std::nullopt);
  CHECK(code_of([&] {
          serialize_safetensors(layout, [](const tensor_info&) { return std::span<const uint8_t>(); });
        }) == 3);
}

TEST_CASE("an interrupting signal stops the writer (exit 130) and the temp file goes") {
  temp_dir dir;
  const std::string out = dir / "int.safetensors";
  std::vector<uint8_t> bytes(64, 1);
  {
    safetensors_writer w(out, plan_safetensors({{"a", dtype::U8, {64}}, {"b", dtype::U8, {64}}}, std::nullopt),
                         durability::visible);
    w.write("a", bytes);
    request_interrupt(SIGINT);
    lora::error e = thrown([&] { w.write_part("b", 0, bytes); });
    request_interrupt(0);
    CHECK(e.code() == exit_code::interrupted);
    CHECK(static_cast<int>(e.code()) == 130);
    CHECK(std::string(e.what()) == "interrupted by SIGINT; nothing was left behind");
    request_interrupt(SIGTERM);
    CHECK(thrown([&] { w.copy_from("b", -1, 0); }).code() == exit_code::interrupted);
    request_interrupt(0);
  }
  CHECK(dir.entries().empty());
  CHECK_NOTHROW(check_interrupted());
}

TEST_CASE("write failures are I/O errors (exit 4) and leave nothing behind") {
  temp_dir dir;
  SUBCASE("the folder does not exist") {
    try {
      safetensors_writer w(dir / "no/such/dir/x.safetensors", plan_safetensors({}, std::nullopt));
      FAIL_CHECK("created");
    } catch (const lora::error& e) {
      CHECK(e.code() == exit_code::io);
      CHECK(e.file() == dir / "no/such/dir/x.safetensors");
    }
    try {
      write_file_atomic(dir / "no/such/dir/x.json", "{}");
      FAIL_CHECK("created");
    } catch (const lora::error& e) {
      CHECK(e.code() == exit_code::io);
    }
  }
  SUBCASE("the file size limit is hit (as on a full disk)") {
    // RLIMIT_FSIZE makes writes past the limit fail with EFBIG
    ::signal(SIGXFSZ, SIG_IGN);
    rlimit old{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    const std::string out = dir / "big.safetensors";
    auto specs = std::vector<tensor_spec>{{"a", dtype::U8, {4096}}, {"b", dtype::U8, {1 << 20}}};
    std::optional<lora::error> in_ctor, in_write;
    {
      rlimit small = old;
      small.rlim_cur = 64 * 1024;
      REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
      try {
        safetensors_writer w(out, plan_safetensors(specs, std::nullopt));
      } catch (const lora::error& e) {
        in_ctor = e;
      }
      REQUIRE(::setrlimit(RLIMIT_FSIZE, &old) == 0);
    }
    REQUIRE(in_ctor.has_value());
    CHECK(in_ctor->code() == exit_code::io);
    CHECK(dir.entries().empty());
    {
      safetensors_writer w(out, plan_safetensors(specs, std::nullopt));  // sized while the limit is off
      w.write("a", bytes_t(4096, 1));
      rlimit small = old;
      small.rlim_cur = 64 * 1024;
      REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
      try {
        w.write("b", bytes_t(1 << 20, 2));
      } catch (const lora::error& e) {
        in_write = e;
      }
      REQUIRE(::setrlimit(RLIMIT_FSIZE, &old) == 0);
    }
    REQUIRE(in_write.has_value());
    CHECK(in_write->code() == exit_code::io);
    CHECK(in_write->file() == out);
    CHECK(in_write->detail().find("write failed") != std::string::npos);
    CHECK(dir.entries().empty());
    ::signal(SIGXFSZ, SIG_DFL);
  }
}

TEST_CASE("copy_file copies every byte, durable or not, and refuses to overwrite") {
  temp_dir dir;
  std::string text(3 * 1000 * 1000 + 7, '\0');
  for (size_t i = 0; i < text.size(); ++i) text[i] = static_cast<char>(i * 131 % 251);
  write_file_atomic(dir / "src.bin", text);
  copy_file(dir / "src.bin", dir / "a.bin");
  copy_file(dir / "src.bin", dir / "b.bin", durability::visible);
  CHECK(read_text_file(dir / "a.bin") == text);
  CHECK(read_text_file(dir / "b.bin") == text);
  CHECK(thrown([&] { copy_file(dir / "src.bin", dir / "a.bin"); }).code() == exit_code::io);
  CHECK(thrown([&] { copy_file(dir / "absent.bin", dir / "c.bin"); }).code() == exit_code::io);
  CHECK(!fs::exists(dir / "c.bin"));
  write_file_atomic(dir / "empty.bin", "");
  copy_file(dir / "empty.bin", dir / "empty.copy");
  CHECK(read_text_file(dir / "empty.copy").empty());
}

TEST_CASE("write_file_atomic and read_text_file") {
  temp_dir dir;
  const std::string p = dir / "a.json";
  write_file_atomic(p, "{\"x\": 1}\n");
  CHECK(read_text_file(p) == "{\"x\": 1}\n");
  write_file_atomic(p, "");
  CHECK(read_text_file(p).empty());
  write_file_atomic(p, "visible", durability::visible);  // no fsync: the same file
  CHECK(read_text_file(p) == "visible");
  CHECK(dir.entries() == std::vector<std::string>{"a.json"});
  try {
    read_text_file(dir / "absent.json");
    FAIL_CHECK("read a missing file");
  } catch (const lora::error& e) {
    CHECK(e.code() == exit_code::io);
  }
}

// ----------------------------------------------------------------------------
// fuzz corpus replay: every committed input parses or is refused, never crashes

TEST_CASE("the fuzz seed and regression corpora parse or are refused with lora::error") {
  auto seeds = corpus_files("safetensors");
  auto regressions = corpus_files("regressions");
  CHECK(seeds.size() >= 8);
  CHECK(regressions.size() >= 1);
  int n_ok = 0, n_refused = 0;
  for (const auto& list : {seeds, regressions}) {
    for (const auto& p : list) {
      CAPTURE(p);
      bytes_t b = read_bytes(p);
      try {
        auto h = parse_safetensors_header(b, b.size(), p);
        // what parses can be written again and parses the same
        bytes_t again = rewrite(b);
        auto h2 = parse_safetensors_header(again, again.size(), "again");
        CHECK(h2.tensors.size() == h.tensors.size());
        ++n_ok;
      } catch (const lora::error& e) {
        CHECK(e.code() == exit_code::invalid_input);
        ++n_refused;
      }
    }
  }
  CHECK(n_ok >= 8);  // every seed is a valid file
  MESSAGE(n_ok << " corpus files parsed, " << n_refused << " refused");
}

TEST_CASE("error text stays on one line: control characters in names are escaped") {
  // a tensor name with a newline, a tab and an ANSI escape, and a bad dtype
  std::string header = R"({"evil\nname\t\u001b[31m":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}})";
  bytes_t file = file_of(header, 4);
  try {
    lora::parse_safetensors_header(file, file.size(), "f.safetensors");
    FAIL("accepted a header with an unknown dtype");
  } catch (const lora::error& e) {
    std::string what = e.what();
    CHECK(static_cast<int>(e.code()) == 3);
    CHECK(what.find('\n') == std::string::npos);
    CHECK(what.find('\x1b') == std::string::npos);
    CHECK(what.find("evil\\nname\\t\\x1b[31m") != std::string::npos);
    CHECK(e.tensor() == "evil\nname\t\x1b[31m");  // the structured field keeps the real name
  }
}
