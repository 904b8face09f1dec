#pragma once
// AdamW (Loshchilov & Hutter): Adam with decoupled weight decay and bias correction.
//
//   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   w -= lr * ( m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * w )
//
// Moments exist only for the tensors the model's recipe trains: the optimizer is
// built by visiting the model's trainable (name, weight, gradient) triples, so a
// frozen tensor has no state, is never read, and is never written. The update is one
// element functor (`adamw_math`) run by Backend::for_each_index on any backend; moments
// live where the weights do.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "skillgraft/backend/cpu/backend.hpp"
#include "skillgraft/backend/host_device.hpp"

namespace skillgraft::train {

struct adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

namespace kernels {
// One element's new first moment, second moment and weight; V is T, or a CPU packet of T
// (backend/cpu/simd.hpp) when the loop runs the same formula on several elements at once.
// 1 - b1 and 1 - b2 come rounded from double: 1 - 0.999f in float is 1.3e-5 off 0.001 (the
// float 0.999 is not 0.999), a bias of every second moment that PyTorch, which passes 1 - beta2
// from a double, does not have.
template <class T>
struct adamw_math {
  T b1, b2, one_minus_b1, one_minus_b2, step, inv_sqrt_bc2, eps, lr_wd;
  template <class V>
  struct element {
    V m, v, p;
  };
  template <class V>
  SKILLGRAFT_HD element<V> operator()(V p, V m, V v, V g) const {
    using scalar::sqrt_;
    element<V> e = moments(p, m, v, g);
    e.p = p - (step * e.m / (sqrt_(e.v) * inv_sqrt_bc2 + eps) + lr_wd * p);
    return e;
  }
  // The new moments, the weight still the old one: the part of the update the CPU packet check
  // (update_fails::lanes_fail) forms exactly as the update does.
  template <class V>
  SKILLGRAFT_HD element<V> moments(V p, V m, V v, V g) const {
    return {b1 * m + one_minus_b1 * g, b2 * v + one_minus_b2 * g * g, p};
  }
};
template <class T>
struct not_finite {
  const T* g;
  SKILLGRAFT_HD bool operator()(std::int64_t i) const { return !scalar::is_finite(g[i]); }
};
// True where the gradient is not finite or the update would overflow a moment or the weight:
// one pass over the tensor finds either.
template <class T>
struct update_fails {
  using value_type = T;
  const T* p;
  const T* g;
  const T* m;
  const T* v;
  adamw_math<T> math;
  SKILLGRAFT_HD bool operator()(std::int64_t j) const {
    const auto e = math(p[j], m[j], v[j], g[j]);
    return !scalar::is_finite(g[j]) || !scalar::is_finite(e.m) || !scalar::is_finite(e.v) || !scalar::is_finite(e.p);
  }
  // CPU packets: a screen, NaN in the lanes where the update may fail and 0 where it cannot,
  // without the update's square root and division (those made the check cost as much as the
  // update; now it costs the reading of the four arrays). The moments are formed as the update
  // forms them; the new weight cannot exceed |p| (1 + |lr wd|) + |step m| / eps in magnitude,
  // the denominator being at least eps. Each is tested times 4, so that rounding near the top of
  // the range cannot hide an overflow. A flagged lane is no verdict: the search
  // (find_first_index) then tests its block element by element with the exact operator(), so a
  // large weight whose update stays finite is still updated.
  template <class V>
  V lanes_fail(std::int64_t j) const {
    const V gj = V::load(g + j), four(T(4));
    const auto e = math.moments(V::load(p + j), V::load(m + j), V::load(v + j), gj);
    const T decay = T(1) + (math.lr_wd < T(0) ? -math.lr_wd : math.lr_wd), inv_eps = T(1) / math.eps;
    const V bound = abs_(e.p) * decay + abs_(math.step * e.m) * inv_eps;
    return not_finite_flag(gj) + not_finite_flag(e.m * four) + not_finite_flag(e.v * four) + not_finite_flag(bound * four);
  }
};
template <class T>
struct adamw_update {
  using value_type = T;
  T* p;
  const T* g;
  T* m;
  T* v;
  adamw_math<T> math;
  SKILLGRAFT_HD void operator()(std::int64_t j) const {
    const auto e = math(p[j], m[j], v[j], g[j]);
    m[j] = e.m;
    v[j] = e.v;
    p[j] = e.p;
  }
  template <class V>  // CPU packets: elements j .. j + V::size - 1
  void lanes(std::int64_t j) const {
    const auto e = math(V::load(p + j), V::load(m + j), V::load(v + j), V::load(g + j));
    e.m.store(m + j);
    e.v.store(v + j);
    e.p.store(p + j);
  }
};
}  // namespace kernels

template <class T, class Backend = backend::cpu>
class adamw {
 public:
  using tensor_t = typename Backend::template tensor<T>;

