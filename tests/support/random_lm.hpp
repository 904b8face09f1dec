#pragma once
// A seeded random decoder LM for tests, on a small configuration with a 13-token vocabulary.
#include "skillgraft/model/decoder_lm.hpp"
#include "support/random.hpp"

namespace skillgraft::test {

inline decoder_config tiny_lm_config(int layers = 2) {
  auto c = tiny_config(false, layers);
  c.vocab_size = 13;
  c.max_seq = 16;
  return c;
}

// Blocks, then embeddings N(0, 1), final norm N(1, 0.1), LM head N(0, 0.5), from one stream.
template <class T>
model::lm_weights<T> random_lm(const decoder_config& c, unsigned seed) {
  model::lm_weights<T> w(c);
  std::mt19937 rng(seed);
  for (auto& l : w.trunk.layers) fill_block(l, rng);
  fill_normal(w.embed_tokens, rng, 0.0, 1.0);
  fill_normal(w.norm, rng, 1.0, 0.1);
  fill_normal(w.lm_head, rng, 0.0, 0.5);
  return w;
}

// Experts that route and compute for real: each layer's router N(0, 1), then each of its experts'
// Gate, Up and Down as fill_linear (expert 0, the original MLP, included), layer by layer from
// one stream. The experts themselves come from cl::add_expert before.
template <class T>
void randomize_experts(model::lm_weights<T>& w, std::mt19937& rng) {
  for (auto& l : w.trunk.layers) {
    fill_normal(l.mlp.router, rng, 0.0, 1.0);
    for (auto& x : l.mlp.experts)
      for (auto* p : {&x.gate_proj, &x.up_proj, &x.down_proj}) fill_linear(*p, rng);
  }
}

}  // namespace skillgraft::test
