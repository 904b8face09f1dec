#pragma once
// Global gradient-norm clipping over a model's trainable tensors.
//
//   norm = sqrt(sum over every trainable gradient element g^2)
//   if norm > max_norm: every g *= max_norm / (norm + 1e-6)       (as torch.nn.utils.clip_grad_norm_)
#include <cmath>
#include <stdexcept>
#include <string>

#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::train {

// Returns the norm before clipping. Throws, changing nothing, if it is not finite.
template <class Model, class Weights, class Grads>
double clip_grad_norm(const Model& model, Weights& w, Grads& g, double max_norm) {
  double ss = 0;
  model.for_each_trainable(w, g, [&](const std::string&, auto&, auto& dp) {
    ss += dp.vec().template cast<double>().squaredNorm();
  });
  const double norm = std::sqrt(ss);
  if (!std::isfinite(norm))
    throw std::domain_error("skillgraft: gradient norm is not finite; no weight was changed");
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    model.for_each_trainable(w, g, [&](const std::string&, auto&, auto& dp) {
      using T = typename std::remove_reference_t<decltype(dp)>::value_type;
      dp.vec() *= T(scale);
    });
  }
  return norm;
}

// Sets every trainable gradient to zero (before accumulating a new step).
template <class Model, class Weights, class Grads>
void zero_grads(const Model& model, Weights& w, Grads& g) {
  model.for_each_trainable(w, g, [](const std::string&, auto&, auto& dp) { dp.set_zero(); });
}

}  // namespace skillgraft::train
