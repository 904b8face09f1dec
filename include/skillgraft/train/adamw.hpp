#pragma once
// AdamW (Loshchilov & Hutter): Adam with decoupled weight decay and bias correction.
//
//   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   w -= lr * ( m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * w )
//
// Moments exist only for the tensors the model's recipe trains: the optimizer is
// built by visiting the model's trainable (name, weight, gradient) triples, so a
// frozen tensor has no state, is never read, and is never written.
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::train {

struct adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

template <class T>
class adamw {
 public:
  // Model: anything with for_each_trainable(weights&, grads&, f(name, w, g)).
  template <class Model, class Weights, class Grads>
  adamw(const Model& model, Weights& w, Grads& g, adamw_options opt = {}) : opt_(opt) {
    model.for_each_trainable(w, g, [&](const std::string& name, cpu::tensor<T>& p, cpu::tensor<T>&) {
      slots_.push_back({name, cpu::tensor<T>(p.shape(), memory_use::optimizer_state),
                        cpu::tensor<T>(p.shape(), memory_use::optimizer_state)});
    });
  }

  const adamw_options& options() const { return opt_; }
  void set_lr(double lr) { opt_.lr = lr; }
  long steps() const { return t_; }
  std::size_t state_bytes() const {
    std::size_t b = 0;
    for (const auto& s : slots_) b += s.m.bytes() + s.v.bytes();
    return b;
  }

  // One update. Non-finite gradients throw before any weight changes.
  template <class Model, class Weights, class Grads>
  void step(const Model& model, Weights& w, Grads& g) {
    std::size_t i = 0;
    model.for_each_trainable(w, g, [&](const std::string& name, cpu::tensor<T>& p, cpu::tensor<T>& dp) {
      if (i >= slots_.size() || slots_[i].name != name || !(slots_[i].m.shape() == p.shape()))
        throw std::logic_error("skillgraft: adamw state was built for another model or recipe (at " + name + ")");
      for (std::size_t j = 0; j < dp.size(); ++j)
        if (!std::isfinite(dp[j]))
          throw std::domain_error("skillgraft: non-finite gradient in " + name + " at element " + std::to_string(j) +
                                  "; no weight was changed");
      ++i;
    });
    if (i != slots_.size()) throw std::logic_error("skillgraft: adamw state was built for another model or recipe");
    ++t_;
    const double bc1 = 1.0 - std::pow(opt_.beta1, double(t_)), bc2 = 1.0 - std::pow(opt_.beta2, double(t_));
    const T b1 = T(opt_.beta1), b2 = T(opt_.beta2), lr = T(opt_.lr), wd = T(opt_.weight_decay), eps = T(opt_.eps);
    const T step = T(opt_.lr / bc1), inv_sqrt_bc2 = T(1.0 / std::sqrt(bc2));
    i = 0;
    model.for_each_trainable(w, g, [&](const std::string&, cpu::tensor<T>& p, cpu::tensor<T>& dp) {
      auto& s = slots_[i++];
      T* pw = p.data();
      T* m = s.m.data();
      T* v = s.v.data();
      const T* gr = dp.data();
      for (std::size_t j = 0; j < p.size(); ++j) {
        m[j] = b1 * m[j] + (T(1) - b1) * gr[j];
        v[j] = b2 * v[j] + (T(1) - b2) * gr[j] * gr[j];
        pw[j] -= step * m[j] / (std::sqrt(v[j]) * inv_sqrt_bc2 + eps) + lr * wd * pw[j];
      }
    });
  }

 private:
  struct slot {
    std::string name;
    cpu::tensor<T> m, v;
  };
  adamw_options opt_;
  std::vector<slot> slots_;
  long t_ = 0;
};

}  // namespace skillgraft::train
