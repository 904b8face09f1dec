// Finite-difference checks (double precision) of every layer's backward, under
// every named recipe and with and without the input gradient. A new layer is
// checked by one more `gradcheck(...)` line.
#include "support/gradcheck.hpp"

#include "skillgraft/nn/decoder_stack.hpp"
#include "skillgraft/policy/dispatch.hpp"

namespace sg = skillgraft;
using sg::test::gradcheck;
using sg::test::gradcheck_stack;
using sg::test::random_tensor;
using D = double;

namespace {

// Every named recipe, each projection alone, each norm alone, and mixtures across the halves.
constexpr auto recipes_to_check = sg::hana::make_tuple(
    sg::recipe::sa_proj, sg::recipe::mlp, sg::recipe::mlp_gate_up, sg::recipe::mlp_down, sg::recipe::llm,
    sg::recipe::frozen, sg::trainable<sg::proj::q>, sg::trainable<sg::proj::k>, sg::trainable<sg::proj::v>,
    sg::trainable<sg::proj::o>, sg::trainable<sg::proj::gate>, sg::trainable<sg::proj::up>,
    sg::trainable<sg::group::attn_norm>, sg::trainable<sg::group::mlp_norm>,
    sg::trainable<sg::proj::v, sg::proj::down>, sg::trainable<sg::proj::k, sg::group::mlp_norm>);

// Names a block must report as trainable under recipe R: every trainable tensor, and no other.
template <class R>
std::set<std::string> expected_block_names(const sg::decoder_config& c) {
  std::set<std::string> n;
  auto lin = [&](bool on, const std::string& name, bool bias) {
    if (!on) return;
    n.insert(name + ".weight");
    if (bias) n.insert(name + ".bias");
  };
  lin(sg::trains_v<sg::proj::q, R>, "self_attn.q_proj", c.attention_bias);
  lin(sg::trains_v<sg::proj::k, R>, "self_attn.k_proj", c.attention_bias);
  lin(sg::trains_v<sg::proj::v, R>, "self_attn.v_proj", c.attention_bias);
  lin(sg::trains_v<sg::proj::o, R>, "self_attn.o_proj", false);
  lin(sg::trains_v<sg::proj::gate, R>, "mlp.gate_proj", false);
  lin(sg::trains_v<sg::proj::up, R>, "mlp.up_proj", false);
  lin(sg::trains_v<sg::proj::down, R>, "mlp.down_proj", false);
  if (sg::trains_v<sg::group::attn_norm, R>) n.insert("input_layernorm.weight");
  if (sg::trains_v<sg::group::mlp_norm, R>) n.insert("post_attention_layernorm.weight");
  return n;
}

template <bool Train, bool Dx>
void check_linear(bool bias) {
  sg::nn::linear_weights<D> w(5, 7, bias, sg::memory_use::weights);
  std::mt19937 rng(3);
  sg::test::fill_linear(w, rng);
  auto x = random_tensor<D>({2, 3, 7}, 4);
  auto names = gradcheck(sg::nn::linear<D, Train, Dx>{}, w, x);
  CHECK(names.size() == (Train ? (bias ? 2u : 1u) : 0u));
}

template <bool Train, bool Dx>
void check_rmsnorm() {
  auto w = random_tensor<D>({9}, 5);
  w.vec().array() += 1.0;
  auto x = random_tensor<D>({2, 4, 9}, 6, 3.0);
  auto names = gradcheck(sg::nn::rmsnorm<D, Train, Dx>{1e-6}, w, x);
  CHECK(names.size() == (Train ? 1u : 0u));
}

template <class Layer, class Weights>
void check_sub_layer(const Layer& layer, Weights& w, const sg::decoder_config& c) {
  auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 8);
  gradcheck(layer, w, x);
}

}  // namespace

TEST_CASE("linear: weight, bias and input gradients") {
  for (bool bias : {false, true}) {
    check_linear<true, true>(bias);
    check_linear<true, false>(bias);
    check_linear<false, true>(bias);
  }
}

TEST_CASE("rmsnorm: weight and input gradients") {
  check_rmsnorm<true, true>();
  check_rmsnorm<true, false>();
  check_rmsnorm<false, true>();
}

