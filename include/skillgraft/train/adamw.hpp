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
#include <cstdio>
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

  // One update. A non-finite gradient, or a finite one so large that a moment or the
  // weight would overflow (a gradient of 1e30 squared is infinite in float, and a weight
  // with an infinite second moment never moves again), throws std::domain_error naming
  // the tensor and the element before any weight or moment changes.
  template <class Model, class Weights, class Grads>
  void step(const Model& model, Weights& w, Grads& g) {
    std::size_t i = 0;
    const coefficients k = next_coefficients();
    model.for_each_trainable(w, g, [&](const std::string& name, cpu::tensor<T>& p, cpu::tensor<T>& dp) {
      if (i >= slots_.size() || slots_[i].name != name || !(slots_[i].m.shape() == p.shape()))
        throw std::logic_error("skillgraft: adamw state was built for another model or recipe (at " + name + ")");
      for (std::size_t j = 0; j < dp.size(); ++j)
        if (!std::isfinite(dp[j]))
          throw std::domain_error("skillgraft: non-finite gradient in " + name + " at element " + std::to_string(j) +
                                  "; no weight was changed");
      const auto& s = slots_[i];
      for (std::size_t j = 0; j < dp.size(); ++j) {
        const element e = update(k, p[j], s.m[j], s.v[j], dp[j]);
        if (!std::isfinite(e.m) || !std::isfinite(e.v) || !std::isfinite(e.p))
          throw std::domain_error("skillgraft: the gradient of " + name + " at element " + std::to_string(j) + " (" +
                                  number(dp[j]) + ") makes the AdamW " +
                                  (!std::isfinite(e.m) ? "first moment" : !std::isfinite(e.v) ? "second moment" : "update") +
                                  " overflow; no weight was changed (clip the gradients, or lower the loss scale)");
      }
      ++i;
    });
    if (i != slots_.size()) throw std::logic_error("skillgraft: adamw state was built for another model or recipe");
    ++t_;
    i = 0;
    model.for_each_trainable(w, g, [&](const std::string&, cpu::tensor<T>& p, cpu::tensor<T>& dp) {
      auto& s = slots_[i++];
      T* pw = p.data();
      T* m = s.m.data();
      T* v = s.v.data();
      const T* gr = dp.data();
      for (std::size_t j = 0; j < p.size(); ++j) {
        const element e = update(k, pw[j], m[j], v[j], gr[j]);
        m[j] = e.m;
        v[j] = e.v;
        pw[j] = e.p;
      }
    });
  }

 private:
  struct slot {
    std::string name;
    cpu::tensor<T> m, v;
  };
  struct coefficients {
    T b1, b2, lr_wd, step, inv_sqrt_bc2, eps;
  };
  struct element {
    T m, v, p;
  };
  static std::string number(T x) {
    char b[32];
    std::snprintf(b, sizeof b, "%g", double(x));
    return b;
  }
  // The constants of the next step (t + 1).
  coefficients next_coefficients() const {
    const double t = double(t_ + 1);
    const double bc1 = 1.0 - std::pow(opt_.beta1, t), bc2 = 1.0 - std::pow(opt_.beta2, t);
    return {T(opt_.beta1), T(opt_.beta2), T(opt_.lr) * T(opt_.weight_decay), T(opt_.lr / bc1),
            T(1.0 / std::sqrt(bc2)), T(opt_.eps)};
  }
  // One element's new first moment, second moment and weight.
  static element update(const coefficients& k, T p, T m, T v, T g) {
    element e;
    e.m = k.b1 * m + (T(1) - k.b1) * g;
    e.v = k.b2 * v + (T(1) - k.b2) * g * g;
    e.p = p - (k.step * e.m / (std::sqrt(e.v) * k.inv_sqrt_bc2 + k.eps) + k.lr_wd * p);
    return e;
  }
  adamw_options opt_;
  std::vector<slot> slots_;
  long t_ = 0;
};

}  // namespace skillgraft::train
