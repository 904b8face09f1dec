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
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "skillgraft/backend/cpu/backend.hpp"
#include "skillgraft/backend/host_device.hpp"
#include "skillgraft/train/clip.hpp"

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
  T scale = T(1);  // clipping's factor, applied to each gradient element as the update applies it
  SKILLGRAFT_HD bool operator()(std::int64_t j) const {
    const T gj = g[j] * scale;
    const auto e = math(p[j], m[j], v[j], gj);
    return !scalar::is_finite(gj) || !scalar::is_finite(e.m) || !scalar::is_finite(e.v) || !scalar::is_finite(e.p);
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
    const V gj = V::load(g + j) * V(scale), four(T(4));
    const auto e = math.moments(V::load(p + j), V::load(m + j), V::load(v + j), gj);
    const T decay = T(1) + (math.lr_wd < T(0) ? -math.lr_wd : math.lr_wd), inv_eps = T(1) / math.eps;
    const V bound = abs_(e.p) * decay + abs_(math.step * e.m) * inv_eps;
    return not_finite_flag(gj) + not_finite_flag(e.m * four) + not_finite_flag(e.v * four) + not_finite_flag(bound * four);
  }
};
// The update. Scaled: a clipped step's, each gradient element first multiplied by clipping's
// factor and written back (train_step leaves the gradients clipped, as a separate scaling pass
// did), so one pass does what the scaling pass and the update did, with the same bits.
template <class T, bool Scaled = false>
struct adamw_update {
  using value_type = T;
  T* p;
  std::conditional_t<Scaled, T*, const T*> g;
  T* m;
  T* v;
  adamw_math<T> math;
  T scale = T(1);
  SKILLGRAFT_HD void operator()(std::int64_t j) const {
    T gj = g[j];
    if constexpr (Scaled) g[j] = gj = gj * scale;
    const auto e = math(p[j], m[j], v[j], gj);
    m[j] = e.m;
    v[j] = e.v;
    p[j] = e.p;
  }
  template <class V>  // CPU packets: elements j .. j + V::size - 1
  void lanes(std::int64_t j) const {
    V gj = V::load(g + j);
    if constexpr (Scaled) {
      gj = gj * V(scale);
      gj.store(g + j);
    }
    const auto e = math(V::load(p + j), V::load(m + j), V::load(v + j), gj);
    e.m.store(m + j);
    e.v.store(v + j);
    e.p.store(p + j);
  }
};
// True where |p_j| * k is not finite, i.e. |p_j| is above about max / k (and where p_j is NaN).
template <class T>
struct weight_beyond {
  using value_type = T;
  const T* p;
  T k;
  SKILLGRAFT_HD bool operator()(std::int64_t j) const { return !scalar::is_finite(p[j] * k); }
  template <class V>
  V lanes_fail(std::int64_t j) const {
    return not_finite_flag(V::load(p + j) * V(k));
  }
};
template <class T>
struct magnitude {  // |x_i| in double; NaN stays NaN
  const T* x;
  SKILLGRAFT_HD double operator()(std::int64_t i) const {
    const double a = double(x[i]);
    return a < 0 ? -a : a;
  }
};
template <class T>
struct nonnegative_or_infinite {  // v_i in double where v_i >= 0, else (negative, NaN) infinity
  const T* v;
  SKILLGRAFT_HD double operator()(std::int64_t i) const {
    const double a = double(v[i]);
    return a >= 0 ? a : std::numeric_limits<double>::infinity();
  }
};

