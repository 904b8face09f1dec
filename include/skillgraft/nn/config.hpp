#pragma once
// Shape of a LLaMA/Qwen2-style decoder, with the Hugging Face config names in comments.
#include <cstddef>
#include <stdexcept>
#include <string>

namespace skillgraft {

struct decoder_config {
  int hidden = 512;            // hidden_size
  int n_heads = 8;             // num_attention_heads
  int n_kv_heads = 4;          // num_key_value_heads
  int head_dim = 64;           // head_dim (hidden_size / num_attention_heads by default)
  int intermediate = 1536;     // intermediate_size
  int n_layers = 4;            // num_hidden_layers
  int max_seq = 2048;          // max_position_embeddings: length of the rotary table
  double rope_theta = 10000.0; // rope_theta
  double rms_norm_eps = 1e-6;  // rms_norm_eps
  bool attention_bias = false; // Qwen2: bias on q_proj, k_proj, v_proj
  int vocab_size = 32000;      // vocab_size (language model only)
  bool tie_word_embeddings = false;  // lm_head shares embed_tokens.weight
  int lora_rank = 0;           // rank r of the adapters a recipe's lora<P> tags train (PEFT "r")
  double lora_alpha = 16.0;    // PEFT "lora_alpha": adapter scale = alpha / r
  // Vision-encoder (ViT) blocks: every position attends to every other, and positions
  // come from a learned table instead of rotary embeddings. The defaults are the decoder's.
  bool causal = true;          // false: bidirectional attention (no causal mask)
  bool rotary = true;          // false: no rotary embeddings (the rotary table is not used)

  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }

  void validate() const {
    auto fail = [](const std::string& m) { throw std::invalid_argument("skillgraft: decoder_config: " + m); };
    if (hidden <= 0 || n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0 || intermediate <= 0 || n_layers < 0 ||
        max_seq <= 0)
      fail("sizes must be positive");
    if (n_heads % n_kv_heads != 0)
      fail("num_attention_heads (" + std::to_string(n_heads) + ") is not a multiple of num_key_value_heads (" +
           std::to_string(n_kv_heads) + ")");
    if (rotary && head_dim % 2 != 0) fail("head_dim (" + std::to_string(head_dim) + ") must be even for rotary embeddings");
    if (!(rms_norm_eps > 0)) fail("rms_norm_eps must be positive");
    if (!(rope_theta > 0)) fail("rope_theta must be positive");
    if (vocab_size <= 0) fail("vocab_size must be positive");
  }

  // The benchmark's reference configuration (hidden 512, 8 heads, 4 KV heads, MLP 1536, 4 layers).
  static decoder_config reference() { return {}; }
};

// Batch and sequence length of the activations flowing through a stack.
struct seq_shape {
  int batch = 1;
  int seq = 1;
  std::size_t tokens() const { return static_cast<std::size_t>(batch) * static_cast<std::size_t>(seq); }
};

}  // namespace skillgraft
