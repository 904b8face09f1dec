#pragma once
// Hugging Face config.json <-> decoder_config, for LlamaForCausalLM and Qwen2ForCausalLM.
//
// Reading refuses what the model cannot compute instead of quietly computing something
// else: scaled rotary embeddings, sliding-window attention, an MLP bias, a bias on
// Llama's o_proj (attention_bias puts one there), activations other than SiLU.
//
// Every number is checked before it is used: sizes must be integers (32.7, 1e300 and
// 4294967328 are refused, not truncated or wrapped) in [1, 2^31 - 1] (layers from 0),
// num_attention_heads is checked before head_dim defaults to hidden_size / heads, the
// products the model computes in int (heads x head_dim) must fit, every tensor's
// element count and the whole model's bytes must fit in 64 bits, the rotary table
// (max_position_embeddings x head_dim) may hold at most 2^30 values, and rope_theta
// and rms_norm_eps must be finite and positive.
#include <nlohmann/json.hpp>

#include <climits>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>

#include "skillgraft/io/json_file.hpp"
#include "skillgraft/nn/config.hpp"

namespace skillgraft::model {

namespace detail {
// out = a * b (a + b); false when that does not fit in int64.
inline bool mul_fits(std::int64_t a, std::int64_t b, std::int64_t& out) { return !__builtin_mul_overflow(a, b, &out); }
inline bool add_fits(std::int64_t a, std::int64_t b, std::int64_t& out) { return !__builtin_add_overflow(a, b, &out); }
}  // namespace detail

// Values in a decoder with this config (every weight, biases included; a tied head
// counted once), or throws std::invalid_argument when that count overflows 64 bits.
inline std::int64_t hf_parameter_count(const decoder_config& c, const std::string& where = "config.json") {
  using detail::add_fits;
  using detail::mul_fits;
  auto fail = [&]() -> std::int64_t {
    throw std::invalid_argument("skillgraft: " + where + " describes a model whose size does not fit in 64 bits");
  };
  const std::int64_t d = c.hidden, V = c.vocab_size, I = c.intermediate, L = c.n_layers;
  std::int64_t q = 0, kv = 0, embed = 0, per_layer = 0, t = 0, total = 0;
  if (!mul_fits(c.n_heads, c.head_dim, q) || !mul_fits(c.n_kv_heads, c.head_dim, kv) || !mul_fits(V, d, embed))
    return fail();
  // q, k, v, o; gate, up, down; two norms; q/k/v biases.
  auto add_product = [&](std::int64_t a, std::int64_t b, std::int64_t times) {
    std::int64_t p = 0;
    if (!mul_fits(a, b, p) || !mul_fits(p, times, p) || !add_fits(per_layer, p, per_layer)) fail();
  };
  add_product(q, d, 2);
  add_product(kv, d, 2);
  add_product(I, d, 3);
  add_product(d, 1, 2);
  if (c.attention_bias) {
    add_product(q, 1, 1);
    add_product(kv, 1, 2);
  }
  if (!mul_fits(per_layer, L, t) || !add_fits(t, embed, total) || !add_fits(total, d, total)) return fail();
  if (!c.tie_word_embeddings && !add_fits(total, embed, total)) return fail();
  if (!mul_fits(total, 8, t)) return fail();  // bytes in double must fit too
  return total;
}

inline decoder_config decoder_config_from_hf(const nlohmann::json& j, const std::string& where = "config.json") {
  auto refuse = [&](const std::string& what) {
    throw std::invalid_argument("skillgraft: " + where + " " + what);
  };
  if (!j.is_object()) refuse("is not a JSON object");
  auto need = [&](const char* key) -> const nlohmann::json& {
    if (!j.contains(key) || j.at(key).is_null()) refuse(std::string("has no \"") + key + "\"");
    return j.at(key);
  };
  auto present = [&](const char* key) { return j.contains(key) && !j.at(key).is_null(); };
  auto size = [&](const char* key, const nlohmann::json& v, std::int64_t lo = 1) {
    return static_cast<int>(io::json_integer(v, key, where, lo, INT_MAX));
  };
  try {
    const std::string type = j.value("model_type", "llama");
    if (type != "llama" && type != "qwen2")
      refuse("describes a \"" + io::printable(type) + "\" model; supported: llama, qwen2");
    decoder_config c;
    c.hidden = size("hidden_size", need("hidden_size"));
    c.n_heads = size("num_attention_heads", need("num_attention_heads"));
    c.n_kv_heads = present("num_key_value_heads") ? size("num_key_value_heads", j.at("num_key_value_heads")) : c.n_heads;
    if (present("head_dim")) {
      c.head_dim = size("head_dim", j.at("head_dim"));
    } else {
      if (c.hidden % c.n_heads != 0)
        refuse("has hidden_size " + std::to_string(c.hidden) + ", not a multiple of num_attention_heads " +
               std::to_string(c.n_heads) + ", and no head_dim");
      c.head_dim = c.hidden / c.n_heads;  // n_heads >= 1, checked above
    }
    c.intermediate = size("intermediate_size", need("intermediate_size"));
    c.n_layers = size("num_hidden_layers", need("num_hidden_layers"), 0);
    c.max_seq = present("max_position_embeddings") ? size("max_position_embeddings", j.at("max_position_embeddings"))
                                                   : 2048;
    c.vocab_size = size("vocab_size", need("vocab_size"));
    // The attention computes heads x head_dim in int.
    for (const auto& [heads, name] : {std::pair{c.n_heads, "num_attention_heads"}, std::pair{c.n_kv_heads, "num_key_value_heads"}})
      if (std::int64_t(heads) * c.head_dim > INT_MAX)
        refuse(std::string("has ") + name + " " + std::to_string(heads) + " x head_dim " + std::to_string(c.head_dim) +
               " = " + std::to_string(std::int64_t(heads) * c.head_dim) + ", more than " + std::to_string(INT_MAX));
    if (std::int64_t(c.max_seq) * c.head_dim > (std::int64_t{1} << 30))
      refuse("has max_position_embeddings " + std::to_string(c.max_seq) + " x head_dim " + std::to_string(c.head_dim) +
             ", a rotary table of more than 2^30 values");

    // transformers 5.x nests the rotary settings in "rope_parameters"; 4.x keeps
    // "rope_theta" at the top level and "rope_scaling" for the non-default kinds.
    // A file carrying two different thetas would mean different models to the two
    // versions, so it is refused rather than resolved one way.
    const bool top_theta = present("rope_theta");
    c.rope_theta = top_theta ? io::json_real(j.at("rope_theta"), "rope_theta", where) : 10000.0;
    for (const char* key : {"rope_parameters", "rope_scaling"}) {
      if (!present(key)) continue;
      const auto& r = j.at(key);
      if (!r.is_object()) refuse(std::string("has \"") + key + "\" that is not an object");
      const std::string kind = r.value("rope_type", r.value("type", std::string("default")));
      if (kind != "default")
        refuse(std::string("uses ") + key + " of rope_type \"" + io::printable(kind) +
               "\"; only the default rotary embedding is supported");
      if (r.contains("rope_theta") && !r.at("rope_theta").is_null()) {
        const double theta = io::json_real(r.at("rope_theta"), std::string(key) + ".rope_theta", where);
        if (top_theta && theta != c.rope_theta)
          refuse("has rope_theta " + nlohmann::json(c.rope_theta).dump() + " at the top level but " +
                 nlohmann::json(theta).dump() + " in " + key + "; which one applies depends on the transformers "
                 "version, so the file is ambiguous");
        c.rope_theta = theta;
      }
    }

    if (j.value("mlp_bias", false)) refuse("uses mlp_bias, which is not supported");
    if (type == "llama" && j.value("attention_bias", false))
      refuse("uses attention_bias, which in Llama also puts a bias on o_proj; that is not supported");
    // Qwen2's sliding window only takes effect when use_sliding_window is set.
    if (type == "qwen2" && j.value("use_sliding_window", false))
      refuse("uses sliding-window attention (use_sliding_window), which is not supported");
    if (j.contains("layer_types") && j.at("layer_types").is_array())
      for (const auto& t : j.at("layer_types"))
        if (t != "full_attention")
          refuse("has layer_types entry " + io::json_shown(t) + "; only full_attention is supported");
    c.rms_norm_eps = present("rms_norm_eps") ? io::json_real(j.at("rms_norm_eps"), "rms_norm_eps", where) : 1e-6;
    c.tie_word_embeddings = j.value("tie_word_embeddings", false);
    c.attention_bias = type == "qwen2";  // Qwen2: q/k/v always have a bias, o_proj never
    const std::string act = j.value("hidden_act", std::string("silu"));
    if (act != "silu") refuse("uses hidden_act \"" + io::printable(act) + "\"; only silu (SwiGLU) is supported");
    c.validate();
    hf_parameter_count(c, where);
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("skillgraft: " + where + ": " + io::printable(e.what()));
  }
}

inline decoder_config read_hf_config(const std::filesystem::path& file) {
  return decoder_config_from_hf(io::read_json_file(file), file.string());
}

// The config.json transformers needs to load our weights (LlamaForCausalLM, or
// Qwen2ForCausalLM when the attention has Q/K/V bias). `dtype` is how the weights are
// stored ("float32", "bfloat16"). The rotary base is written both ways, so 4.x and 5.x
// read the same theta.
inline nlohmann::json decoder_config_to_hf(const decoder_config& c, std::string_view dtype = "float32") {
  c.validate();
  const bool qwen = c.attention_bias;
  nlohmann::json j = {
      {"architectures", {qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
      {"model_type", qwen ? "qwen2" : "llama"},
      {"hidden_size", c.hidden},
      {"num_attention_heads", c.n_heads},
      {"num_key_value_heads", c.n_kv_heads},
      {"head_dim", c.head_dim},
      {"intermediate_size", c.intermediate},
      {"num_hidden_layers", c.n_layers},
      {"max_position_embeddings", c.max_seq},
      {"rope_theta", c.rope_theta},
      {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", c.rope_theta}}},
      {"rms_norm_eps", c.rms_norm_eps},
      {"vocab_size", c.vocab_size},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"hidden_act", "silu"},
      {"torch_dtype", dtype},  // transformers 4.x
      {"dtype", dtype}};       // transformers 5.x
  if (!qwen) {
    j["attention_bias"] = false;
    j["mlp_bias"] = false;
  }
  if (qwen) j["use_sliding_window"] = false;
  return j;
}

}  // namespace skillgraft::model