// Bounds on one tensor's moments, |m_i| <= m and 0 <= v_i <= v for every i, carried from step
// to step so that a clipped step need not read the moments to know that they cannot overflow.
// With every |g_i| <= G, the moments' recurrences hold for the bounds too:
//   m' = b1 m + (1 - b1) G,   v' = b2 v + (1 - b2) G^2        (times 1 + 1e-6 for the roundings)
// and the new weight, |p - (step m / (sqrt(v) c + eps) + lr wd p)| with a denominator of at least
// eps, is finite while |p| (1 + |lr wd|) + |step| m / eps stays below a sixteenth of the range.
struct moment_bounds {
  double m = 0, v = 0;
  template <class T>
  moment_bounds next(const adamw_math<T>& a, double g_bound) const {
    // Relative 1e-6 covers the roundings of normal numbers; a subnormal result is off by up to
    // half of T's smallest subnormal instead (0.9 m can round back to m there), which T's
    // smallest normal, added each step, covers.
    constexpr double rounding = 1 + 1e-6;
    const double tiny = double(std::numeric_limits<T>::min());
    return {(double(a.b1) * m + double(a.one_minus_b1) * g_bound) * rounding + tiny,
            (double(a.b2) * v + double(a.one_minus_b2) * g_bound * g_bound) * rounding + tiny};
  }
  // The largest |p| at which no element's update can overflow, with these (new) bounds; 0 when
  // the bounds, or constants outside AdamW's range, say nothing.
  template <class T>
  double weight_limit(const adamw_math<T>& a) const {
    const double top = double(std::numeric_limits<T>::max()) / 16;
    const bool in_range = a.b1 >= 0 && a.b2 >= 0 && a.one_minus_b1 >= 0 && a.one_minus_b2 >= 0 && a.eps > 0 &&
                          scalar::is_finite(a.inv_sqrt_bc2) && a.inv_sqrt_bc2 >= 0 && scalar::is_finite(a.step) &&
                          scalar::is_finite(a.lr_wd);
    // step m rounded to a subnormal is off by up to T's smallest subnormal, which the division
    // by a small eps magnifies
    const double step = std::abs(double(a.step)),
                 step_term = (step * m + double(std::numeric_limits<T>::denorm_min())) / double(a.eps);
    if (!in_range || !(m <= top && v <= top && step * m <= top && step_term <= top)) return 0;
    return (top - step_term) / (1 + std::abs(double(a.lr_wd)));
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
                        tensor_t(p.shape(), memory_use::optimizer_state), kernels::moment_bounds{}, true});
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
      slots_[i].bounds_known = false;
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
      check_slot(i, name, p);
      refuse_failing_update(name, p, dp, slots_[i], math, T(1));
      ++i;
    });
    if (i != slots_.size()) throw std::logic_error("skillgraft: adamw state was built for another model or recipe");
    ++t_;
    i = 0;
    model.for_each_trainable(w, g, [&](const std::string&, tensor_t& p, tensor_t& dp) {
      auto& s = slots_[i++];
      Backend::for_each_index(std::int64_t(p.size()),
                              kernels::adamw_update<T>{p.data(), dp.data(), s.m.data(), s.v.data(), math});
      s.bounds_known = false;  // nothing bounded this step's gradients
    });
  }

  // One update with clipping's decision (decide_clipping in train/clip.hpp; train_step calls
  // this form): the same weights, moments and clipped gradients, bit for bit, as scale_grads
  // then step(), and the same refusal of an update that would overflow, in fewer passes over
  // memory. The gradient norm bounds every element, so the moments' bounds
  // (kernels::moment_bounds) follow without reading them, and the check before the update reads
  // the weights alone; only where that screen flags a weight does the exact test read every
  // array (step()'s check).
  template <class Model, class Weights, class Grads>
  void step(const Model& model, Weights& w, Grads& g, const clip_decision& clip) {
    const kernels::adamw_math<T> math = next_math();
    const T scale = T(clip.scale());
    // Every |g_i scale| after its rounding: relative 1e-6 for the roundings of normal numbers; the
    // absolute terms for subnormal ones (T's smallest normal) and for squares that underflow in
    // the norm's double sum (a double gradient below 1e-162 adds nothing to it).
    const double g_bound = clip.norm() * double(scale) * (1 + 1e-6) + 1e-150 + double(std::numeric_limits<T>::min());
    std::vector<kernels::moment_bounds> next(slots_.size());
    std::size_t i = 0;
    model.for_each_trainable(w, g, [&](const std::string& name, tensor_t& p, tensor_t& dp) {
      check_slot(i, name, p);
      auto& s = slots_[i];
      if (!s.bounds_known) {
        const auto n = std::int64_t(s.m.size());
        const double m_sum = Backend::template sum_index<double>(n, kernels::magnitude<T>{s.m.data()}),
                     v_sum = Backend::template sum_index<double>(n, kernels::nonnegative_or_infinite<T>{s.v.data()});
        s.bounds = {m_sum * (1 + 1e-6), v_sum * (1 + 1e-6)};
        s.bounds_known = true;
      }
      next[i] = s.bounds.next(math, g_bound);
      const double limit = next[i].weight_limit(math);
      const double k = limit > 0 ? double(std::numeric_limits<T>::max()) / limit : 0;
      if (!(limit > 0) || !(k <= double(std::numeric_limits<T>::max())) ||
          Backend::find_first_index(std::int64_t(p.size()), kernels::weight_beyond<T>{p.data(), T(k)}) >= 0)
        refuse_failing_update(name, p, dp, s, math, scale);
      ++i;
    });
    if (i != slots_.size()) throw std::logic_error("skillgraft: adamw state was built for another model or recipe");
    ++t_;
    i = 0;
    model.for_each_trainable(w, g, [&](const std::string&, tensor_t& p, tensor_t& dp) {
      auto& s = slots_[i];
      const auto n = std::int64_t(p.size());
      if (scale == T(1))
        Backend::for_each_index(n, kernels::adamw_update<T>{p.data(), dp.data(), s.m.data(), s.v.data(), math});
      else
        Backend::for_each_index(
            n, kernels::adamw_update<T, true>{p.data(), dp.data(), s.m.data(), s.v.data(), math, scale});
      s.bounds = next[i++];
      // Bounds that say nothing (moments restored infinite or negative, then updated past the exact
      // test) are read from the moments again next time rather than carried.
      s.bounds_known = std::isfinite(s.bounds.m) && std::isfinite(s.bounds.v);
    });
  }

 private:
  struct slot {
    std::string name;
    tensor_t m, v;
    kernels::moment_bounds bounds;  // zero moments at first
    bool bounds_known = true;       // false after restore() or an unclipped step()
  };
  void check_slot(std::size_t i, const std::string& name, const tensor_t& p) const {
    if (i >= slots_.size() || slots_[i].name != name || !(slots_[i].m.shape() == p.shape()))
      throw std::logic_error("skillgraft: adamw state was built for another model or recipe (at " + name + ")");
  }
  // Throws std::domain_error, naming the first element whose update (of the gradient times
  // scale) is not finite, and why; returns if there is none.
  void refuse_failing_update(const std::string& name, const tensor_t& p, const tensor_t& dp, const slot& s,
                             const kernels::adamw_math<T>& math, T scale) const {
    const auto j = Backend::find_first_index(
        std::int64_t(dp.size()), kernels::update_fails<T>{p.data(), dp.data(), s.m.data(), s.v.data(), math, scale});
    if (j < 0) return;
    const auto at = std::size_t(j);
    const T gj = Backend::value_at(dp, at) * scale;
    if (!std::isfinite(gj))
      throw std::domain_error("skillgraft: non-finite gradient in " + name + " at element " + std::to_string(j) +
                              "; no weight was changed");
    const auto e = math(Backend::value_at(p, at), Backend::value_at(s.m, at), Backend::value_at(s.v, at), gj);
    throw std::domain_error("skillgraft: the gradient of " + name + " at element " + std::to_string(j) + " (" +
                            number(gj) + ") makes the AdamW " +
                            (!std::isfinite(e.m) ? "first moment" : !std::isfinite(e.v) ? "second moment" : "update") +
                            " overflow; no weight was changed (clip the gradients, or lower the loss scale)");
  }
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
