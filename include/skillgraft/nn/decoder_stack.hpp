#pragma once
// The language-model trunk: N decoder blocks, specialised per layer by a recipe.
//
// A recipe scoped to layers [first, last] splits the stack into up to four kinds
// of block, each its own type:
//   below  [0, first)       frozen, and (unless the embeddings train) no backward: keeps nothing
//   lowest  first           the recipe, no input gradient: backward stops here
//   middle (first, last]    the recipe, with input gradient
//   above  (last, N)        frozen, but passes the gradient down: keeps only what dx needs
// Every block uses the stack's MLP policy (nn::swiglu<> by default; see nn/moe_mlp.hpp).
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "skillgraft/nn/decoder_block.hpp"
#include "skillgraft/nn/gradient_hook.hpp"
#include "skillgraft/nn/rope.hpp"
#include "skillgraft/policy/recipes.hpp"

namespace skillgraft::nn {

template <class T, class Backend = backend::cpu>
struct trunk_weights {
  decoder_config config;
  std::vector<block_weights<T, Backend>> layers;

  trunk_weights() = default;
  explicit trunk_weights(const decoder_config& c, memory_use use = memory_use::weights) : config(c) {
    c.validate();
    layers.reserve(std::size_t(c.n_layers));
    for (int i = 0; i < c.n_layers; ++i) layers.emplace_back(c, use);
  }
  std::size_t elements() const {
    std::size_t n = 0;
    for (const auto& l : layers) n += l.elements();
    return n;
  }
};

// Gives every layer's MLP the range alpha of an expanded activation (act::xsilu, act::xgelu):
// model.layers.{i}.mlp.act_fn.alpha = alpha (0: the function of SiLU / GELU gating).
template <class T>
void add_act_range(trunk_weights<T>& w, T alpha = T(0)) {
  for (auto& l : w.layers) add_act_range(l.mlp, alpha);
}

// Gives every layer the two residual gates of a gate_skip policy (nn/gate_skip.hpp).
template <class T>
void add_residual_gates(trunk_weights<T>& w, gate_shape shape = gate_shape::vector, const residual_gate_init& init = {}) {
  for (std::size_t i = 0; i < w.layers.size(); ++i) add_residual_gates(w.layers[i], w.config, shape, init, int(i));
}

template <class T, class Recipe, bool NeedsInputGrad = false, class Backend = backend::cpu, class Mlp = default_mlp>
class decoder_stack {
 public:
  using value_type = T;
  using mlp_policy = Mlp;
  using mlp_options_t = typename Mlp::options;
  using recipe_type = restrict_t<Recipe, decltype(block_tags)>;
  using frozen_type = std::remove_cv_t<decltype(recipe::frozen)>;
  static constexpr bool any_trainable = !recipe_type::empty;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  using below_t = decoder_block<T, frozen_type, NeedsInputGrad, Backend, Mlp>;
  using lowest_t = decoder_block<T, recipe_type, NeedsInputGrad, Backend, Mlp>;
  using middle_t = decoder_block<T, recipe_type, true, Backend, Mlp>;
  using above_t = decoder_block<T, frozen_type, true, Backend, Mlp>;
  using weights_t = trunk_weights<T, Backend>;
  using backend_type = Backend;
  using tensor_t = typename Backend::template tensor<T>;
  using block_grads_t = typename lowest_t::grads_t;
  static_assert(std::is_same_v<block_grads_t, typename middle_t::grads_t>);

  struct saved_t {
    std::vector<typename below_t::saved_t> below;
    std::optional<typename lowest_t::saved_t> lowest;
    std::vector<typename middle_t::saved_t> middle;
    std::vector<typename above_t::saved_t> above;
    std::optional<output_rows> rows;  // forward's output rows (nn/output_rows.hpp), if it had some
  };

  // Gradients of the trainable layers [first, last] only.
  struct grads_t {
    int first = 0;
    std::vector<block_grads_t> layers;
    block_grads_t& layer(int i) {
      if (i < first || i >= first + int(layers.size()))
        throw std::out_of_range("skillgraft: layer " + std::to_string(i) + " is frozen under this recipe (trainable: " +
                                (layers.empty() ? std::string("none")
                                                : std::to_string(first) + ".." + std::to_string(first + int(layers.size()) - 1)) +
                                ")");
      return layers[std::size_t(i - first)];
    }
  };

  decoder_stack(const decoder_config& c, layer_range range = {}, const mlp_options_t& mlp = {})
      : config_(c), mlp_options_(mlp), table_((c.validate(), c.head_dim), c.max_seq, c.rope_theta) {
    const int n = c.n_layers;
    if (!any_trainable) {
      first_ = n;
      last_ = n - 1;
      return;
    }
    first_ = range.first;
    last_ = range.last < 0 ? n - 1 : range.last;
    if (first_ < 0 || first_ > last_ || last_ >= n)
      throw std::invalid_argument("skillgraft: recipe layer range [" + std::to_string(range.first) + ", " +
                                  std::to_string(range.last) + "] does not fit a stack of " + std::to_string(n) +
                                  " layers");
  }
  template <class S>
  decoder_stack(const decoder_config& c, trainable_set<S> r, const mlp_options_t& mlp = {})
      : decoder_stack(c, r.layers, mlp) {}

