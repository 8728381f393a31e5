// Merging LoRA adapters into a base model: W = W0 + sum_k weight_k * scale *
// dW_k (core/delta), computed in f32 with BLAS (f64 where a tensor is F64)
// and rounded once to the output dtype, written as a complete model folder.
// For 16-bit outputs of plain LoRA, the few elements whose f32 value lies
// within the f32 error bound of a rounding midpoint are recomputed in double
// (core/delta's exact_rounding), so they too round as the exact value would.
//
// Streaming: a plan first (every check, the output layout: what --dry-run
// returns), then the write: one tensor per job on a thread pool, merged
// tensors in row blocks of 1 MiB (f32) read with pread into per-thread
// buffers; untouched tensors copied byte for byte in the kernel
// (copy_file_range). An input not in the page cache is read ahead and
// dropped from the cache once read (formats' read_pass); the output is
// written back in 64 MiB windows, each dropped from the cache a few windows
// later (write_behind), so the page cache holds the part of the output the
// disk has not taken yet, not the model twice. Peak memory is a few row
// blocks per thread, plus one whole tensor in f32 for the rare DoRA module
// whose norm runs per column (fan_in_fan_out, embedding).
//
// Heads: on a base that ties its head to the embedding (no lm_head weight),
// an adapter that changes lm_head gives the output its own lm_head (the
// embedding's values plus the delta, in the embedding's dtype, rounded once;
// or the saved tensor) and config.json tie_word_embeddings false.
// modules_to_save tensors the base lacks are added; saved embeddings / heads
// with more rows (added tokens) replace the base's, with config.json's
// vocab_size updated. trainable_token_indices rows replace those rows of
// their embedding / head (converted once to the output dtype); every other
// row is computed as without them.
//
// Atomic: everything is written to `<out>.tmp-XXXXXX` beside --out, renamed
// onto --out at the end (swapped with the old one under --force); any error
// removes the temp folder, so nothing is left behind.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/progress-event.h"
#include "formats/dtype.h"

namespace lora {

struct merge_input {
  std::string path;     // PEFT folder, PEFT .safetensors or kohya file
  double weight = 1.0;  // multiplies this adapter's deltas
};

struct merge_options {
  std::string base;                   // model folder or bare .safetensors
  std::vector<merge_input> adapters;  // applied in this order
  std::string out;                    // the output folder
  std::optional<dtype> out_type;      // nullopt: every tensor keeps its dtype
  double scale = 1.0;                 // multiplies every delta (and bias delta)
  int threads = 0;                    // <= 0: all cores
  bool dry_run = false;               // check everything, write nothing
  bool force = false;                 // replace an existing --out
  bool allow_nonfinite = false;       // write NaN / Inf produced by a merge
  bool sync = false;                  // fsync the output before it is moved into place
  // adapter modules that map to no base tensor are skipped and listed
  // (merge_report::skipped_modules) instead of refused; an ambiguous name or
  // a shape that does not fit is still refused
  bool skip_unmatched = false;
  progress_fn progress;  // may be empty
};

struct merge_report {
  std::string out;
  bool dry_run = false;
  std::vector<std::string> files;  // written into out (names)
  // entries of the base folder not copied, with why: weights in another
  // format, links out of the model's tree, folders, FIFOs, devices
  std::vector<std::pair<std::string, std::string>> skipped_files;  // name, reason
  uint64_t n_tensors = 0;                                          // tensors in the output
  uint64_t n_modules = 0;                                          // LoRA modules applied (over all adapters)
  // --skip-unmatched: the modules that map to nothing, as {adapter path, module name}
  std::vector<std::pair<std::string, std::string>> skipped_modules;
  uint64_t n_merged = 0;    // tensors that received a delta (weights and biases)
  uint64_t n_token_rows = 0;  // trainable_token_indices rows written in place of the base's
  uint64_t n_replaced = 0;  // modules_to_save tensors written in place of the base's
  // tensors the base lacks, written by the merge: a tied base's lm_head (the
  // embedding plus its delta, or the saved tensor), modules_to_save heads
  // (score, classifier)
  std::vector<std::string> added;
  // config.json fields changed, as "field: value" (tie_word_embeddings: false
  // for an untied head, vocab_size for added tokens)
  std::vector<std::string> config_changes;
  // block-scaled FP8 base (core/fp8): its scheme ("fp8 e4m3, block 128x128,
  // ..."; empty: not FP8); scale tensors rewritten for requantized weights;
  // scale tensors dropped by --dtype (the weights dequantized)
  std::string fp8;
  uint64_t n_rescaled = 0;
  uint64_t n_dropped_scales = 0;
  uint64_t n_converted = 0;    // untouched tensors converted to --dtype
  uint64_t n_copied = 0;       // untouched tensors copied byte for byte
  uint64_t bytes_written = 0;  // every file of the output (or that would be)
  uint64_t bytes_free = 0;     // available on the output's file system before writing
  double seconds = 0;
};

// Runs (or, with dry_run, checks) a merge. Checks first, before writing
// anything: options, every adapter's fit to the base (keys, shapes), dtypes,
// free disk space (statvfs).
// Throws lora::error:
//   exit 2: no adapter, a weight per adapter that does not match, --out
//           exists without force, --out is (or holds) the base or an adapter;
//   exit 3: malformed inputs, an adapter that does not fit the base (the first
//           problem's key, with a hint), a non-arithmetic dtype to merge into,
//           NaN / Inf in an adapter tensor (found while checking, so by
//           the dry run too) or in a merged tensor (unless allow_nonfinite);
//   exit 4: unreadable inputs, not enough free space, failed writes (disk
//           full, file size limit).
// After an exception nothing is left at --out or beside it.
merge_report merge_model(const merge_options& options);

}  // namespace lora