  // Model: anything with for_each_trainable(weights&, grads&, f(name, w, g)).
  template <class Model, class Weights, class Grads>
  adamw(const Model& model, Weights& w, Grads& g, adamw_options opt = {}) : opt_(opt) {
    model.for_each_trainable(w, g, [&](const std::string& name, tensor_t& p, tensor_t&) {
      slots_.push_back({name, tensor_t(p.shape(), memory_use::optimizer_state),
                        tensor_t(p.shape(), memory_use::optimizer_state)});
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

  // (name, m, v) of every trained tensor, in the order of the model's for_each_trainable:
  // what train/optimizer_state.hpp saves.
  template <class F>
  void for_each_state(F&& f) const {
    for (const auto& s : slots_) f(s.name, s.m, s.v);
  }
  // Puts back a saved state: the step count, the options and, per slot in order, the moments
  // (the caller, load_optimizer_state, has checked names and shapes against this optimizer).
  void restore(long steps, const adamw_options& o, std::vector<std::pair<tensor_t, tensor_t>> moments) {
    if (steps < 0 || moments.size() != slots_.size())
      throw std::logic_error("skillgraft: adamw::restore needs a step count >= 0 and one pair of moments per tensor");
    for (std::size_t i = 0; i < slots_.size(); ++i)
      if (!(moments[i].first.shape() == slots_[i].m.shape()) || !(moments[i].second.shape() == slots_[i].v.shape()))
        throw std::logic_error("skillgraft: adamw::restore: the moments of " + slots_[i].name + " have another shape");
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      slots_[i].m = std::move(moments[i].first);
      slots_[i].v = std::move(moments[i].second);
    }
    t_ = steps;
    opt_ = o;
  }

  // One update. A non-finite gradient, or a finite one so large that a moment or the
  // weight would overflow (a gradient of 1e30 squared is infinite in float, and a weight
  // with an infinite second moment never moves again), throws std::domain_error naming
  // the tensor and the element before any weight or moment changes.
  template <class Model, class Weights, class Grads>
  void step(const Model& model, Weights& w, Grads& g) {
    std::size_t i = 0;
    const kernels::adamw_math<T> math = next_math();
    model.for_each_trainable(w, g, [&](const std::string& name, tensor_t& p, tensor_t& dp) {
      if (i >= slots_.size() || slots_[i].name != name || !(slots_[i].m.shape() == p.shape()))
        throw std::logic_error("skillgraft: adamw state was built for another model or recipe (at " + name + ")");
      const auto n = std::int64_t(dp.size());
      const auto& s = slots_[i];
      const auto j =
          Backend::find_first_index(n, kernels::update_fails<T>{p.data(), dp.data(), s.m.data(), s.v.data(), math});
      if (j >= 0) {
        const auto at = std::size_t(j);
        const T gj = Backend::value_at(dp, at);
        // The message names the first element where the update fails, and why.
        if (!std::isfinite(gj))
          throw std::domain_error("skillgraft: non-finite gradient in " + name + " at element " + std::to_string(j) +
                                  "; no weight was changed");
        const auto e = math(Backend::value_at(p, at), Backend::value_at(s.m, at), Backend::value_at(s.v, at), gj);
        throw std::domain_error("skillgraft: the gradient of " + name + " at element " + std::to_string(j) + " (" +
                                number(gj) + ") makes the AdamW " +
                                (!std::isfinite(e.m) ? "first moment" : !std::isfinite(e.v) ? "second moment" : "update") +
                                " overflow; no weight was changed (clip the gradients, or lower the loss scale)");
      }
      ++i;
    });
    if (i != slots_.size()) throw std::logic_error("skillgraft: adamw state was built for another model or recipe");
    ++t_;
    i = 0;
    model.for_each_trainable(w, g, [&](const std::string&, tensor_t& p, tensor_t& dp) {
      auto& s = slots_[i++];
      Backend::for_each_index(std::int64_t(p.size()),
                              kernels::adamw_update<T>{p.data(), dp.data(), s.m.data(), s.v.data(), math});
    });
  }

 private:
  struct slot {
    std::string name;
    tensor_t m, v;
  };
  static std::string number(T x) {
    char b[32];
    std::snprintf(b, sizeof b, "%g", double(x));
    return b;
  }
  // The constants of the next step (t + 1).
  kernels::adamw_math<T> next_math() const {
    const double t = double(t_ + 1);
    const double bc1 = 1.0 - std::pow(opt_.beta1, t), bc2 = 1.0 - std::pow(opt_.beta2, t);
    return {T(opt_.beta1),        T(opt_.beta2),           T(1.0 - opt_.beta1), T(1.0 - opt_.beta2),
            T(opt_.lr / bc1),      T(1.0 / std::sqrt(bc2)), T(opt_.eps),         T(opt_.lr) * T(opt_.weight_decay)};
  }
  adamw_options opt_;
  std::vector<slot> slots_;
  long t_ = 0;
};

}  // namespace skillgraft::train
