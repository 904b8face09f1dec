#pragma once
// Pre-norm decoder block (LlamaDecoderLayer / Qwen2DecoderLayer), specialised by recipe.
//
//   forward   h1 = rmsnorm(x; w_attn_norm),  x2 = x + attention(h1)
//             h2 = rmsnorm(x2; w_mlp_norm),  y  = x2 + mlp(h2)
//   backward  dx2 = dy + rmsnorm'(mlp'(dy))         (only if anything at or below attention trains)
//             dx  = dx2 + rmsnorm'(attention'(dx2)) (only if something below this block trains)
//   gated     (policy nn::gate_skip) x2 = x + ga * attention(h1), y = x2 + gm * mlp(h2) with
//             ga = sigmoid(h1 Wa^T + ba), gm = sigmoid(h2 Wm^T + bm) (nn/residual_gate.hpp)
//
// The recipe and `NeedsInputGrad` (does anything below this block train?) decide
// at compile time which sub-layers run backward, which weight gradients exist
// (`grads_t`) and which activations forward keeps (`saved_t`). The MLP is a policy
// (nn/swiglu.hpp, nn/moe_mlp.hpp): the dense SiLU MLP by default, or another gate
// activation (`swiglu<act::xsilu>`), or a mixture of experts (`moe<act::silu, 2>`).
#include <cstddef>
#include <string>
#include <type_traits>

#include "skillgraft/backend/cpu/backend.hpp"
#include "skillgraft/nn/attention.hpp"
#include "skillgraft/nn/block_schema.hpp"
#include "skillgraft/nn/config.hpp"
#include "skillgraft/nn/gate_skip.hpp"
#include "skillgraft/nn/optional_member.hpp"
#include "skillgraft/nn/output_rows.hpp"
#include "skillgraft/nn/rmsnorm.hpp"
#include "skillgraft/nn/swiglu.hpp"
#include "skillgraft/policy/trainable.hpp"

namespace skillgraft::nn {

template <class T, class Backend = backend::cpu>
struct block_weights {
  using tensor_t = typename Backend::template tensor<T>;
  tensor_t attn_norm;                       // input_layernorm.weight [hidden]
  attention_weights<T, Backend> self_attn;  // self_attn.{q,k,v,o}_proj
  tensor_t mlp_norm;                        // post_attention_layernorm.weight [hidden]
  mlp_weights<T, Backend> mlp;              // mlp.{gate,up,down}_proj
  // GateSkip residual gates (nn/gate_skip.hpp), empty unless the block's policy has them:
  // self_attn_residual_gate.{weight,bias}, mlp_residual_gate.{weight,bias} ([w, hidden], [w];
  // w = hidden for vector gates, 1 for scalar ones). Not Hugging Face names: docs/gateskip.md.
  linear_weights<T, Backend> attn_gate, mlp_gate;

