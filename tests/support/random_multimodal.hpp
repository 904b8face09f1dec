#pragma once
// Small seeded multimodal models for tests: an 8x8 RGB image in 4x4 patches (or 2x2 patches
// merged 2x2), a two-block bidirectional ViT with grouped heads, and a two-layer LM.
#include <cmath>
#include <random>
#include <string>

#include "skillgraft/model/multimodal.hpp"
#include "support/random.hpp"

namespace skillgraft::test {

inline decoder_config vit_blocks() {
  auto c = tiny_config(false, 2);
  c.hidden = 8;
  c.n_heads = 2;
  c.n_kv_heads = 1;  // grouped heads in the encoder too
  c.head_dim = 4;
  c.intermediate = 12;
  c.causal = false;
  c.rotary = false;
  return c;
}

inline model::multimodal_config tiny_multimodal() {
  model::multimodal_config c;
  c.vision.image_size = 8;
  c.vision.patch_size = 4;
  c.vision.channels = 3;
  c.vision.blocks = vit_blocks();
  c.projector = {.in = 8, .intermediate = 10, .out = 16};
  c.text = tiny_config(false, 2);
  c.text.vocab_size = 13;
  c.text.max_seq = 16;
  return c;
}

// The same model with 2x2 patches on the 8x8 image (a 4x4 grid) merged 2x2 into 4 image tokens.
inline model::multimodal_config tiny_merged_multimodal() {
  auto c = tiny_multimodal();
  c.vision.patch_size = 2;
  c.vision.merge = 2;
  c.vision.blocks.max_seq = 16;
  c.projector.in = c.vision.out_features();  // 4 x 8
  return c;
}

template <class T>
model::multimodal_weights<T> random_multimodal(const model::multimodal_config& c, unsigned seed) {
  model::multimodal_weights<T> w(c);
  std::mt19937 rng(seed);
  // Larger than a training init so that every path carries a visible gradient.
  model::for_each_multimodal_parameter(w, [&](const std::string& name, cpu::tensor<T>& t) {
    const bool norm = name.find("norm") != std::string::npos;
    fill_normal(t, rng, norm ? 1.0 : 0.0, norm ? 0.1 : 1.0 / std::sqrt(double(t.shape().last())));
  });
  return w;
}

}  // namespace skillgraft::test
