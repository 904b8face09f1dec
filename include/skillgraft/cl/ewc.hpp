#pragma once
// Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al.
// 2018): a quadratic pull towards the weights a task ended with, each weight weighted by
// how much the task's log-likelihood depends on it (the diagonal of the Fisher).
//
//   F_j = (1/N) Σ_n ( ∂ log p(y_n | x_n; θ) / ∂θ_j )²        one term per example n
//   penalty = λ Σ_j F_j (θ_j − θ*_j)²,   ∂penalty/∂θ_j = 2 λ F_j (θ_j − θ*_j)
//   online:  F ← γ F_old + F_new,  θ* ← θ   after each task
//
// Convention: the penalty is λ·Σ F·(θ−θ*)² exactly — no ½. Kirkpatrick et al. write
// (λ/2)·Σ F·(θ−θ*)², so their λ is twice ours.
//
// An example is one sequence of a micro-batch; log p(y_n | x_n) sums over its target
// positions (teacher-forced), or averages over them with fisher_options::per_token. Each
// example gets its own forward and backward: the diagonal of the Fisher needs the square
// of each example's gradient, which a batched gradient (their sum) cannot give.
//   empirical: y = the data's labels (the "empirical Fisher").
//   sampled:   y_t ~ p(· | x, y_<t; θ) at every target position, from a seeded generator
//              (the true Fisher's Monte Carlo estimate; `samples` draws per example).
//
// State exists only for the tensors the recipe trains: F and θ* (method_state), i.e.
// 2 × trainable elements × sizeof(T). Frozen tensors are neither copied nor read.
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/model/parameters.hpp"
#include "skillgraft/train/clip.hpp"
#include "skillgraft/train/cross_entropy.hpp"
#include "skillgraft/train/step.hpp"

namespace skillgraft::cl {

using cpu::tensor;

enum class fisher_kind { empirical, sampled };

struct fisher_options {
  fisher_kind kind = fisher_kind::empirical;
  std::uint64_t seed = 0;   // sampled: the labels' generator
  int samples = 1;          // sampled: label draws per example (each its own backward)
  bool per_token = false;   // log-likelihood averaged over an example's targets instead of summed
  std::size_t chunk = 256;  // rows of logits held at once by the loss
};

// The diagonal of a Fisher, one tensor per trainable tensor (method_state).
template <class T>
class diagonal_fisher {
 public:
  // Zeros, shaped like the tensors `model` trains.
  template <class Model>
  diagonal_fisher(const Model& model, const model::lm_weights<T>& w) {
    model::for_each_trainable_weight(model, w, [&](const std::string& name, const tensor<T>& t) {
      index_[name] = slots_.size();
      slots_.push_back({name, tensor<T>(t.shape(), memory_use::method_state)});
    });
  }

  std::size_t size() const { return slots_.size(); }
  std::size_t state_bytes() const {
    std::size_t b = 0;
    for (const auto& s : slots_) b += s.value.bytes();
    return b;
  }
  // Gradients averaged into it (examples × samples).
  std::size_t examples() const { return examples_; }
  void set_examples(std::size_t n) { examples_ = n; }
  const tensor<T>* find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &slots_[it->second].value;
  }
  // f(name, tensor&) / f(name, const tensor&), in the model's trainable order.
  template <class F>
  void for_each(F&& f) {
    for (auto& s : slots_) f(s.name, s.value);
  }
  template <class F>
  void for_each(F&& f) const {
    for (const auto& s : slots_) f(s.name, s.value);
  }

 private:
  struct slot {
    std::string name;
    tensor<T> value;
  };
  std::vector<slot> slots_;
  std::map<std::string, std::size_t> index_;
  std::size_t examples_ = 0;
};

