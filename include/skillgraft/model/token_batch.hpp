#pragma once
// Token ids at the API boundary: xtensor arrays [batch, seq] of int64, as Hugging Face
// tokenizers and `.npy`/safetensors files hand them over. `ignore_index` (-100, as in
// PyTorch) marks positions without a target.
//
// Two kinds of per-position labels exist, and they differ by one position:
//   next-token targets (this library's `targets`): target t is the token that should
//     follow position t, i.e. the token at t + 1;
//   Hugging Face `labels` (`hf_labels` here): label t is the token at position t itself
//     (usually `input_ids` with ignore_index on prompt and padding); the model shifts them.
// `shift_labels` turns the second into the first. `hf_labels` is its own type so that
// labels cannot be passed where targets are expected without saying which they are.
#include <xtensor/xtensor.hpp>
#include <xtensor/xutils.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

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

// Hugging Face causal-LM labels, unshifted: label t is the token at position t.
// `train::micro_batch{ids, hf_labels{labels}}` shifts them into next-token targets.
struct hf_labels {
  token_ids values;  // [batch, seq] or [batch, prefix + seq]
  explicit hf_labels(token_ids labels) : values(std::move(labels)) {}
};

inline token_ids shift_labels(const hf_labels& labels) { return shift_labels(labels.values); }

// Token ids from any xtensor expression, checking that it has rank 2 ([batch, seq]): a
// rank-1 sequence converted to token_ids implicitly would not fail with a clear message.
// A fixed rank is checked at compile time, a dynamic one (xarray) when called.
template <class E>
token_ids to_token_ids(const E& e, const char* what) {
  constexpr std::size_t rank = xt::get_rank<std::decay_t<E>>::value;
  static_assert(rank != 1, "skillgraft: token ids of rank 1 ([seq]) where [batch, seq] is expected: "
                           "reshape one sequence to [1, seq] (e.g. xt::atleast_2d(ids))");
  static_assert(rank == 1 || rank == 2 || rank == SIZE_MAX, "skillgraft: token ids must have rank 2, [batch, seq]");
  if constexpr (rank == SIZE_MAX) {
    if (e.dimension() != 2) {
      std::string shape;
      for (auto n : e.shape()) shape += (shape.empty() ? "" : ", ") + std::to_string(n);
      throw std::invalid_argument(std::string("skillgraft: ") + what + " have rank " + std::to_string(e.dimension()) +
                                  " (shape [" + shape + "]); token ids are [batch, seq]" +
                                  (e.dimension() == 1 ? ": reshape one sequence to [1, seq]" : ""));
    }
  }
  return token_ids(e);
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
