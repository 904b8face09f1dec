#pragma once
// Seeded random tensors and weights for tests.
#include <random>

#include "skillgraft/nn/decoder_stack.hpp"

namespace skillgraft::test {

template <class T>
void fill_normal(cpu::tensor<T>& t, std::mt19937& rng, double mean, double stddev) {
  std::normal_distribution<double> nd(mean, stddev);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(nd(rng));
}

template <class T>
void fill_linear(nn::linear_weights<T>& l, std::mt19937& rng) {
  fill_normal(l.weight, rng, 0.0, 1.0 / std::sqrt(double(l.in_features())));
  if (l.has_bias()) fill_normal(l.bias, rng, 0.0, 0.1);
}

template <class T>
void fill_block(nn::block_weights<T>& w, std::mt19937& rng) {
  fill_normal(w.attn_norm, rng, 1.0, 0.1);
  fill_normal(w.mlp_norm, rng, 1.0, 0.1);
  for (auto* l : {&w.self_attn.q_proj, &w.self_attn.k_proj, &w.self_attn.v_proj, &w.self_attn.o_proj, &w.mlp.gate_proj,
                  &w.mlp.up_proj, &w.mlp.down_proj})
    fill_linear(*l, rng);
}

template <class T>
nn::trunk_weights<T> random_trunk(const decoder_config& c, unsigned seed) {
  nn::trunk_weights<T> w(c);
  std::mt19937 rng(seed);
  for (auto& l : w.layers) fill_block(l, rng);
  return w;
}

template <class T>
cpu::tensor<T> random_tensor(cpu::shape_t s, unsigned seed, double stddev = 1.0) {
  cpu::tensor<T> t(s, memory_use::workspace);
  std::mt19937 rng(seed);
  fill_normal(t, rng, 0.0, stddev);
  return t;
}

// A small configuration that still has grouped heads (4 query heads on 2 kv heads).
inline decoder_config tiny_config(bool bias = false, int layers = 3) {
  decoder_config c;
  c.hidden = 16;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.intermediate = 24;
  c.n_layers = layers;
  c.max_seq = 8;
  c.rope_theta = 10000.0;
  c.rms_norm_eps = 1e-6;
  c.attention_bias = bias;
  return c;
}

}  // namespace skillgraft::test