  const decoder_config& config() const { return config_; }
  const mlp_options_t& mlp_options() const { return mlp_options_; }
  // New runtime settings of the MLP policy (e.g. a gate_skip model's train_skip, step by step).
  void set_mlp_options(const mlp_options_t& o) { mlp_options_ = o; }
  const rope_table<T, Backend>& rope() const { return table_; }
  int first_trainable() const { return first_; }
  int last_trainable() const { return last_; }
  bool layer_trains(int i) const { return i >= first_ && i <= last_; }

  grads_t make_grads(const weights_t& w) const {
    check_weights(w);
    grads_t g;
    g.first = first_;
    for (int i = first_; i <= last_; ++i) g.layers.push_back(block<lowest_t>().make_grads(w.layers[std::size_t(i)]));
    return g;
  }

  // x: [batch, seq, hidden]; token s sits at position first_pos + s. With `rows`, the output is
  // those rows alone, [1, rows, hidden], and the top block computes its MLP half on them only
  // (nn/output_rows.hpp); backward then takes dy of that shape.
  tensor_t forward(const weights_t& w, const tensor_t& x, saved_t& s, int first_pos = 0,
                   const output_rows* rows = nullptr) const {
    check_weights(w);
    const int n = config_.n_layers;
    s = saved_t{};
    if (rows) {
      rows->check_against(x, "the trunk's input");
      s.rows = *rows;
    }
    tensor_t h = x.clone(memory_use::workspace);
    for (int i = 0; i < n; ++i) {
      const auto& wi = w.layers[std::size_t(i)];
      const output_rows* top = i == n - 1 && s.rows ? &*s.rows : nullptr;
      auto run = [&](auto b, auto& saved) {
        using B = decltype(b);
        if constexpr (B::selects_rows) {
          h = b.forward(wi, h, saved, top);
        } else {
          h = b.forward(wi, h, saved);
          if (top) h = select_rows<Backend>(h, *top);
        }
      };
      if (i < first_) run(block<below_t>(first_pos), s.below.emplace_back());
      else if (i == first_) run(block<lowest_t>(first_pos), s.lowest.emplace());
      else if (i <= last_) run(block<middle_t>(first_pos), s.middle.emplace_back());
      else run(block<above_t>(first_pos), s.above.emplace_back());
    }
    return h;
  }

  // Walks down from the top to the lowest trainable layer (to layer 0 when the input
  // gradient is wanted), adding weight gradients into g. `hook` hears of each trainable layer's
  // gradients as soon as that layer's backward returns (nn/gradient_hook.hpp).
  template <class... Hook>
  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dy, grads_t& g, int first_pos = 0,
                    const Hook&... hook) const {
    check_weights(w);
    if (!s.lowest && first_ < config_.n_layers)
      throw std::logic_error("skillgraft: decoder_stack::backward called without a forward that saved activations");
    if (g.first != first_ || int(g.layers.size()) != last_ - first_ + 1)
      throw std::invalid_argument("skillgraft: gradients were made for another recipe or layer range");
    const int n = config_.n_layers;
    if (s.rows && !(dy.rank() == 3 && dy.dim(0) == 1 && dy.dim(1) == s.rows->count()))
      throw std::invalid_argument("skillgraft: the trunk's output gradient has shape " + dy.shape().str() +
                                  ", forward kept " + std::to_string(s.rows->count()) + " output rows: expected [1, " +
                                  std::to_string(s.rows->count()) + ", hidden]");
    tensor_t d = dy.clone(memory_use::workspace);
    // Block i's backward; the top block takes forward's output rows, or the stack spreads them first.
    auto back = [&](auto b, int i, const auto& saved, auto& grads) {
      using B = decltype(b);
      const output_rows* top = i == n - 1 && s.rows ? &*s.rows : nullptr;
      if constexpr (B::selects_rows) {
        return b.backward(w.layers[std::size_t(i)], saved, d, grads, top);
      } else {
        if (top) d = spread_rows<Backend>(d, *top);
        return b.backward(w.layers[std::size_t(i)], saved, d, grads);
      }
    };
    for (int i = n - 1; i > last_; --i) {
      typename above_t::grads_t none;
      d = back(block<above_t>(first_pos), i, s.above[std::size_t(i - last_ - 1)], none);
    }
    for (int i = last_; i > first_; --i) {
      d = back(block<middle_t>(first_pos), i, s.middle[std::size_t(i - first_ - 1)], g.layers[std::size_t(i - first_)]);
      gradients_ready<middle_t>(w.layers[std::size_t(i)], g.layers[std::size_t(i - first_)], hook...);
    }
    if (first_ < n) {
      d = back(block<lowest_t>(first_pos), first_, *s.lowest, g.layers[0]);
      gradients_ready<lowest_t>(w.layers[std::size_t(first_)], g.layers[0], hook...);
    }
    if constexpr (NeedsInputGrad) {
      for (int i = first_ - 1; i >= 0; --i) {
        typename below_t::grads_t none;
        d = back(block<below_t>(first_pos), i, s.below[std::size_t(i)], none);
      }
      return d;
    } else {
      return {};
    }
  }

