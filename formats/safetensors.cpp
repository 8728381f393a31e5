#include "formats/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "formats/error.h"
#include "formats/json.h"

namespace lora {

namespace {

constexpr uint64_t k_max_header = 100'000'000;

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

// Well-formed UTF-8 (no overlongs, no surrogates, at most U+10FFFF).
bool valid_utf8(std::span<const uint8_t> s, size_t& bad_at) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const uint8_t c = s[i];
    size_t len = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      bad_at = i;
      return false;
    }
    if (i + len > n) {
      bad_at = i;
      return false;
    }
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) {
        bad_at = i;
        return false;
      }
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    const bool overlong = (len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      bad_at = i;
      return false;
    }
    i += len;
  }
  return true;
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A short description of a JSON value for messages: numbers as written,
// anything else by its type (dumping a deeply nested array would recurse
// once per level and could exhaust the stack).
std::string describe(const json& v) {
  if (v.is_number()) return v.dump();
  return std::string("a JSON ") + v.type_name();
}

uint64_t checked_u64(const json& v, const std::string& label, const std::string& name, const char* field) {
  if (!v.is_number_unsigned())
    throw errors::invalid(label, name, fmt::format("{} must hold non-negative integers, found {}", field, describe(v)));
  return v.get<uint64_t>();
}

tensor_info parse_entry(const std::string& name, const json& entry, const std::string& label) {
  if (!entry.is_object()) throw errors::invalid(label, name, "tensor entry is not an object");
  for (auto it = entry.begin(); it != entry.end(); ++it) {
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
      throw errors::invalid(label, name, fmt::format("unexpected field \"{}\" in tensor entry", it.key()));
  }
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!entry.contains(field)) throw errors::invalid(label, name, fmt::format("tensor entry has no \"{}\"", field));

  tensor_info t;
  t.name = name;
  const json& jd = entry["dtype"];
  if (!jd.is_string()) throw errors::invalid(label, name, "dtype is not a string");
  auto d = parse_dtype(jd.get<std::string>());
  if (!d) throw errors::invalid(label, name, fmt::format("unknown dtype \"{}\"", jd.get<std::string>()));
  t.type = *d;

  const json& js = entry["shape"];
  if (!js.is_array()) throw errors::invalid(label, name, "shape is not an array");
  t.n_elements = 1;
  for (const json& dim : js) {
    uint64_t v = checked_u64(dim, label, name, "shape");
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw errors::invalid(label, name, "shape dimension overflows 64 bits");
    t.shape.push_back(static_cast<int64_t>(v));
    if (__builtin_mul_overflow(t.n_elements, v, &t.n_elements))
      throw errors::invalid(label, name,
                            fmt::format("element count of shape {} overflows 64 bits", shape_text(t.shape)));
  }

  const json& jo = entry["data_offsets"];
  if (!jo.is_array() || jo.size() != 2)
    throw errors::invalid(label, name, "data_offsets is not an array of two integers");
  t.begin = checked_u64(jo[0], label, name, "data_offsets");
  t.end = checked_u64(jo[1], label, name, "data_offsets");
  if (t.end < t.begin)
    throw errors::invalid(label, name, fmt::format("data_offsets [{}, {}] end before they begin", t.begin, t.end));

  auto bytes = dtype_bytes(t.type, t.n_elements);
  if (!bytes) {
    uint64_t bits = 0;
    if (__builtin_mul_overflow(t.n_elements, static_cast<uint64_t>(dtype_bits(t.type)), &bits))
      throw errors::invalid(
          label, name, fmt::format("byte count of {} {} overflows 64 bits", dtype_name(t.type), shape_text(t.shape)));
    throw errors::invalid(
        label, name,
        fmt::format("{} {} is {} bits, not a whole number of bytes", dtype_name(t.type), shape_text(t.shape), bits));
  }
  if (*bytes != t.end - t.begin)
    throw errors::invalid(label, name,
                          fmt::format("data_offsets [{}, {}] span {} bytes but {} {} needs {}", t.begin, t.end,
                                      t.end - t.begin, dtype_name(t.type), shape_text(t.shape), *bytes));
  return t;
}

}  // namespace

const tensor_info* safetensors_header::find(std::string_view name) const {
  auto it = index.find(std::string(name));
  return it == index.end() ? nullptr : &tensors[it->second];
}

