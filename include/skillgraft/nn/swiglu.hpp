#pragma once
// SwiGLU MLP (LLaMA / Qwen2).
//
//   forward   g = h Wg^T,  u = h Wu^T,  m = silu(g) * u,  out = m Wd^T
//   backward  dWd += dout^T m;  dm = dout Wd
//             dg = dm * u * silu'(g),  du = dm * silu(g)
//             silu'(g) = s (1 + g (1 - s)),  s = sigmoid(g)
//             dWg += dg^T h,  dWu += du^T h,  dh = dg Wg + du Wu
//
// With Down frozen m is never kept; with only Down trainable, g and u are not kept
// and dm is never formed.
#include <cmath>

#include "skillgraft/nn/config.hpp"
#include "skillgraft/nn/linear.hpp"
#include "skillgraft/nn/optional_member.hpp"
#include "skillgraft/policy/trainable.hpp"

namespace skillgraft::nn {

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

template <class Recipe, bool NeedsInputGrad>
struct mlp_plan {
  static constexpr bool train_gate = trains_v<proj::gate, Recipe>;
  static constexpr bool train_up = trains_v<proj::up, Recipe>;
  static constexpr bool train_down = trains_v<proj::down, Recipe>;
  static constexpr bool adapt_gate = trains_v<lora<proj::gate>, Recipe>;
  static constexpr bool adapt_up = trains_v<lora<proj::up>, Recipe>;
  static constexpr bool adapt_down = trains_v<lora<proj::down>, Recipe>;
  static constexpr bool need_dg = train_gate || adapt_gate || NeedsInputGrad;
  static constexpr bool need_du = train_up || adapt_up || NeedsInputGrad;
  static constexpr bool need_dm = need_dg || need_du;
  static constexpr bool active = need_dm || train_down || adapt_down;
  static constexpr bool save_h = train_gate || train_up || adapt_gate || adapt_up;  // dW{g,u} = d{g,u}^T h, dA
  static constexpr bool save_g = need_dm;                 // silu(g), silu'(g)
  static constexpr bool save_u = need_dg;                 // dg = dm * u * silu'(g)
  static constexpr bool save_m = train_down || adapt_down;  // dWd = dout^T m, dA_down
};

// Gradients of the trainable projections only; the same type whether or not dh is wanted.
template <class T, class Recipe>
struct mlp_grads : members::optional_gate_proj<trains_v<proj::gate, Recipe>, linear_weights<T>>,
                   members::optional_up_proj<trains_v<proj::up, Recipe>, linear_weights<T>>,
                   members::optional_down_proj<trains_v<proj::down, Recipe>, linear_weights<T>>,
                   members::optional_gate_lora<trains_v<lora<proj::gate>, Recipe>, lora_factors<T>>,
                   members::optional_up_lora<trains_v<lora<proj::up>, Recipe>, lora_factors<T>>,
                   members::optional_down_lora<trains_v<lora<proj::down>, Recipe>, lora_factors<T>> {};

template <class T>
inline T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

template <class T, class Recipe, bool NeedsInputGrad>
struct swiglu_mlp {
  using value_type = T;
  using weights_t = mlp_weights<T>;
  using plan = mlp_plan<Recipe, NeedsInputGrad>;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  struct saved_t : members::optional_h<plan::save_h, tensor<T>>,
                   members::optional_g<plan::save_g, tensor<T>>,
                   members::optional_u<plan::save_u, tensor<T>>,
                   members::optional_m<plan::save_m, tensor<T>>,
                   members::optional_u_gate<plan::adapt_gate, tensor<T>>,
                   members::optional_u_up<plan::adapt_up, tensor<T>>,
                   members::optional_u_down<plan::adapt_down, tensor<T>> {};
  using grads_t = mlp_grads<T, Recipe>;

  decoder_config config;

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    if constexpr (plan::train_gate) g.gate_proj = w.gate_proj.like(memory_use::gradients);
    if constexpr (plan::train_up) g.up_proj = w.up_proj.like(memory_use::gradients);
    if constexpr (plan::train_down) g.down_proj = w.down_proj.like(memory_use::gradients);
    if constexpr (plan::adapt_gate)
      g.gate_lora = (require_lora(w.gate_proj, "gate_proj"), w.gate_proj.lora.like(memory_use::gradients));
    if constexpr (plan::adapt_up) g.up_lora = (require_lora(w.up_proj, "up_proj"), w.up_proj.lora.like(memory_use::gradients));
    if constexpr (plan::adapt_down)
      g.down_lora = (require_lora(w.down_proj, "down_proj"), w.down_proj.lora.like(memory_use::gradients));
    return g;
  }

