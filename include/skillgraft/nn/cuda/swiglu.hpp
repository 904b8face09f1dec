#pragma once
// SwiGLU MLP on the CUDA backend (LLaMA / Qwen2).
//
//   forward   g = h Wg^T,  u = h Wu^T,  m = silu(g) * u,  out = m Wd^T
//   backward  dWd += dout^T m;  dm = dout Wd
//             dg = dm * u * silu'(g),  du = dm * silu(g)
//             silu'(g) = s (1 + g (1 - s)),  s = sigmoid(g)
//             dWg += dg^T h,  dWu += du^T h,  dh = dg Wg + du Wu
// The plan (what is kept, which gradients are formed) is the CPU one: nn::mlp_plan.
#include "skillgraft/nn/cuda/linear.hpp"
#include "skillgraft/nn/swiglu.hpp"

namespace skillgraft::nn::cuda {

template <class T>
struct mlp_weights {
  linear_weights<T> gate_proj, up_proj, down_proj;

  mlp_weights() = default;
  mlp_weights(const decoder_config& c, memory_use use)
      : gate_proj(std::size_t(c.intermediate), std::size_t(c.hidden), false, use),
        up_proj(std::size_t(c.intermediate), std::size_t(c.hidden), false, use),
        down_proj(std::size_t(c.hidden), std::size_t(c.intermediate), false, use) {}
  std::size_t elements() const { return gate_proj.elements() + up_proj.elements() + down_proj.elements(); }
};

template <class T, class Recipe>
struct mlp_grads : members::optional_gate_proj<trains_v<proj::gate, Recipe>, linear_weights<T>>,
                   members::optional_up_proj<trains_v<proj::up, Recipe>, linear_weights<T>>,
                   members::optional_down_proj<trains_v<proj::down, Recipe>, linear_weights<T>> {};

namespace kernels {
template <class T>
SKILLGRAFT_HD inline T sigmoid(T z) {
  return T(1) / (T(1) + skillgraft::cuda::exp_(-z));
}
template <class T>
struct swiglu_forward {  // m = silu(g) * u
  T* m;
  const T* g;
  const T* u;
  SKILLGRAFT_HD void operator()(index_t i) const { m[i] = g[i] * sigmoid(g[i]) * u[i]; }
};
template <class T, bool NeedDg, bool NeedDu>
struct swiglu_backward {  // du = dm silu(g); dg = dm u silu'(g), written over dm
  T* dm;
  T* du;
  const T* g;
  const T* u;
  SKILLGRAFT_HD void operator()(index_t i) const {
    const T z = g[i], s = sigmoid(z), d = dm[i];
    if constexpr (NeedDu) du[i] = d * z * s;
    if constexpr (NeedDg) dm[i] = d * u[i] * s * (T(1) + z * (T(1) - s));
  }
};
}  // namespace kernels

template <class T, class Recipe, bool NeedsInputGrad>
struct swiglu_mlp {
  static_assert(!(mlp_plan<Recipe, NeedsInputGrad>::adapt_gate || mlp_plan<Recipe, NeedsInputGrad>::adapt_up ||
                  mlp_plan<Recipe, NeedsInputGrad>::adapt_down),
                "skillgraft: LoRA adapters (lora<P> tags) are not implemented on the CUDA backend yet");
  using value_type = T;
  using weights_t = mlp_weights<T>;
  using plan = mlp_plan<Recipe, NeedsInputGrad>;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  struct saved_t : members::optional_h<plan::save_h, tensor<T>>,
                   members::optional_g<plan::save_g, tensor<T>>,
                   members::optional_u<plan::save_u, tensor<T>>,
                   members::optional_m<plan::save_m, tensor<T>> {};
  using grads_t = mlp_grads<T, Recipe>;

  decoder_config config;

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    if constexpr (plan::train_gate) g.gate_proj = w.gate_proj.like(memory_use::gradients);
    if constexpr (plan::train_up) g.up_proj = w.up_proj.like(memory_use::gradients);
    if constexpr (plan::train_down) g.down_proj = w.down_proj.like(memory_use::gradients);
    return g;
  }

  tensor<T> forward(const weights_t& w, const tensor<T>& h, saved_t& s) const {
    check_linear_input(w.gate_proj, h, "mlp");
    auto kept = [](bool keep) { return keep ? memory_use::saved_activations : memory_use::workspace; };
    const shape_t inner = with_last(h.shape(), w.gate_proj.out_features());
    tensor<T> g(inner, kept(plan::save_g)), u(inner, kept(plan::save_u)), m(inner, kept(plan::save_m));
    linear_forward(w.gate_proj, h, g, "gate_proj: g = h Wg^T");
    linear_forward(w.up_proj, h, u, "up_proj: u = h Wu^T");
    skillgraft::cuda::for_each_index(index_t(m.size()), kernels::swiglu_forward<T>{m.data(), g.data(), u.data()});
    tensor<T> out(h.shape(), memory_use::workspace);
    linear_forward(w.down_proj, m, out, "down_proj: out = m Wd^T");
    if constexpr (plan::save_h) s.h = h.clone(memory_use::saved_activations);
    if constexpr (plan::save_g) s.g = std::move(g);
    if constexpr (plan::save_u) s.u = std::move(u);
    if constexpr (plan::save_m) s.m = std::move(m);
    return out;
  }

  tensor<T> backward(const weights_t& w, const saved_t& s, const tensor<T>& dout, grads_t& gr) const {
    if constexpr (plan::train_down) linear_backward_weight(s.m, dout, gr.down_proj, "down_proj: dWd += dout^T m");
    if constexpr (!plan::need_dm) {
      return {};
    } else {
      const shape_t inner = with_last(dout.shape(), w.gate_proj.out_features());
      tensor<T> dm(inner, memory_use::workspace);
      linear_backward_input(w.down_proj, dout, dm, false, "down_proj: dm = dout Wd");
      // dg overwrites dm's buffer after du has read it; du gets its own only when needed.
      tensor<T> du;
      if constexpr (plan::need_du) du = tensor<T>(inner, memory_use::workspace);
      const T* u = nullptr;
      if constexpr (plan::save_u) u = s.u.data();
      skillgraft::cuda::for_each_index(
          index_t(dm.size()),
          kernels::swiglu_backward<T, plan::need_dg, plan::need_du>{dm.data(), du.data(), s.g.data(), u});
      if constexpr (plan::train_gate) linear_backward_weight(s.h, dm, gr.gate_proj, "gate_proj: dWg += dg^T h");
      if constexpr (plan::train_up) linear_backward_weight(s.h, du, gr.up_proj, "up_proj: dWu += du^T h");
      if constexpr (NeedsInputGrad) {
        tensor<T> dh(dout.shape(), memory_use::workspace);
        linear_backward_input(w.gate_proj, dm, dh, false, "gate_proj: dh = dg Wg");
        linear_backward_input(w.up_proj, du, dh, true, "up_proj: dh += du Wu");
        return dh;
      } else {
        return {};
      }
    }
  }

  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    if constexpr (plan::train_gate) visit_linear("gate_proj", w.gate_proj, g.gate_proj, f);
    if constexpr (plan::train_up) visit_linear("up_proj", w.up_proj, g.up_proj, f);
    if constexpr (plan::train_down) visit_linear("down_proj", w.down_proj, g.down_proj, f);
  }
};

}  // namespace skillgraft::nn::cuda