TEST_CASE("rope: input gradient is the transposed rotation") {
  sg::nn::rope_table<D> table(6, 12, 10000.0);
  for (int first_pos : {0, 3}) {
    sg::nn::rope<D> layer{&table, first_pos};
    sg::nn::rope<D>::weights_t none;
    auto x = random_tensor<D>({2, 7, 18}, 9);
    gradcheck(layer, none, x);
  }
}

TEST_CASE("attention and MLP: every recipe, with and without input gradient") {
  for (bool bias : {false, true}) {
    const auto c = sg::test::tiny_config(bias);
    sg::nn::rope_table<D> table(c.head_dim, c.max_seq, c.rope_theta);
    std::mt19937 rng(11);
    sg::nn::block_weights<D> w(c);
    sg::test::fill_block(w, rng);
    sg::hana::for_each(recipes_to_check, [&](auto r) {
      using R = decltype(r);
      check_sub_layer(sg::nn::self_attention<D, R, true>{c, &table}, w.self_attn, c);
      check_sub_layer(sg::nn::self_attention<D, R, false>{c, &table}, w.self_attn, c);
      check_sub_layer(sg::nn::swiglu_mlp<D, R, true>{c}, w.mlp, c);
      check_sub_layer(sg::nn::swiglu_mlp<D, R, false>{c}, w.mlp, c);
    });
  }
}

TEST_CASE("decoder block: every recipe, LLaMA and Qwen2 (bias) layouts") {
  for (bool bias : {false, true}) {
    const auto c = sg::test::tiny_config(bias);
    sg::nn::rope_table<D> table(c.head_dim, c.max_seq, c.rope_theta);
    std::mt19937 rng(12);
    sg::nn::block_weights<D> w(c);
    sg::test::fill_block(w, rng);
    sg::hana::for_each(recipes_to_check, [&](auto r) {
      using R = decltype(r);
      auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 13);
      {
        INFO("input gradient wanted");
        auto names = gradcheck(sg::nn::decoder_block<D, R, true>(c, table), w, x);
        CHECK(names == expected_block_names<R>(c));
      }
      {
        INFO("no input gradient");
        auto names = gradcheck(sg::nn::decoder_block<D, R, false>(c, table), w, x);
        CHECK(names == expected_block_names<R>(c));
      }
    });
  }
}

namespace {
template <class R, bool Dx>
void check_stack(R recipe, const sg::decoder_config& c, int expected_first, int expected_last) {
  auto w = sg::test::random_trunk<D>(c, 21);
  sg::nn::decoder_stack<D, R, Dx> stack(c, recipe);
  auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 22);
  auto names = gradcheck_stack(stack, w, x);
  std::set<std::string> expected;
  for (int i = expected_first; i <= expected_last; ++i)
    for (const auto& n : expected_block_names<R>(c)) expected.insert("model.layers." + std::to_string(i) + "." + n);
  CHECK(names == expected);
}
}  // namespace

TEST_CASE("decoder stack: named recipes over all layers") {
  const auto c = sg::test::tiny_config(true, 3);
  sg::hana::for_each(sg::named_recipes, [&](const auto& nr) {
    INFO("recipe " << nr.name);
    const int last = decltype(nr.value)::empty ? -1 : 2;
    const int first = decltype(nr.value)::empty ? 0 : 0;
    check_stack<decltype(nr.value), false>(nr.value, c, first, last);
    check_stack<decltype(nr.value), true>(nr.value, c, first, last);
  });
}

TEST_CASE("decoder stack: layer-scoped recipes") {
  const auto c = sg::test::tiny_config(false, 4);
  check_stack<decltype(sg::recipe::mlp_gate_up), false>(sg::recipe::mlp_gate_up.on_layers(1, 2), c, 1, 2);
  check_stack<decltype(sg::recipe::mlp_gate_up), true>(sg::recipe::mlp_gate_up.on_layers(1, 2), c, 1, 2);
  check_stack<decltype(sg::recipe::sa_proj), false>(sg::recipe::sa_proj.on_layers(2, 2), c, 2, 2);
  check_stack<decltype(sg::recipe::llm), false>(sg::recipe::llm.on_layers(0, 0), c, 0, 0);
  check_stack<decltype(sg::recipe::mlp_down), false>(sg::recipe::mlp_down.on_layers(3, 3), c, 3, 3);
}
