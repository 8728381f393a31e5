// core/verify: a real merge (core/merge) verifies; copies of it with one
// element moved by a given number of bf16 ulps, or one tensor left unmerged,
// fail naming that tensor; 1 ulp (PEFT's double rounding) still passes.
#include <doctest/doctest.h>

#include <filesystem>

#include "core/dtype.h"
#include "core/merge.h"
#include "core/verify.h"
#include "tests/merge-testing.h"

using namespace lora;
using namespace lora::testing;

namespace {
const std::string td = std::string(LORA_SOURCE_DIR) + "/testdata/";

// A copy of the model folder `src` with `edit` applied to its tensors (decoded to double, re-encoded exactly).
void edited_copy(const std::string& src, const std::string& dst,
                 const std::function<void(std::map<std::string, test_tensor>&)>& edit) {
  std::filesystem::create_directories(dst);
  std::filesystem::copy_file(src + "/config.json", dst + "/config.json");
  safetensors_file f(src + "/model.safetensors");
  std::map<std::string, test_tensor> ts;
  for (const auto& t : f.tensors()) ts[t.name] = {t.name, t.type, t.shape, read_f64(f, t.name)};
  edit(ts);
  std::vector<test_tensor> list;
  for (auto& [n, t] : ts) list.push_back(t);
  write_safetensors(dst + "/model.safetensors", list);
}

// The bf16 value k units in the last place above v.
double bf16_step(double v, int k) {
  uint16_t h = f64_to_bf16(v);
  h = static_cast<uint16_t>(v >= 0 ? h + k : h - k);
  return bf16_to_f32(h);
}
}  // namespace

TEST_CASE("a merge verifies; an edited merge fails naming the tensor") {
  temp_dir dir;
  merge_options mo;
  mo.base = td + "tiny-llama";
  mo.adapters = {{td + "lora-tiny-llama", 1.0}};
  mo.out = dir / "merged";
  merge_model(mo);
  verify_options vo{td + "tiny-llama", td + "lora-tiny-llama", dir / "merged", {}, 1};
  verify_report ok = verify_merge(vo);
  CHECK(ok.equivalent);
  CHECK(ok.n_checked == 21);
  CHECK(ok.model.ran);
  CHECK(ok.model.top1_agreement == 1.0);

  const std::string target = "model.layers.0.self_attn.q_proj.weight";
  for (int ulps : {1, 4}) {
    CAPTURE(ulps);
    const std::string out = dir / ("ulp" + std::to_string(ulps));
    edited_copy(dir / "merged", out, [&](auto& ts) { ts[target].values[100] = bf16_step(ts[target].values[100], ulps); });
    vo.merged = out;
    verify_report r = verify_merge(vo);
    if (ulps == 1) {
      CHECK(r.equivalent);
    } else {
      CHECK(!r.equivalent);
      REQUIRE(r.n_failed == 1);
      CHECK(r.tensors.front().name == target);
      CHECK(r.tensors.front().n_bad == 1);
    }
  }

  const std::string unmerged = "model.layers.1.mlp.down_proj.weight";
  safetensors_file base(td + "tiny-llama/model.safetensors");
  edited_copy(dir / "merged", dir / "unmerged", [&](auto& ts) { ts[unmerged].values = read_f64(base, unmerged); });
  vo.merged = dir / "unmerged";
  verify_report r = verify_merge(vo);
  CHECK(!r.equivalent);
  REQUIRE(r.n_failed == 1);
  CHECK(r.tensors.front().name == unmerged);
  CHECK(!r.model.ok);

  // an untouched tensor that changed fails as "untouched"
  edited_copy(dir / "merged", dir / "norm", [&](auto& ts) { ts["model.norm.weight"].values[0] += 0.5; });
  vo.merged = dir / "norm";
  r = verify_merge(vo);
  REQUIRE(r.n_failed == 1);
  CHECK(r.tensors.front().name == "model.norm.weight");
  CHECK(r.tensors.front().kind == "untouched");
}