namespace detail {
// Row b of a micro-batch as a batch of one: ids, targets and (if any) soft-token prefix.
template <class T>
struct one_example {
  token_ids ids, targets;
  tensor<T> prefix;
  one_example(const train::micro_batch<T>& mb, std::size_t b) {
    const std::size_t S = mb.ids.shape(1), P = mb.targets.shape(1);
    ids = token_ids::from_shape({1, S});
    targets = token_ids::from_shape({1, P});
    for (std::size_t s = 0; s < S; ++s) ids(0, s) = mb.ids(b, s);
    for (std::size_t s = 0; s < P; ++s) targets(0, s) = mb.targets(b, s);
    if (mb.prefix && !mb.prefix->empty()) {
      const auto& p = *mb.prefix;
      if (p.rank() != 3 || p.dim(0) != mb.ids.shape(0))
        throw std::invalid_argument("skillgraft: prefix embeddings have shape " + p.shape().str() + ", expected [" +
                                    std::to_string(mb.ids.shape(0)) + ", prefix, hidden]");
      const std::size_t n = p.dim(1) * p.dim(2);
      prefix = tensor<T>({1, p.dim(1), p.dim(2)}, memory_use::workspace);
      std::copy_n(p.data() + b * n, n, prefix.data());
    }
  }
  const tensor<T>* prefix_ptr() const { return prefix.empty() ? nullptr : &prefix; }
};

// A uniform double in [0, 1) from 53 random bits: the same draws on every standard library
// (std::uniform_real_distribution's algorithm is implementation-defined).
inline double unit_draw(std::mt19937_64& rng) { return double(rng() >> 11) * 0x1.0p-53; }

// y ~ softmax(h_i W^T) at every target position i of a batch of one (teacher-forced).
template <class T>
token_ids sample_targets(const tensor<T>& h, const tensor<T>& head, const token_ids& targets, std::mt19937_64& rng) {
  token_ids y = targets;
  const std::size_t V = head.dim(0);
  Eigen::VectorXd z(Eigen::Index(V), 1);
  for (std::size_t s = 0; s < targets.shape(1); ++s) {
    if (targets(0, s) == ignore_index) continue;
    z = (head.mat() * h.mat().row(Eigen::Index(s)).transpose()).template cast<double>();
    const double mx = z.maxCoeff();
    double sum = 0;
    for (Eigen::Index j = 0; j < z.size(); ++j) sum += (z(j) = std::exp(z(j) - mx));
    // Inverse CDF; the last label takes whatever rounding leaves over.
    const double u = unit_draw(rng) * sum;
    double c = 0;
    std::int64_t pick = std::int64_t(V) - 1;
    for (Eigen::Index j = 0; j < z.size(); ++j) {
      c += z(j);
      if (u < c) {
        pick = std::int64_t(j);
        break;
      }
    }
    y(0, s) = pick;
  }
  return y;
}
}  // namespace detail

// Estimates the diagonal Fisher of `model`'s trainable tensors on a task's data, at w.
// Examples without any target carry no likelihood and are not counted. Uses a gradient
// buffer of its own (memory_use::gradients) and leaves w unchanged.
template <class Model, class T>
diagonal_fisher<T> estimate_fisher(const Model& model, model::lm_weights<T>& w,
                                   std::span<const train::micro_batch<std::type_identity_t<T>>> data,
                                   fisher_options o = {}) {
  if (o.samples < 1)
    throw std::invalid_argument("skillgraft: Fisher samples per example must be at least 1 (got " +
                                std::to_string(o.samples) + ")");
  diagonal_fisher<T> fisher(model, w);
  std::vector<tensor<T>*> dst;  // the fisher's tensors, in the model's trainable order
  fisher.for_each([&](const std::string&, tensor<T>& f) { dst.push_back(&f); });
  auto g = model.make_grads(w);
  std::mt19937_64 rng(o.seed);
  const int draws = o.kind == fisher_kind::sampled ? o.samples : 1;
  std::size_t n = 0;
  for (const auto& mb : data) {
    if (mb.targets.shape(0) != mb.ids.shape(0))
      throw std::invalid_argument("skillgraft: a micro-batch has " + std::to_string(mb.ids.shape(0)) +
                                  " sequences of ids but " + std::to_string(mb.targets.shape(0)) + " of targets");
    for (std::size_t b = 0; b < mb.ids.shape(0); ++b) {
      detail::one_example<T> ex(mb, b);
      std::size_t count = 0;
      for (auto y : ex.targets) count += (y != ignore_index);
      if (count == 0) continue;
      typename Model::saved_t saved;
      auto h = model.forward(w, ex.ids, saved, ex.prefix_ptr());
      for (int k = 0; k < draws; ++k) {
        train::zero_grads(model, w, g);
        const token_ids y =
            o.kind == fisher_kind::sampled ? detail::sample_targets(h, w.head(), ex.targets, rng) : ex.targets;
        // normaliser 1: the gradient of Σ_t −log p(y_t) (its sign does not matter once squared).
        auto r = train::masked_cross_entropy(h, w.head(), y, model.head_grad(g),
                                             {.chunk = o.chunk, .want_dh = true,
                                              .normaliser = o.per_token ? count : std::size_t(1)});
        model.backward(w, saved, r.dh, g);
        // F += g²
        std::size_t i = 0;
        model.for_each_trainable(w, g, [&](const std::string&, tensor<T>&, tensor<T>& dp) {
          dst[i++]->vec().array() += dp.vec().array().square();
        });
        ++n;
      }
    }
  }
  if (n == 0) throw std::invalid_argument("skillgraft: the Fisher's data has no target tokens (all ignore_index)");
  const T inv = T(1.0 / double(n));
  fisher.for_each([&](const std::string& name, tensor<T>& f) {
    f.vec() *= inv;
    for (std::size_t j = 0; j < f.size(); ++j)
      if (!std::isfinite(f[j]))
        throw std::domain_error("skillgraft: the Fisher of " + name + " is not finite at element " + std::to_string(j));
  });
  fisher.set_examples(n);
  return fisher;
}