safetensors_header parse_safetensors_header(std::span<const uint8_t> bytes, uint64_t file_size,
                                            const std::string& label) {
  if (file_size < 8 || bytes.size() < 8)
    throw errors::invalid(label, "",
                          fmt::format("file is {} bytes, too small to hold a safetensors header", file_size));
  safetensors_header h;
  h.header_len = read_u64_le(bytes.data());
  // a safetensors file may start with the byte '{' (a header length of
  // 123 + 256k), but not with a length past the limit or the file's end: then
  // it is JSON (config.json, model_index.json, an index) given for a model
  const bool json_like = bytes[0] == '{' || (bytes[0] == '\n' && bytes[1] == '{') || (bytes[0] == '[');
  if (json_like && (h.header_len > k_max_header || h.header_len + 8 > file_size))
    throw errors::invalid(label, "", "is a JSON file, not safetensors (pass the folder that holds it)");
  if (h.header_len > k_max_header)
    throw errors::invalid(label, "",
                          fmt::format("header length {} exceeds the limit of {} bytes", h.header_len, k_max_header));
  // 8 + N cannot overflow after the limit check, but keep the check explicit.
  uint64_t stop = 0;
  if (__builtin_add_overflow(h.header_len, uint64_t{8}, &stop) || stop > file_size || stop > bytes.size())
    throw errors::invalid(
        label, "", fmt::format("header length {} runs past the end of the file ({} bytes)", h.header_len, file_size));

  auto text_bytes = bytes.subspan(8, h.header_len);
  size_t bad_at = 0;
  if (!valid_utf8(text_bytes, bad_at))
    throw errors::invalid(label, "", fmt::format("header is not valid UTF-8 (byte {} of the header)", bad_at));
  std::string text(reinterpret_cast<const char*>(text_bytes.data()), text_bytes.size());
  // nlohmann skips a leading UTF-8 byte order mark; JSON (and the reference reader) does not
  if (text.starts_with("\xEF\xBB\xBF"))
    throw errors::invalid(label, "", "header is not valid JSON: it starts with a byte order mark");

  // NUL bytes, syntax, duplicate keys in any object; a header needs 3 levels
  // (header, tensor entry, shape): stopping deep nesting early bounds the
  // memory a 100 MB header of "[[[[..." could take
  json j = parse_json_bounded(text, label, "header", {.max_depth = 16, .refuse_duplicate_keys = true});
  if (!j.is_object()) throw errors::invalid(label, "", "header is not a JSON object");

  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      const json& m = it.value();
      if (m.is_null()) continue;  // MLX writes null
      if (!m.is_object()) throw errors::invalid(label, "__metadata__", "is not a map of strings to strings");
      metadata_map mm;
      for (auto mi = m.begin(); mi != m.end(); ++mi) {
        if (!mi.value().is_string())
          throw errors::invalid(label, "__metadata__", fmt::format("value of \"{}\" is not a string", mi.key()));
        mm.emplace(mi.key(), mi.value().get<std::string>());
      }
      h.metadata = std::move(mm);
      continue;
    }
    h.tensors.push_back(parse_entry(it.key(), it.value(), label));
  }

  // the data ranges, sorted by begin, must tile the buffer exactly
  std::sort(h.tensors.begin(), h.tensors.end(), [](const tensor_info& a, const tensor_info& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expect = 0;
  for (const tensor_info& t : h.tensors) {
    if (t.begin != expect) {
      if (expect == 0 && &t == &h.tensors.front())
        throw errors::invalid(label, t.name,
                              fmt::format("data_offsets do not start at 0: the first tensor begins at {}", t.begin));
      if (t.begin > expect)
        throw errors::invalid(
            label, t.name,
            fmt::format("data_offsets leave a gap: begins at {}, previous tensor ends at {}", t.begin, expect));
      throw errors::invalid(
          label, t.name,
          fmt::format("data_offsets overlap: begins at {}, previous tensor ends at {}", t.begin, expect));
    }
    expect = t.end;
  }
  const uint64_t buffer = file_size - stop;
  if (expect != buffer)
    throw errors::invalid(label, "",
                          fmt::format("data buffer is {} bytes but the tensors cover {}: {}", buffer, expect,
                                      expect < buffer ? "trailing bytes after the last tensor" : "file is truncated"));
  h.index.reserve(h.tensors.size());
  for (size_t i = 0; i < h.tensors.size(); ++i) h.index.emplace(h.tensors[i].name, i);
  return h;
}

// --- reader -------------------------------------------------------------------

safetensors_file::safetensors_file(const std::string& path) : safetensors_file(mapped_file(path)) {}

safetensors_file::safetensors_file(mapped_file map)
    : map_(std::move(map)), header_(parse_safetensors_header(map_.bytes(), map_.size(), map_.path())) {}

const tensor_info& safetensors_file::at(std::string_view name) const {
  const tensor_info* t = find(name);
  if (t == nullptr) throw errors::invalid(path(), std::string(name), "no such tensor");
  return *t;
}

std::span<const uint8_t> safetensors_file::data(const tensor_info& t) const noexcept {
  return map_.bytes().subspan(header_.data_start() + t.begin, t.n_bytes());
}

void safetensors_file::release(const tensor_info& t) const noexcept { map_.release(file_offset(t), t.n_bytes()); }

// --- writer -------------------------------------------------------------------

const tensor_info* safetensors_layout::find(std::string_view name) const {
  auto it = index.find(std::string(name));
  return it == index.end() ? nullptr : &tensors[it->second];
}

safetensors_layout plan_safetensors(std::vector<tensor_spec> specs, const std::optional<metadata_map>& metadata) {
  // dtype descending, then name ascending (byte order), as the reference writer sorts
  std::sort(specs.begin(), specs.end(), [](const tensor_spec& a, const tensor_spec& b) {
    if (a.type != b.type) return a.type > b.type;
    return a.name < b.name;
  });
  safetensors_layout out;
  ordered_json header = ordered_json::object();
  if (metadata) {
    ordered_json m = ordered_json::object();
    for (const auto& [k, v] : *metadata) m[k] = v;  // std::map: sorted keys
    header["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  for (auto& s : specs) {
    if (s.name == "__metadata__") throw errors::invalid("", s.name, "is reserved and cannot name a tensor");
    tensor_info t;
    t.name = s.name;
    t.type = s.type;
    t.shape = s.shape;
    for (int64_t d : s.shape) {
      if (d < 0) throw errors::invalid("", s.name, "negative dimension in shape");
      if (__builtin_mul_overflow(t.n_elements, static_cast<uint64_t>(d), &t.n_elements))
        throw errors::invalid("", s.name, "element count overflows 64 bits");
    }
    auto bytes = dtype_bytes(t.type, t.n_elements);
    if (!bytes) throw errors::invalid("", s.name, "byte count overflows or is not a whole number of bytes");
    t.begin = offset;
    if (__builtin_add_overflow(offset, *bytes, &t.end))
      throw errors::invalid("", s.name, "file size overflows 64 bits");
    offset = t.end;
    if (!out.index.emplace(t.name, out.tensors.size()).second)
      throw errors::invalid("", s.name, "duplicate tensor name");
    ordered_json e = ordered_json::object();
    e["dtype"] = std::string(dtype_name(t.type));
    e["shape"] = t.shape;
    e["data_offsets"] = {t.begin, t.end};
    header[t.name] = std::move(e);
    out.tensors.push_back(std::move(t));
  }
  out.data_size = offset;
  try {
    out.header = header.dump();
  } catch (const ordered_json::exception&) {
    // nlohmann refuses to write a name or metadata string that is not UTF-8
    throw errors::invalid("", "", "a tensor name or metadata string is not valid UTF-8");
  }
  out.header.append((8 - out.header.size() % 8) % 8, ' ');
  return out;
}

std::vector<uint8_t> serialize_safetensors(const safetensors_layout& layout,
                                           const std::function<std::span<const uint8_t>(const tensor_info&)>& data) {
  std::vector<uint8_t> out;
  out.reserve(layout.file_size());
  const uint64_t n = layout.header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
  out.insert(out.end(), layout.header.begin(), layout.header.end());
  for (const tensor_info& t : layout.tensors) {
    auto bytes = data(t);
    if (bytes.size() != t.n_bytes())
      throw errors::invalid("", t.name, fmt::format("{} bytes given, {} expected", bytes.size(), t.n_bytes()));
    out.insert(out.end(), bytes.begin(), bytes.end());
  }
  return out;
}

safetensors_writer::safetensors_writer(std::string path, safetensors_layout layout, durability mode)
    : layout_(std::move(layout)), mode_(mode), file_(std::move(path)) {
  uint8_t n[8];
  const uint64_t len = layout_.header.size();
  for (int i = 0; i < 8; ++i) n[i] = static_cast<uint8_t>(len >> (8 * i));
  pwrite_all(file_.fd(), n, 0, file_.target());
  pwrite_all(file_.fd(), std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(layout_.header.data()), len), 8,
             file_.target());
  // the final size up front: a zero-byte tensor at the end needs no write
  if (::ftruncate(file_.fd(), static_cast<off_t>(layout_.file_size())) != 0)
    throw errors::io(file_.target(), "cannot size output file", errno);
  behind_.emplace(file_.fd(), layout_.file_size());
}

safetensors_writer::~safetensors_writer() { stop_syncing(); }

const tensor_info& safetensors_writer::at(std::string_view name) const {
  const tensor_info* t = layout_.find(name);
  if (t == nullptr) throw errors::invalid(path(), std::string(name), "tensor is not part of the output layout");
  return *t;
}

void safetensors_writer::write(std::string_view name, std::span<const uint8_t> bytes) {
  const tensor_info& t = at(name);
  if (bytes.size() != t.n_bytes())
    throw errors::invalid(path(), t.name, fmt::format("{} bytes given, {} expected", bytes.size(), t.n_bytes()));
  write_part(name, 0, bytes);
}

void safetensors_writer::write_part(std::string_view name, uint64_t offset, std::span<const uint8_t> bytes) {
  check_interrupted();
  const tensor_info& t = at(name);
  if (offset > t.n_bytes() || bytes.size() > t.n_bytes() - offset)
    throw errors::invalid(path(), t.name, "partial write runs past the tensor's end");
  const uint64_t at_byte = 8 + layout_.header.size() + t.begin + offset;
  pwrite_all(file_.fd(), bytes, at_byte, path());
  behind_->written(at_byte, bytes.size());
  note_written(bytes.size());
}

void safetensors_writer::copy_from(std::string_view name, int src_fd, uint64_t src_offset, const std::string& src_path,
                                   const std::function<void(uint64_t)>& piece) {
  const tensor_info& t = at(name);
  const uint64_t at_byte = 8 + layout_.header.size() + t.begin;
  copy_bytes(src_fd, src_offset, file_.fd(), at_byte, t.n_bytes(), path(), "tensor " + t.name, src_path,
             [&](uint64_t offset, uint64_t n) {
               behind_->written(offset, n);
               note_written(n);
               if (piece) piece(offset - at_byte + n);
             });
}

void safetensors_writer::sync_in_background(uint64_t every) {
  if (mode_ != durability::durable || syncer_.joinable() || every == 0) return;
  sync_every_ = every;
  syncer_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(sync_mutex_);
    for (;;) {
      sync_wake_.wait(lock, [this] { return sync_stop_ || written_ - synced_ >= sync_every_; });
      if (sync_stop_) return;
      const uint64_t mark = written_;
      lock.unlock();
      const int rc = ::fdatasync(file_.fd());
      const int err = errno;
      lock.lock();
      if (rc != 0 && sync_errno_ == 0) sync_errno_ = err;
      synced_ = mark;
    }
  });
}

void safetensors_writer::note_written(uint64_t n) {
  if (!syncer_.joinable()) return;
  std::lock_guard<std::mutex> lock(sync_mutex_);
  written_ += n;
  if (written_ - synced_ >= sync_every_) sync_wake_.notify_one();
}

void safetensors_writer::stop_syncing() noexcept {
  if (!syncer_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(sync_mutex_);
    sync_stop_ = true;
  }
  sync_wake_.notify_one();
  syncer_.join();
}

void safetensors_writer::commit() {
  stop_syncing();
  // a background sync that failed consumed the error: fsync would not see it
  if (sync_errno_ != 0) throw errors::io(path(), "fsync failed", sync_errno_);
  file_.commit(mode_);
}

std::string shape_text(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

}  // namespace lora
