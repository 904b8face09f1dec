#pragma once
// A seeded random language model for tests (embedding, head, final norm and every block).
#include <random>

#include "skillgraft/model/decoder_lm.hpp"
#include "support/random.hpp"

namespace skillgraft::test {

inline model::lm_weights<float> random_lm(const decoder_config& c, unsigned seed) {
  model::lm_weights<float> w(c);
  std::mt19937 rng(seed);
  fill_normal(w.embed_tokens, rng, 0.0, 0.5);
  if (!c.tie_word_embeddings) fill_normal(w.lm_head, rng, 0.0, 0.5);
  fill_normal(w.norm, rng, 1.0, 0.1);
  for (auto& l : w.trunk.layers) fill_block(l, rng);
  return w;
}

}  // namespace skillgraft::test
