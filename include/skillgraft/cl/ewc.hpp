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
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "skillgraft/backend/host_device.hpp"
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

// Element functors of the Fisher and the penalty (SKILLGRAFT_HD: every backend runs them).
namespace ewc_kernels {
template <class T>
struct add_square {  // f += g²
  T* f;
  const T* g;
  SKILLGRAFT_HD void operator()(std::int64_t j) const { f[j] += g[j] * g[j]; }
};
template <class T>
struct decay_add {  // F ← γ F + F_new
  T* f;
  const T* f_new;
  T gamma;
  SKILLGRAFT_HD void operator()(std::int64_t j) const { f[j] = gamma * f[j] + f_new[j]; }
};
template <class T>
struct assign {  // θ* ← θ
  T* to;
  const T* from;
  SKILLGRAFT_HD void operator()(std::int64_t j) const { to[j] = from[j]; }
};
template <class T>
struct weighted_square {  // F (θ − θ*)², in double
  const T* f;
  const T* theta;
  const T* anchor;
  SKILLGRAFT_HD double operator()(std::int64_t j) const {
    const double d = double(theta[j] - anchor[j]);
    return double(f[j]) * d * d;
  }
};
template <class T>
struct pull {  // g += 2 λ F (θ − θ*)
  T* g;
  const T* f;
  const T* theta;
  const T* anchor;
  T two_lambda;
  SKILLGRAFT_HD void operator()(std::int64_t j) const { g[j] += two_lambda * f[j] * (theta[j] - anchor[j]); }
};
template <class T>
struct not_finite {
  const T* f;
  SKILLGRAFT_HD bool operator()(std::int64_t j) const { return !scalar::is_finite(f[j]); }
};
template <class T>
struct not_a_fisher {  // not finite or negative
  const T* f;
  SKILLGRAFT_HD bool operator()(std::int64_t j) const { return !(scalar::is_finite(f[j]) && f[j] >= T(0)); }
};
}  // namespace ewc_kernels

// The diagonal of a Fisher, one tensor per trainable tensor (method_state), on the backend
// of the weights it was estimated at.
template <class T, class Backend = backend::cpu>
class diagonal_fisher {
 public:
  using tensor_t = typename Backend::template tensor<T>;

