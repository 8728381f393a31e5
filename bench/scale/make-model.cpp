// Writes, deterministically, a Llama-3-8B-shaped BF16 model in 4 shards
// (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab
// 128256, untied lm_head: 8.03B parameters, 16.06 GB) and a PEFT adapter
// (rank 16, alpha 32, F32) on q, k, v, o, gate, up and down of every layer.
// Each tensor has its own PRNG (xoshiro256** seeded from its name), so the
// bytes do not depend on the order or on anything else. Values: uniform with
// the standard deviation of N(0, 1/in) for weights (embedding: 1), 1 +- 0.1
// for norms; A, B uniform with std 0.01. Bench-only, never committed output.
// Usage: make-model OUT_DIR [LAYERS] (LAYERS < 32: a smaller model, same widths)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <sys/stat.h>
#include <vector>

namespace {

struct rng {
  uint64_t s[4];
  explicit rng(const std::string& name) {
    uint64_t h = 1469598103934665603ull;  // fnv1a64 of the name, through splitmix64
    for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
    for (auto& x : s) {
      h += 0x9e3779b97f4a7c15ull;
      uint64_t z = h;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      x = z ^ (z >> 31);
    }
  }
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t next() {
    const uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t, s[3] = rotl(s[3], 45);
    return r;
  }
};

uint16_t bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

struct tensor {
  std::string name;
  std::vector<int64_t> shape;
  bool f32 = false;
  uint64_t elements() const {
    uint64_t n = 1;
    for (int64_t d : shape) n *= static_cast<uint64_t>(d);
    return n;
  }
  uint64_t bytes() const { return elements() * (f32 ? 4 : 2); }
};

// Streams one tensor's values: uniform in [center - a, center + a] (std a / sqrt(3)).
void write_tensor(FILE* f, const tensor& t, float center, float a) {
  rng r(t.name);
  std::vector<uint8_t> buf(uint64_t{8} << 20);
  uint64_t left = t.elements();
  const size_t esize = t.f32 ? 4 : 2;
  while (left > 0) {
    const uint64_t n = std::min<uint64_t>(left, buf.size() / esize);
    for (uint64_t i = 0; i < n; i += 2) {
      const uint64_t x = r.next();
      for (uint64_t k = 0; k < 2 && i + k < n; ++k) {
        const float u = static_cast<float>((x >> (32 * k)) & 0xffffffu) * (1.0f / 16777216.0f);
        const float v = center + a * (2.0f * u - 1.0f);
        if (t.f32)
          std::memcpy(&buf[(i + k) * 4], &v, 4);
        else {
          const uint16_t h = bf16(v);
          std::memcpy(&buf[(i + k) * 2], &h, 2);
        }
      }
    }
    if (std::fwrite(buf.data(), esize, n, f) != n) {
      std::perror("write");
      std::exit(1);
    }
    left -= n;
  }
}

std::string header_json(const std::vector<tensor>& ts, const char* meta) {
  std::string h = "{";
  if (meta) h += std::string("\"__metadata__\":") + meta + ",";
  uint64_t off = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const tensor& t = ts[i];
    h += "\"" + t.name + "\":{\"dtype\":\"" + (t.f32 ? "F32" : "BF16") + "\",\"shape\":[";
    for (size_t k = 0; k < t.shape.size(); ++k) h += (k ? "," : "") + std::to_string(t.shape[k]);
    h += "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + t.bytes()) + "]}";
    h += i + 1 < ts.size() ? "," : "";
    off += t.bytes();
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');
  return h;
}

// Writes a safetensors file; `value` gives each tensor's center and half-width.
template <typename F>
void write_file(const std::string& path, std::vector<tensor> ts, const char* meta, F value) {
  std::sort(ts.begin(), ts.end(), [](const tensor& x, const tensor& y) { return x.name < y.name; });
  const std::string h = header_json(ts, meta);
  const std::string tmp = path + ".partial";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) {
    std::perror(tmp.c_str());
    std::exit(1);
  }
  uint64_t n = h.size();
  std::fwrite(&n, 8, 1, f);
  std::fwrite(h.data(), 1, h.size(), f);
  for (const tensor& t : ts) {
    const auto [center, a] = value(t);
    write_tensor(f, t, center, a);
  }
  if (std::fclose(f) != 0) {
    std::perror(tmp.c_str());
    std::exit(1);
  }
  std::rename(tmp.c_str(), path.c_str());
}

