// The product of a few activation rows with a weight matrix as the file
// stores it (F16, BF16, F32, F64; block-scaled FP8 with its scales), without an
// f32 copy of the matrix:
//
//   y[T, n_rows] = x[T, n_cols] W^T,   W [n_rows, n_cols] row-major
//
// computed one block of W's rows at a time: decode the block to f32
// (core/dtype) into a per-thread buffer, one cblas_sgemm per block
// (y[:, rb:re] = x W[rb:re, :]^T, a column slice of y). Blocks are shared out
// to `threads` threads, each with single-threaded BLAS calls (as merge does).
// Aligned F32 blocks are used in place. Every element of y is the same dot
// product over the same n_cols terms as one whole-matrix sgemm: only the
// kernel's blocking of the rows changes (see tests/test-stored-gemm.cpp for
// the stated tolerance). Follows the row blocks of core/merge (DESIGN
// section 6): decode a block, one sgemm, next block.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "formats/dtype.h"
#include "formats/mapped-file.h"

namespace lora {

// Elements of W per block by default: 512 KiB of f32 per thread (a row longer
// than that is a block of its own).
inline constexpr int64_t stored_gemm_block_elements = int64_t{1} << 17;

// A row-major matrix [n_rows, n_cols] as a file stores it. Borrows `bytes`
// (any alignment; n_rows * n_cols elements of `type`) and `map`.
struct stored_matrix {
  stored_matrix() = default;
  stored_matrix(dtype type_, std::span<const uint8_t> bytes_, int64_t n_rows_, int64_t n_cols_,
                const mapped_file* map_ = nullptr, std::optional<dtype> round_to_ = std::nullopt)
      : type(type_), bytes(bytes_), n_rows(n_rows_), n_cols(n_cols_), map(map_), round_to(round_to_) {}

  dtype type = dtype::F32;
  std::span<const uint8_t> bytes;
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  // When given, the map `bytes` lie in: each block's pages are released
  // (mapped_file::release) once the block has been used, so resident memory
  // stays a few blocks whatever the matrix's size.
  const mapped_file* map = nullptr;
  // When given, each decoded value is rounded once to this dtype (round_through)
  // before the product: the weights as a model of that dtype holds them.
  std::optional<dtype> round_to;
  // Block-scaled FP8 (type F8_E4M3, core/fp8): the whole scale tensor
  // [ceil(n_rows / block_rows), ceil(n_cols / block_cols)], borrowed; each
  // row block is dequantized (code x its block's scale) as it is decoded.
  std::span<const float> scales;
  int64_t block_rows = 0, block_cols = 0;
};

// Rows [row_begin, row_end) of w decoded to f32 into out ((row_end -
// row_begin) * n_cols values; FP8 dequantized with its block scales, then
// rounded to round_to when given). Throws lora::error (exit 3) for a dtype
// without arithmetic (F8_E4M3 without scales included).
void stored_rows_to_f32(const stored_matrix& w, int64_t row_begin, int64_t row_end, float* out);

// Called once per block after its product, on the thread that computed it,
// with rows [row_begin, row_end) of W decoded to f32 (row-major, n_cols each)
// in a buffer the callback may modify (DoRA adds its delta there to take the
// row norms). Blocks of one call run concurrently: a callback writes only
// what belongs to its own rows.
using stored_block_fn = std::function<void(int64_t row_begin, int64_t row_end, float* w_block)>;

// f32 block buffers, one per thread, kept from one product to the next.
class stored_gemm_scratch {
 public:
  // A buffer of at least n floats for worker `worker` (not zeroed).
  float* block(size_t worker, size_t n);

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<float[]>> buffers_;
  std::vector<size_t> sizes_;
};

// y[n_tokens, w.n_rows] = x[n_tokens, w.n_cols] W^T (y overwritten; row
// stride n_rows), W decoded block by block. block_elements <= 0: the default
// (stored_gemm_block_elements); rows per block = max(1, block_elements /
// n_cols). threads <= 0: all cores. on_block, when given, sees every block in
// f32 (then F32 blocks are copied too). Expects BLAS set to one thread
// (set_blas_threads(1)) when threads > 1.
// Throws lora::error: exit 3 for a non-math dtype (F8_E4M3 with scales is
// one), bytes of the wrong size or
// a dimension beyond BLAS's int; 130 when interrupted; what on_block throws.
void stored_gemm(const stored_matrix& w, const float* x, int64_t n_tokens, float* y, int threads,
                 stored_gemm_scratch& scratch, int64_t block_elements = 0, const stored_block_fn& on_block = {});

}  // namespace lora