struct ewc_options {
  double lambda = 1.0;  // penalty = λ Σ F (θ − θ*)²  (no ½)
  double gamma = 1.0;   // online EWC decay: F ← γ F_old + F_new (1: Fishers add up)
};

// F and θ* for the recipe's trainable tensors, and the penalty they define.
template <class T>
class ewc {
 public:
  // F = 0 (no penalty yet), θ* = w's trainable tensors.
  template <class Model>
  ewc(const Model& model, const model::lm_weights<T>& w, ewc_options o = {}) {
    check_lambda(o.lambda);
    check_gamma(o.gamma);
    opt_ = o;
    model::for_each_trainable_weight(model, w, [&](const std::string& name, const tensor<T>& t) {
      index_[name] = slots_.size();
      slots_.push_back({name, tensor<T>(t.shape(), memory_use::method_state), t.clone(memory_use::method_state)});
    });
  }

  double lambda() const { return opt_.lambda; }
  double gamma() const { return opt_.gamma; }
  void set_lambda(double l) {
    check_lambda(l);
    opt_.lambda = l;
  }
  void set_gamma(double g) {
    check_gamma(g);
    opt_.gamma = g;
  }
  int tasks() const { return tasks_; }
  std::size_t size() const { return slots_.size(); }
  // 2 × trainable elements × sizeof(T).
  std::size_t state_bytes() const {
    std::size_t b = 0;
    for (const auto& s : slots_) b += s.fisher.bytes() + s.anchor.bytes();
    return b;
  }
  const tensor<T>* fisher(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &slots_[it->second].fisher;
  }
  const tensor<T>* anchor(const std::string& name) const {  // θ*
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &slots_[it->second].anchor;
  }

  // After a task: F ← γ F + F_new, θ* ← w. The Fisher must be of this recipe's tensors,
  // finite and non-negative; all is checked before anything changes.
  template <class Model>
  void consolidate(const Model& model, const model::lm_weights<T>& w, const diagonal_fisher<T>& f_new) {
    std::size_t i = 0;
    f_new.for_each([&](const std::string& name, const tensor<T>& f) {
      if (i >= slots_.size() || slots_[i].name != name)
        throw std::invalid_argument(
            "skillgraft: the Fisher was estimated under another recipe or model: it has " + name +
            (i < slots_.size() ? " where the EWC state has " + slots_[i].name : std::string(", which the EWC state lacks")));
      if (!(f.shape() == slots_[i].fisher.shape()))
        throw std::invalid_argument("skillgraft: the Fisher of " + name + " has shape " + f.shape().str() +
                                    ", the EWC state's " + slots_[i].fisher.shape().str());
      for (std::size_t j = 0; j < f.size(); ++j)
        if (!(std::isfinite(f[j]) && f[j] >= T(0)))
          throw std::invalid_argument("skillgraft: the Fisher of " + name + " is " + std::to_string(double(f[j])) +
                                      " at element " + std::to_string(j) + ", expected finite and >= 0");
      ++i;
    });
    if (i != slots_.size())
      throw std::invalid_argument("skillgraft: the Fisher has " + std::to_string(i) + " tensors, the EWC state " +
                                  std::to_string(slots_.size()) + " (estimated under another recipe or model)");
    check_model(model, w);
    i = 0;
    const T gamma = T(opt_.gamma);
    f_new.for_each([&](const std::string&, const tensor<T>& f) {
      auto& s = slots_[i++];
      s.fisher.vec() = gamma * s.fisher.vec() + f.vec();
    });
    i = 0;
    model::for_each_trainable_weight(model, w, [&](const std::string&, const tensor<T>& t) {
      std::copy_n(t.data(), t.size(), slots_[i++].anchor.data());
    });
    ++tasks_;
  }

  // Estimates the Fisher on the task's data at w, then consolidates it.
  template <class Model>
  void consolidate(const Model& model, model::lm_weights<T>& w, std::span<const train::micro_batch<T>> data,
                   fisher_options o = {}) {
    consolidate(model, w, estimate_fisher(model, w, data, o));
  }

