#include "core/stored-gemm.h"

#include <cblas.h>

#include <algorithm>
#include <climits>

#include <fmt/format.h>

#include "core/dtype.h"
#include "core/fp8.h"
#include "core/thread-pool.h"
#include "formats/error.h"

namespace lora {

float* stored_gemm_scratch::block(size_t worker, size_t n) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (buffers_.size() <= worker) {
    buffers_.resize(worker + 1);
    sizes_.resize(worker + 1, 0);
  }
  if (sizes_[worker] < n) {
    buffers_[worker].reset(new float[n]);  // no zeroing: every value is written before it is read
    sizes_[worker] = n;
  }
  return buffers_[worker].get();
}

namespace {

int blas_dim(int64_t v) {
  if (v > INT_MAX || v < 0) throw errors::invalid("", "", fmt::format("dimension {} is too large for BLAS", v));
  return static_cast<int>(v);
}

// Releases the whole pages of `bytes` when they lie in `map`.
void release_bytes(const mapped_file* map, std::span<const uint8_t> bytes) {
  if (!map || bytes.empty()) return;
  const uint8_t* base = map->bytes().data();
  if (bytes.data() < base || bytes.data() + bytes.size() > base + map->size()) return;
  map->release(static_cast<uint64_t>(bytes.data() - base), bytes.size());
}

bool is_fp8(const stored_matrix& w) { return w.type == dtype::F8_E4M3 && !w.scales.empty(); }

size_t element_size(const stored_matrix& w) {
  if (is_fp8(w)) return 1;
  if (!dtype_is_math(w.type))
    throw errors::invalid("", "", fmt::format("dtype {} is not supported for arithmetic", dtype_name(w.type)));
  return static_cast<size_t>(math_dtype_size(w.type));
}

}  // namespace

void stored_rows_to_f32(const stored_matrix& w, int64_t row_begin, int64_t row_end, float* out) {
  const size_t esize = element_size(w), n_cols = static_cast<size_t>(w.n_cols);
  const size_t n = static_cast<size_t>(row_end - row_begin) * n_cols;
  const std::span<const uint8_t> src = w.bytes.subspan(static_cast<size_t>(row_begin) * n_cols * esize, n * esize);
  if (is_fp8(w) && (w.block_rows <= 0 || w.block_cols <= 0 ||
                    w.scales.size() != static_cast<size_t>(((w.n_rows + w.block_rows - 1) / w.block_rows) *
                                                           ((w.n_cols + w.block_cols - 1) / w.block_cols))))
    throw errors::invalid("", "", fmt::format("{} block scales do not fit a [{}, {}] FP8 matrix in {}x{} blocks",
                                              w.scales.size(), w.n_rows, w.n_cols, w.block_rows, w.block_cols));
  if (is_fp8(w))
    fp8_dequantize_rows(src, w.scales, {w.block_rows, w.block_cols}, w.n_cols, row_begin, row_end, out);
  else
    to_f32(w.type, src, std::span<float>(out, n));
  if (w.round_to) round_through(*w.round_to, std::span<float>(out, n));
}

void stored_gemm(const stored_matrix& w, const float* x, int64_t n_tokens, float* y, int threads,
                 stored_gemm_scratch& scratch, int64_t block_elements, const stored_block_fn& on_block) {
  const size_t esize = element_size(w);
  const size_t n_cols = static_cast<size_t>(w.n_cols);
  if (w.n_rows < 0 || w.n_cols < 0 || w.bytes.size() != static_cast<size_t>(w.n_rows) * n_cols * esize)
    throw errors::invalid("", "",
                          fmt::format("{} bytes do not hold a [{}, {}] matrix", w.bytes.size(), w.n_rows, w.n_cols));
  const int m = blas_dim(n_tokens), k = blas_dim(w.n_cols), ldc = blas_dim(w.n_rows);
  if (m == 0 || w.n_rows == 0) return;
  if (k == 0) {  // an empty sum
    for (int64_t t = 0; t < n_tokens; ++t) std::fill_n(y + t * w.n_rows, w.n_rows, 0.0f);
    return;
  }
  if (block_elements <= 0) block_elements = stored_gemm_block_elements;
  const int64_t rows_per_block =
      std::min(w.n_rows, std::max<int64_t>(1, block_elements / std::max<int64_t>(w.n_cols, 1)));
  const int64_t n_blocks = (w.n_rows + rows_per_block - 1) / rows_per_block;
  const int64_t n_workers = std::min<int64_t>(resolve_threads(threads), n_blocks);
  const bool in_place =
      w.type == dtype::F32 && !on_block && !w.round_to && reinterpret_cast<uintptr_t>(w.bytes.data()) % 4 == 0;

  // worker j takes blocks j, j + n_workers, ... (neighbouring reads in the file)
  parallel_for(static_cast<size_t>(n_workers), static_cast<int>(n_workers), [&](size_t j) {
    float* buf = in_place ? nullptr : scratch.block(j, static_cast<size_t>(rows_per_block) * n_cols);
    for (int64_t b = static_cast<int64_t>(j); b < n_blocks; b += n_workers) {
      check_interrupted();
      const int64_t rb = b * rows_per_block, re = std::min(w.n_rows, rb + rows_per_block);
      const size_t n = static_cast<size_t>(re - rb) * n_cols;
      const std::span<const uint8_t> src = w.bytes.subspan(static_cast<size_t>(rb) * n_cols * esize, n * esize);
      // decode W[rb:re, :] to f32 (or borrow it)
      const float* wb = in_place ? reinterpret_cast<const float*>(src.data()) : buf;
      if (!in_place) stored_rows_to_f32(w, rb, re, buf);
      // y[:, rb:re] = x W[rb:re, :]^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, static_cast<int>(re - rb), k, 1.0f, x, k, wb, k, 0.0f,
                  y + rb, ldc);
      if (on_block) on_block(rb, re, buf);
      release_bytes(w.map, src);
    }
  });
  release_bytes(w.map, w.bytes);  // the pages shared by two blocks
}

}  // namespace lora
