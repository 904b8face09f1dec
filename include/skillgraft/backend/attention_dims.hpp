#pragma once
// The shape of the attention core a backend computes: q [batch, seq, heads * head_dim],
// k and v [batch, seq, kv_heads * head_dim], scores P [batch, heads, seq, seq]; query head j
// reads kv head j / (heads / kv_heads). `causal`: row i sees keys 0..i; otherwise all keys.
#include <cstddef>

namespace skillgraft {

struct attention_dims {
  int batch = 1, seq = 1, heads = 1, kv_heads = 1, head_dim = 1;
  bool causal = true;
  int group() const { return heads / kv_heads; }
  std::size_t score_elements() const {
    return std::size_t(batch) * std::size_t(heads) * std::size_t(seq) * std::size_t(seq);
  }
};

}  // namespace skillgraft
