// The adapter model, format-neutral: LoRA modules (A paired with B, rank,
// alpha, scale, DoRA, extras) with views into the adapter's tensors, the
// scale rule and its inverse, the one rule for which files hold an adapter,
// and how an adapter fits a base model. Each format's key grammar lives in
// its own module (core/peft-format, core/kohya-format, core/mlx-format);
// load_adapter classifies a file and hands it to its reader. Which base
// tensor a module changes is core/name-map's answer.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "formats/adapter-config.h"
#include "formats/error.h"
#include "formats/model-files.h"

namespace lora {

// diffusers: pytorch_lora_weights.safetensors, dotted module paths with a
// component prefix (core/diffusers-format); written back as PEFT.
enum class adapter_format { peft, kohya, diffusers };
// parameter: PEFT target_parameters (lora.ParamWrapper) on an nn.Parameter,
// a 2-D [out, in] weight or 3-D fused MoE experts [E, out, in] / [E, in, out].
enum class module_kind { linear, embedding, conv, parameter };
// How a module's tensors form its delta (core/delta computes every form):
// low_rank dW = B A (LoRA, LoCon); loha (w1a w1b) ⊙ (w2a w2b), Tucker forms
// with t1/t2; lokr kron(w1, w2); tucker (LoCon with lora_mid) up ×mid× down.
enum class delta_form { low_rank, loha, lokr, tucker };

std::string_view adapter_format_name(adapter_format f) noexcept;  // "peft" | "kohya" | "diffusers"
std::string_view module_kind_name(module_kind k) noexcept;        // "linear" | "embedding" | "conv" | "parameter"
std::string_view delta_form_name(delta_form f) noexcept;          // "LoRA" | "LoHa" | "LoKr" | "LoCon+Tucker"

// The LyCORIS tensors of a module whose delta is not B A (views into the
// adapter file; which are set depends on the form, see core/lycoris-format.h).
struct lycoris_tensors {
  std::optional<tensor_ref> w1, w1_a, w1_b;  // LoHa hada_w1_a/b; LoKr lokr_w1 or lokr_w1_a/b
  std::optional<tensor_ref> w2, w2_a, w2_b;  // LoHa hada_w2_a/b; LoKr lokr_w2 or lokr_w2_a/b
  std::optional<tensor_ref> t1, t2;          // LoHa hada_t1/t2; LoKr lokr_t2 (Tucker cores)
  std::optional<tensor_ref> mid;             // LoCon lora_mid [r, r, kh, kw]
};

// Rows of a base tensor a module's delta lands in when the base fuses what
// the adapter keeps apart (or splits what it fuses; core/name-map,
// core/fused-rows): rows [tensor_row, tensor_row + n_rows) of `tensor`
// receive rows [module_row, module_row + n_rows) of the module's delta
// (B's rows; A whole). `bias` is the base bias with the same rows ("" when
// the base has none): a lora_B bias's rows go there alike.
struct row_slice {
  std::string tensor;
  std::string bias;
  int64_t tensor_row = 0;
  int64_t module_row = 0;
  int64_t n_rows = 0;
};

struct lora_module {
  // PEFT: the base module path ("model.layers.0.self_attn.q_proj").
  // kohya: the kohya name ("lora_unet_down_blocks_0_attentions_0_proj_in")
  // until fit_adapter() resolves it to the dotted base path.
  std::string name;
  // The base tensor the delta applies to ("<name>.weight"); empty for a kohya
  // module until fit_adapter() resolves it. For a module with `slices`, the
  // first slice's tensor (messages only; `name` then stays the adapter's).
  std::string target;
  // Fused targets (fit_adapter, from core/name-map): where the delta's rows
  // go, in module row order; empty: the whole `target`. `delta_shape` is
  // then the shape of the module's whole delta ([B rows, A columns]).
  std::vector<row_slice> slices;
  std::vector<int64_t> delta_shape;
  module_kind kind = module_kind::linear;
  // linear: A [r, in], B [out, r]; conv: A [r, in, kh, kw], B [out, r, 1, 1];
  // embedding: A [r, vocab], B [dim, r] and dW = (B A)^T.
  // fit_adapter() makes `kind` follow the base tensor: a kohya 1x1-conv LoRA
  // (A [r, in, 1, 1]) on a 2-D base becomes linear, a 2-D LoRA on a
  // [out, in, 1, 1] base becomes conv. The bytes are the same either way, so
  // read A as rank = shape[0] rows of n_elements / rank columns, B as
  // shape[0] rows of rank columns, whatever their number of dimensions.
  tensor_ref a;
  tensor_ref b;
  // low_rank: dW = B A from a and b. Other forms: the delta comes from
  // `lycoris` (core/delta), and a / b only name two of the module's tensors
  // in messages (LoHa hada_w1_b / hada_w1_a, LoKr its w1 / w2 part, Tucker
  // lora_down / lora_up, which are also its factors).
  delta_form form = delta_form::low_rank;
  lycoris_tensors lycoris;
  // DoRA m: one per row of B (linear / conv out, embedding dim); PEFT
  // stores [out], conv [1, out, 1, 1]: read it as n_elements values.
  std::optional<tensor_ref> magnitude;
  std::optional<tensor_ref> bias;  // lora_B.bias, [out]: added to "<name>.bias"
  // LyCORIS weight decomposition (LoCon, LoHa, LoKr "<module>.dora_scale"):
  // [out, 1, ...] (one magnitude per output row) or [1, in, 1, ...] (one per
  // input channel). Not PEFT DoRA: `dora` and `magnitude` stay unset; the
  // formula (its own eps, axis and multiplier rule) is core/delta's.
  std::optional<tensor_ref> dora_scale;
  int64_t rank = 0;                // from the shapes (A rows == B columns)
  // PEFT: alpha_pattern (first match), else lora_alpha, else 8.
  // kohya: the .alpha scalar; absent or 0 reads as rank (sd-scripts LoRAModule).
  double alpha = 0;
  double scale = 0;  // lora_scale(alpha, rank, rslora)
  bool dora = false;
  // The base weight is stored [in, out] (GPT-2 Conv1D): dW is transposed.
  // load_adapter() copies the config's value (linear modules only);
  // fit_adapter() then decides it from the base (see fit_adapter).
  // A parameter module: the experts are stored [E, in, out] (transformers'
  // is_transposed experts, gpt-oss), decided by fit_adapter.
  bool fan_in_fan_out = false;
  // A parameter module (kind parameter; `name` and `target` are the
  // parameter's key, "model.layers.0.mlp.experts.gate_up_proj"): PEFT's
  // ParamWrapper stores lora_A [r * E, in] and lora_B [out, r * E] for E
  // experts (E = 1 for a 2-D parameter); `rank` is the per-expert r of the
  // config (rank_pattern matched against the parameter key) and n_experts
  // = A's rows / r. Zero for other kinds.
  int64_t n_experts = 0;
};

// trainable_token_indices (PEFT TrainableTokensLayer): the rows `indices`
// of the embedding (or head) `target` are replaced by the rows of `values`
// ([indices.size(), dim], ".token_adapter.trainable_tokens_delta" as saved).
struct token_rows {
  std::string target;  // the base weight ("model.embed_tokens.weight")
  std::vector<int64_t> indices;
  tensor_ref values;
};

// modules_to_save: a tensor that replaces the base tensor `target` whole.
struct saved_tensor {
  std::string target;
  tensor_ref tensor;
};

struct adapter {
  std::string path;          // what the user named
  std::string weights_path;  // the .safetensors file
  adapter_format format = adapter_format::peft;
  std::unique_ptr<safetensors_file> file;  // owns the map every tensor_ref borrows from
  std::optional<peft_config> config;       // PEFT only
  std::vector<lora_module> modules;        // sorted by name
  std::vector<saved_tensor> saved;
  std::vector<token_rows> tokens;  // trainable_token_indices, sorted by target
};

// What a safetensors file holds, judged from its tensor names alone. Other
// kinds are checked first (a LyCORIS file may also hold lora_down keys).
enum class file_kind {
  model,           // no adapter keys
  peft_lora,       // lora_A / lora_B (PEFT)
  kohya_lora,      // lora_down / lora_up (+ alpha), lora_unet_ / lora_te*_ prefixes
  lycoris,         // LoHa, LoKr, LoCon with lora_mid (kohya names; core/lycoris-format)
  diffusers_lora,  // pytorch_lora_weights: unet./text_encoder. lora_A/B, .lora.down/up, *_lora.down/up
  other_adapter,   // LoHa, LoKr, MLX lora_a/lora_b, diffusers processors, cloneofsimo, ...
};
struct file_classification {
  file_kind kind = file_kind::model;
  std::string description;  // e.g. "LoHa (hada_w1_a, hada_w1_b, ...)": names the other kind
};
file_classification classify_tensors(const std::vector<std::string>& names);

// The adapter's kind for people: "<format> LoRA" ("peft LoRA", "kohya LoRA")
// when every module is B A, else "LyCORIS " and its forms ("LyCORIS LoHa",
// "LyCORIS LoCon + LoCon+Tucker"; B A modules are LoCon there). Pure.
std::string adapter_kind_name(const adapter& a);

// Throws lora::error (exit 3) naming the first module of `a` whose delta is
// not B A (LoHa, LoKr, Tucker) or is a target_parameters module, or its
// first trainable_token_indices tensor: `command` (resize, combine, convert)
// works on LoRA factors only; also for a diffusers adapter (no writer for
// that format yet). Pure.
void require_low_rank(const adapter& a, std::string_view command);

// Throws lora::error (exit 3) naming the first module of `a` (fitted to a
// base) that reaches rows of a fused base tensor (lora_module::slices):
// `command` (convert, combine) writes modules by base module path, and such
// a module has none in the base. Pure.
void require_whole_targets(const adapter& a, std::string_view command);

// The scale of one module: alpha / r, or alpha / sqrt(r) with rsLoRA.
double lora_scale(double alpha, int64_t rank, bool rslora) noexcept;

// The inverse of lora_scale: the alpha that gives `scale` at `rank`,
// scale * r, or scale * sqrt(r) with rsLoRA. May be inf when the product
// overflows: callers check. Pure (resize, combine and convert write it).
double alpha_for_scale(double scale, int64_t rank, bool rslora) noexcept;

// Where an adapter's files are.
struct adapter_files {
  std::string weights;  // the .safetensors file
  std::string config;   // adapter_config.json beside it; empty when there is none
};

// The one file rule (load_adapter, inspect, convert's MLX reader): a folder
// holds adapter_model.safetensors (PEFT), adapters.safetensors (mlx_lm) or
// pytorch_lora_weights.safetensors (diffusers),
// whose config is the folder's adapter_config.json; a file is the weights,
// with adapter_config.json beside it when present (a kohya file ignores it).
// Throws lora::error: exit 4 when `path` does not exist, exit 3 for a folder
// with neither file (adapter_model.bin named as pickle). Reads no file.
adapter_files find_adapter_files(const std::string& path);

// Loads a PEFT folder (adapter_config.json + adapter_model.safetensors), a
// PEFT .safetensors file with its config beside it, or a kohya single file.
// Throws lora::error (exit 3) naming the key: a missing half, a rank that
// disagrees between A, B and the config (rank_pattern keys are regexes matched
// as ^(.*\.)?(KEY)$ against the module path, first match in file order wins;
// core/module-pattern, RE2: a key using a backreference or lookaround is refused),
// a key that is neither LoRA nor a known extra, DoRA / lora_bias tensors the
// config does not announce, peft_type other than LORA, PEFT weights without a
// config, and adapters of other kinds (LoHa, LoKr, MLX lora_a/lora_b,
// diffusers attention processors, ...) named as such. Exit 4 when unreadable.
// Modules are sorted by name, saved tensors by target.
adapter load_adapter(const std::string& path);

// load_adapter over bytes already in memory, touching no file (the fuzz
// target, tests): `weights` is the .safetensors file, named `weights_label`
// in messages; `config_text` the adapter_config.json beside it (nullopt: there
// is none), named `config_label`. Borrows `weights`: it must outlive the
// adapter. Throws as load_adapter (exit 3); the file-based load_adapter is
// the one the commands use.
adapter load_adapter_bytes(std::span<const uint8_t> weights, const std::string& weights_label,
                           const std::optional<std::string>& config_text, const std::string& config_label);

// How an adapter fits a base model. A problem is a value: its kind decides
// the hint fit_error() gives, once, for the whole report.
enum class fit_issue {
  no_base_tensor,  // the base lacks the target (or no base key matches a kohya name)
  shape,           // the base tensor's shape is not the one the adapter changes
  ambiguous,       // a kohya name matches two base tensors
  conflict,        // two adapter entries change the same base tensor
  orientation,     // GPT-2 Conv1D ([in, out]) or nn.Linear cannot be told apart
  inconsistent,    // the adapter disagrees with itself (DoRA magnitude length)
};
struct fit_problem {
  fit_problem() = default;
  fit_problem(std::string key_, std::string what_, fit_issue issue_, std::string target_ = {},
              std::vector<int64_t> base_shape_ = {}, std::vector<int64_t> adapter_shape_ = {})
      : key(std::move(key_)),
        what(std::move(what_)),
        issue(issue_),
        target(std::move(target_)),
        base_shape(std::move(base_shape_)),
        adapter_shape(std::move(adapter_shape_)) {}

