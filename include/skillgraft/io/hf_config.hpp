#pragma once
// Hugging Face config.json <-> decoder_config, for LlamaForCausalLM and Qwen2ForCausalLM,
// and the small JSON file helpers every Hugging Face side file (config.json,
// model.safetensors.index.json, adapter_config.json) is read and written with.
//
// Reading refuses what the model cannot compute instead of quietly computing something
// else: scaled rotary embeddings, sliding-window attention, an MLP bias, a bias on
// Llama's o_proj (attention_bias puts one there), activations other than SiLU.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <stdexcept>
#include <fstream>
#include <string>
#include <string_view>

#include "skillgraft/io/atomic_file.hpp"
#include "skillgraft/nn/config.hpp"

namespace skillgraft::io {

// Parses a JSON file; a missing file or bad JSON is std::invalid_argument naming the file.
inline nlohmann::json read_json_file(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw std::invalid_argument("skillgraft: cannot open " + file.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("skillgraft: " + file.string() + " is not valid JSON: " + e.what());
  }
}

// Writes j as transformers does (2-space indent, trailing newline), replacing `file` atomically.
inline void write_json_file(const std::filesystem::path& file, const nlohmann::json& j) {
  const std::string text = j.dump(2) + "\n";
  atomic_file out(file);
  out.write(text.data(), text.size());
  out.commit();
}

inline decoder_config decoder_config_from_hf(const nlohmann::json& j, const std::string& where = "config.json") {
  auto need = [&](const char* key) -> const nlohmann::json& {
    if (!j.contains(key)) throw std::invalid_argument("skillgraft: " + where + " has no \"" + key + "\"");
    return j.at(key);
  };
  auto refuse = [&](const std::string& what) {
    throw std::invalid_argument("skillgraft: " + where + " " + what);
  };
  if (!j.is_object()) refuse("is not a JSON object");
  const std::string type = j.value("model_type", "llama");
  if (type != "llama" && type != "qwen2")
    refuse("describes a \"" + type + "\" model; supported: llama, qwen2");
  try {
    decoder_config c;
    c.hidden = need("hidden_size").get<int>();
    c.n_heads = need("num_attention_heads").get<int>();
    c.n_kv_heads = j.contains("num_key_value_heads") && !j.at("num_key_value_heads").is_null()
                       ? j.at("num_key_value_heads").get<int>()
                       : c.n_heads;
    c.head_dim = j.contains("head_dim") && !j.at("head_dim").is_null() ? j.at("head_dim").get<int>() : c.hidden / c.n_heads;
    c.intermediate = need("intermediate_size").get<int>();
    c.n_layers = need("num_hidden_layers").get<int>();
    c.max_seq = j.value("max_position_embeddings", 2048);

    // transformers 5.x nests the rotary settings in "rope_parameters"; 4.x keeps
    // "rope_theta" at the top level and "rope_scaling" for the non-default kinds.
    // A file carrying two different thetas would mean different models to the two
    // versions, so it is refused rather than resolved one way.
    const bool top_theta = j.contains("rope_theta") && !j.at("rope_theta").is_null();
    c.rope_theta = top_theta ? j.at("rope_theta").get<double>() : 10000.0;
    for (const char* key : {"rope_parameters", "rope_scaling"}) {
      if (!j.contains(key) || j.at(key).is_null()) continue;
      const auto& r = j.at(key);
      if (!r.is_object()) refuse(std::string("has \"") + key + "\" that is not an object");
      const std::string kind = r.value("rope_type", r.value("type", std::string("default")));
      if (kind != "default")
        refuse(std::string("uses ") + key + " of rope_type \"" + kind +
               "\"; only the default rotary embedding is supported");
      if (r.contains("rope_theta") && !r.at("rope_theta").is_null()) {
        const double theta = r.at("rope_theta").get<double>();
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
        if (t != "full_attention") refuse("has layer_types entry " + t.dump() + "; only full_attention is supported");
    c.rms_norm_eps = j.value("rms_norm_eps", 1e-6);
    c.vocab_size = need("vocab_size").get<int>();
    c.tie_word_embeddings = j.value("tie_word_embeddings", false);
    c.attention_bias = type == "qwen2";  // Qwen2: q/k/v always have a bias, o_proj never
    const std::string act = j.value("hidden_act", std::string("silu"));
    if (act != "silu") refuse("uses hidden_act \"" + act + "\"; only silu (SwiGLU) is supported");
    c.validate();
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("skillgraft: " + where + ": " + e.what());
  }
}

inline decoder_config read_hf_config(const std::filesystem::path& file) {
  return decoder_config_from_hf(read_json_file(file), file.string());
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

}  // namespace skillgraft::io
