#pragma once
// Global gradient-norm clipping over a model's trainable tensors, on any backend.
//
//   norm = sqrt(sum over every trainable gradient element g^2)
//   if norm > max_norm: every g *= max_norm / (norm + 1e-6)       (as torch.nn.utils.clip_grad_norm_)
// The sum is in double, in a fixed order (Backend::sum_index), so a step is repeatable.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "skillgraft/backend/backend_of.hpp"
#include "skillgraft/backend/host_device.hpp"

namespace skillgraft::train {

namespace kernels {
template <class T>
struct square {  // g_i^2 in double
  const T* g;
  SKILLGRAFT_HD double operator()(std::int64_t i) const { return double(g[i]) * double(g[i]); }
};
template <class T>
struct scale_by {  // g_i *= a
  T* g;
  T a;
  SKILLGRAFT_HD void operator()(std::int64_t i) const { g[i] *= a; }
};
}  // namespace kernels

// The global norm of the trainable gradients. Throws, changing nothing, if it is not finite
// (the squares are summed in double, so it is finite exactly when every element is).
template <class Model, class Weights, class Grads>
double gradient_norm(const Model& model, Weights& w, Grads& g) {
  double ss = 0;
  model.for_each_trainable(w, g, [&](const std::string&, auto&, auto& dp) {
    using tensor_t = std::remove_cvref_t<decltype(dp)>;
    using B = typename backend_of<tensor_t>::type;
    ss += B::template sum_index<double>(std::int64_t(dp.size()),
                                        kernels::square<typename tensor_t::value_type>{dp.data()});
  });
  const double norm = std::sqrt(ss);
  if (!std::isfinite(norm))
    throw std::domain_error("skillgraft: gradient norm is not finite; no weight was changed");
  return norm;
}

inline double clip_scale(double norm, double max_norm) {
  return max_norm > 0 && norm > max_norm ? max_norm / (norm + 1e-6) : 1.0;
}

// What clipping decides for a set of gradients: their global norm before clipping, and the
// factor every element is to be multiplied by (1 when the norm is within max_norm or
// max_norm <= 0). An optimizer that offers step(model, w, g, clip_decision) applies the factor
// inside its update pass (and leaves the gradients scaled, as scale_grads would), which saves
// train_step a pass that reads and writes every gradient; AdamW also takes the norm as a bound
// on every element, so only decide_clipping makes one, from the gradients themselves, and it
// holds for them as they were then.
class clip_decision {
 public:
  double norm() const { return norm_; }
  double scale() const { return scale_; }

 private:
  clip_decision(double norm, double scale) : norm_(norm), scale_(scale) {}
  template <class Model, class Weights, class Grads>
  friend clip_decision decide_clipping(const Model&, Weights&, Grads&, double);
  double norm_, scale_;
};

// The norm of the trainable gradients (gradient_norm: throws if not finite) and the factor that
// clips it to max_norm.
template <class Model, class Weights, class Grads>
clip_decision decide_clipping(const Model& model, Weights& w, Grads& g, double max_norm) {
  const double norm = gradient_norm(model, w, g);
  return {norm, clip_scale(norm, max_norm)};
}

// Every trainable gradient element times scale (nothing to do when it is 1).
template <class Model, class Weights, class Grads>
void scale_grads(const Model& model, Weights& w, Grads& g, double scale) {
  if (scale == 1.0) return;
  model.for_each_trainable(w, g, [&](const std::string&, auto&, auto& dp) {
    using tensor_t = std::remove_cvref_t<decltype(dp)>;
    using T = typename tensor_t::value_type;
    backend_of<tensor_t>::type::for_each_index(std::int64_t(dp.size()), kernels::scale_by<T>{dp.data(), T(scale)});
  });
}

// Returns the norm before clipping. Throws, changing nothing, if it is not finite.
template <class Model, class Weights, class Grads>
double clip_grad_norm(const Model& model, Weights& w, Grads& g, double max_norm) {
  const double norm = gradient_norm(model, w, g);
  scale_grads(model, w, g, clip_scale(norm, max_norm));
  return norm;
}

// Sets every trainable gradient to zero (before accumulating a new step).
template <class Model, class Weights, class Grads>
void zero_grads(const Model& model, Weights& w, Grads& g) {
  model.for_each_trainable(w, g, [](const std::string&, auto&, auto& dp) { dp.set_zero(); });
}

}  // namespace skillgraft::train
