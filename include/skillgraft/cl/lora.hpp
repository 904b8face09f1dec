#pragma once
// LoRA (Hu et al. 2021): low-rank adapters on the projections a recipe names with
// lora<P> tags, the PEFT way.
//
//   W' = W + s B A,   A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)),  B [out, r] = 0,  s = alpha / r
//
// B starts at zero, so an adapted model starts out computing exactly the base model.
// Merging folds s B A into W (inference without the extra GEMMs); `merge` keeps the
// pre-merge W so `unmerge` restores it bit for bit (recomputing W - s B A would not).
#include <random>
#include <string>
#include <vector>

#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/model/parameters.hpp"

namespace skillgraft::cl {

using cpu::tensor;

// The rank and alpha of the adapters are the model's: decoder_config::lora_rank (PEFT "r",
// which the blocks and the memory plan size their buffers by) and lora_alpha. Leave them
// 0 here; a non-zero value is only a check that must agree with the config.
struct lora_options {
  int rank = 0;         // 0: the model config's lora_rank
  double alpha = 0;     // 0: the model config's lora_alpha
  std::uint64_t seed = 0;
};

namespace detail {
// f(name, linear_weights&, layer) for each projection that Recipe adapts, in layers [first, last].
template <class Recipe, class T, class F>
void for_each_adapted(nn::trunk_weights<T>& trunk, int first, int last, F&& f) {
  for (int i = first; i <= last; ++i) {
    auto& l = trunk.layers[std::size_t(i)];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    nn::block_projections::for_each([&](auto e) {
      if constexpr (trains_v<lora<typename decltype(e)::tag>, Recipe>) f(p + e.path(), e.in_block(l));
    });
  }
}
template <class T, class F>
void for_each_projection(nn::trunk_weights<T>& trunk, F&& f) {
  for (std::size_t i = 0; i < trunk.layers.size(); ++i) {
    auto& l = trunk.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    nn::block_projections::for_each([&](auto e) { f(p + e.path(), e.in_block(l)); });
  }
}
}  // namespace detail

// Attaches fresh adapters (B = 0) to every projection the model's recipe adapts, on its
// layer range; returns how many. Rank and alpha come from the model's config.
template <class Model, class T>
int attach_lora(const Model& model, model::lm_weights<T>& w, lora_options o = {}) {
  const int config_rank = model.config().lora_rank;
  if (config_rank <= 0)
    throw std::invalid_argument("skillgraft: the model's config has lora_rank " + std::to_string(config_rank) +
                                "; set decoder_config::lora_rank (PEFT r) to the adapters' rank before building the model");
  if (o.rank != 0 && o.rank != config_rank)
    throw std::invalid_argument("skillgraft: the model's config has lora_rank " + std::to_string(config_rank) +
                                " but adapters of rank " + std::to_string(o.rank) +
                                " were asked for (leave lora_options::rank 0: the config's rank is used)");
  o.rank = config_rank;
  if (o.alpha == 0) o.alpha = model.config().lora_alpha;
  std::mt19937_64 rng(o.seed);
  int n = 0;
  const auto& st = model.stack();
  if (st.first_trainable() >= model.config().n_layers) return 0;
  detail::for_each_adapted<typename Model::recipe_type>(
      w.trunk, st.first_trainable(), st.last_trainable(), [&](const std::string& name, nn::linear_weights<T>& l) {
        if (l.has_lora()) throw std::invalid_argument("skillgraft: " + name + " already has an adapter");
        const std::size_t r = std::size_t(o.rank);
        l.lora.A = tensor<T>({r, l.in_features()}, memory_use::method_state);
        l.lora.B = tensor<T>({l.out_features(), r}, memory_use::method_state);
        // PEFT: kaiming_uniform_(a = sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0.
        std::uniform_real_distribution<double> u(-1.0 / std::sqrt(double(l.in_features())),
                                                 1.0 / std::sqrt(double(l.in_features())));
        for (std::size_t i = 0; i < l.lora.A.size(); ++i) l.lora.A[i] = T(u(rng));
        l.lora_scale = T(o.alpha / double(o.rank));
        ++n;
      });
  return n;
}

// Removes every adapter (e.g. after merging).
template <class T>
void detach_lora(model::lm_weights<T>& w) {
  detail::for_each_projection(w.trunk, [](const std::string&, nn::linear_weights<T>& l) {
    l.lora = {};
    l.lora_scale = T(0);
  });
}

// Bytes of all adapters attached to w.
template <class T>
std::size_t lora_bytes(model::lm_weights<T>& w) {
  std::size_t b = 0;
  detail::for_each_projection(w.trunk, [&](const std::string&, nn::linear_weights<T>& l) { b += l.lora.elements() * sizeof(T); });
  return b;
}

// The pre-merge base weights, for an exact unmerge.
template <class T>
class lora_merge {
 public:
  // W += s B A for every adapted projection; the adapters are kept but switched off
  // (scale 0) so the merged model computes W' once, not W' + s B A again.
  explicit lora_merge(model::lm_weights<T>& w) : w_(&w) {
    detail::for_each_projection(w.trunk, [&](const std::string& name, nn::linear_weights<T>& l) {
      if (!l.has_lora() || l.lora_scale == T(0)) return;
      kept_.push_back({name, &l, l.weight.clone(memory_use::method_state), l.lora_scale});
      l.weight.mat().noalias() += l.lora_scale * (l.lora.B.mat() * l.lora.A.mat());
      l.lora_scale = T(0);
    });
  }
  lora_merge(const lora_merge&) = delete;
  lora_merge& operator=(const lora_merge&) = delete;
  std::size_t merged() const { return kept_.size(); }

  // Restores the exact pre-merge weights and re-enables the adapters.
  void unmerge() {
    for (auto& k : kept_) {
      std::copy_n(k.before.data(), k.before.size(), k.layer->weight.data());  // stays counted as weights
      k.layer->lora_scale = k.scale;
    }
    kept_.clear();
  }
  // Keeps the merged weights and drops the adapters (and the backup).
  void commit() {
    for (auto& k : kept_) k.layer->lora = {};
    kept_.clear();
  }

 private:
  struct kept {
    std::string name;
    nn::linear_weights<T>* layer;
    tensor<T> before;
    T scale;
  };
  model::lm_weights<T>* w_;
  std::vector<kept> kept_;
};

// PEFT's file names for an adapter tensor: "base_model.model." + the model's name.
inline std::string peft_name(const std::string& model_name) { return "base_model.model." + model_name; }

}  // namespace skillgraft::cl
