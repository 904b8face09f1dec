#pragma once
// Gated MLP (LLaMA / Qwen2 SwiGLU), with the gate activation as a policy (nn/activation.hpp).
//
//   forward   g = h Wg^T,  u = h Wu^T,  m = phi(g; a) * u,  out = m Wd^T
//             phi(g) = silu(g) = g sigmoid(g) by default; xsilu / xgelu: g ((1 + 2a) gamma(g) - a)
//   backward  dWd += dout^T m;  dm = dout Wd
//             dg = dm * u * phi'(g),  du = dm * phi(g),  da += sum(dm * u * dphi/da)
//             silu'(g) = s (1 + g (1 - s)),  s = sigmoid(g)
//             dWg += dg^T h,  dWu += du^T h,  dh = dg Wg + du Wu
//
// With Down frozen m is never kept; with only Down trainable, g and u are not kept
// and dm is never formed. The range a (mlp.act_fn.alpha, tag group::act_range) exists
// only under an expanded activation; training it keeps g and u, like training Gate.
#include <cmath>
#include <string>
#include <vector>

#include "skillgraft/nn/activation.hpp"
#include "skillgraft/nn/config.hpp"
#include "skillgraft/nn/block_schema.hpp"
#include "skillgraft/nn/linear.hpp"
#include "skillgraft/nn/optional_member.hpp"
#include "skillgraft/nn/projection_schema.hpp"
#include "skillgraft/policy/trainable.hpp"

namespace skillgraft::nn {

namespace members {
SKILLGRAFT_OPTIONAL_MEMBER(act_alpha);
}  // namespace members

template <class T, class Backend = backend::cpu>
struct mlp_weights {
  using tensor_t = typename Backend::template tensor<T>;
  linear_weights<T, Backend> gate_proj, up_proj, down_proj;
  tensor_t act_alpha;  // act_fn.alpha [1]: the gate range of xsilu / xgelu; empty for silu
  // A mixture of experts (nn/moe_mlp.hpp), empty for a dense MLP: this MLP is expert 0
  // and experts[j] is expert j + 1 (the last one is the newest, the one that trains).
  tensor_t router;                  // router.weight [experts, hidden]
  std::vector<mlp_weights> experts; // experts 1 .. E-1 (no router or experts of their own)

  mlp_weights() = default;
  mlp_weights(const decoder_config& c, memory_use use) {
    mlp_projections::for_each(
        [&](auto p) { decltype(p)::weight(*this) = linear_weights<T, Backend>(p.out(c), p.in(c), p.bias(c), use); });
  }
  bool is_mixture() const { return !router.empty(); }
  std::size_t expert_count() const { return is_mixture() ? router.dim(0) : 1; }
  mlp_weights& expert(std::size_t e) { return e == 0 ? *this : experts[e - 1]; }
  const mlp_weights& expert(std::size_t e) const { return e == 0 ? *this : experts[e - 1]; }
  std::size_t elements() const {
    std::size_t n = gate_proj.elements() + up_proj.elements() + down_proj.elements() + act_alpha.size() + router.size();
    for (const auto& e : experts) n += e.elements();
    return n;
  }
  // Another expert with the same values (Gate, Up, Down and the range; no adapters).
  mlp_weights clone_expert(memory_use use) const {
    mlp_weights e;
    mlp_projections::for_each([&](auto p) {
      using P = decltype(p);
      P::weight(e).weight = P::weight(*this).weight.clone(use);
      P::weight(e).bias = P::weight(*this).bias.clone(use);
    });
    e.act_alpha = act_alpha.clone(use);
    return e;
  }
  // Every tensor with its Hugging Face name relative to the MLP ("gate_proj.weight",
  // "act_fn.alpha", "router.weight", "experts.1.gate_proj.weight" for expert 1).
  template <class Other, class F>
  void for_each_tensor(Other& other, F&& f) const {
    visit_expert(*this, other, std::string(), f);
    if (!router.empty()) f(schema::router::name(), router, other.router);
    for (std::size_t e = 0; e < experts.size() && e < other.experts.size(); ++e)
      visit_expert(experts[e], other.experts[e], schema::expert_prefix(e + 1), f);
  }