  block_weights() = default;
  block_weights(const decoder_config& c, memory_use use = memory_use::weights)
      : attn_norm({std::size_t(c.hidden)}, use),
        self_attn(c, use),
        mlp_norm({std::size_t(c.hidden)}, use),
        mlp(c, use) {}
  std::size_t elements() const {
    return attn_norm.size() + self_attn.elements() + mlp_norm.size() + mlp.elements() + attn_gate.elements() +
           mlp_gate.elements();
  }
  bool has_residual_gates() const { return !attn_gate.weight.empty(); }
  // The same count from the config alone (for memory planning).
  static std::size_t elements_for(const decoder_config& c) {
    return 2 * std::size_t(c.hidden) + projection_elements(block_projections{}, c);  // norms, projections
  }
  // Every tensor with its Hugging Face name relative to the layer ("self_attn.q_proj.weight"),
  // paired with the same tensor of `other`.
  template <class Other, class F>
  void for_each_tensor(Other& other, F&& f) const {
    auto norm = [&](auto e) { f(e.path(), e.weight(*this), e.weight(other)); };
    auto gate = [&](auto e) {
      if (!e.weight(*this).weight.empty())
        e.weight(*this).for_each_tensor(e.weight(other),
                                        [&](const std::string& n, auto& a, auto& b) { f(e.path() + "." + n, a, b); });
    };
    norm(schema::input_layernorm{});
    self_attn.for_each_tensor(other.self_attn, [&](const std::string& n, auto& a, auto& b) { f("self_attn." + n, a, b); });
    gate(schema::self_attn_residual_gate{});
    norm(schema::post_attention_layernorm{});
    mlp.for_each_tensor(other.mlp, [&](const std::string& n, auto& a, auto& b) { f("mlp." + n, a, b); });
    gate(schema::mlp_residual_gate{});
  }
};

// Throws, naming the tensor, when a weight's shape does not match the config (and, for the
// MLP, the policy Mlp with its options: a range alpha for xsilu, router and experts for moe).
template <class Mlp = default_mlp, class T, class B>
void check_block_weights(const block_weights<T, B>& w, const decoder_config& c, const std::string& prefix = "",
                         const typename Mlp::options& o = {}) {
  const auto d = std::size_t(c.hidden);
  block_norms::for_each([&](auto e) { cpu::expect_shape(e.weight(w), {d}, prefix + e.path()); });
  attention_projections::for_each([&](auto p) {
    detail::check_projection(p.in_block(w), p.out(c), p.in(c), p.bias(c), prefix + p.path());
  });
  Mlp::check_weights(w.mlp, c, o, prefix + "mlp.");
  constexpr bool gated = has_residual_gates_v<Mlp>;
  residual_gates::for_each(
      [&](auto e) { check_residual_gate(e.weight(w), gated, gate_shape_of<Mlp>, d, prefix + e.path()); });
}

// Gives a block the two residual gates of a gate_skip policy of shape `shape`, CPU weights
// (bias init.bias, weights N(0, init.weight_std^2) drawn from a generator seeded by
// init.seed and the layer index, so every layer's gates differ and runs repeat).
template <class T>
void add_residual_gates(block_weights<T>& w, const decoder_config& c, gate_shape shape = gate_shape::vector,
                        const residual_gate_init& init = {}, int layer = 0) {
  if (!w.attn_gate.weight.empty() || !w.mlp_gate.weight.empty())
    throw std::invalid_argument("skillgraft: model.layers." + std::to_string(layer) + " has residual gates already");
  const std::size_t d = std::size_t(c.hidden), width = gate_width(shape, d);
  std::mt19937_64 rng(init.seed * 1000003ULL + std::uint64_t(layer));
  std::normal_distribution<double> normal(0.0, init.weight_std);
  for (auto* g : {&w.attn_gate, &w.mlp_gate}) {
    *g = linear_weights<T>(width, d, true, memory_use::weights);
    for (std::size_t i = 0; i < g->weight.size(); ++i) g->weight[i] = init.weight_std > 0 ? T(normal(rng)) : T(0);
    for (std::size_t i = 0; i < width; ++i) g->bias[i] = T(init.bias);
  }
}

// A recipe naming a tag the language model does not have stops here, naming the tag.
template <class Tag, class Recipe>
struct recipe_tag_outside_language_model {
  static constexpr bool ok = decltype(hana::contains(language_model_tags, hana::type_c<Tag>))::value;
  static_assert(ok, "skillgraft: the recipe names a tag (first template argument) that a decoder block does not have");
};
// A recipe naming a tag that the block's MLP policy does not have (the range of an activation
// without one, the router of a dense MLP, adapters on experts) stops here.
template <class Tag, class Recipe, class Mlp>
struct recipe_tag_outside_mlp_policy {
  static constexpr bool ok = is_residual_gate_v<Tag> || Mlp::template accepts<Tag>;
  static_assert(ok, "skillgraft: the recipe names a tag (first template argument) that the block's MLP policy (third) does not have");
};
// A recipe naming a residual gate for a block built without gates stops here.
template <class Tag, class Recipe, class Policy>
struct residual_gate_on_block_without_gates {
  static constexpr bool ok = !is_residual_gate_v<Tag> || has_residual_gates_v<Policy>;
  static_assert(ok, "skillgraft: the recipe names a residual gate (first template argument) but the block's policy (third) has no gates: build it with nn::gate_skip<...>");
};
template <class Recipe, class Mlp = default_mlp>
constexpr bool check_language_model_recipe() {
  hana::for_each(Recipe::set, [](auto t) {
    (void)recipe_tag_outside_language_model<typename decltype(t)::type, Recipe>::ok;
    (void)recipe_tag_outside_mlp_policy<typename decltype(t)::type, Recipe, Mlp>::ok;
    (void)residual_gate_on_block_without_gates<typename decltype(t)::type, Recipe, Mlp>::ok;
  });
  return true;
}

// Asking for the gradient of a frozen tensor stops here, naming the tag and the recipe.
template <class Tag, class Recipe>
struct gradient_of_frozen_tensor {
  static constexpr bool ok = trains_v<Tag, Recipe>;
  static_assert(ok, "skillgraft: gradient requested for a tag (first template argument) that the recipe (second) does not train");
};

// Gradients of a block: members only for the recipe's trainable tensors
// (`q_proj`, ..., `down_proj`, `attn_norm`, `mlp_norm`, and the MLP policy's `act_alpha`,
// `router`), so naming a frozen one does not compile.
template <class T, class Recipe, class Mlp = default_mlp, class Backend = backend::cpu>
struct block_grads
    : attention_grads<T, Recipe, Backend>,
      Mlp::template grads<T, Recipe, Backend>,
      members::optional_attn_norm<trains_v<group::attn_norm, Recipe>, typename Backend::template tensor<T>>,
      members::optional_mlp_norm<trains_v<group::mlp_norm, Recipe>, typename Backend::template tensor<T>>,
      members::optional_self_attn_residual_gate<
          has_residual_gates_v<Mlp> && trains_v<group::residual_gate<branch::attention>, Recipe>, linear_weights<T, Backend>>,
      members::optional_mlp_residual_gate<has_residual_gates_v<Mlp> && trains_v<group::residual_gate<branch::mlp>, Recipe>,
                                          linear_weights<T, Backend>> {};

template <class T, class Recipe, bool NeedsInputGrad, class Backend = backend::cpu, class Mlp = default_mlp>
struct decoder_block {
  static_assert(check_language_model_recipe<Recipe, Mlp>());
  using value_type = T;
  using backend_type = Backend;
  using tensor_t = typename Backend::template tensor<T>;
  using mlp_policy = Mlp;
  using mlp_options_t = typename Mlp::options;
  using recipe_type = restrict_t<Recipe, decltype(block_tags)>;
  using weights_t = block_weights<T, Backend>;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  // The flow of gradients through the block, decided by the recipe.
  static constexpr bool gated = has_residual_gates_v<Mlp>;  // GateSkip residual gates (nn/gate_skip.hpp)
  static constexpr bool train_attn_norm = trains_v<group::attn_norm, recipe_type>;
  static constexpr bool train_mlp_norm = trains_v<group::mlp_norm, recipe_type>;
  static constexpr bool attention_needs_dh = train_attn_norm || NeedsInputGrad;
  using attn_norm_t = rmsnorm<T, train_attn_norm, NeedsInputGrad, Backend>;
  using attention_t = self_attention<T, recipe_type, attention_needs_dh, Backend>;
  static constexpr bool attention_active = attention_t::plan::active;
  using attn_gate_plan = residual_gate_plan<gated, trains_v<group::residual_gate<branch::attention>, recipe_type>,
                                            attention_needs_dh, attention_active>;
  using attn_gate_t = residual_gate<T, attn_gate_plan, Backend>;
  // gradient of the residual stream between the halves: the attention half runs backward
  static constexpr bool need_dx2 = attention_active || attn_gate_plan::active;
  using mlp_norm_t = rmsnorm<T, train_mlp_norm, need_dx2, Backend>;
  static constexpr bool mlp_needs_dh = train_mlp_norm || need_dx2;
  using mlp_t = typename Mlp::template layer<T, recipe_type, mlp_needs_dh, Backend>;
  static constexpr bool mlp_active = mlp_t::plan::active;
  using mlp_gate_plan =
      residual_gate_plan<gated, trains_v<group::residual_gate<branch::mlp>, recipe_type>, mlp_needs_dh, mlp_active>;
  using mlp_gate_t = residual_gate<T, mlp_gate_plan, Backend>;
  static constexpr bool any_backward = mlp_active || mlp_gate_plan::active;  // nothing trains at or below: none
  // Runs its MLP half on the output rows alone (nn/output_rows.hpp) where the MLP policy says its
  // rows are independent. A mixture's routing and a gated block's token-wise skipping look at the
  // whole batch: those run every row, and the stack selects after the block.
  static constexpr bool selects_rows = !gated && requires { requires Mlp::rows_independent; };

