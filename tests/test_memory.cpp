// What a recipe keeps: saved_t and grads_t members, allocated bytes against the
// memory plan, and frozen tensors untouched by an optimizer step.
#include <catch2/catch.hpp>

#include <cstring>
#include <map>
#include <set>

#include "skillgraft/nn/memory_report.hpp"
#include "skillgraft/policy/dispatch.hpp"
#include "skillgraft/train/adamw.hpp"
#include "support/plan_ledger.hpp"
#include "support/random.hpp"

namespace sg = skillgraft;
using sg::memory_use;

template <class R, bool Dx>
using block = sg::nn::decoder_block<float, R, Dx>;
using frozen_r = std::remove_const_t<decltype(sg::recipe::frozen)>;
using sa_r = std::remove_const_t<decltype(sg::recipe::sa_proj)>;
using gate_up_r = std::remove_const_t<decltype(sg::recipe::mlp_gate_up)>;
using down_r = std::remove_const_t<decltype(sg::recipe::mlp_down)>;
using v_r = std::remove_const_t<decltype(sg::trainable<sg::proj::v>)>;
using llm_r = std::remove_const_t<decltype(sg::recipe::llm)>;

// Member checks must be dependent to be soft: one concept per member path.
template <class S>
concept has_attention_probs_mlp_g_mlp_u = requires(S s) { s.attention.probs; s.mlp.g; s.mlp.u; };
template <class S>
concept has_attention_h = requires(S s) { s.attention.h; };
template <class S>
concept has_attention_attn = requires(S s) { s.attention.attn; };
template <class S>
concept has_mlp_m = requires(S s) { s.mlp.m; };
template <class S>
concept has_mlp_h = requires(S s) { s.mlp.h; };
template <class S>
concept has_mlp_h_mlp_g_mlp_u = requires(S s) { s.mlp.h; s.mlp.g; s.mlp.u; };
template <class S>
concept has_attention = requires(S s) { s.attention; };
template <class S>
concept has_attn_norm = requires(S s) { s.attn_norm; };
template <class S>
concept has_mlp_norm = requires(S s) { s.mlp_norm; };
template <class S>
concept has_mlp_g = requires(S s) { s.mlp.g; };
template <class S>
concept has_attention_probs_attention_h = requires(S s) { s.attention.probs; s.attention.h; };
template <class S>
concept has_attention_q = requires(S s) { s.attention.q; };
template <class S>
concept has_attention_k = requires(S s) { s.attention.k; };
template <class S>
concept has_mlp_g_mlp_u_attention_q_attention_k = requires(S s) { s.mlp.g; s.mlp.u; s.attention.q; s.attention.k; };
template <class S>
concept has_q_proj_k_proj_v_proj_o_proj = requires(S g) { g.q_proj; g.k_proj; g.v_proj; g.o_proj; };
template <class S>
concept has_gate_proj = requires(S g) { g.gate_proj; };
template <class S>
concept has_gate_proj_up_proj = requires(S g) { g.gate_proj; g.up_proj; };
template <class S>
concept has_down_proj = requires(S g) { g.down_proj; };
template <class S>
concept has_attn_norm_mlp_norm_down_proj = requires(S g) { g.attn_norm; g.mlp_norm; g.down_proj; };

