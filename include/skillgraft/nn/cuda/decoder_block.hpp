#pragma once
// The pre-norm decoder block on the CUDA backend: decoder_block<T, Recipe, Dx, backend::cuda>.
//
//   forward   h1 = rmsnorm(x; w_attn_norm),  x2 = x + attention(h1)
//             h2 = rmsnorm(x2; w_mlp_norm),  y  = x2 + mlp(h2)
//   backward  dx2 = dy + rmsnorm'(mlp'(dy))         (only if anything at or below attention trains)
//             dx  = dx2 + rmsnorm'(attention'(dx2)) (only if something below this block trains)
//
// The compile-time plan is the CPU block's (`host_block`): the same flags decide which
// sub-layers run backward, what `saved_t` holds and what `grads_t` has, so the CPU's
// saved_elements / trainable_elements / flops describe this block too, and
// plan_memory<Block> predicts what it allocates in device memory (checked by the tests).
#include <string>
#include <type_traits>

#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/nn/cuda/attention.hpp"
#include "skillgraft/nn/cuda/rmsnorm.hpp"
#include "skillgraft/nn/cuda/swiglu.hpp"
#include "skillgraft/nn/decoder_block.hpp"

namespace skillgraft::nn {

namespace cuda {

template <class T>
struct block_weights {
  tensor<T> attn_norm;             // input_layernorm.weight [hidden]
  attention_weights<T> self_attn;  // self_attn.{q,k,v,o}_proj
  tensor<T> mlp_norm;              // post_attention_layernorm.weight [hidden]
  mlp_weights<T> mlp;              // mlp.{gate,up,down}_proj

  block_weights() = default;
  block_weights(const decoder_config& c, memory_use use = memory_use::weights)
      : attn_norm({std::size_t(c.hidden)}, use), self_attn(c, use), mlp_norm({std::size_t(c.hidden)}, use), mlp(c, use) {}
  std::size_t elements() const { return attn_norm.size() + self_attn.elements() + mlp_norm.size() + mlp.elements(); }

