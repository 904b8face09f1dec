#pragma once
// One optimisation step for any model of the library, over one or more micro-batches.
//
//   zero grads; for each micro-batch: forward, fused masked loss, backward (gradients add up,
//   each micro-batch's loss divided by the target count of the *whole* batch, so k micro-batches
//   give the gradient of one batch of their union); clip the global norm; set the scheduled
//   learning rate; optimizer step.
// A non-finite loss or gradient throws before any weight changes. Given the same seed,
// data and thread count, the step is bit-for-bit repeatable (no atomics, fixed reduction order).
#include <cmath>
#include <span>
#include <string>
#include <stdexcept>

#include "skillgraft/train/clip.hpp"
#include "skillgraft/train/cross_entropy.hpp"

namespace skillgraft::train {

template <class T>
struct micro_batch {
  token_ids ids;                          // [batch, seq]
  token_ids targets;                      // [batch, prefix + seq]; ignore_index where no loss
  const cpu::tensor<T>* prefix = nullptr; // optional soft tokens [batch, prefix, hidden]
};

struct step_options {
  double max_grad_norm = 1.0;  // <= 0: no clipping
};

struct step_stats {
  double loss = 0;
  double grad_norm = 0;
  double lr = 0;
  std::size_t targets = 0;
};

// The default objective: next-token cross-entropy on the target positions.
// An objective provides micro(model, w, g, batch, h, normaliser) -> loss_result (it forms
// d loss / d h and adds the head's gradient), and optionally finish(model, w, g) -> double,
// called once after all micro-batches to add penalty terms (EWC) to loss and gradients.
struct masked_ce_objective {
  std::size_t chunk = 256;
  template <class Model, class T>
  loss_result<T> micro(const Model& model, const typename Model::weights_t& w, typename Model::grads_t& g,
                       const micro_batch<T>&, const cpu::tensor<T>& h, const token_ids& targets,
                       std::size_t normaliser) const {
    return masked_cross_entropy(h, w.head(), targets, model.head_grad(g),
                                {.chunk = chunk, .want_dh = true, .normaliser = normaliser});
  }
};

template <class Model, class Optimizer, class Schedule, class Objective = masked_ce_objective>
step_stats train_step(const Model& model, typename Model::weights_t& w, typename Model::grads_t& g, Optimizer& opt,
                      const Schedule& schedule, std::span<const micro_batch<typename Model::value_type>> batches,
                      step_options o = {}, const Objective& objective = {}) {
  if (batches.empty()) throw std::invalid_argument("skillgraft: train_step needs at least one micro-batch");
  step_stats st;
  for (const auto& mb : batches)
    for (auto y : mb.targets) st.targets += (y != ignore_index);
  if (st.targets == 0) throw std::invalid_argument("skillgraft: the batch has no target tokens (all ignore_index)");
  zero_grads(model, w, g);
  for (const auto& mb : batches) {
    typename Model::saved_t saved;
    auto h = model.forward(w, mb.ids, saved, mb.prefix);
    auto r = objective.micro(model, w, g, mb, h, mb.targets, st.targets);
    st.loss += r.loss;
    model.backward(w, saved, r.dh, g);
  }
  if constexpr (requires { objective.finish(model, w, g); }) st.loss += objective.finish(model, w, g);
  if (!std::isfinite(st.loss))
    throw std::domain_error("skillgraft: the loss is not finite (" + std::to_string(st.loss) + "); no weight was changed");
  st.grad_norm = clip_grad_norm(model, w, g, o.max_grad_norm);
  st.lr = schedule(opt.steps());
  opt.set_lr(st.lr);
  opt.step(model, w, g);
  return st;
}

}  // namespace skillgraft::train