// --- saved_t: members exist only when a gradient reads them ------------------------------
// Nothing trainable at or below: nothing kept at all.
static_assert(block<frozen_r, false>::keeps_nothing && std::is_empty_v<block<frozen_r, false>::saved_t>);
static_assert(!block<frozen_r, false>::any_backward);
// A frozen block that must pass the gradient down keeps what dx needs, but no weight-gradient inputs.
static_assert(!block<frozen_r, true>::keeps_nothing);
static_assert(has_attention_probs_mlp_g_mlp_u<block<frozen_r, true>::saved_t>);
static_assert(!has_attention_h<block<frozen_r, true>::saved_t>);
static_assert(!has_attention_attn<block<frozen_r, true>::saved_t>);
static_assert(!has_mlp_m<block<frozen_r, true>::saved_t>);
static_assert(!has_mlp_h<block<frozen_r, true>::saved_t>);
// Gate & Up with Down frozen: the input of Down (m) is not kept; attention keeps nothing.
static_assert(has_mlp_h_mlp_g_mlp_u<block<gate_up_r, false>::saved_t>);
static_assert(!has_mlp_m<block<gate_up_r, false>::saved_t>);
static_assert(!has_attention<block<gate_up_r, false>::saved_t>);
static_assert(!has_attn_norm<block<gate_up_r, false>::saved_t>);
static_assert(!has_mlp_norm<block<gate_up_r, false>::saved_t>);
// Down alone: only m.
static_assert(has_mlp_m<block<down_r, false>::saved_t>);
static_assert(!has_mlp_g<block<down_r, false>::saved_t>);
static_assert(!has_mlp_h<block<down_r, false>::saved_t>);
// V alone: probabilities and the input of V, not q or k.
static_assert(has_attention_probs_attention_h<block<v_r, false>::saved_t>);
static_assert(!has_attention_q<block<v_r, false>::saved_t>);
static_assert(!has_attention_k<block<v_r, false>::saved_t>);
// Attention projections: the MLP must pass the gradient through, so it keeps g, u but not h or m.
static_assert(has_mlp_g_mlp_u_attention_q_attention_k<block<sa_r, false>::saved_t>);
static_assert(!has_mlp_m<block<sa_r, false>::saved_t>);
static_assert(!has_mlp_h<block<sa_r, false>::saved_t>);
static_assert(!has_attn_norm<block<sa_r, false>::saved_t>);

// --- grads_t: members only for trainable tensors --------------------------------------------
static_assert(has_q_proj_k_proj_v_proj_o_proj<block<sa_r, false>::grads_t>);
static_assert(!has_gate_proj<block<sa_r, false>::grads_t>);
static_assert(!has_attn_norm<block<sa_r, false>::grads_t>);
static_assert(has_gate_proj_up_proj<block<gate_up_r, false>::grads_t>);
static_assert(!has_down_proj<block<gate_up_r, false>::grads_t>);
static_assert(std::is_empty_v<block<frozen_r, true>::grads_t>);
static_assert(has_attn_norm_mlp_norm_down_proj<block<llm_r, false>::grads_t>);

namespace {

template <class R>
void check_plan_against_ledger(R recipe, const sg::decoder_config& c, sg::seq_shape sh) {
  sg::test::check_plan_against_ledger([&] { return sg::test::random_trunk<float>(c, 5); },
                                      [&] { return sg::nn::decoder_stack<float, R>(c, recipe); }, sh);
}

}  // namespace

TEST_CASE("memory plan equals what the code allocates, for every recipe") {
  const auto c = sg::test::tiny_config(true, 4);
  const sg::seq_shape sh{3, 7};
  sg::hana::for_each(sg::named_recipes, [&](const auto& nr) {
    INFO("recipe " << nr.name);
    check_plan_against_ledger(nr.value, c, sh);
  });
  INFO("layer-scoped");
  check_plan_against_ledger(sg::recipe::mlp_gate_up.on_layers(1, 2), c, sh);
  check_plan_against_ledger(sg::recipe::sa_proj.on_layers(3, 3), c, sh);
}

TEST_CASE("a frozen trunk keeps nothing, recipes keep less than the whole model") {
  auto c = sg::decoder_config::reference();
  const sg::seq_shape sh{4, 256};
  auto saved = [&](auto r) {
    sg::nn::decoder_stack<float, decltype(r)> s(c, r);
    return sg::plan_memory(s, sh);
  };
  CHECK(saved(sg::recipe::frozen).saved_activations == 0);
  CHECK(saved(sg::recipe::frozen).gradients == 0);
  const auto llm = saved(sg::recipe::llm), sa = saved(sg::recipe::sa_proj), gu = saved(sg::recipe::mlp_gate_up);
  CHECK(sa.saved_activations < llm.saved_activations);
  CHECK(gu.saved_activations < llm.saved_activations);
  CHECK(sa.gradients < llm.gradients);
  CHECK(gu.gradients < llm.gradients);
  // Scoping to the top layer only: the layers below keep nothing.
  CHECK(saved(sg::recipe::mlp_gate_up.on_layers(3, 3)).saved_activations <
        gu.saved_activations / 3);
}

