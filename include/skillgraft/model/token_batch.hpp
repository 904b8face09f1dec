#pragma once
// Token ids at the API boundary: xtensor arrays [batch, seq] of int64, as Hugging Face
// tokenizers and `.npy`/safetensors files hand them over. `ignore_index` (-100, as in
// PyTorch) marks positions without a target.
#include <xtensor/xtensor.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace skillgraft {

using token_ids = xt::xtensor<std::int64_t, 2>;
inline constexpr std::int64_t ignore_index = -100;

// Hugging Face causal-LM labels (label t is the token at t) -> per-position targets
// (target t is the token that should follow position t): shift left, pad with ignore.
inline token_ids shift_labels(const token_ids& labels) {
  token_ids t = xt::full_like(labels, ignore_index);
  for (std::size_t b = 0; b < labels.shape(0); ++b)
    for (std::size_t s = 0; s + 1 < labels.shape(1); ++s) t(b, s) = labels(b, s + 1);
  return t;
}

inline void check_token_ids(const token_ids& ids, int vocab, const char* what) {
  for (std::size_t b = 0; b < ids.shape(0); ++b)
    for (std::size_t s = 0; s < ids.shape(1); ++s)
      if (ids(b, s) < 0 || ids(b, s) >= vocab)
        throw std::invalid_argument(std::string("skillgraft: ") + what + " [" + std::to_string(b) + ", " +
                                    std::to_string(s) + "] is " + std::to_string(ids(b, s)) +
                                    ", outside the vocabulary [0, " + std::to_string(vocab) + ")");
}

}  // namespace skillgraft
