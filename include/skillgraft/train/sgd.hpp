#pragma once
// SGD with momentum (PyTorch convention) and decoupled weight decay, on any backend.
//
//   b = mu b + g          (b = g on the first step)
//   w -= lr (b + wd w)
// Momentum buffers exist only for trainable tensors, like AdamW's moments.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "skillgraft/backend/cpu/backend.hpp"
#include "skillgraft/train/adamw.hpp"

namespace skillgraft::train {

struct sgd_options {
  double lr = 1e-2;
  double momentum = 0.9;
  double weight_decay = 0.0;
};

namespace kernels {
// Scaled: a clipped step's update, each gradient element first multiplied by clipping's factor
// and written back (as a separate scaling pass leaves it), with the same bits.
template <class T, bool Scaled = false>
struct sgd_update {
  T* p;
  std::conditional_t<Scaled, T*, const T*> g;
  T* b;  // null without momentum
  T lr, mu, wd;
  bool first;
  T scale = T(1);
  SKILLGRAFT_HD void operator()(std::int64_t j) const {
    T d = g[j];
    if constexpr (Scaled) g[j] = d = d * scale;
    if (b) d = b[j] = (first ? d : mu * b[j] + d);
    p[j] -= lr * (d + wd * p[j]);
  }
};
}  // namespace kernels

template <class T, class Backend = backend::cpu>
class sgd {
 public:
  using tensor_t = typename Backend::template tensor<T>;

  template <class Model, class Weights, class Grads>
  sgd(const Model& model, Weights& w, Grads& g, sgd_options opt = {}) : opt_(opt) {
    if (opt.momentum > 0)
      model.for_each_trainable(w, g, [&](const std::string& name, tensor_t& p, tensor_t&) {
        slots_.push_back({name, tensor_t(p.shape(), memory_use::optimizer_state)});
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
    model.for_each_trainable(w, g, [&](const std::string& name, tensor_t&, tensor_t& dp) {
      if (Backend::find_first_index(std::int64_t(dp.size()), kernels::not_finite<T>{dp.data()}) >= 0)
        throw std::domain_error("skillgraft: non-finite gradient in " + name + "; no weight was changed");
    });
    update<false>(model, w, g, T(1));
  }
  // With clipping's decision (decide_clipping, train/clip.hpp; train_step calls this form): its
  // finite norm means every gradient element is finite, so no check pass; clipping's factor is
  // applied in the update. The same bits as scale_grads then step().
  template <class Model, class Weights, class Grads>
  void step(const Model& model, Weights& w, Grads& g, const clip_decision& clip) {
    if (T(clip.scale()) == T(1))
      update<false>(model, w, g, T(1));
    else
      update<true>(model, w, g, T(clip.scale()));
  }

 private:
  template <bool Scaled, class Model, class Weights, class Grads>
  void update(const Model& model, Weights& w, Grads& g, T scale) {
    const T lr = T(opt_.lr), mu = T(opt_.momentum), wd = T(opt_.weight_decay);
    std::size_t i = 0;
    model.for_each_trainable(w, g, [&](const std::string& name, tensor_t& p, tensor_t& dp) {
      T* b = nullptr;
      if (opt_.momentum > 0) {
        if (i >= slots_.size() || slots_[i].name != name)
          throw std::logic_error("skillgraft: sgd state was built for another model or recipe (at " + name + ")");
        b = slots_[i++].b.data();
      }
      Backend::for_each_index(std::int64_t(p.size()),
                              kernels::sgd_update<T, Scaled>{p.data(), dp.data(), b, lr, mu, wd, t_ == 0, scale});
    });
    ++t_;
  }
  struct slot {
    std::string name;
    tensor_t b;
  };
  sgd_options opt_;
  std::vector<slot> slots_;
  long t_ = 0;
};

}  // namespace skillgraft::train