  struct saved_t : members::optional_attn_norm<attn_norm_t::keeps_input, typename attn_norm_t::saved_t>,
                   members::optional_attention<attention_active, typename attention_t::saved_t>,
                   members::optional_self_attn_residual_gate<gated, typename attn_gate_t::saved_t>,
                   members::optional_mlp_norm<mlp_norm_t::keeps_input, typename mlp_norm_t::saved_t>,
                   members::optional_mlp<mlp_active, typename mlp_t::saved_t>,
                   members::optional_mlp_residual_gate<gated, typename mlp_gate_t::saved_t> {};
  using grads_t = block_grads<T, recipe_type, Mlp, Backend>;
  static constexpr bool keeps_nothing = std::is_empty_v<saved_t>;

  decoder_config config;
  const rope_table<T, Backend>* table = nullptr;
  int first_pos = 0;
  [[no_unique_address]] mlp_options_t mlp_options{};

  decoder_block() = default;
  decoder_block(const decoder_config& c, const rope_table<T, Backend>& t, const mlp_options_t& o = {})
      : config(c), table(&t), mlp_options(o) {}

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    static_cast<typename attention_t::grads_t&>(g) = attention().make_grads(w.self_attn);
    static_cast<typename mlp_t::grads_t&>(g) = mlp().make_grads(w.mlp);
    block_norms::for_each([&](auto e) {
      if constexpr (trains_v<typename decltype(e)::tag, recipe_type>)
        e.grad(g) = tensor_t(e.weight(w).shape(), memory_use::gradients);
    });
    residual_gates::for_each([&](auto e) {
      if constexpr (has_residual_gates_v<Mlp> && trains_v<typename decltype(e)::tag, recipe_type>) {
        if (e.weight(w).weight.empty())
          throw std::invalid_argument("skillgraft: the recipe trains " + e.name() +
                                      ", but the block has no residual gates (nn::add_residual_gates)");
        e.grad(g) = e.weight(w).like(memory_use::gradients);
      }
    });
    return g;
  }

