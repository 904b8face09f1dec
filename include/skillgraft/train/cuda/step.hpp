#pragma once
// One optimisation step on the CUDA backend, the twin of train::train_step:
//
//   zero grads; for each micro-batch: forward, fused masked loss, backward (each micro-batch's
//   loss divided by the target count of the whole batch); clip the global norm; set the
//   scheduled learning rate; optimizer step.
// A non-finite loss or gradient throws before any weight changes.
#include <cmath>
#include <span>
#include <stdexcept>
#include <string>

#include "skillgraft/train/clip.hpp"
#include "skillgraft/train/cuda/adamw.hpp"
#include "skillgraft/train/cuda/cross_entropy.hpp"
#include "skillgraft/train/step.hpp"

namespace skillgraft::train::cuda {

template <class T>
struct micro_batch {
  token_ids ids;                       // [batch, seq] (host)
  token_ids targets;                   // [batch, prefix + seq]; ignore_index where no loss (host)
  const tensor<T>* prefix = nullptr;   // optional soft tokens [batch, prefix, hidden] (device)
};

namespace kernels {
template <class T>
struct square {
  const T* g;
  SKILLGRAFT_HD double operator()(index_t i) const { return double(g[i]) * double(g[i]); }
};
}  // namespace kernels

//   norm = sqrt(sum over every trainable gradient element g^2)
//   if norm > max_norm: every g *= max_norm / (norm + 1e-6)       (as torch.nn.utils.clip_grad_norm_)
// Returns the norm before clipping. Throws, changing nothing, if it is not finite.
template <class Model, class Weights, class Grads>
double clip_grad_norm(const Model& model, Weights& w, Grads& g, double max_norm) {
  double ss = 0;
  model.for_each_trainable(w, g, [&](const std::string&, auto&, auto& dp) {
    ss += skillgraft::cuda::sum_index<double>(index_t(dp.size()), kernels::square<typename std::remove_reference_t<decltype(dp)>::value_type>{dp.data()});
  });
  const double norm = std::sqrt(ss);
  if (!std::isfinite(norm)) throw std::domain_error("skillgraft: gradient norm is not finite; no weight was changed");
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    model.for_each_trainable(w, g, [&](const std::string&, auto&, auto& dp) {
      using V = typename std::remove_reference_t<decltype(dp)>::value_type;
      skillgraft::cuda::for_each_index(index_t(dp.size()), skillgraft::cuda::scale_by<V>{dp.data(), V(scale)});
    });
  }
  return norm;
}

template <class Model, class Optimizer, class Schedule>
step_stats train_step(const Model& model, typename Model::weights_t& w, typename Model::grads_t& g, Optimizer& opt,
                      const Schedule& schedule, std::span<const micro_batch<typename Model::value_type>> batches,
                      step_options o = {}, std::size_t chunk = 256) {
  if (batches.empty()) throw std::invalid_argument("skillgraft: train_step needs at least one micro-batch");
  step_stats st;
  for (const auto& mb : batches)
    for (auto y : mb.targets) st.targets += (y != ignore_index);
  if (st.targets == 0) throw std::invalid_argument("skillgraft: the batch has no target tokens (all ignore_index)");
  zero_grads(model, w, g);  // only set_zero() on each gradient: the CPU helper serves both backends
  for (const auto& mb : batches) {
    typename Model::saved_t saved;
    auto h = model.forward(w, mb.ids, saved, mb.prefix);
    auto r = masked_cross_entropy(h, w.head(), mb.targets, model.head_grad(g),
                                  {.chunk = chunk, .want_dh = true, .normaliser = st.targets});
    st.loss += r.loss;
    model.backward(w, saved, r.dh, g);
  }
  if (!std::isfinite(st.loss))
    throw std::domain_error("skillgraft: the loss is not finite (" + std::to_string(st.loss) + "); no weight was changed");
  st.grad_norm = clip_grad_norm(model, w, g, o.max_grad_norm);
  st.lr = schedule(opt.steps());
  opt.set_lr(st.lr);
  opt.step(model, w, g);
  return st;
}

}  // namespace skillgraft::train::cuda
