#pragma once
// AdamW on the CUDA backend (decoupled weight decay, bias correction), the twin of train::adamw.
//
//   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   w -= lr * ( m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * w )
//
// Moments exist only for the tensors the model's recipe trains (built by visiting its
// trainable (name, weight, gradient) triples), in device memory, counted as optimizer_state.
// A non-finite gradient, or one that would overflow a moment or the weight, throws, naming
// the tensor and the element, before any weight changes.
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include <thrust/find.h>

#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/train/adamw.hpp"

namespace skillgraft::train::cuda {

template <class T>
using tensor = skillgraft::cuda::tensor<T>;
using skillgraft::cuda::index_t;

namespace kernels {
template <class T>
struct not_finite {
  const T* g;
  SKILLGRAFT_HD bool operator()(index_t i) const { return !skillgraft::cuda::is_finite(g[i]); }
};
// One element's new first moment, second moment and weight (the formula of train::adamw).
template <class T>
struct adamw_math {
  T b1, b2, step, inv_sqrt_bc2, eps, lr_wd;
  SKILLGRAFT_HD void operator()(T p, T m, T v, T g, T& m_out, T& v_out, T& p_out) const {
    m_out = b1 * m + (T(1) - b1) * g;
    v_out = b2 * v + (T(1) - b2) * g * g;
    p_out = p - (step * m_out / (skillgraft::cuda::sqrt_(v_out) * inv_sqrt_bc2 + eps) + lr_wd * p);
  }
};
// True where the update would overflow a moment or the weight (the gradient is finite).
template <class T>
struct would_overflow {
  const T* p;
  const T* g;
  const T* m;
  const T* v;
  adamw_math<T> math;
  SKILLGRAFT_HD bool operator()(index_t j) const {
    T m2, v2, p2;
    math(p[j], m[j], v[j], g[j], m2, v2, p2);
    return !skillgraft::cuda::is_finite(m2) || !skillgraft::cuda::is_finite(v2) || !skillgraft::cuda::is_finite(p2);
  }
};
template <class T>
struct adamw_update {
  T* p;
  const T* g;
  T* m;
  T* v;
  adamw_math<T> math;
  SKILLGRAFT_HD void operator()(index_t j) const { 
    T m2, v2, p2;
    math(p[j], m[j], v[j], g[j], m2, v2, p2);
    m[j] = m2;
    v[j] = v2;
    p[j] = p2;
  }
};
}  // namespace kernels

// Index of the first non-finite element of t, or -1.
template <class T>
index_t first_non_finite(const tensor<T>& t) {
  const auto first = thrust::counting_iterator<index_t>(0), last = first + index_t(t.size());
  const auto at = thrust::find_if(skillgraft::cuda::exec(), first, last, kernels::not_finite<T>{t.data()});
  return at == last ? -1 : index_t(at - first);
}

template <class T>
class adamw {
 public:
  template <class Model, class Weights, class Grads>
  adamw(const Model& model, Weights& w, Grads& g, adamw_options opt = {}) : opt_(opt) {
    model.for_each_trainable(w, g, [&](const std::string& name, tensor<T>& p, tensor<T>&) {
      slots_.push_back({name, tensor<T>(p.shape(), memory_use::optimizer_state), tensor<T>(p.shape(), memory_use::optimizer_state)});
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

  // One update. A non-finite gradient, or a finite one that would overflow a moment or
  // the weight, throws std::domain_error naming the tensor and the element before any
  // weight or moment changes (as train::adamw does).
  template <class Model, class Weights, class Grads>
  void step(const Model& model, Weights& w, Grads& g) {
    std::size_t i = 0;
    const kernels::adamw_math<T> math = next_math();
    model.for_each_trainable(w, g, [&](const std::string& name, tensor<T>& p, tensor<T>& dp) {
      if (i >= slots_.size() || slots_[i].name != name || !(slots_[i].m.shape() == p.shape()))
        throw std::logic_error("skillgraft: adamw state was built for another model or recipe (at " + name + ")");
      if (const index_t bad = first_non_finite(dp); bad >= 0)
        throw std::domain_error("skillgraft: non-finite gradient in " + name + " at element " + std::to_string(bad) +
                                "; no weight was changed");
      const auto& s = slots_[i];
      const auto first = thrust::counting_iterator<index_t>(0), last = first + index_t(p.size());
      const auto at = thrust::find_if(skillgraft::cuda::exec(), first, last,
                                      kernels::would_overflow<T>{p.data(), dp.data(), s.m.data(), s.v.data(), math});
      if (at != last)
        throw std::domain_error("skillgraft: the gradient of " + name + " at element " + std::to_string(index_t(at - first)) +
                                " makes the AdamW moments or the weight overflow; no weight was changed (clip the "
                                "gradients, or lower the loss scale)");
      ++i;
    });
    if (i != slots_.size()) throw std::logic_error("skillgraft: adamw state was built for another model or recipe");
    ++t_;
    i = 0;
    model.for_each_trainable(w, g, [&](const std::string&, tensor<T>& p, tensor<T>& dp) {
      auto& s = slots_[i++];
      skillgraft::cuda::for_each_index(index_t(p.size()),
                                       kernels::adamw_update<T>{p.data(), dp.data(), s.m.data(), s.v.data(), math});
    });
  }

 private:
  struct slot {
    std::string name;
    tensor<T> m, v;
  };
  // The constants of the next step (t + 1).
  kernels::adamw_math<T> next_math() const {
    const double t = double(t_ + 1);
    const double bc1 = 1.0 - std::pow(opt_.beta1, t), bc2 = 1.0 - std::pow(opt_.beta2, t);
    return {T(opt_.beta1), T(opt_.beta2), T(opt_.lr / bc1), T(1.0 / std::sqrt(bc2)), T(opt_.eps),
            T(opt_.lr) * T(opt_.weight_decay)};
  }
  adamw_options opt_;
  std::vector<slot> slots_;
  long t_ = 0;
};

}  // namespace skillgraft::train::cuda