 private:
  // Gate, Up, Down and the range of one expert (not recursive: experts have no experts).
  template <class Other, class F>
  static void visit_expert(const mlp_weights& w, Other& other, const std::string& prefix, F& f) {
    mlp_projections::for_each([&](auto p) {
      using P = decltype(p);
      P::weight(w).for_each_tensor(P::weight(other),
                                   [&](const std::string& n, auto& a, auto& b) { f(prefix + P::name() + "." + n, a, b); });
    });
    if (!w.act_alpha.empty()) f(prefix + schema::act_fn_alpha::name(), w.act_alpha, other.act_alpha);
  }
};

// Gives an MLP (every expert of a mixture) the range alpha of an expanded activation,
// a tensor [1] counted as weights. alpha = 0 keeps the function of SiLU (GELU) gating.
template <class T>
void add_act_range(mlp_weights<T>& w, T alpha = T(0)) {
  for (std::size_t e = 0; e < w.expert_count(); ++e) {
    auto& x = w.expert(e);
    if (!x.act_alpha.empty())
      throw std::invalid_argument("skillgraft: " + schema::act_fn_alpha::path() + " exists already");
    x.act_alpha = tensor<T>({1}, memory_use::weights);
    x.act_alpha[0] = alpha;
  }
}

template <class Recipe, bool NeedsInputGrad, class Act = act::silu>
struct mlp_plan {
  static constexpr bool train_gate = trains_v<proj::gate, Recipe>;
  static constexpr bool train_up = trains_v<proj::up, Recipe>;
  static constexpr bool train_down = trains_v<proj::down, Recipe>;
  static constexpr bool train_alpha = Act::has_range && trains_v<group::act_range, Recipe>;
  static constexpr bool adapt_gate = trains_v<lora<proj::gate>, Recipe>;
  static constexpr bool adapt_up = trains_v<lora<proj::up>, Recipe>;
  static constexpr bool adapt_down = trains_v<lora<proj::down>, Recipe>;
  static constexpr bool need_dg = train_gate || adapt_gate || NeedsInputGrad;
  static constexpr bool need_du = train_up || adapt_up || NeedsInputGrad;
  static constexpr bool need_dm = need_dg || need_du || train_alpha;
  static constexpr bool active = need_dm || train_down || adapt_down;
  static constexpr bool save_h = train_gate || train_up || adapt_gate || adapt_up;  // dW{g,u} = d{g,u}^T h, dA
  static constexpr bool save_g = need_dm;                   // phi(g), phi'(g)
  static constexpr bool save_u = need_dg || train_alpha;    // dg = dm * u * phi'(g), da = sum(dm * u * dphi/da)
  static constexpr bool save_m = train_down || adapt_down;  // dWd = dout^T m, dA_down
};

// Gradients of the trainable tensors only; the same type whether or not dh is wanted.
template <class T, class Recipe, class Act = act::silu, class Backend = backend::cpu>
struct mlp_grads
    : members::optional_gate_proj<trains_v<proj::gate, Recipe>, linear_weights<T, Backend>>,
      members::optional_up_proj<trains_v<proj::up, Recipe>, linear_weights<T, Backend>>,
      members::optional_down_proj<trains_v<proj::down, Recipe>, linear_weights<T, Backend>>,
      members::optional_gate_lora<trains_v<lora<proj::gate>, Recipe>, lora_factors<T, Backend>>,
      members::optional_up_lora<trains_v<lora<proj::up>, Recipe>, lora_factors<T, Backend>>,
      members::optional_down_lora<trains_v<lora<proj::down>, Recipe>, lora_factors<T, Backend>>,
      members::optional_act_alpha<mlp_plan<Recipe, false, Act>::train_alpha, typename Backend::template tensor<T>> {};

// Runtime settings of an MLP policy (a dense MLP has none).
struct dense_options {
  bool operator==(const dense_options&) const = default;
};

namespace detail {

// Throws, naming the tensor, unless a projection has the shape the config implies.
template <class T, class B>
void check_projection(const linear_weights<T, B>& l, std::size_t out, std::size_t in, bool bias, const std::string& name) {
  cpu::expect_shape(l.weight, {out, in}, name + ".weight");
  if (l.has_lora()) {
    const std::size_t r = l.lora.rank();
    cpu::expect_shape(l.lora.A, {r, in}, name + ".lora_A.weight");
    cpu::expect_shape(l.lora.B, {out, r}, name + ".lora_B.weight");
  }
  if (bias) cpu::expect_shape(l.bias, {out}, name + ".bias");
  else if (l.has_bias()) throw std::invalid_argument("skillgraft: " + name + ".bias present but the config has no bias");
}

// Gate, Up, Down and the range of one MLP (or expert) named `prefix` ("model.layers.0.mlp.").
template <class Act, class T, class B>
void check_expert(const mlp_weights<T, B>& w, const decoder_config& c, const std::string& prefix) {
  mlp_projections::for_each([&](auto p) {
    check_projection(decltype(p)::weight(w), p.out(c), p.in(c), p.bias(c), prefix + p.name());
  });
  const std::string alpha = prefix + schema::act_fn_alpha::name();
  if constexpr (Act::has_range) {
    if (w.act_alpha.empty())
      throw std::invalid_argument("skillgraft: " + alpha + " is missing: an " + std::string(Act::name) +
                                  " MLP needs its range alpha [1] (nn::add_act_range gives alpha = 0)");
    cpu::expect_shape(w.act_alpha, {1}, alpha);
  } else if (!w.act_alpha.empty()) {
    throw std::invalid_argument("skillgraft: " + alpha + " present but the MLP's activation is " +
                                std::string(Act::name) + ", which has no range (use act::xsilu, act::xgelu or act::xatlu)");
  }
}

// The range tensor alpha [1] of an MLP whose activation has one (null otherwise), checked.
template <class Act, class T, class B>
const typename B::template tensor<T>* range_of(const mlp_weights<T, B>& w) {
  if constexpr (Act::has_range) {
    if (w.act_alpha.size() != 1)
      throw std::invalid_argument("skillgraft: " + schema::act_fn_alpha::path() + " has shape " + w.act_alpha.shape().str() +
                                  ", expected [1] (an " + std::string(Act::name) +
                                  " MLP needs its range: nn::add_act_range)");
    return &w.act_alpha;
  } else {
    return nullptr;
  }
}
// The same, read on the host (0 without a range): CPU weights only.
template <class Act, class T>
T range_value(const mlp_weights<T>& w) {
  const auto* a = range_of<Act>(w);
  return a ? (*a)[0] : T(0);
}

}  // namespace detail

template <class T, class Recipe, bool NeedsInputGrad, class Act = act::silu, class Backend = backend::cpu>
struct swiglu_mlp {
  using value_type = T;
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = mlp_weights<T, Backend>;
  using activation = Act;
  using options = dense_options;
  using plan = mlp_plan<Recipe, NeedsInputGrad, Act>;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  struct saved_t : members::optional_h<plan::save_h, tensor_t>,
                   members::optional_g<plan::save_g, tensor_t>,
                   members::optional_u<plan::save_u, tensor_t>,
                   members::optional_m<plan::save_m, tensor_t>,
                   members::optional_u_gate<plan::adapt_gate, tensor_t>,
                   members::optional_u_up<plan::adapt_up, tensor_t>,
                   members::optional_u_down<plan::adapt_down, tensor_t> {};
  using grads_t = mlp_grads<T, Recipe, Act, Backend>;