  tensor<T> forward(const weights_t& w, const tensor<T>& h, saved_t& s) const {
    check_linear_input(w.gate_proj, h, "mlp");
    const std::size_t n = std::size_t(h.rows()), I = w.gate_proj.out_features();
    auto kept = [](bool keep) { return keep ? memory_use::saved_activations : memory_use::workspace; };
    shape_t inner = h.shape();
    inner.dims[std::size_t(inner.rank - 1)] = I;
    tensor<T> g(inner, kept(plan::save_g)), u(inner, kept(plan::save_u)), m(inner, kept(plan::save_m));
    auto adapter_input = [&](bool adapt, const linear_weights<T>& p, const char* name) {
      if (!adapt) return tensor<T>();
      require_lora(p, name);
      shape_t us = h.shape();
      us.dims[std::size_t(us.rank - 1)] = p.lora.rank();
      return tensor<T>(us, memory_use::saved_activations);
    };
    tensor<T> ug = adapter_input(plan::adapt_gate, w.gate_proj, "gate_proj"),
              uu = adapter_input(plan::adapt_up, w.up_proj, "up_proj"),
              ud = adapter_input(plan::adapt_down, w.down_proj, "down_proj");
    linear_forward(w.gate_proj, h, g, plan::adapt_gate ? &ug : nullptr);
    linear_forward(w.up_proj, h, u, plan::adapt_up ? &uu : nullptr);
    const T* gp = g.data();
    const T* up = u.data();
    T* mp = m.data();
#pragma omp parallel for schedule(static) if (n * I > 32768)
    for (std::size_t i = 0; i < n * I; ++i) mp[i] = gp[i] * sigmoid(gp[i]) * up[i];
    tensor<T> out(h.shape(), memory_use::workspace);
    linear_forward(w.down_proj, m, out, plan::adapt_down ? &ud : nullptr);
    if constexpr (plan::adapt_gate) s.u_gate = std::move(ug);
    if constexpr (plan::adapt_up) s.u_up = std::move(uu);
    if constexpr (plan::adapt_down) s.u_down = std::move(ud);
    if constexpr (plan::save_h) s.h = h.clone(memory_use::saved_activations);
    if constexpr (plan::save_g) s.g = std::move(g);
    if constexpr (plan::save_u) s.u = std::move(u);
    if constexpr (plan::save_m) s.m = std::move(m);
    return out;
  }

  tensor<T> backward(const weights_t& w, const saved_t& s, const tensor<T>& dout, grads_t& gr) const {
    if constexpr (plan::train_down) linear_backward_weight(s.m, dout, gr.down_proj);
    if constexpr (plan::adapt_down) lora_backward(w.down_proj, s.m, s.u_down, dout, gr.down_lora);
    if constexpr (!plan::need_dm) {
      return {};
    } else {
      const std::size_t I = w.gate_proj.out_features();
      shape_t inner = dout.shape();
      inner.dims[std::size_t(inner.rank - 1)] = I;
      tensor<T> dm(inner, memory_use::workspace);
      linear_backward_input(w.down_proj, dout, dm, false);
      // dg overwrites dm's buffer after du has read it; du gets its own only when needed.
      tensor<T> du;
      if constexpr (plan::need_du) du = tensor<T>(inner, memory_use::workspace);
      const std::size_t n = dm.size();
      const T* gp = s.g.data();
      T* dmp = dm.data();
      T* dup = plan::need_du ? du.data() : nullptr;
#pragma omp parallel for schedule(static) if (n > 32768)
      for (std::size_t i = 0; i < n; ++i) {
        const T z = gp[i], sg = sigmoid(z), d = dmp[i];
        if constexpr (plan::need_du) dup[i] = d * z * sg;
        if constexpr (plan::need_dg) dmp[i] = d * s.u[i] * sg * (T(1) + z * (T(1) - sg));
      }
      if constexpr (plan::train_gate) linear_backward_weight(s.h, dm, gr.gate_proj);
      if constexpr (plan::train_up) linear_backward_weight(s.h, du, gr.up_proj);
      if constexpr (plan::adapt_gate) lora_backward(w.gate_proj, s.h, s.u_gate, dm, gr.gate_lora);
      if constexpr (plan::adapt_up) lora_backward(w.up_proj, s.h, s.u_up, du, gr.up_lora);
      if constexpr (NeedsInputGrad) {
        tensor<T> dh(dout.shape(), memory_use::workspace);
        linear_backward_input(w.gate_proj, dm, dh, false);
        linear_backward_input(w.up_proj, du, dh, true);
        return dh;
      } else {
        return {};
      }
    }
  }

  // Per projection: base weight (and bias), then its adapter, as for_each_parameter orders them.
  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    auto both = [&](const char* name, linear_weights<T>& p, linear_weights<T>& dp) {
      f(std::string(name) + ".weight", p.weight, dp.weight);
      if (p.has_bias()) f(std::string(name) + ".bias", p.bias, dp.bias);
    };
    auto factors = [&](const char* name, linear_weights<T>& p, lora_factors<T>& dp) {
      f(std::string(name) + ".lora_A.weight", p.lora.A, dp.A);
      f(std::string(name) + ".lora_B.weight", p.lora.B, dp.B);
    };
    if constexpr (plan::train_gate) both("gate_proj", w.gate_proj, g.gate_proj);
    if constexpr (plan::adapt_gate) factors("gate_proj", w.gate_proj, g.gate_lora);
    if constexpr (plan::train_up) both("up_proj", w.up_proj, g.up_proj);
    if constexpr (plan::adapt_up) factors("up_proj", w.up_proj, g.up_lora);
    if constexpr (plan::train_down) both("down_proj", w.down_proj, g.down_proj);
    if constexpr (plan::adapt_down) factors("down_proj", w.down_proj, g.down_lora);
  }

};

}  // namespace skillgraft::nn
