#pragma once
// WiSE-FT (Wortsman et al. 2022): weight-space ensembling of a model before and after
// fine-tuning, and its sequential form across a sequence of tasks.
//
//   θ = (1 − α) θ_before + α θ_after                  (per tensor; α may differ by group)
//   sequential:  θ̄_0 = θ_pretrained,  θ̄_k = ½ (θ̄_{k−1} + θ_k),  weights ← θ̄_k after task k
//                so θ̄_3 = θ_0/8 + θ_1/8 + θ_2/4 + θ_3/2.
//
// Only the tensors the recipe trains are copied or touched: a frozen tensor is the same
// before and after fine-tuning, so its interpolation is itself, and it is shared, never
// copied, never written (bit-identical afterwards). Sums are formed in fp32 (double when
// T is double) so a reduced-precision T does not round twice.
#include <cmath>
#include <concepts>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "skillgraft/backend/host_device.hpp"
#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/model/parameters.hpp"

namespace skillgraft::cl {

using cpu::tensor;

// The groups α can be chosen by. LoRA adapters belong to their projection's group; a tied
// head is embed_tokens and so takes the embedding's α.
enum class param_group { attention, mlp, norm, embedding, head };

inline std::string_view group_name(param_group g) {
  switch (g) {
    case param_group::attention: return "attention";
    case param_group::mlp: return "mlp";
    case param_group::norm: return "norm";
    case param_group::embedding: return "embedding";
    case param_group::head: return "head";
  }
  return "?";
}

template <class Tag>
constexpr param_group group_of() {
  if constexpr (requires { typename Tag::base; }) {  // lora<P>
    return group_of<typename Tag::base>();
  } else if constexpr (is_residual_gate_v<Tag>) {  // a GateSkip gate goes with its branch
    return std::is_same_v<typename Tag::branch, branch::attention> ? param_group::attention : param_group::mlp;
  } else if constexpr (std::is_same_v<Tag, proj::q> || std::is_same_v<Tag, proj::k> || std::is_same_v<Tag, proj::v> ||
                       std::is_same_v<Tag, proj::o>) {
    return param_group::attention;
  } else if constexpr (std::is_same_v<Tag, proj::gate> || std::is_same_v<Tag, proj::up> ||
                       std::is_same_v<Tag, proj::down> || std::is_same_v<Tag, group::act_range> ||
                       std::is_same_v<Tag, group::router>) {  // the MLP policies' own tensors
    return param_group::mlp;
  } else if constexpr (std::is_same_v<Tag, group::attn_norm> || std::is_same_v<Tag, group::mlp_norm> ||
                       std::is_same_v<Tag, group::final_norm>) {
    return param_group::norm;
  } else if constexpr (std::is_same_v<Tag, group::embed>) {
    return param_group::embedding;
  } else {
    static_assert(std::is_same_v<Tag, group::lm_head>, "skillgraft: this tag has no WiSE-FT group (not a language-model tensor)");
    return param_group::head;
  }
}

// α per group. Any callable double(const std::string& hf_name, param_group) — or
// double(const std::string& hf_name) — or a plain number (the same α everywhere) works too.
struct group_alpha {
  double attention = 1.0;
  double mlp = 1.0;
  double norm = 1.0;
  double embedding = 1.0;
  double head = 1.0;
  double operator()(const std::string&, param_group g) const {
    switch (g) {
      case param_group::attention: return attention;
      case param_group::mlp: return mlp;
      case param_group::norm: return norm;
      case param_group::embedding: return embedding;
      case param_group::head: return head;
    }
    return 1.0;
  }
};

namespace detail {
// f(name, tensor&, param_group) for each tensor `model`'s recipe trains, in the order of
// model::for_each_trainable_weight (which does not pass the tag along).
template <class Model, class W, class F>
void for_each_trainable_grouped(const Model& model, W& w, F&& f) {
  model::for_each_parameter(w, [&](const std::string& name, auto& t, auto tag, int layer) {
    using Tag = typename decltype(tag)::type;
    if constexpr (trains_v<Tag, typename Model::recipe_type>)
      if (layer < 0 || model.stack().layer_trains(layer)) f(name, t, group_of<Tag>());
  });
}

template <class A>
double alpha_for(const A& alpha, const std::string& name, param_group g) {
  if constexpr (std::is_arithmetic_v<A>) {
    return double(alpha);
  } else if constexpr (std::is_invocable_r_v<double, const A&, const std::string&, param_group>) {
    return double(alpha(name, g));
  } else {
    static_assert(std::is_invocable_r_v<double, const A&, const std::string&>,
                  "skillgraft: WiSE-FT alpha must be a number, group_alpha, or a callable "
                  "double(const std::string& name, param_group) or double(const std::string& name)");
    return double(alpha(name));
  }
}

inline void check_alpha(double a, const std::string& name) {
  if (!(a >= 0.0 && a <= 1.0))
    throw std::invalid_argument("skillgraft: WiSE-FT alpha for " + name + " is " + std::to_string(a) +
                                ", expected a value in [0, 1]");
}

template <class T>
struct mix_kernel {  // out = wb b + wa a in Acc
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  T* out;
  const T* b;
  const T* a;
  acc_t wb, wa;
  SKILLGRAFT_HD void operator()(std::int64_t j) const { out[j] = T(wb * acc_t(b[j]) + wa * acc_t(a[j])); }
};
template <class T>
struct copy_kernel {
  T* out;
  const T* in;
  SKILLGRAFT_HD void operator()(std::int64_t j) const { out[j] = in[j]; }
};

// out = (1 − α) b + α a, elementwise on the backend, summed in fp32 (double for T = double).
// α = 0 and α = 1 copy (exact even for −0 and non-finite values, and cheaper).
template <class Backend, class T>
void mix(T* out, const T* b, const T* a, std::size_t n, double alpha) {
  using acc_t = typename mix_kernel<T>::acc_t;
  if (alpha == 0.0 || alpha == 1.0) {
    const T* from = alpha == 0.0 ? b : a;
    if (out != from) Backend::for_each_index(std::int64_t(n), copy_kernel<T>{out, from});
    return;
  }
  Backend::for_each_index(std::int64_t(n), mix_kernel<T>{out, b, a, acc_t(1.0 - alpha), acc_t(alpha)});
}
}  // namespace detail

// Copies of the tensors a recipe trains (method_state), each with its name and group.
// (Like cl::trainable_snapshot, but writable, so a running average can live in it.)
// On the backend of the weights they copy.
template <class T, class Backend = backend::cpu>
class weight_snapshot {
 public:
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = model::lm_weights<T, Backend>;