  // rows: when given (selects_rows blocks only), the MLP half runs on those rows of x2 alone and
  // the output is [1, rows, hidden] (nn/output_rows.hpp); backward then takes the same rows.
  tensor_t forward(const weights_t& w, const tensor_t& x, saved_t& s, const output_rows* rows = nullptr) const {
    if (x.rank() != 3 || x.dim(2) != std::size_t(config.hidden))
      throw std::invalid_argument("skillgraft: decoder block input has shape " + x.shape().str() +
                                  ", expected [batch, seq, " + std::to_string(config.hidden) + "]");
    tensor_t h1 = attn_norm().forward(w.attn_norm, x,
                                      part<attn_norm_t::keeps_input, typename attn_norm_t::saved_t>(
                                          s, [](auto& ss) -> auto& { return ss.attn_norm; }),
                                      schema::input_layernorm::tag::name);
    if constexpr (!selects_rows)
      if (rows)
        throw std::logic_error("skillgraft: this block (gated, or a mixture) runs every row; the stack selects after it");
    // With rows, attention forms its queries and output for those rows only: x2 is [1, rows, hidden].
    tensor_t x2 = attention().forward(
        w.self_attn, h1, part<attention_active, typename attention_t::saved_t>(s, [](auto& ss) -> auto& { return ss.attention; }),
        rows);
    if constexpr (gated)
      x2 = attn_gate_t::forward(w.attn_gate, h1, std::move(x2), x, s.self_attn_residual_gate,
                                schema::self_attn_residual_gate::tag::name.data(), train_skip_of(mlp_options));
    else if (rows)
      Backend::add_into(x2, select_rows<Backend>(x, *rows));
    else
      Backend::add_into(x2, x);
    tensor_t h2 = mlp_norm().forward(w.mlp_norm, x2,
                                     part<mlp_norm_t::keeps_input, typename mlp_norm_t::saved_t>(
                                         s, [](auto& ss) -> auto& { return ss.mlp_norm; }),
                                     schema::post_attention_layernorm::tag::name);
    tensor_t y = mlp().forward(w.mlp, h2, part<mlp_active, typename mlp_t::saved_t>(
                                              s, [](auto& ss) -> auto& { return ss.mlp; }));
    if constexpr (gated)
      y = mlp_gate_t::forward(w.mlp_gate, h2, std::move(y), x2, s.mlp_residual_gate,
                              schema::mlp_residual_gate::tag::name.data(), train_skip_of(mlp_options));
    else
      Backend::add_into(y, x2);
    return y;
  }