  // Host -> device; `prefix` ("model.layers.3.") names the tensors in messages.
  static block_weights upload(const nn::block_weights<T>& h, const std::string& prefix = "",
                              memory_use use = memory_use::weights) {
    // The dense SiLU MLP only: an activation range or a mixture of experts is CPU-only for now.
    if constexpr (requires { h.mlp.is_mixture(); })
      if (h.mlp.is_mixture())
        throw std::invalid_argument("skillgraft: " + prefix +
                                    "mlp is a mixture of experts; the CUDA backend runs the dense SiLU MLP only");
    if constexpr (requires { h.mlp.act_alpha; })
      if (!h.mlp.act_alpha.empty())
        throw std::invalid_argument("skillgraft: " + prefix +
                                    "mlp.act_fn.alpha is present; the CUDA backend runs the dense SiLU MLP only");
    block_weights d;
    d.attn_norm = tensor<T>::from_host(h.attn_norm, use);
    d.self_attn.q_proj = linear_weights<T>::upload(h.self_attn.q_proj, use, prefix + "self_attn.q_proj");
    d.self_attn.k_proj = linear_weights<T>::upload(h.self_attn.k_proj, use, prefix + "self_attn.k_proj");
    d.self_attn.v_proj = linear_weights<T>::upload(h.self_attn.v_proj, use, prefix + "self_attn.v_proj");
    d.self_attn.o_proj = linear_weights<T>::upload(h.self_attn.o_proj, use, prefix + "self_attn.o_proj");
    d.mlp_norm = tensor<T>::from_host(h.mlp_norm, use);
    d.mlp.gate_proj = linear_weights<T>::upload(h.mlp.gate_proj, use, prefix + "mlp.gate_proj");
    d.mlp.up_proj = linear_weights<T>::upload(h.mlp.up_proj, use, prefix + "mlp.up_proj");
    d.mlp.down_proj = linear_weights<T>::upload(h.mlp.down_proj, use, prefix + "mlp.down_proj");
    return d;
  }
  // Device -> host, into weights of the same shapes.
  void download(nn::block_weights<T>& h) const {
    attn_norm.copy_to(h.attn_norm);
    self_attn.q_proj.download(h.self_attn.q_proj);
    self_attn.k_proj.download(h.self_attn.k_proj);
    self_attn.v_proj.download(h.self_attn.v_proj);
    self_attn.o_proj.download(h.self_attn.o_proj);
    mlp_norm.copy_to(h.mlp_norm);
    mlp.gate_proj.download(h.mlp.gate_proj);
    mlp.up_proj.download(h.mlp.up_proj);
    mlp.down_proj.download(h.mlp.down_proj);
  }
};

// Throws, naming the tensor, when a weight's shape does not match the config.
template <class T>
void check_block_weights(const block_weights<T>& w, const decoder_config& c, const std::string& prefix = "") {
  const auto d = std::size_t(c.hidden), qd = std::size_t(c.q_dim()), kvd = std::size_t(c.kv_dim()),
             I = std::size_t(c.intermediate);
  auto lin = [&](const linear_weights<T>& l, std::size_t out, std::size_t in, bool bias, const char* name) {
    skillgraft::cuda::expect_shape(l.weight, {out, in}, prefix + name + ".weight");
    if (bias) skillgraft::cuda::expect_shape(l.bias, {out}, prefix + name + ".bias");
    else if (l.has_bias())
      throw std::invalid_argument("skillgraft: " + prefix + name + ".bias present but the config has no bias");
  };
  skillgraft::cuda::expect_shape(w.attn_norm, {d}, prefix + "input_layernorm.weight");
  skillgraft::cuda::expect_shape(w.mlp_norm, {d}, prefix + "post_attention_layernorm.weight");
  lin(w.self_attn.q_proj, qd, d, c.attention_bias, "self_attn.q_proj");
  lin(w.self_attn.k_proj, kvd, d, c.attention_bias, "self_attn.k_proj");
  lin(w.self_attn.v_proj, kvd, d, c.attention_bias, "self_attn.v_proj");
  lin(w.self_attn.o_proj, d, qd, false, "self_attn.o_proj");
  lin(w.mlp.gate_proj, I, d, false, "mlp.gate_proj");
  lin(w.mlp.up_proj, I, d, false, "mlp.up_proj");
  lin(w.mlp.down_proj, d, I, false, "mlp.down_proj");
}

// Gradients of a block: members only for the recipe's trainable tensors (names as on the CPU).
template <class T, class Recipe>
struct block_grads : attention_grads<T, Recipe>,
                     mlp_grads<T, Recipe>,
                     members::optional_attn_norm<trains_v<group::attn_norm, Recipe>, tensor<T>>,
                     members::optional_mlp_norm<trains_v<group::mlp_norm, Recipe>, tensor<T>> {};

// The CPU block's MLP options type where it has one (an MLP policy's options), else none.
template <class Block, class = void>
struct mlp_options_of {
  struct type {};
};
template <class Block>
struct mlp_options_of<Block, std::void_t<typename Block::mlp_options_t>> {
  using type = typename Block::mlp_options_t;
};

}  // namespace cuda

// The dense SiLU MLP (the default MLP policy) only: other MLP policies are CPU-only for now.
template <class T, class Recipe, bool NeedsInputGrad>
struct decoder_block<T, Recipe, NeedsInputGrad, backend::cuda> {
  // The CPU block of the same recipe: its plan and its byte and FLOP accounting are this block's.
  using host_block = decoder_block<T, Recipe, NeedsInputGrad, backend::cpu>;
  using value_type = T;
  using recipe_type = typename host_block::recipe_type;
  using weights_t = cuda::block_weights<T>;
  using mlp_options_t = typename cuda::mlp_options_of<host_block>::type;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  static constexpr bool train_attn_norm = host_block::train_attn_norm;
  static constexpr bool train_mlp_norm = host_block::train_mlp_norm;
  static constexpr bool attention_needs_dh = host_block::attention_needs_dh;
  using attn_norm_t = cuda::rmsnorm<T, train_attn_norm, NeedsInputGrad>;
  using attention_t = cuda::causal_attention<T, recipe_type, attention_needs_dh>;
  static constexpr bool attention_active = host_block::attention_active;
  static constexpr bool need_dx2 = host_block::need_dx2;
  using mlp_norm_t = cuda::rmsnorm<T, train_mlp_norm, need_dx2>;
  using mlp_t = cuda::swiglu_mlp<T, recipe_type, host_block::mlp_t::needs_input_grad>;
  static constexpr bool mlp_active = host_block::mlp_active;
  static constexpr bool any_backward = host_block::any_backward;
  static_assert(std::is_same_v<typename attention_t::plan, typename host_block::attention_t::plan> &&
                    std::is_same_v<typename mlp_t::plan, typename host_block::mlp_t::plan> &&
                    attn_norm_t::keeps_input == host_block::attn_norm_t::keeps_input &&
                    mlp_norm_t::keeps_input == host_block::mlp_norm_t::keeps_input,
                "skillgraft: the CUDA decoder block must follow the CPU block's plan");