  template <class Model>
  weight_snapshot(const Model& model, const weights_t& w) {
    detail::for_each_trainable_grouped(model, w, [&](const std::string& name, const tensor_t& t, param_group g) {
      index_[name] = slots_.size();
      slots_.push_back({name, g, t.clone(memory_use::method_state)});
    });
  }

  std::size_t size() const { return slots_.size(); }
  std::size_t state_bytes() const {
    std::size_t b = 0;
    for (const auto& s : slots_) b += s.value.bytes();
    return b;
  }
  // The copy of a tensor, or nullptr when the recipe does not train it (it is shared).
  const tensor_t* find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &slots_[it->second].value;
  }
  // f(name, param_group, const tensor&)
  template <class F>
  void for_each(F&& f) const {
    for (const auto& s : slots_) f(s.name, s.group, s.value);
  }

  // f(slot index, name, group, tensor& of w) for every trainable tensor of w, after checking
  // that w (under model's recipe) has exactly this snapshot's tensors, names and shapes —
  // so a caller that writes in f has validated everything before the first write.
  template <class Model, class F>
  void visit_matching(const Model& model, weights_t& w, std::string_view what, F&& f) const {
    std::size_t i = 0;
    detail::for_each_trainable_grouped(model, w, [&](const std::string& name, tensor_t& t, param_group) {
      if (i >= slots_.size() || slots_[i].name != name)
        throw std::invalid_argument("skillgraft: " + std::string(what) +
                                    " was taken under another recipe or model: the model trains " + name +
                                    (i < slots_.size() ? " where the snapshot has " + slots_[i].name
                                                       : std::string(", which the snapshot lacks")));
      if (!(slots_[i].value.shape() == t.shape()))
        throw std::invalid_argument("skillgraft: " + std::string(what) + " of " + name + " has shape " +
                                    slots_[i].value.shape().str() + ", the model's is " + t.shape().str());
      ++i;
    });
    if (i != slots_.size())
      throw std::invalid_argument("skillgraft: " + std::string(what) + " holds " + std::to_string(slots_.size()) +
                                  " tensors, the model's recipe trains " + std::to_string(i) +
                                  " (taken under another recipe or model)");
    i = 0;
    detail::for_each_trainable_grouped(model, w, [&](const std::string& name, tensor_t& t, param_group g) {
      f(i, name, g, t);
      ++i;
    });
  }