  // Adds weight gradients into g; returns dx when NeedsInputGrad, else an empty tensor.
  // rows: those given to forward (dy is then [1, rows, hidden]); dx has every row.
  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dy, grads_t& g,
                    const output_rows* rows = nullptr) const {
    if (dy.rank() != 3 || dy.dim(2) != std::size_t(config.hidden))
      throw std::invalid_argument("skillgraft: decoder block output gradient has shape " + dy.shape().str() +
                                  ", expected [batch, seq, " + std::to_string(config.hidden) + "]");
    if constexpr (!any_backward) {
      return {};
    } else {
      tensor_t dh2;
      if constexpr (gated) {  // do = dy * gm into the MLP, then the gate's own dz
        auto gb = mlp_gate_t::template backward_gate<mlp_active>(s.mlp_residual_gate, dy);
        if constexpr (mlp_active) dh2 = mlp().backward(w.mlp, s.mlp, gb.d_out, g);
        linear_weights<T, Backend>* dgw = nullptr;
        if constexpr (mlp_gate_plan::train) dgw = &g.mlp_residual_gate;
        mlp_gate_t::backward_params(w.mlp_gate, s.mlp_residual_gate, gb.dz, dgw, mlp_needs_dh ? &dh2 : nullptr);
      } else {
        dh2 = mlp().backward(w.mlp, s.mlp, dy, g);
      }
      tensor_t dx2;
      if constexpr (mlp_norm_t::keeps_input) {
        tensor_t* dw2 = nullptr;
        if constexpr (train_mlp_norm) dw2 = &g.mlp_norm;
        dx2 = mlp_norm_t::backward_into(w.mlp_norm, s.mlp_norm, dh2, dw2);
      }
      if constexpr (!need_dx2) {
        return {};
      } else {
        Backend::add_into(dx2, dy);  // [1, rows, hidden] with rows: attention's backward takes them so
        tensor_t dh1;
        if constexpr (gated) {  // do = dx2 * ga into attention, then the gate's own dz
          auto gb = attn_gate_t::template backward_gate<attention_active>(s.self_attn_residual_gate, dx2);
          if constexpr (attention_active) dh1 = attention().backward(w.self_attn, s.attention, gb.d_out, g);
          linear_weights<T, Backend>* dgw = nullptr;
          if constexpr (attn_gate_plan::train) dgw = &g.self_attn_residual_gate;
          attn_gate_t::backward_params(w.attn_gate, s.self_attn_residual_gate, gb.dz, dgw,
                                       attention_needs_dh ? &dh1 : nullptr);
        } else {
          dh1 = attention().backward(w.self_attn, s.attention, dx2, g, rows);
        }
        if constexpr (attention_needs_dh) {
          tensor_t* dw1 = nullptr;
          if constexpr (train_attn_norm) dw1 = &g.attn_norm;
          tensor_t dx = attn_norm_t::backward_into(w.attn_norm, s.attn_norm, dh1, dw1);
          if constexpr (NeedsInputGrad) Backend::add_into(dx, rows ? spread_rows<Backend>(dx2, *rows) : std::move(dx2));
          return dx;
        } else {
          return {};
        }
      }
    }
  }

  // Visits (name, weight, gradient) of every trainable tensor, with Hugging Face names
  // relative to the layer ("self_attn.q_proj.weight").
  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    auto norm = [&](auto e) {
      if constexpr (trains_v<typename decltype(e)::tag, recipe_type>) f(e.path(), e.weight(w), e.grad(g));
    };
    auto gate = [&](auto e) {
      if constexpr (gated && trains_v<typename decltype(e)::tag, recipe_type>)
        visit_linear(e.path(), e.weight(w), e.grad(g), f);
    };
    norm(schema::input_layernorm{});
    attention_t::for_each_trainable(w.self_attn, g, [&](const std::string& n, tensor_t& p, tensor_t& dp) {
      f("self_attn." + n, p, dp);
    });
    gate(schema::self_attn_residual_gate{});
    norm(schema::post_attention_layernorm{});
    mlp_t::for_each_trainable(w.mlp, g, [&](const std::string& n, tensor_t& p, tensor_t& dp) { f("mlp." + n, p, dp); });
    gate(schema::mlp_residual_gate{});
  }

  // The gate records of this block's forward (attention's, then the MLP's); none without gates.
  template <class F>
  static void for_each_gate_record(saved_t& s, F&& f) {
    if constexpr (gated) {
      f(s.self_attn_residual_gate.record);
      f(s.mlp_residual_gate.record);
    }
  }

  // Elements forward keeps for backward, from the plan (not from running it).
  // mlp_rows: the rows the MLP half runs on when the block selects output rows (0: every row).
  static std::size_t saved_elements(const decoder_config& c, seq_shape sh, const mlp_options_t& o = {},
                                    std::size_t mlp_rows = 0) {
    const std::size_t M = selects_rows && mlp_rows ? mlp_rows : sh.tokens();
    const seq_shape mlp_shape = M == sh.tokens() ? sh : seq_shape{1, int(M)};
    const std::size_t N = sh.tokens(), d = std::size_t(c.hidden), qd = std::size_t(c.q_dim()),
                      kvd = std::size_t(c.kv_dim()),
                      probs = std::size_t(sh.batch) * std::size_t(c.n_heads) * std::size_t(sh.seq) * std::size_t(sh.seq);
    using ap = typename attention_t::plan;
    std::size_t n = 0;
    if (attn_norm_t::keeps_input) n += N * d + N;
    if (ap::save_h) n += N * d;
    if (ap::save_q) n += N * qd;
    if (ap::save_k) n += N * kvd;
    if (ap::save_v) n += N * kvd;
    if (ap::save_probs) n += probs;
    if (ap::save_a) n += M * qd;  // a[rows] when the block selects rows
    if (mlp_norm_t::keeps_input) n += M * d + M;
    if (mlp_active) n += mlp_t::saved_elements(c, mlp_shape, o);
    const std::size_t gw = gate_width(gate_shape_of<Mlp>, d);  // residual gates: h, o, g
    auto gate = [&](auto plan) {
      using P = decltype(plan);
      n += N * d * (std::size_t(P::save_h) + std::size_t(P::save_o)) + (P::save_g ? N * gw : 0);
      if (P::active && gate_drop_count(train_skip_of(o), N)) n += N;  // the keep mask
    };
    gate(attn_gate_plan{});
    gate(mlp_gate_plan{});
    const std::size_t r = std::size_t(c.lora_rank);  // adapter inputs u = x A^T
    n += N * r * std::size_t(ap::adapt_k + ap::adapt_v) + M * r * std::size_t(ap::adapt_q + ap::adapt_o);
    return n;
  }

  // Trainable elements of one block (= gradient elements).
  static std::size_t trainable_elements(const decoder_config& c, const mlp_options_t& o = {}) {
    const std::size_t d = std::size_t(c.hidden);
    std::size_t n = trainable_projection_elements<recipe_type>(attention_projections{}, c) + mlp_t::trainable_elements(c, o);
    if (train_attn_norm) n += d;
    if (train_mlp_norm) n += d;
    const std::size_t gw = gate_width(gate_shape_of<Mlp>, d);
    n += (gw * d + gw) * (std::size_t(attn_gate_plan::train) + std::size_t(mlp_gate_plan::train));
    return n;
  }

  // Parameters of one block, the MLP policy's (alpha, router, experts) included.
  static std::size_t weight_elements(const decoder_config& c, const mlp_options_t& o = {}) {
    return block_weights<T>::elements_for(c) + Mlp::extra_weight_elements(c, o);
  }

  // Multiply-add FLOPs (2 per MAC) of the GEMMs forward and backward really run.
  struct flop_count {
    double forward = 0, backward = 0;
  };
  static flop_count flops(const decoder_config& c, seq_shape sh, const mlp_options_t& o = {}) {
    // core: one S x S x hd product per head; causal attention pairs each query only with the
    // keys up to it, S (S + 1) / 2 pairs (the CPU kernel's query blocks add part of the diagonal
    // blocks to that, the CUDA backend multiplies the whole square).
    const double S = double(sh.seq), pairs = c.causal ? S * (S + 1) / 2 : S * S;
    const double N = double(sh.tokens()), d = c.hidden, qd = c.q_dim(), kvd = c.kv_dim(),
                 core = 2.0 * sh.batch * c.n_heads * pairs * c.head_dim;
    using ap = typename attention_t::plan;
    const auto mf = mlp_t::flops(c, sh, o);  // the MLP's own forward and backward (adapters included)
    flop_count f;
    f.forward = 2 * N * d * (qd + 2 * kvd) + 2 * core + 2 * N * qd * d + mf.forward;
    double b = mlp_active ? mf.backward : 0;
    if (ap::train_o) b += 2 * N * qd * d;
    if (ap::need_da) b += 2 * N * qd * d;
    if (ap::need_dv) b += core;
    if (ap::need_dq || ap::need_dk) b += core;  // dP
    if (ap::need_dq) b += core;
    if (ap::need_dk) b += core;
    if (ap::train_q) b += 2 * N * d * qd;
    if (ap::train_k) b += 2 * N * d * kvd;
    if (ap::train_v) b += 2 * N * d * kvd;
    if (attention_t::needs_input_grad) b += 2 * N * d * (qd + 2 * kvd);
    // Adapters named by the recipe: forward s (x A^T) B^T; backward dB, dy B, dA
    // (the input path through an adapter is folded into the dx GEMMs above only in spirit:
    // it adds 2 N r in per adapted projection when dx is formed, counted here too).
    const double r = c.lora_rank;
    auto adapter = [&](bool on, double in, double out, bool dx) {
      if (!on) return;
      f.forward += 2 * N * r * (in + out);
      b += 2 * N * out * r * 2 + 2 * N * r * in + (dx ? 2 * N * r * in : 0);
    };
    adapter(ap::adapt_q, d, qd, attention_t::needs_input_grad);
    adapter(ap::adapt_k, d, kvd, attention_t::needs_input_grad);
    adapter(ap::adapt_v, d, kvd, attention_t::needs_input_grad);
    adapter(ap::adapt_o, qd, d, ap::need_da);
    if constexpr (gated) {  // z = h Wg^T per branch; backward dWg, dh and (scalar) the row sums of dy * o
      const double gw = double(gate_width(gate_shape_of<Mlp>, std::size_t(d)));
      f.forward += 2 * 2 * N * d * gw;
      auto gate = [&](auto plan, bool dh) {
        using P = decltype(plan);
        if (P::train) b += 2 * N * d * gw;
        if (P::need_dz && dh) b += 2 * N * d * gw;
        if (P::need_dz && gw == 1) b += 2 * N * d;
      };
      gate(attn_gate_plan{}, attention_needs_dh);
      gate(mlp_gate_plan{}, mlp_needs_dh);
    }
    f.backward = any_backward ? b : 0;
    return f;
  }

 private:
  attn_norm_t attn_norm() const { return {config.rms_norm_eps}; }
  mlp_norm_t mlp_norm() const { return {config.rms_norm_eps}; }
  attention_t attention() const { return {config, table, first_pos}; }
  mlp_t mlp() const { return {config, mlp_options}; }

  // The saved state of a sub-layer, or a scratch one when the block keeps nothing of it.
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

// grad<proj::q>(grads): the gradient of one tag; a compile error naming the tag for a frozen one.
template <class Tag, class Block>
auto& grad(typename Block::grads_t& g) {
  static_assert(gradient_of_frozen_tensor<Tag, typename Block::recipe_type>::ok);
  if constexpr (block_projections::has<Tag>) return projection_of<Tag>::grad(g);
  else if constexpr (std::is_same_v<Tag, group::attn_norm>) return g.attn_norm;
  else if constexpr (std::is_same_v<Tag, group::act_range>) return g.act_alpha;
  else if constexpr (std::is_same_v<Tag, group::router>) return g.router;
  else if constexpr (std::is_same_v<Tag, group::residual_gate<branch::attention>>) return g.self_attn_residual_gate;
  else if constexpr (std::is_same_v<Tag, group::residual_gate<branch::mlp>>) return g.mlp_residual_gate;
  else return g.mlp_norm;
}

}  // namespace skillgraft::nn
