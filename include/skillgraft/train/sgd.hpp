#pragma once
// SGD with momentum (PyTorch convention) and decoupled weight decay.
//
//   b = mu b + g          (b = g on the first step)
//   w -= lr (b + wd w)
// Momentum buffers exist only for trainable tensors, like AdamW's moments.
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::train {

struct sgd_options {
  double lr = 1e-2;
  double momentum = 0.9;
  double weight_decay = 0.0;
};

template <class T>
class sgd {
 public:
  template <class Model, class Weights, class Grads>
  sgd(const Model& model, Weights& w, Grads& g, sgd_options opt = {}) : opt_(opt) {
    if (opt.momentum > 0)
      model.for_each_trainable(w, g, [&](const std::string& name, cpu::tensor<T>& p, cpu::tensor<T>&) {
        slots_.push_back({name, cpu::tensor<T>(p.shape(), memory_use::optimizer_state)});
      });
  }
  void set_lr(double lr) { opt_.lr = lr; }
  long steps() const { return t_; }
  std::size_t state_bytes() const {
    std::size_t b = 0;
    for (const auto& s : slots_) b += s.b.bytes();
    return b;
  }

  template <class Model, class Weights, class Grads>
  void step(const Model& model, Weights& w, Grads& g) {
    model.for_each_trainable(w, g, [&](const std::string& name, cpu::tensor<T>&, cpu::tensor<T>& dp) {
      for (std::size_t j = 0; j < dp.size(); ++j)
        if (!std::isfinite(dp[j]))
          throw std::domain_error("skillgraft: non-finite gradient in " + name + "; no weight was changed");
    });
    const T lr = T(opt_.lr), mu = T(opt_.momentum), wd = T(opt_.weight_decay);
    std::size_t i = 0;
    model.for_each_trainable(w, g, [&](const std::string& name, cpu::tensor<T>& p, cpu::tensor<T>& dp) {
      T* b = nullptr;
      if (opt_.momentum > 0) {
        if (i >= slots_.size() || slots_[i].name != name)
          throw std::logic_error("skillgraft: sgd state was built for another model or recipe (at " + name + ")");
        b = slots_[i++].b.data();
      }
      for (std::size_t j = 0; j < p.size(); ++j) {
        T d = dp[j];
        if (b) d = b[j] = (t_ == 0 ? d : mu * b[j] + d);
        p[j] -= lr * (d + wd * p[j]);
      }
    });
    ++t_;
  }

 private:
  struct slot {
    std::string name;
    cpu::tensor<T> b;
  };
  sgd_options opt_;
  std::vector<slot> slots_;
  long t_ = 0;
};

}  // namespace skillgraft::train