  // Zeros, shaped like the tensors `model` trains.
  template <class Model>
  diagonal_fisher(const Model& model, const model::lm_weights<T, Backend>& w) {
    model::for_each_trainable_weight(model, w, [&](const std::string& name, const tensor_t& t) {
      index_[name] = slots_.size();
      slots_.push_back({name, tensor_t(t.shape(), memory_use::method_state)});
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
  const tensor_t* find(const std::string& name) const {
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
    tensor_t value;
  };
  std::vector<slot> slots_;
  std::map<std::string, std::size_t> index_;
  std::size_t examples_ = 0;
};

namespace detail {
// Row b of a micro-batch as a batch of one: ids, targets and (if any) soft-token prefix.
template <class T, class Backend>
struct one_example {
  using tensor_t = typename Backend::template tensor<T>;
  token_ids ids, targets;
  tensor_t prefix;
  one_example(const train::micro_batch<T, Backend>& mb, std::size_t b) {
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
      prefix = tensor_t({1, p.dim(1), p.dim(2)}, memory_use::workspace);
      Backend::gather_rows(p, p.dim(1) * p.dim(2), {std::int64_t(b)}, prefix);  // sequence b as one row
    }
  }
  const tensor_t* prefix_ptr() const { return prefix.empty() ? nullptr : &prefix; }
};

// A uniform double in [0, 1) from 53 random bits: the same draws on every standard library
// (std::uniform_real_distribution's algorithm is implementation-defined).
inline double unit_draw(std::mt19937_64& rng) { return double(rng() >> 11) * 0x1.0p-53; }

// y ~ softmax(h_i W^T) at every target position i of a batch of one (teacher-forced). The
// logits of all positions are one GEMM on the backend; the draws are made on the host.
template <class T, template <class> class Tensor>
token_ids sample_targets(const Tensor<T>& h, const Tensor<T>& head, const token_ids& targets, std::mt19937_64& rng) {
  using B = typename backend_of<Tensor<T>>::type;
  token_ids y = targets;
  const std::size_t V = head.dim(0), d = head.dim(1), S = targets.shape(1);
  Tensor<T> z({S, V}, memory_use::workspace);
  B::gemm("Fisher: z = h W^T", op::n, op::t, int(S), int(V), int(d), T(1), h.data(), int(d), head.data(), int(d), T(0),
          z.data(), int(V));
  cpu::tensor<T> zh({S, V}, memory_use::workspace);
  B::download(z, zh);
  std::vector<double> p(V);
  for (std::size_t s = 0; s < S; ++s) {
    if (targets(0, s) == ignore_index) continue;
    const T* zs = zh.data() + s * V;
    double mx = double(zs[0]);
    for (std::size_t j = 1; j < V; ++j) mx = std::max(mx, double(zs[j]));
    double sum = 0;
    for (std::size_t j = 0; j < V; ++j) sum += (p[j] = std::exp(double(zs[j]) - mx));
    // Inverse CDF; the last label takes whatever rounding leaves over.
    const double u = unit_draw(rng) * sum;
    double c = 0;
    std::int64_t pick = std::int64_t(V) - 1;
    for (std::size_t j = 0; j < V; ++j) {
      c += p[j];
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
template <class Model, class T, class Backend>
diagonal_fisher<T, Backend> estimate_fisher(const Model& model, model::lm_weights<T, Backend>& w,
                                            std::type_identity_t<std::span<const train::micro_batch<T, Backend>>> data,
                                            fisher_options o = {}) {
  using tensor_t = typename Backend::template tensor<T>;
  if (o.samples < 1)
    throw std::invalid_argument("skillgraft: Fisher samples per example must be at least 1 (got " +
                                std::to_string(o.samples) + ")");
  diagonal_fisher<T, Backend> fisher(model, w);
  std::vector<tensor_t*> dst;  // the fisher's tensors, in the model's trainable order
  fisher.for_each([&](const std::string&, tensor_t& f) { dst.push_back(&f); });
  auto g = model.make_grads(w);
  std::mt19937_64 rng(o.seed);
  const int draws = o.kind == fisher_kind::sampled ? o.samples : 1;
  std::size_t n = 0;
  for (const auto& mb : data) {
    if (mb.targets.shape(0) != mb.ids.shape(0))
      throw std::invalid_argument("skillgraft: a micro-batch has " + std::to_string(mb.ids.shape(0)) +
                                  " sequences of ids but " + std::to_string(mb.targets.shape(0)) + " of targets");
    for (std::size_t b = 0; b < mb.ids.shape(0); ++b) {
      detail::one_example<T, Backend> ex(mb, b);
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
        model.for_each_trainable(w, g, [&](const std::string&, tensor_t&, tensor_t& dp) {
          Backend::for_each_index(std::int64_t(dp.size()), ewc_kernels::add_square<T>{dst[i++]->data(), dp.data()});
        });
        ++n;
      }
    }
  }
  if (n == 0) throw std::invalid_argument("skillgraft: the Fisher's data has no target tokens (all ignore_index)");
  const T inv = T(1.0 / double(n));
  fisher.for_each([&](const std::string& name, tensor_t& f) {
    const auto n_f = std::int64_t(f.size());
    Backend::for_each_index(n_f, train::kernels::scale_by<T>{f.data(), inv});
    if (const auto j = Backend::find_first_index(n_f, ewc_kernels::not_finite<T>{f.data()}); j >= 0)
      throw std::domain_error("skillgraft: the Fisher of " + name + " is not finite at element " + std::to_string(j));
  });
  fisher.set_examples(n);
  return fisher;
}

struct ewc_options {
  double lambda = 1.0;  // penalty = λ Σ F (θ − θ*)²  (no ½)
  double gamma = 1.0;   // online EWC decay: F ← γ F_old + F_new (1: Fishers add up)
};

// F and θ* for the recipe's trainable tensors, and the penalty they define; they live on the
// backend of the weights.
template <class T, class Backend = backend::cpu>
class ewc {
 public:
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = model::lm_weights<T, Backend>;

  // F = 0 (no penalty yet), θ* = w's trainable tensors.
  template <class Model>
  ewc(const Model& model, const weights_t& w, ewc_options o = {}) {
    check_lambda(o.lambda);
    check_gamma(o.gamma);
    opt_ = o;
    model::for_each_trainable_weight(model, w, [&](const std::string& name, const tensor_t& t) {
      index_[name] = slots_.size();
      slots_.push_back({name, tensor_t(t.shape(), memory_use::method_state), t.clone(memory_use::method_state)});
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
  const tensor_t* fisher(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &slots_[it->second].fisher;
  }
  const tensor_t* anchor(const std::string& name) const {  // θ*
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &slots_[it->second].anchor;
  }

  // After a task: F ← γ F + F_new, θ* ← w. The Fisher must be of this recipe's tensors,
  // finite and non-negative; all is checked before anything changes.
  template <class Model>
  void consolidate(const Model& model, const weights_t& w, const diagonal_fisher<T, Backend>& f_new) {
    std::size_t i = 0;
    f_new.for_each([&](const std::string& name, const tensor_t& f) {
      if (i >= slots_.size() || slots_[i].name != name)
        throw std::invalid_argument(
            "skillgraft: the Fisher was estimated under another recipe or model: it has " + name +
            (i < slots_.size() ? " where the EWC state has " + slots_[i].name : std::string(", which the EWC state lacks")));
      if (!(f.shape() == slots_[i].fisher.shape()))
        throw std::invalid_argument("skillgraft: the Fisher of " + name + " has shape " + f.shape().str() +
                                    ", the EWC state's " + slots_[i].fisher.shape().str());
      if (const auto j = Backend::find_first_index(std::int64_t(f.size()), ewc_kernels::not_a_fisher<T>{f.data()});
          j >= 0)
        throw std::invalid_argument("skillgraft: the Fisher of " + name + " is " +
                                    std::to_string(double(Backend::value_at(f, std::size_t(j)))) + " at element " +
                                    std::to_string(j) + ", expected finite and >= 0");
      ++i;
    });
    if (i != slots_.size())
      throw std::invalid_argument("skillgraft: the Fisher has " + std::to_string(i) + " tensors, the EWC state " +
                                  std::to_string(slots_.size()) + " (estimated under another recipe or model)");
    check_model(model, w);
    i = 0;
    const T gamma = T(opt_.gamma);
    f_new.for_each([&](const std::string&, const tensor_t& f) {
      auto& s = slots_[i++];
      Backend::for_each_index(std::int64_t(f.size()), ewc_kernels::decay_add<T>{s.fisher.data(), f.data(), gamma});
    });
    i = 0;
    model::for_each_trainable_weight(model, w, [&](const std::string&, const tensor_t& t) {
      Backend::for_each_index(std::int64_t(t.size()), ewc_kernels::assign<T>{slots_[i++].anchor.data(), t.data()});
    });
    ++tasks_;
  }

  // Estimates the Fisher on the task's data at w, then consolidates it.
  template <class Model>
  void consolidate(const Model& model, weights_t& w, std::span<const train::micro_batch<T, Backend>> data,
                   fisher_options o = {}) {
    consolidate(model, w, estimate_fisher(model, w, data, o));
  }

  // λ Σ F (θ − θ*)², summed in double.
  template <class Model>
  double penalty(const Model& model, const weights_t& w) const {
    check_model(model, w);
    double p = 0;
    std::size_t i = 0;
    model::for_each_trainable_weight(model, w, [&](const std::string&, const tensor_t& t) {
      const auto& s = slots_[i++];
      p += Backend::template sum_index<double>(
          std::int64_t(t.size()), ewc_kernels::weighted_square<T>{s.fisher.data(), t.data(), s.anchor.data()});
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
    model.for_each_trainable(w, g, [&](const std::string&, tensor_t& t, tensor_t& dt) {
      const auto& s = slots_[i++];
      const auto n = std::int64_t(t.size());
      p += Backend::template sum_index<double>(n, ewc_kernels::weighted_square<T>{s.fisher.data(), t.data(), s.anchor.data()});
      Backend::for_each_index(n, ewc_kernels::pull<T>{dt.data(), s.fisher.data(), t.data(), s.anchor.data(), two_lambda});
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
  void check_model(const Model& model, const weights_t& w) const {
    std::size_t i = 0;
    model::for_each_trainable_weight(model, w, [&](const std::string& name, const tensor_t& t) {
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
    tensor_t fisher;  // F
    tensor_t anchor;  // θ*
  };
  ewc_options opt_;
  std::vector<slot> slots_;
  std::map<std::string, std::size_t> index_;
  int tasks_ = 0;
};

// EWC as a train_step objective: the inner objective (default: masked cross-entropy)
// forms each micro-batch's loss; finish() adds 2 λ F (θ − θ*) to the gradients once per
// step, after every micro-batch's backward, and returns the penalty to add to the loss.
template <class T, class Inner = train::masked_ce_objective, class Backend = backend::cpu>
struct ewc_objective {
  const ewc<T, Backend>* state = nullptr;
  Inner inner{};
  // The penalty reads no activation: the rows the inner objective reads are all it needs.
  static constexpr bool reads_target_rows_only = train::reads_target_rows_only<Inner>;

  template <class Model, class W>
  auto micro(const Model& model, W& w, typename Model::grads_t& g, const train::micro_batch<T, Backend>& mb,
             const typename Backend::template tensor<T>& h, const token_ids& targets, std::size_t normaliser) const {
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