  decoder_config config;
  [[no_unique_address]] options mlp_options{};

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    mlp_projections::for_each([&](auto p) { make_projection_grads<Recipe>(p, w, g); });
    if constexpr (plan::train_alpha)
      g.act_alpha = (detail::range_of<Act>(w), tensor_t({1}, memory_use::gradients));
    return g;
  }

  tensor_t forward(const weights_t& w, const tensor_t& h, saved_t& s) const {
    check_linear_input(w.gate_proj, h, "mlp");
    const tensor_t* alpha = detail::range_of<Act>(w);
    const shape_t inner = with_last(h.shape(), w.gate_proj.out_features());
    auto kept = [](bool keep) { return keep ? memory_use::saved_activations : memory_use::workspace; };
    // g, u, m and out are written whole (GEMMs with beta = 0, the gated product) before any read.
    tensor_t g(inner, kept(plan::save_g), uninitialized), u(inner, kept(plan::save_u), uninitialized),
        m(inner, kept(plan::save_m), uninitialized);
    auto adapter_input = [&](bool adapt, const linear_weights<T, Backend>& p, const char* name) {
      if (!adapt) return tensor_t();
      require_lora(p, name);
      return tensor_t(with_last(h.shape(), p.lora.rank()), memory_use::saved_activations);
    };
    tensor_t ug = adapter_input(plan::adapt_gate, w.gate_proj, "gate_proj"),
             uu = adapter_input(plan::adapt_up, w.up_proj, "up_proj"),
             ud = adapter_input(plan::adapt_down, w.down_proj, "down_proj");
    linear_forward(w.gate_proj, h, g, plan::adapt_gate ? &ug : nullptr, "gate_proj: g = h Wg^T");
    linear_forward(w.up_proj, h, u, plan::adapt_up ? &uu : nullptr, "up_proj: u = h Wu^T");
    Backend::template gated_product<Act>(g.data(), u.data(), alpha, m.data(), m.size());
    tensor_t out(h.shape(), memory_use::workspace, uninitialized);
    linear_forward(w.down_proj, m, out, plan::adapt_down ? &ud : nullptr, "down_proj: out = m Wd^T");
    if constexpr (plan::adapt_gate) s.u_gate = std::move(ug);
    if constexpr (plan::adapt_up) s.u_up = std::move(uu);
    if constexpr (plan::adapt_down) s.u_down = std::move(ud);
    if constexpr (plan::save_h) s.h = h.clone(memory_use::saved_activations);
    if constexpr (plan::save_g) s.g = std::move(g);
    if constexpr (plan::save_u) s.u = std::move(u);
    if constexpr (plan::save_m) s.m = std::move(m);
    return out;
  }

  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dout, grads_t& gr) const {
    if constexpr (plan::train_down) linear_backward_weight(s.m, dout, gr.down_proj, "down_proj: dWd += dout^T m");
    if constexpr (plan::adapt_down) lora_backward(w.down_proj, s.m, s.u_down, dout, gr.down_lora);
    if constexpr (!plan::need_dm) {
      return {};
    } else {
      const shape_t inner = with_last(dout.shape(), w.gate_proj.out_features());
      tensor_t dm(inner, memory_use::workspace, uninitialized);
      linear_backward_input(w.down_proj, dout, dm, false, "down_proj: dm = dout Wd");
      // dg overwrites dm's buffer after du has read it; du gets its own only when needed.
      tensor_t du;
      if constexpr (plan::need_du) du = tensor_t(inner, memory_use::workspace, uninitialized);
      const tensor_t* u = nullptr;
      if constexpr (plan::save_u) u = &s.u;
      tensor_t* dalpha = nullptr;
      if constexpr (plan::train_alpha) dalpha = &gr.act_alpha;
      Backend::template gated_product_backward<Act, plan::need_dg, plan::need_du, plan::train_alpha>(
          s.g.data(), u ? u->data() : nullptr, detail::range_of<Act>(w), dm.data(), plan::need_du ? du.data() : nullptr,
          dalpha, dm.size());
      if constexpr (plan::train_gate) linear_backward_weight(s.h, dm, gr.gate_proj, "gate_proj: dWg += dg^T h");
      if constexpr (plan::train_up) linear_backward_weight(s.h, du, gr.up_proj, "up_proj: dWu += du^T h");
      if constexpr (plan::adapt_gate) lora_backward(w.gate_proj, s.h, s.u_gate, dm, gr.gate_lora);
      if constexpr (plan::adapt_up) lora_backward(w.up_proj, s.h, s.u_up, du, gr.up_lora);
      if constexpr (NeedsInputGrad) {
        tensor_t dh(dout.shape(), memory_use::workspace, uninitialized);
        linear_backward_input(w.gate_proj, dm, dh, false, "gate_proj: dh = dg Wg");
        linear_backward_input(w.up_proj, du, dh, true, "up_proj: dh += du Wu");
        return dh;
      } else {
        return {};
      }
    }
  }

  // Per projection: base weight (and bias), then its adapter, then the range, as
  // for_each_parameter orders them.
  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    mlp_projections::for_each([&](auto p) { visit_projection<Recipe>(p, w, g, f); });
    if constexpr (plan::train_alpha) f(schema::act_fn_alpha::name(), w.act_alpha, g.act_alpha);
  }

  // --- what it costs, from the plan (decoder_block and memory_report add these up) ---------

  static std::size_t saved_elements(const decoder_config& c, seq_shape sh, const options&) {
    const std::size_t N = sh.tokens(), d = std::size_t(c.hidden), I = std::size_t(c.intermediate),
                      r = std::size_t(c.lora_rank);
    std::size_t n = 0;
    if (plan::save_h) n += N * d;
    if (plan::save_g) n += N * I;
    if (plan::save_u) n += N * I;
    if (plan::save_m) n += N * I;
    n += N * r * std::size_t(plan::adapt_gate + plan::adapt_up + plan::adapt_down);  // adapter inputs x A^T
    return n;
  }
  static std::size_t trainable_elements(const decoder_config& c, const options&) {
    return trainable_projection_elements<Recipe>(mlp_projections{}, c) + (plan::train_alpha ? 1 : 0);
  }
  // Multiply-add FLOPs (2 per MAC) of the GEMMs forward and backward run (adapters included).
  struct flop_count {
    double forward = 0, backward = 0;
  };
  static flop_count flops(const decoder_config& c, seq_shape sh, const options&) {
    const double N = double(sh.tokens()), d = c.hidden, I = c.intermediate, r = c.lora_rank;
    flop_count f;
    f.forward = 3 * 2 * N * d * I;
    double b = 0;
    if (plan::train_down) b += 2 * N * d * I;
    if (plan::need_dm) b += 2 * N * d * I;
    if (plan::train_gate) b += 2 * N * d * I;
    if (plan::train_up) b += 2 * N * d * I;
    if (NeedsInputGrad) b += 2 * 2 * N * d * I;
    auto adapter = [&](bool on, double in, double out, bool dx) {
      if (!on) return;
      f.forward += 2 * N * r * (in + out);
      b += 2 * N * out * r * 2 + 2 * N * r * in + (dx ? 2 * N * r * in : 0);
    };
    adapter(plan::adapt_gate, d, I, NeedsInputGrad);
    adapter(plan::adapt_up, d, I, NeedsInputGrad);
    adapter(plan::adapt_down, I, d, plan::need_dm);
    f.backward = b;
    return f;
  }
};