  tensor_t& value(std::size_t i) { return slots_[i].value; }
  const tensor_t& value(std::size_t i) const { return slots_[i].value; }

 private:
  struct slot {
    std::string name;
    param_group group;
    tensor_t value;
  };
  std::vector<slot> slots_;
  std::map<std::string, std::size_t> index_;
};

// w ← (1 − α) before + α after on the recipe's trainable tensors; frozen tensors untouched.
// Sweeping α needs no retraining: keep both snapshots and call this once per α.
// Everything (snapshots, every α in [0, 1]) is checked before any weight is written.
template <class Model, class T, class Backend, class Alpha>
void interpolate(const Model& model, model::lm_weights<T, Backend>& w, const weight_snapshot<T, Backend>& before,
                 const weight_snapshot<T, Backend>& after, const Alpha& alpha) {
  std::vector<double> alphas;
  before.visit_matching(model, w, "the snapshot before fine-tuning", [&](std::size_t, const std::string& name,
                                                                          param_group g, auto&) {
    alphas.push_back(detail::alpha_for(alpha, name, g));
    detail::check_alpha(alphas.back(), name);
  });
  after.visit_matching(model, w, "the snapshot after fine-tuning", [](auto&&...) {});
  before.visit_matching(model, w, "", [&](std::size_t i, const std::string&, param_group, auto& t) {
    detail::mix<Backend>(t.data(), before.value(i).data(), after.value(i).data(), t.size(), alphas[i]);
  });
}

// WiSE-FT in place: w holds the fine-tuned weights θ_after and becomes
// (1 − α) θ_before + α θ_after on the recipe's trainable tensors.
template <class Model, class T, class Backend, class Alpha>
void wise_ft(const Model& model, model::lm_weights<T, Backend>& w, const weight_snapshot<T, Backend>& before,
             const Alpha& alpha) {
  std::vector<double> alphas;
  before.visit_matching(model, w, "the snapshot before fine-tuning",
                        [&](std::size_t, const std::string& name, param_group g, auto&) {
                          alphas.push_back(detail::alpha_for(alpha, name, g));
                          detail::check_alpha(alphas.back(), name);
                        });
  before.visit_matching(model, w, "", [&](std::size_t i, const std::string&, param_group, auto& t) {
    detail::mix<Backend>(t.data(), before.value(i).data(), t.data(), t.size(), alphas[i]);
  });
}

// Sequential WiSE-FT across tasks: a running average of the weights reached after each task.
//
//   θ̄_0 = weights at construction (pretrained),  θ̄_k = (1 − β) θ̄_{k−1} + β θ_k  (β = ½),
//   and the model continues from θ̄_k: after_task writes it back into the weights.
// State: one copy of the trainable tensors (method_state), whatever the number of tasks.
template <class T, class Backend = backend::cpu>
class running_average {
 public:
  using weights_t = model::lm_weights<T, Backend>;

  template <class Model>
  running_average(const Model& model, const weights_t& w, double beta = 0.5)
      : average_(model, w), beta_(beta) {
    if (!(beta > 0.0 && beta <= 1.0))
      throw std::invalid_argument("skillgraft: running-average weight beta is " + std::to_string(beta) +
                                  ", expected a value in (0, 1]");
  }

  // After training task k: θ̄ ← (1 − β) θ̄ + β w, then w ← θ̄ (trainable tensors only).
  template <class Model>
  void after_task(const Model& model, weights_t& w) {
    average_.visit_matching(model, w, "the running average", [&](std::size_t i, const std::string&, param_group, auto& t) {
      auto& avg = average_.value(i);
      detail::mix<Backend>(avg.data(), avg.data(), t.data(), t.size(), beta_);
      Backend::for_each_index(std::int64_t(t.size()), detail::copy_kernel<T>{t.data(), avg.data()});
    });
    ++tasks_;
  }

  int tasks() const { return tasks_; }
  double beta() const { return beta_; }
  const weight_snapshot<T, Backend>& average() const { return average_; }
  std::size_t state_bytes() const { return average_.state_bytes(); }

 private:
  weight_snapshot<T, Backend> average_;
  double beta_;
  int tasks_ = 0;
};

}  // namespace skillgraft::cl