  struct saved_t : members::optional_attn_norm<attn_norm_t::keeps_input, typename attn_norm_t::saved_t>,
                   members::optional_attention<attention_active, typename attention_t::saved_t>,
                   members::optional_mlp_norm<mlp_norm_t::keeps_input, typename mlp_norm_t::saved_t>,
                   members::optional_mlp<mlp_active, typename mlp_t::saved_t> {};
  using grads_t = cuda::block_grads<T, recipe_type>;
  static constexpr bool keeps_nothing = std::is_empty_v<saved_t>;

  decoder_config config;
  const cuda::rope_table<T>* table = nullptr;
  int first_pos = 0;

  decoder_block() = default;
  decoder_block(const decoder_config& c, const cuda::rope_table<T>& t) : config(c), table(&t) {}

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    static_cast<typename attention_t::grads_t&>(g) = attention().make_grads(w.self_attn);
    static_cast<typename mlp_t::grads_t&>(g) = mlp().make_grads(w.mlp);
    if constexpr (train_attn_norm) g.attn_norm = cuda::tensor<T>(w.attn_norm.shape(), memory_use::gradients);
    if constexpr (train_mlp_norm) g.mlp_norm = cuda::tensor<T>(w.mlp_norm.shape(), memory_use::gradients);
    return g;
  }

  cuda::tensor<T> forward(const weights_t& w, const cuda::tensor<T>& x, saved_t& s) const {
    if (x.rank() != 3 || x.dim(2) != std::size_t(config.hidden))
      throw std::invalid_argument("skillgraft: decoder block input has shape " + x.shape().str() +
                                  ", expected [batch, seq, " + std::to_string(config.hidden) + "]");
    cuda::tensor<T> h1 = attn_norm().forward(
        w.attn_norm, x, part<attn_norm_t::keeps_input, typename attn_norm_t::saved_t>(s, [](auto& ss) -> auto& { return ss.attn_norm; }),
        "input_layernorm");
    cuda::tensor<T> x2 = attention().forward(
        w.self_attn, h1, part<attention_active, typename attention_t::saved_t>(s, [](auto& ss) -> auto& { return ss.attention; }));
    skillgraft::cuda::add_into(x2.data(), x.data(), cuda::index_t(x.size()));
    cuda::tensor<T> h2 = mlp_norm().forward(
        w.mlp_norm, x2, part<mlp_norm_t::keeps_input, typename mlp_norm_t::saved_t>(s, [](auto& ss) -> auto& { return ss.mlp_norm; }),
        "post_attention_layernorm");
    cuda::tensor<T> y =
        mlp().forward(w.mlp, h2, part<mlp_active, typename mlp_t::saved_t>(s, [](auto& ss) -> auto& { return ss.mlp; }));
    skillgraft::cuda::add_into(y.data(), x2.data(), cuda::index_t(y.size()));
    return y;
  }