  // (name, weight, gradient) for each trainable tensor, with Hugging Face names.
  template <class F>
  void for_each_trainable(weights_t& w, grads_t& g, F&& f) const {
    for (int i = first_; i <= last_; ++i)
      lowest_t::for_each_trainable(w.layers[std::size_t(i)], g.layers[std::size_t(i - first_)],
                                   [&](const std::string& n, tensor_t& p, tensor_t& dp) {
                                     f("model.layers." + std::to_string(i) + "." + n, p, dp);
                                   });
  }

  // f(layer, gate_record&) for the residual gates of every layer, bottom up (attention's gate,
  // then the MLP's): what a forward saw of them, and where a penalty seeds its gradient.
  template <class F>
  void for_each_gate_record(saved_t& s, F&& f) const {
    if constexpr (has_residual_gates_v<Mlp>) {
      int layer = 0;
      auto visit = [&](auto& block_saved, auto block_tag) {
        using B = typename decltype(block_tag)::type;
        B::for_each_gate_record(block_saved, [&](gate_record& r) { f(layer, r); });
        ++layer;
      };
      for (auto& b : s.below) visit(b, hana::type_c<below_t>);
      if (s.lowest) visit(*s.lowest, hana::type_c<lowest_t>);
      for (auto& b : s.middle) visit(b, hana::type_c<middle_t>);
      for (auto& b : s.above) visit(b, hana::type_c<above_t>);
    }
  }

  // Models of what the code allocates (checked against the ledger by the tests).
  // output_rows: the rows a forward with output rows keeps (0: a forward of every row).
  std::size_t saved_elements(seq_shape sh, std::size_t output_rows = 0) const {
    const int n = config_.n_layers;
    const auto& o = mlp_options_;
    std::size_t e = 0;
    for (int i = 0; i < n; ++i) {
      const std::size_t r = i == n - 1 ? output_rows : 0;
      if (i < first_) e += below_t::saved_elements(config_, sh, o, r);
      else if (i == first_) e += lowest_t::saved_elements(config_, sh, o, r);
      else if (i <= last_) e += middle_t::saved_elements(config_, sh, o, r);
      else e += above_t::saved_elements(config_, sh, o, r);
    }
    return e;
  }
  std::size_t trainable_elements() const {
    return first_ < config_.n_layers
               ? std::size_t(last_ - first_ + 1) * lowest_t::trainable_elements(config_, mlp_options_)
               : 0;
  }
  // Every parameter of the trunk, the MLP policy's (alpha, router, experts) included.
  std::size_t weight_elements() const {
    return std::size_t(config_.n_layers) * lowest_t::weight_elements(config_, mlp_options_);
  }
  typename lowest_t::flop_count flops(seq_shape sh) const {
    typename lowest_t::flop_count f;
    for (int i = 0; i < config_.n_layers; ++i) {
      auto add = [&](auto fl) {
        f.forward += fl.forward;
        f.backward += fl.backward;
      };
      const auto& o = mlp_options_;
      if (i < first_) add(below_t::flops(config_, sh, o));
      else if (i == first_) add(lowest_t::flops(config_, sh, o));
      else if (i <= last_) add(middle_t::flops(config_, sh, o));
      else add(above_t::flops(config_, sh, o));
    }
    return f;
  }

  // Throws, naming the tensor, unless w fits this stack's config and MLP policy.
  void check_weights(const weights_t& w) const {
    if (int(w.layers.size()) != config_.n_layers)
      throw std::invalid_argument("skillgraft: trunk weights have " + std::to_string(w.layers.size()) +
                                  " layers, the stack expects " + std::to_string(config_.n_layers));
    for (int i = 0; i < config_.n_layers; ++i)
      check_block_weights<Mlp>(w.layers[std::size_t(i)], config_, "model.layers." + std::to_string(i) + ".",
                               mlp_options_);
  }

 private:
  template <class Block>
  Block block(int first_pos = 0) const {
    Block b(config_, table_, mlp_options_);
    b.first_pos = first_pos;
    return b;
  }

  decoder_config config_;
  mlp_options_t mlp_options_;
  rope_table<T, Backend> table_;
  int first_ = 0;
  int last_ = -1;
};

}  // namespace skillgraft::nn
