// safetensors: validated header parsing, a memory-mapped reader and a
// streaming writer whose bytes match the reference implementation's.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "formats/dtype.h"
#include "formats/file-io.h"
#include "formats/mapped-file.h"
#include "formats/staged-folder.h"

namespace lora {

using metadata_map = std::map<std::string, std::string>;

// One tensor as the header describes it. Offsets count from the start of the
// data buffer (that is, from 8 + N in the file).
struct tensor_info {
  std::string name;
  dtype type = dtype::F32;
  std::vector<int64_t> shape;
  uint64_t n_elements = 1;
  uint64_t begin = 0;
  uint64_t end = 0;
  uint64_t n_bytes() const noexcept { return end - begin; }
};

// A validated header: tensors in data order (ascending offsets).
struct safetensors_header {
  uint64_t header_len = 0;  // N
  std::vector<tensor_info> tensors;
  std::optional<metadata_map> metadata;           // nullopt when absent or `null`
  std::unordered_map<std::string, size_t> index;  // name -> position in tensors

  uint64_t data_start() const noexcept { return 8 + header_len; }
  const tensor_info* find(std::string_view name) const;
};

// Parses and validates the header of a safetensors file against every rule of
// DESIGN section 2. `bytes` holds at least the first 8 + N bytes of the file
// (the whole file is fine); `file_size` is the file's total size; `label`
// names the file in messages. Touches no tensor data.
// Throws lora::error (exit 3) naming the file, the tensor and the rule.
safetensors_header parse_safetensors_header(std::span<const uint8_t> bytes, uint64_t file_size,
                                            const std::string& label);

// A read-only, memory-mapped safetensors file. Opening reads the header only.
class safetensors_file {
 public:
  // Throws lora::error: exit 4 when it cannot be read, 3 when malformed.
  explicit safetensors_file(const std::string& path);
  // Parses the header of a file already mapped, or of bytes in memory
  // (mapped_file::borrow). Throws lora::error (exit 3) when malformed.
  explicit safetensors_file(mapped_file map);

  const std::string& path() const noexcept { return map_.path(); }
  const safetensors_header& header() const noexcept { return header_; }
  const std::vector<tensor_info>& tensors() const noexcept { return header_.tensors; }
  const std::optional<metadata_map>& metadata() const noexcept { return header_.metadata; }
  uint64_t file_size() const noexcept { return map_.size(); }
  const mapped_file& map() const noexcept { return map_; }

  const tensor_info* find(std::string_view name) const { return header_.find(name); }
  // Throws lora::error (exit 3) when the tensor is absent.
  const tensor_info& at(std::string_view name) const;

  // The tensor's bytes, borrowed from the map (valid while *this lives).
  // Not aligned: never cast to a wider type; convert through core/dtype.
  std::span<const uint8_t> data(const tensor_info& t) const noexcept;
  uint64_t file_offset(const tensor_info& t) const noexcept { return header_.data_start() + t.begin; }
  // Drops the tensor's pages from memory once it has been processed.
  void release(const tensor_info& t) const noexcept;

 private:
  mapped_file map_;
  safetensors_header header_;
};

// What a writer is asked to store: the bytes follow from dtype and shape.
struct tensor_spec {
  std::string name;
  dtype type = dtype::F32;
  std::vector<int64_t> shape;
};

// The file the reference writer would produce: tensors sorted by dtype
// (descending enum order) then name, contiguous offsets, compact JSON with
// `__metadata__` first, padded with spaces to a multiple of 8.
struct safetensors_layout {
  std::vector<tensor_info> tensors;  // data order
  std::string header;                // padded JSON, header.size() == N
  uint64_t data_size = 0;
  std::unordered_map<std::string, size_t> index;

  uint64_t file_size() const noexcept { return 8 + header.size() + data_size; }
  const tensor_info* find(std::string_view name) const;
};

// Throws lora::error (exit 3) on duplicate names, overflowing shapes or
// sub-byte tensors that are not a whole number of bytes.
safetensors_layout plan_safetensors(std::vector<tensor_spec> specs, const std::optional<metadata_map>& metadata);

// In-memory serializer (tests, small files): the whole file as bytes.
// `data(name)` returns each tensor's bytes; sizes must match the layout.
std::vector<uint8_t> serialize_safetensors(const safetensors_layout& layout,
                                           const std::function<std::span<const uint8_t>(const tensor_info&)>& data);

// Streams a safetensors file to disk: the header is written at once, tensor
// bytes by write()/copy_from() in any order (pwrite at fixed offsets, so
// several threads may write distinct tensors at the same time). Everything
// goes to `<path>.tmp-XXXXXX` beside the target (formats/file-io's
// temp_file); commit() renames it there (durable: after an fsync).
// Destroying an uncommitted writer removes the temp file. Written bytes go
// through write_behind: each complete 64 MiB window is dropped from the page
// cache a few windows later (its writeback started then).
class safetensors_writer {
 public:
  // Throws lora::error (exit 4) when the temp file cannot be created.
  safetensors_writer(std::string path, safetensors_layout layout, durability mode = durability::durable);
  safetensors_writer(const safetensors_writer&) = delete;
  safetensors_writer& operator=(const safetensors_writer&) = delete;
  ~safetensors_writer();

  const safetensors_layout& layout() const noexcept { return layout_; }
  const std::string& path() const noexcept { return file_.target(); }

  // Writes one tensor's bytes (size must equal the layout's). Throws exit 4
  // on a failed write (disk full, file size limit), exit 3 on a size mismatch.
  void write(std::string_view name, std::span<const uint8_t> bytes);
  // Writes part of a tensor: `bytes` go at `offset` bytes into the tensor.
  void write_part(std::string_view name, uint64_t offset, std::span<const uint8_t> bytes);
  // Copies a tensor's bytes in-kernel from `src_fd` at `src_offset`; a
  // source that ends early is exit 4 naming `src_path` (when given).
  // `done(n)`, when given, is called as the first n bytes of the tensor are
  // in place (every 64 MiB or less), so that the caller can release them.
  void copy_from(std::string_view name, int src_fd, uint64_t src_offset, const std::string& src_path = "",
                 const std::function<void(uint64_t)>& done = {});
  // Persists the data in the background while writing goes on: a thread
  // fdatasyncs the file each time `every` more bytes have been written, so
  // commit()'s fsync finds little left (on a virtual disk the final flush of
  // a large file otherwise costs about as much as writing it). A failed sync
  // is kept and thrown by commit(). Nothing to do unless durable.
  void sync_in_background(uint64_t every);
  // Renames onto path (durable: fsync first). Throws exit 4 on failure.
  void commit();

 private:
  const tensor_info& at(std::string_view name) const;
  void note_written(uint64_t n);
  void stop_syncing() noexcept;
  safetensors_layout layout_;
  durability mode_;
  temp_file file_;
  std::optional<write_behind> behind_;
  // background sync (sync_in_background); the counters are guarded by sync_mutex_
  std::thread syncer_;
  std::mutex sync_mutex_;
  std::condition_variable sync_wake_;
  uint64_t sync_every_ = 0, written_ = 0, synced_ = 0;
  bool sync_stop_ = false;
  int sync_errno_ = 0;
};

// A shape as messages print it: "[64, 48]" ("[]" for a scalar). Pure; the one
// copy every layer uses (safetensors' own messages spell shapes this way).
std::string shape_text(const std::vector<int64_t>& shape);

}  // namespace lora