  // Adds weight gradients into g; returns dx when NeedsInputGrad, else an empty tensor.
  cuda::tensor<T> backward(const weights_t& w, const saved_t& s, const cuda::tensor<T>& dy, grads_t& g) const {
    if (dy.rank() != 3 || dy.dim(2) != std::size_t(config.hidden))
      throw std::invalid_argument("skillgraft: decoder block output gradient has shape " + dy.shape().str() +
                                  ", expected [batch, seq, " + std::to_string(config.hidden) + "]");
    if constexpr (!any_backward) {
      return {};
    } else {
      cuda::tensor<T> dh2 = mlp().backward(w.mlp, s.mlp, dy, g);
      cuda::tensor<T> dx2;
      if constexpr (mlp_norm_t::keeps_input) {
        cuda::tensor<T>* dw2 = nullptr;
        if constexpr (train_mlp_norm) dw2 = &g.mlp_norm;
        dx2 = mlp_norm_t::backward_into(w.mlp_norm, s.mlp_norm, dh2, dw2);
      }
      if constexpr (!attention_active) {
        return {};
      } else {
        skillgraft::cuda::add_into(dx2.data(), dy.data(), cuda::index_t(dy.size()));
        cuda::tensor<T> dh1 = attention().backward(w.self_attn, s.attention, dx2, g);
        if constexpr (attention_needs_dh) {
          cuda::tensor<T>* dw1 = nullptr;
          if constexpr (train_attn_norm) dw1 = &g.attn_norm;
          cuda::tensor<T> dx = attn_norm_t::backward_into(w.attn_norm, s.attn_norm, dh1, dw1);
          if constexpr (NeedsInputGrad) skillgraft::cuda::add_into(dx.data(), dx2.data(), cuda::index_t(dx.size()));
          return dx;
        } else {
          return {};
        }
      }
    }
  }

  // (name, weight, gradient) of every trainable tensor, Hugging Face names relative to the layer.
  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    if constexpr (train_attn_norm) f(std::string("input_layernorm.weight"), w.attn_norm, g.attn_norm);
    attention_t::for_each_trainable(w.self_attn, g, [&](const std::string& n, cuda::tensor<T>& p, cuda::tensor<T>& dp) {
      f("self_attn." + n, p, dp);
    });
    if constexpr (train_mlp_norm) f(std::string("post_attention_layernorm.weight"), w.mlp_norm, g.mlp_norm);
    mlp_t::for_each_trainable(w.mlp, g, [&](const std::string& n, cuda::tensor<T>& p, cuda::tensor<T>& dp) { f("mlp." + n, p, dp); });
  }

  // Accounting shared with the CPU block (same plan, same buffers; the dense MLP has no options).
  static std::size_t saved_elements(const decoder_config& c, seq_shape sh, const mlp_options_t& = {}) {
    return host_block::saved_elements(c, sh);
  }
  static std::size_t trainable_elements(const decoder_config& c, const mlp_options_t& = {}) {
    return host_block::trainable_elements(c);
  }
  static std::size_t weight_elements(const decoder_config& c, const mlp_options_t& = {}) {
    return nn::block_weights<T>::elements_for(c);
  }
  using flop_count = typename host_block::flop_count;
  static flop_count flops(const decoder_config& c, seq_shape sh, const mlp_options_t& = {}) {
    return host_block::flops(c, sh);
  }

 private:
  attn_norm_t attn_norm() const { return {config.rms_norm_eps}; }
  mlp_norm_t mlp_norm() const { return {config.rms_norm_eps}; }
  attention_t attention() const { return {config, table, first_pos}; }
  mlp_t mlp() const { return {config}; }

  template <bool Kept, class Part, class Get>
  static Part& part(saved_t& s, Get get) {
    if constexpr (Kept) {
      return get(s);
    } else {
      thread_local Part scratch;  // empty struct: the sub-layer keeps nothing
      static_assert(std::is_empty_v<Part>);
      return scratch;
    }
  }
};

}  // namespace skillgraft::nn