// --- MLP policies of a decoder block ---------------------------------------------------------
//
// A policy is a type that names the MLP layer a decoder block builds (`layer<T, Recipe, Dx, Backend>`),
// its gradients (`grads<T, Recipe, Backend>`), its runtime settings (`options`) and which optional
// tags a recipe may name with it (`accepts<Tag>`).

// The dense gated MLP with gate activation Act (default: SiLU, the LLaMA/Qwen2 MLP).
template <class Act = act::silu>
struct swiglu {
  using activation = Act;
  using options = dense_options;
  template <class T, class Recipe, bool NeedsInputGrad, class Backend = backend::cpu>
  using layer = swiglu_mlp<T, Recipe, NeedsInputGrad, Act, Backend>;
  template <class T, class Recipe, class Backend = backend::cpu>
  using grads = mlp_grads<T, Recipe, Act, Backend>;
  template <class Tag>
  static constexpr bool accepts =
      !std::is_same_v<Tag, group::router> && (Act::has_range || !std::is_same_v<Tag, group::act_range>);
  // Each row's output depends on that row alone, so the top block may run it on the rows a
  // loss reads (nn/output_rows.hpp). A policy without this member runs every row.
  static constexpr bool rows_independent = true;

  // Throws, naming the tensor, unless w is a dense MLP of this activation for config c
  // (prefix: "model.layers.3.mlp.").
  template <class T, class B>
  static void check_weights(const mlp_weights<T, B>& w, const decoder_config& c, const options&, const std::string& prefix) {
    if (w.is_mixture() || !w.experts.empty())
      throw std::invalid_argument("skillgraft: " + prefix + schema::router::name() + " present, but the block's MLP policy is "
                                  "dense (nn::swiglu); a mixture of experts needs an nn::moe policy");
    detail::check_expert<Act>(w, c, prefix);
  }
  // Parameters beyond Gate, Up and Down (block_weights::elements_for counts those).
  static std::size_t extra_weight_elements(const decoder_config&, const options&) { return Act::has_range ? 1 : 0; }
};

using default_mlp = swiglu<act::silu>;

}  // namespace skillgraft::nn
