#pragma once
// Hugging Face config.json <-> decoder_config, for LlamaForCausalLM and Qwen2ForCausalLM.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>

#include "skillgraft/nn/config.hpp"

namespace skillgraft::io {

inline decoder_config decoder_config_from_hf(const nlohmann::json& j, const std::string& where = "config.json") {
  auto need = [&](const char* key) -> const nlohmann::json& {
    if (!j.contains(key)) throw std::invalid_argument("skillgraft: " + where + " has no \"" + key + "\"");
    return j.at(key);
  };
  const std::string type = j.value("model_type", "llama");
  if (type != "llama" && type != "qwen2")
    throw std::invalid_argument("skillgraft: " + where + " describes a \"" + type +
                                "\" model; supported: llama, qwen2");
  try {
    decoder_config c;
    c.hidden = need("hidden_size").get<int>();
    c.n_heads = need("num_attention_heads").get<int>();
    c.n_kv_heads = j.value("num_key_value_heads", c.n_heads);
    c.head_dim = j.contains("head_dim") && !j.at("head_dim").is_null() ? j.at("head_dim").get<int>() : c.hidden / c.n_heads;
    c.intermediate = need("intermediate_size").get<int>();
    c.n_layers = need("num_hidden_layers").get<int>();
    c.max_seq = j.value("max_position_embeddings", 2048);
    c.rope_theta = j.value("rope_theta", 10000.0);
    c.rms_norm_eps = j.value("rms_norm_eps", 1e-6);
    c.vocab_size = need("vocab_size").get<int>();
    c.tie_word_embeddings = j.value("tie_word_embeddings", false);
    c.attention_bias = type == "qwen2" ? true : j.value("attention_bias", false);
    if (j.contains("rope_scaling") && !j.at("rope_scaling").is_null())
      throw std::invalid_argument("skillgraft: " + where + " uses rope_scaling, which is not supported");
    if (j.value("hidden_act", std::string("silu")) != "silu")
      throw std::invalid_argument("skillgraft: " + where + " uses hidden_act \"" + j.value("hidden_act", std::string()) +
                                  "\"; only silu (SwiGLU) is supported");
    c.validate();
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("skillgraft: " + where + ": " + e.what());
  }
}

inline decoder_config read_hf_config(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw std::invalid_argument("skillgraft: cannot open " + file.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("skillgraft: " + file.string() + " is not valid JSON: " + e.what());
  }
  return decoder_config_from_hf(j, file.string());
}

// The config.json transformers needs to load our weights (LlamaForCausalLM, or
// Qwen2ForCausalLM when the attention has Q/K/V bias).
inline nlohmann::json decoder_config_to_hf(const decoder_config& c) {
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
      {"rms_norm_eps", c.rms_norm_eps},
      {"vocab_size", c.vocab_size},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"hidden_act", "silu"},
      {"torch_dtype", "float32"}};
  if (!qwen) j["attention_bias"] = false;
  if (qwen) j["use_sliding_window"] = false;
  return j;
}

}  // namespace skillgraft::io
