#pragma once
// What the data-parallel tests share: a global batch whose two halves hold different target
// counts, and a few AdamW steps of a tiny LM on any backend with any communicator, returning
// the trainable weights on the host.
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include <xtensor/xview.hpp>

#include "support/random_lm.hpp"

#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace skillgraft::test {

// Four sequences whose prompts and padding leave 9, 3, 5 and 5 targets, so rank 0 of two
// (rows 0, 1) holds 12 and rank 1 (rows 2, 3) holds 10: a rank that divided by its own count
// instead of the global 22 would step differently.
struct global_batch {
  static constexpr std::size_t rows = 4, seq = 10, targets_in_all = 22;
  token_ids ids = token_ids::from_shape({rows, seq});
  token_ids targets = token_ids::from_shape({rows, seq});
  global_batch() {
    const std::size_t prompt[rows] = {0, 6, 2, 4};
    const std::size_t length[rows] = {seq, seq, seq - 2, seq};
    for (std::size_t b = 0; b < rows; ++b)
      for (std::size_t s = 0; s < seq; ++s) ids(b, s) = std::int64_t((3 * b + 5 * s + b * s) % 13);
    for (std::size_t b = 0; b < rows; ++b)
      for (std::size_t s = 0; s < seq; ++s)
        targets(b, s) = s >= prompt[b] && s + 1 < length[b] ? ids(b, s + 1) : ignore_index;
  }
  // Rows [first, first + n) as a micro-batch of any backend (ids and targets are host data).
  template <class Backend = backend::cpu>
  train::micro_batch<float, Backend> rows_of(std::size_t first, std::size_t n) const {
    return {token_ids(xt::view(ids, xt::range(first, first + n), xt::all())),
            token_ids(xt::view(targets, xt::range(first, first + n), xt::all()))};
  }
  // Rank r's half of the batch when two ranks share it.
  template <class Backend = backend::cpu>
  train::micro_batch<float, Backend> half(int rank) const {
    return rows_of<Backend>(2 * std::size_t(rank), 2);
  }
};

struct run_result {
  std::vector<float> weights;  // every trainable tensor after the last step, on the host
  std::vector<train::step_stats> stats;
};

// `steps` AdamW steps (weight decay, clipping at 0.5) from the same seeded weights.
template <class Backend, class Recipe, class Comm>
run_result train_tiny_lm(Recipe recipe, const std::vector<train::micro_batch<float, Backend>>& batches, Comm& comm,
                         int steps = 4) {
  const auto c = tiny_lm_config();
  const auto host = random_lm<float>(c, 11);
  auto w = [&] {
    if constexpr (std::is_same_v<Backend, backend::cpu>) return random_lm<float>(c, 11);
    else return model::to_backend<Backend>(host);
  }();
  model::decoder_lm<float, Recipe, Backend> lm(c, recipe);
  auto g = lm.make_grads(w);
  train::adamw<float, Backend> opt(lm, w, g, {.lr = 1e-2, .weight_decay = 0.01});
  run_result r;
  for (int k = 0; k < steps; ++k)
    r.stats.push_back(train::train_step(lm, w, g, opt, train::constant_schedule{1e-2}, std::span(batches),
                                        {.max_grad_norm = 0.5}, {}, comm));
  model::lm_weights<float> back(c);
  if constexpr (std::is_same_v<Backend, backend::cpu>) back = std::move(w);
  else model::download(w, back);
  model::decoder_lm<float, Recipe> host_lm(c, recipe);
  auto host_g = host_lm.make_grads(back);
  host_lm.for_each_trainable(back, host_g, [&](const std::string&, auto& t, auto&) {
    r.weights.insert(r.weights.end(), t.data(), t.data() + t.size());
  });
  return r;
}

}  // namespace skillgraft::test