  std::string key;   // the adapter key (or module name)
  std::string what;  // what is wrong, without a hint
  fit_issue issue = fit_issue::no_base_tensor;
  // For the hint: the base tensor concerned, and for a shape problem the
  // base's shape and the one the adapter makes (empty when not known).
  std::string target;
  std::vector<int64_t> base_shape;
  std::vector<int64_t> adapter_shape;
};
struct fit_report {
  fit_report() = default;
  // A report of these problems alone (fit_error({{problem}}) in a reader).
  fit_report(std::vector<fit_problem> p) : problems(std::move(p)) {}  // NOLINT: implicit on purpose

  std::vector<fit_problem> problems;  // empty: every module fits
  // The base layout the adapter's names were mapped through (core/name-map
  // model_layouts; empty: names as they are), e.g. "bare GPT2Model checkpoint".
  std::string layout;
  // When names are missing: the layout under which the most are found, as a
  // sentence for the hint ("41 of 42 names are found as a bare GPT2Model
  // checkpoint"); empty when none helps.
  std::string closest_layout;
  // When the names missing under the closest layout are all of other
  // diffusers pipeline components than the ones found ("text_encoder." in a
  // UNet's own file): those prefixes, for the hint.
  std::vector<std::string> other_components;
  // For the hint: how many base tensors the adapter changes or replaces, and
  // whether the base ties its output head to the input embedding
  // (config.json tie_word_embeddings, or no lm_head.weight beside an embedding).
  size_t n_targets = 0;
  bool base_ties_embeddings = false;
  bool ok() const noexcept { return problems.empty(); }
};

// Matches every module to its base tensor through core/name-map (kohya names
// resolved to dotted paths; a dotted path as it is, then through the layout
// table; ambiguity is a problem naming both candidates), decides
// fan_in_fan_out from the base's
// model_type and shapes (GPT-2 Conv1D), and checks every shape. Updates
// `name`/`target` (kohya), `kind` (1x1 conv vs linear, see lora_module) and
// `fan_in_fan_out` in place, and re-sorts modules by name. Never throws for a
// mismatch: the report lists them (cli decides the exit code).
// fan_in_fan_out, as PEFT forces it from the layer type (Conv1D: true,
// nn.Linear: false, whatever the config says): a non-square base weight
// decides by its layout ([in, out] -> true); a square one is Conv1D when the
// base's config.json model_type is GPT-2-like (gpt2, openai-gpt, imagegpt,
// decision_transformer) and the module is c_attn / c_proj / c_fc, else false;
// with no model_type the config value stands, except a c_attn / c_proj / c_fc
// module with fan_in_fan_out false, which is a problem ("orientation
// ambiguous"). Throws only when the base's config.json is unreadable (exit 4)
// or not JSON (exit 3). Implemented in core/adapter-fit.cpp with fit_error
// and require_fit.
// `skip_unmatched` (merge / verify --skip-unmatched): the base layout is the
// one under which the most names are found (core/name-map choose_layout
// most_found) and is applied only to the names found under it; the rest keep
// the adapter's names and are reported missing (no_base_tensor), to skip.
fit_report fit_adapter(adapter& a, const model_files& base, bool skip_unmatched = false);

// Whether the 2-D base weight of `module` is stored [in, out] (transformers'
// pytorch_utils.Conv1D): the base's config.json model_type is GPT-2-like
// (gpt2, openai-gpt, imagegpt, decision_transformer) and the module is
// c_attn / c_proj / c_fc. The rule fit_adapter applies to a square weight, and
// the one extract applies to every weight (it has no LoRA shapes to read).
// PEFT forces fan_in_fan_out true for Conv1D (peft/tuners/lora/layer.py,
// Linear.__init__ and dispatch_default, huggingface/peft @ b28a09c4). Pure.
bool stored_in_out(const std::optional<std::string>& model_type, std::string_view module);

// Whether the 2-D base weight of `module` is stored [in, out] (transformers'
// pytorch_utils.Conv1D): the base's config.json model_type is GPT-2-like
// (gpt2, openai-gpt, imagegpt, decision_transformer) and the module is
// c_attn / c_proj / c_fc. The rule fit_adapter applies to a square weight, and
// the one extract applies to every weight (it has no LoRA shapes to read).
// PEFT forces fan_in_fan_out true for Conv1D (peft/tuners/lora/layer.py,
// Linear.__init__ and dispatch_default, huggingface/peft @ b28a09c4). Pure.
bool stored_in_out(const std::optional<std::string>& model_type, std::string_view module);

// The base tensor whose values a tied base's missing output head starts
// from: when `target` is an lm_head weight the base lacks and the base ties
// its head to the input embedding (an embedding and no lm_head weight, as
// checkpoints saved with tie_word_embeddings are), the embedding's name
// ("model.embed_tokens.weight"); nullopt otherwise. A LoRA module or a
// modules_to_save tensor on such a head fits: merge writes the untied head.
// Pure.
std::optional<std::string> tied_head_source(const model_files& base, const std::string& target);

// Whether a modules_to_save tensor of `saved_shape` may replace a base tensor
// of `base_shape`: the same shape, or an input embedding / output head
// weight (by transformers' names) with the same columns and more rows
// (tokens added during training). Pure.
bool saved_shape_ok(const std::string& target, const std::vector<int64_t>& base_shape,
                    const std::vector<int64_t>& saved_shape);

// The one rendering of a fit report that is not ok(), shared by every command
// (merge, combine, convert --base, verify, forward, inspect --base): an
// exit-3 lora::error naming `adapter_path` (the file or folder the user named),
// with the text "does not fit <base_path>: <n> problem(s), first <key>: <what>"
// followed by one hint chosen from the problems' kinds ("does the adapter
// belong to this base model?" for a missing or misshapen base tensor; a
// fan_in_fan_out hint for an orientation the base cannot decide). Pure.
// Follows llama.cpp's adapter loader, which names the tensor and the hint.
error fit_error(const std::string& adapter_path, const std::string& base_path, const fit_report& report);

// fit_adapter(a, base), then throws fit_error(a.path, base.path, report) when
// a module does not fit. Throws as fit_adapter too.
void require_fit(adapter& a, const model_files& base);

// require_fit for --skip-unmatched: the modules that map to nothing in the
// base (no base tensor matches their name: fit_issue::no_base_tensor on the
// module itself) are removed from a.modules and their names returned, sorted
// (kohya names as the file spells them, dotted paths as resolved); any other
// problem (an ambiguous name, a shape that does not fit, a lora_B bias or a
// modules_to_save tensor without its base tensor) still throws fit_error.
// Throws fit_error (exit 3) too when no module is left.
std::vector<std::string> require_fit_skipping(adapter& a, const model_files& base);

}  // namespace lora