namespace {
// Bit patterns of every tensor of a trunk, by Hugging Face name.
std::map<std::string, std::vector<unsigned char>> snapshot(sg::nn::trunk_weights<float>& w) {
  std::map<std::string, std::vector<unsigned char>> out;
  auto put = [&](const std::string& n, const sg::cpu::tensor<float>& t) {
    std::vector<unsigned char> b(t.bytes());
    if (t.bytes()) std::memcpy(b.data(), t.data(), t.bytes());
    out[n] = std::move(b);
  };
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    auto& l = w.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    put(p + "input_layernorm.weight", l.attn_norm);
    put(p + "post_attention_layernorm.weight", l.mlp_norm);
    auto lin = [&](const std::string& n, sg::nn::linear_weights<float>& lw) {
      put(p + n + ".weight", lw.weight);
      if (lw.has_bias()) put(p + n + ".bias", lw.bias);
    };
    lin("self_attn.q_proj", l.self_attn.q_proj);
    lin("self_attn.k_proj", l.self_attn.k_proj);
    lin("self_attn.v_proj", l.self_attn.v_proj);
    lin("self_attn.o_proj", l.self_attn.o_proj);
    lin("mlp.gate_proj", l.mlp.gate_proj);
    lin("mlp.up_proj", l.mlp.up_proj);
    lin("mlp.down_proj", l.mlp.down_proj);
  }
  return out;
}

template <class R>
void check_frozen_untouched(R recipe, const sg::decoder_config& c) {
  auto w = sg::test::random_trunk<float>(c, 7);
  sg::nn::decoder_stack<float, R> stack(c, recipe);
  auto g = stack.make_grads(w);
  sg::train::adamw<float> adam(stack, w, g, {.lr = 1e-2, .weight_decay = 0.1});
  std::set<std::string> trainable;
  stack.for_each_trainable(w, g, [&](const std::string& n, auto&, auto&) { trainable.insert(n); });
  const auto before = snapshot(w);
  auto x = sg::test::random_tensor<float>({2, 5, std::size_t(c.hidden)}, 8);
  typename decltype(stack)::saved_t s;
  auto y = stack.forward(w, x, s);
  stack.backward(w, s, y, g);
  adam.step(stack, w, g);
  const auto after = snapshot(w);
  for (const auto& [name, bytes] : before) {
    INFO(name);
    if (trainable.count(name)) CHECK(after.at(name) != bytes);
    else CHECK(after.at(name) == bytes);
  }
}
}  // namespace

TEST_CASE("frozen tensors are bit-identical after an AdamW step") {
  const auto c = sg::test::tiny_config(true, 3);
  sg::hana::for_each(sg::named_recipes, [&](const auto& nr) {
    INFO("recipe " << nr.name);
    check_frozen_untouched(nr.value, c);
  });
  check_frozen_untouched(sg::recipe::mlp.on_layers(1, 1), c);
}

TEST_CASE("AdamW matches the closed-form update and refuses non-finite gradients") {
  const auto c = sg::test::tiny_config(false, 1);
  auto w = sg::test::random_trunk<float>(c, 9);
  sg::nn::decoder_stack<float, decltype(sg::recipe::mlp_down)> stack(c, sg::recipe::mlp_down);
  auto g = stack.make_grads(w);
  const sg::train::adamw_options o{.lr = 0.01, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.05};
  sg::train::adamw<float> adam(stack, w, g, o);
  auto& dw = g.layer(0).down_proj.weight;
  auto& pw = w.layers[0].mlp.down_proj.weight;
  for (std::size_t i = 0; i < dw.size(); ++i) dw[i] = float(std::sin(0.37 * double(i)));
  std::vector<double> p0(pw.data(), pw.data() + pw.size());
  adam.step(stack, w, g);
  adam.step(stack, w, g);  // same gradient twice: m, v follow a closed form
  for (std::size_t i = 0; i < pw.size(); i += 7) {
    const double gi = dw[i];
    double p = p0[i], m = 0, v = 0;
    for (int t = 1; t <= 2; ++t) {
      m = o.beta1 * m + (1 - o.beta1) * gi;
      v = o.beta2 * v + (1 - o.beta2) * gi * gi;
      const double mhat = m / (1 - std::pow(o.beta1, t)), vhat = v / (1 - std::pow(o.beta2, t));
      p = p - o.lr * (mhat / (std::sqrt(vhat) + o.eps) + o.weight_decay * p);
    }
    CHECK(pw[i] == Approx(p).epsilon(1e-5).margin(1e-7));
  }
  const auto before = snapshot(w);
  dw[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(adam.step(stack, w, g), Catch::Contains("non-finite gradient in model.layers.0.mlp.down_proj.weight at element 3"));
  CHECK(snapshot(w) == before);
  CHECK(adam.steps() == 2);
}