  // λ Σ F (θ − θ*)², summed in double.
  template <class Model>
  double penalty(const Model& model, const model::lm_weights<T>& w) const {
    check_model(model, w);
    double p = 0;
    std::size_t i = 0;
    model::for_each_trainable_weight(model, w, [&](const std::string&, const tensor<T>& t) {
      const auto& s = slots_[i++];
      const auto d = (t.vec() - s.anchor.vec()).template cast<double>();
      p += (s.fisher.vec().template cast<double>().array() * d.array().square()).sum();
    });
    return opt_.lambda * p;
  }

  // g += 2 λ F (θ − θ*) for every trainable tensor; returns the penalty.
  template <class Model>
  double add_penalty_gradient(const Model& model, typename Model::weights_t& w, typename Model::grads_t& g) const {
    check_model(model, w);
    if (tasks_ == 0 || opt_.lambda == 0.0) return 0.0;  // F = 0 or λ = 0: nothing to add
    double p = 0;
    std::size_t i = 0;
    const T two_lambda = T(2.0 * opt_.lambda);
    model.for_each_trainable(w, g, [&](const std::string&, tensor<T>& t, tensor<T>& dt) {
      const auto& s = slots_[i++];
      const T* th = t.data();
      const T* a = s.anchor.data();
      const T* f = s.fisher.data();
      T* d = dt.data();
      for (std::size_t j = 0; j < t.size(); ++j) {
        const T diff = th[j] - a[j];
        d[j] += two_lambda * f[j] * diff;
        p += double(f[j]) * double(diff) * double(diff);
      }
    });
    return opt_.lambda * p;
  }

 private:
  static void check_lambda(double l) {
    if (!(l >= 0.0 && std::isfinite(l)))
      throw std::invalid_argument("skillgraft: EWC lambda is " + std::to_string(l) + ", expected a finite value >= 0");
  }
  static void check_gamma(double g) {
    if (!(g >= 0.0 && g <= 1.0))
      throw std::invalid_argument("skillgraft: online EWC gamma is " + std::to_string(g) + ", expected a value in [0, 1]");
  }
  // The model's recipe must train exactly the tensors this state was built for.
  template <class Model>
  void check_model(const Model& model, const model::lm_weights<T>& w) const {
    std::size_t i = 0;
    model::for_each_trainable_weight(model, w, [&](const std::string& name, const tensor<T>& t) {
      if (i >= slots_.size() || slots_[i].name != name)
        throw std::invalid_argument(
            "skillgraft: the EWC state was built under another recipe or model: the model trains " + name +
            (i < slots_.size() ? " where the EWC state has " + slots_[i].name : std::string(", which the EWC state lacks")));
      if (!(t.shape() == slots_[i].anchor.shape()))
        throw std::invalid_argument("skillgraft: " + name + " has shape " + t.shape().str() + ", the EWC state's " +
                                    slots_[i].anchor.shape().str());
      ++i;
    });
    if (i != slots_.size())
      throw std::invalid_argument("skillgraft: the model's recipe trains " + std::to_string(i) +
                                  " tensors, the EWC state holds " + std::to_string(slots_.size()) +
                                  " (built under another recipe or model)");
  }

  struct slot {
    std::string name;
    tensor<T> fisher;  // F
    tensor<T> anchor;  // θ*
  };
  ewc_options opt_;
  std::vector<slot> slots_;
  std::map<std::string, std::size_t> index_;
  int tasks_ = 0;
};

// EWC as a train_step objective: the inner objective (default: masked cross-entropy)
// forms each micro-batch's loss; finish() adds 2 λ F (θ − θ*) to the gradients once per
// step, after every micro-batch's backward, and returns the penalty to add to the loss.
template <class T, class Inner = train::masked_ce_objective>
struct ewc_objective {
  const ewc<T>* state = nullptr;
  Inner inner{};

  template <class Model, class W>
  auto micro(const Model& model, W& w, typename Model::grads_t& g, const train::micro_batch<T>& mb, const tensor<T>& h,
             const token_ids& targets, std::size_t normaliser) const {
    return inner.micro(model, w, g, mb, h, targets, normaliser);
  }
  template <class Model>
  double finish(const Model& model, typename Model::weights_t& w, typename Model::grads_t& g) const {
    if (!state) throw std::logic_error("skillgraft: ewc_objective has no EWC state");
    double extra = 0;
    if constexpr (requires { inner.finish(model, w, g); }) extra = inner.finish(model, w, g);
    return extra + state->add_penalty_gradient(model, w, g);
  }
};

}  // namespace skillgraft::cl