bool exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: make-model OUT_DIR [LAYERS]\n");
    return 2;
  }
  const std::string out = argv[1];
  const int L = argc > 2 ? std::atoi(argv[2]) : 32;
  const int64_t H = 4096, F = 14336, NH = 32, KV = 8, V = 128256, hd = H / NH;
  const std::string base = out + "/base", adapter = out + "/adapter";
  ::mkdir(out.c_str(), 0755);
  ::mkdir(base.c_str(), 0755);
  ::mkdir(adapter.c_str(), 0755);
  const int n_shards = 4;
  // shards as Llama-3-8B's: layers split evenly, embedding in the first, norm and head in the last
  std::vector<std::vector<tensor>> shards(n_shards);
  shards[0].push_back({"model.embed_tokens.weight", {V, H}});
  std::vector<tensor> lora;
  const char* modules[7][2] = {{"self_attn.q_proj", ""}, {"self_attn.k_proj", ""}, {"self_attn.v_proj", ""},
                               {"self_attn.o_proj", ""}, {"mlp.gate_proj", ""},    {"mlp.up_proj", ""},
                               {"mlp.down_proj", ""}};
  const int64_t outs[7] = {NH * hd, KV * hd, KV * hd, H, F, F, H}, ins[7] = {H, H, H, NH * hd, H, H, F};
  for (int l = 0; l < L; ++l) {
    auto& s = shards[static_cast<size_t>(l * n_shards / L)];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    s.push_back({p + "input_layernorm.weight", {H}});
    s.push_back({p + "post_attention_layernorm.weight", {H}});
    for (int m = 0; m < 7; ++m) {
      s.push_back({p + modules[m][0] + ".weight", {outs[m], ins[m]}});
      const std::string k = "base_model.model." + p + modules[m][0];
      lora.push_back({k + ".lora_A.weight", {16, ins[m]}, true});
      lora.push_back({k + ".lora_B.weight", {outs[m], 16}, true});
    }
  }
  shards[n_shards - 1].push_back({"model.norm.weight", {H}});
  shards[n_shards - 1].push_back({"lm_head.weight", {V, H}});

  const auto base_value = [&](const tensor& t) -> std::pair<float, float> {
    if (t.shape.size() == 1) return {1.0f, 0.1f * std::sqrt(3.0f)};
    const float std_dev =
        t.name == "model.embed_tokens.weight" ? 1.0f : 1.0f / std::sqrt(static_cast<float>(t.shape[1]));
    return {0.0f, std_dev * std::sqrt(3.0f)};
  };
  std::string index = "{\"metadata\":{\"total_size\":";
  uint64_t total = 0;
  std::string weight_map;
  for (int s = 0; s < n_shards; ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", s + 1, n_shards);
    for (const tensor& t : shards[static_cast<size_t>(s)]) {
      total += t.bytes();
      weight_map += std::string(weight_map.empty() ? "" : ",") + "\"" + t.name + "\":\"" + name + "\"";
    }
    const std::string path = base + "/" + name;
    if (!exists(path)) write_file(path, shards[static_cast<size_t>(s)], "{\"format\":\"pt\"}", base_value);
  }
  index += std::to_string(total) + "},\"weight_map\":{" + weight_map + "}}\n";
  FILE* f = std::fopen((base + "/model.safetensors.index.json").c_str(), "w");
  std::fputs(index.c_str(), f);
  std::fclose(f);
  f = std::fopen((base + "/config.json").c_str(), "w");
  std::fprintf(f,
               "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":%lld,"
               "\"intermediate_size\":%lld,\"num_hidden_layers\":%d,\"num_attention_heads\":%lld,"
               "\"num_key_value_heads\":%lld,\"vocab_size\":%lld,\"rms_norm_eps\":1e-05,\"rope_theta\":500000.0,"
               "\"max_position_embeddings\":8192,\"tie_word_embeddings\":false,\"hidden_act\":\"silu\","
               "\"torch_dtype\":\"bfloat16\"}\n",
               static_cast<long long>(H), static_cast<long long>(F), L, static_cast<long long>(NH),
               static_cast<long long>(KV), static_cast<long long>(V));
  std::fclose(f);
  if (!exists(adapter + "/adapter_model.safetensors"))
    write_file(adapter + "/adapter_model.safetensors", lora, "{\"format\":\"pt\"}", [](const tensor&) {
      return std::pair<float, float>{0.0f, 0.01f * std::sqrt(3.0f)};
    });
  f = std::fopen((adapter + "/adapter_config.json").c_str(), "w");
  std::fputs(
      "{\"peft_type\":\"LORA\",\"r\":16,\"lora_alpha\":32,\"target_modules\":[\"q_proj\",\"k_proj\",\"v_proj\","
      "\"o_proj\",\"gate_proj\",\"up_proj\",\"down_proj\"],\"bias\":\"none\",\"fan_in_fan_out\":false}\n",
      f);
  std::fclose(f);
  std::printf("%s: %d layers, %.2f GB in %d shards; adapter rank 16 F32\n", base.c_str(), L, total / 1e9, n_shards);
  return 0;
}
