#pragma once
// The training step the benchmarks time: the reference configuration with a vocabulary of
// 8192, seeded weights, and a batch of 4 x 256 tokens with the loss on the second half of each
// sequence (answer tokens).
#include <random>

#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/train/step.hpp"

namespace skillgraft::bench {
namespace sg = skillgraft;

constexpr int batch = 4, seq = 256, vocab = 8192;

inline sg::decoder_config config() {
  auto c = sg::decoder_config::reference();
  c.vocab_size = vocab;
  return c;
}

inline void fill(sg::cpu::tensor<float>& t, std::mt19937& rng, float mean, float sd) {
  std::normal_distribution<float> nd(mean, sd);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = nd(rng);
}

inline sg::model::lm_weights<float> make_weights() {
  sg::model::lm_weights<float> w(config());
  std::mt19937 rng(1);
  fill(w.embed_tokens, rng, 0.f, 0.02f);
  fill(w.lm_head, rng, 0.f, 0.02f);
  w.norm.fill(1.f);
  for (auto& l : w.trunk.layers) {
    l.attn_norm.fill(1.f);
    l.mlp_norm.fill(1.f);
    for (auto* p : {&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj, &l.self_attn.o_proj,
                    &l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj})
      fill(p->weight, rng, 0.f, 0.02f);
  }
  return w;
}

inline sg::train::micro_batch<float> make_batch() {
  sg::train::micro_batch<float> mb;
  mb.ids = sg::token_ids::from_shape({std::size_t(batch), std::size_t(seq)});
  mb.targets = xt::full_like(mb.ids, sg::ignore_index);
  std::mt19937 rng(2);
  std::uniform_int_distribution<int> tok(0, vocab - 1);
  for (auto& t : mb.ids) t = tok(rng);
  for (std::size_t b = 0; b < std::size_t(batch); ++b)
    for (std::size_t s = seq / 2; s + 1 < std::size_t(seq); ++s) mb.targets(b, s) = mb.ids(b, s + 1);
  return mb;
}

}  // namespace skillgraft::bench
