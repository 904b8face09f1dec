// Bad input is an exception that names the tensor, the shape expected and the shape found.
#include <catch2/catch.hpp>

#include "skillgraft/nn/decoder_stack.hpp"
#include "skillgraft/policy/dispatch.hpp"
#include "support/random.hpp"

namespace sg = skillgraft;
using Catch::Contains;

TEST_CASE("mismatched activation shapes") {
  const auto c = sg::test::tiny_config(false, 2);
  auto w = sg::test::random_trunk<float>(c, 1);
  sg::nn::decoder_stack<float, decltype(sg::recipe::mlp)> stack(c, sg::recipe::mlp);
  decltype(stack)::saved_t s;
  auto wrong_width = sg::test::random_tensor<float>({2, 5, 17}, 2);
  CHECK_THROWS_WITH(stack.forward(w, wrong_width, s),
                    "skillgraft: decoder block input has shape [2, 5, 17], expected [batch, seq, 16]");
  auto flat = sg::test::random_tensor<float>({10, 16}, 2);
  CHECK_THROWS_WITH(stack.forward(w, flat, s), Contains("shape [10, 16], expected [batch, seq, 16]"));

  sg::nn::linear_weights<float> lw(4, 6, false, sg::memory_use::weights);
  sg::nn::linear<float, true, true>::saved_t ls;
  auto x = sg::test::random_tensor<float>({3, 5}, 3);
  CHECK_THROWS_WITH((sg::nn::linear<float, true, true>{}.forward(lw, x, ls)),
                    "skillgraft: input of linear has 5 features (shape [3, 5]), expected 6");
  auto nw = sg::test::random_tensor<float>({8}, 4);
  sg::nn::rmsnorm<float, true, true>::saved_t ns;
  CHECK_THROWS_WITH((sg::nn::rmsnorm<float, true, true>{}.forward(nw, x, ns)), Contains("expected 8"));
}

TEST_CASE("a sequence longer than the rotary table") {
  const auto c = sg::test::tiny_config(false, 1);  // max_seq 8
  auto w = sg::test::random_trunk<float>(c, 1);
  sg::nn::decoder_stack<float, decltype(sg::recipe::sa_proj)> stack(c, sg::recipe::sa_proj);
  decltype(stack)::saved_t s;
  auto x = sg::test::random_tensor<float>({1, 9, 16}, 2);
  CHECK_THROWS_WITH(stack.forward(w, x, s),
                    "skillgraft: sequence positions 0..8 exceed the rotary table (max_seq 8)");
  auto x8 = sg::test::random_tensor<float>({1, 8, 16}, 2);
  CHECK_NOTHROW(stack.forward(w, x8, s));
  CHECK_THROWS_WITH(stack.forward(w, x8, s, 1), Contains("positions 1..8 exceed"));
}

TEST_CASE("weights that do not match the config name the tensor") {
  const auto c = sg::test::tiny_config(true, 2);
  auto w = sg::test::random_trunk<float>(c, 1);
  sg::nn::decoder_stack<float, decltype(sg::recipe::llm)> stack(c, sg::recipe::llm);
  decltype(stack)::saved_t s;
  auto x = sg::test::random_tensor<float>({1, 4, 16}, 2);
  w.layers[1].mlp.up_proj.weight = sg::cpu::tensor<float>({24, 15}, sg::memory_use::weights);
  CHECK_THROWS_WITH(stack.forward(w, x, s),
                    "skillgraft: model.layers.1.mlp.up_proj.weight has shape [24, 15], expected [24, 16]");
  w.layers[1].mlp.up_proj.weight = sg::cpu::tensor<float>({24, 16}, sg::memory_use::weights);
  w.layers[0].self_attn.k_proj.bias = sg::cpu::tensor<float>();
  CHECK_THROWS_WITH(stack.forward(w, x, s), Contains("model.layers.0.self_attn.k_proj.bias has shape [], expected [8]"));
  w.layers.pop_back();
  CHECK_THROWS_WITH(stack.forward(w, x, s), Contains("trunk weights have 1 layers, the stack expects 2"));
}

TEST_CASE("invalid configs, layer ranges and call order") {
  auto c = sg::test::tiny_config(false, 2);
  c.n_kv_heads = 3;
  CHECK_THROWS_WITH(sg::nn::trunk_weights<float>(c), Contains("num_attention_heads (4) is not a multiple of num_key_value_heads (3)"));
  c = sg::test::tiny_config(false, 2);
  c.head_dim = 5;
  CHECK_THROWS_WITH(c.validate(), Contains("head_dim (5) must be even"));
  c = sg::test::tiny_config(false, 2);
  using S = sg::nn::decoder_stack<float, decltype(sg::recipe::mlp)>;
  CHECK_THROWS_WITH(S(c, sg::recipe::mlp.on_layers(1, 2)),
                    "skillgraft: recipe layer range [1, 2] does not fit a stack of 2 layers");
  S stack(c, sg::recipe::mlp.on_layers(1, 1));
  auto w = sg::test::random_trunk<float>(c, 1);
  auto g = stack.make_grads(w);
  CHECK_THROWS_WITH(g.layer(0), "skillgraft: layer 0 is frozen under this recipe (trainable: 1..1)");
  S::saved_t empty;
  auto dy = sg::test::random_tensor<float>({1, 4, 16}, 2);
  CHECK_THROWS_WITH(stack.backward(w, empty, dy, g), Contains("without a forward"));
  S other(c, sg::recipe::mlp);
  auto g_other = other.make_grads(w);
  S::saved_t s;
  stack.forward(w, dy, s);
  CHECK_THROWS_WITH(stack.backward(w, s, dy, g_other), Contains("made for another recipe or layer range"));
}

TEST_CASE("unknown recipe names") {
  CHECK_THROWS_WITH(sg::with_recipe("mlp_gate", [](auto) {}), Contains("unknown recipe 'mlp_gate'; valid names: sa_proj"));
}

TEST_CASE("row maps outside the tensor or with a repeated target") {
  using B = sg::backend::cpu;
  auto in = sg::test::random_tensor<float>({4, 3}, 1);
  sg::cpu::tensor<float> out({2, 3}, sg::memory_use::workspace);
  CHECK_NOTHROW(B::gather_rows(in, 3, {3, 0}, out));
  CHECK(out[0] == in[9]);
  CHECK(out[5] == in[2]);
  CHECK_THROWS_WITH(B::gather_rows(in, 3, {4, 0}, out),
                    "skillgraft: gather_rows: row index 4 (entry 0) is outside 0..3");
  CHECK_THROWS_WITH(B::gather_rows(in, 3, {1, -1}, out), Contains("row index -1 (entry 1) is outside 0..3"));
  CHECK_THROWS_WITH(B::gather_rows(in, 3, {1, 2, 3}, out),
                    "skillgraft: gather_rows: the row map has 3 rows of 3 elements, the tensor they come from or "
                    "go to only 6");
  sg::cpu::tensor<float> five({1, 5}, sg::memory_use::workspace);
  CHECK_THROWS_WITH(B::gather_rows(in, 5, {0}, five), Contains("12 elements is not made of rows of 5"));

  sg::cpu::tensor<float> target({4, 3}, sg::memory_use::workspace);
  target.fill(7.f);
  CHECK_NOTHROW(B::scatter_rows(out, 3, {2, 0}, target));
  CHECK(target[6] == in[9]);
  CHECK(target[3] == 7.f);
  target.fill(7.f);
  CHECK_THROWS_WITH(B::scatter_rows(out, 3, {1, 1}, target),
                    "skillgraft: scatter_rows: row 1 is a target twice (entry 1)");
  CHECK_THROWS_WITH(B::scatter_rows(out, 3, {0, 4}, target), Contains("row index 4 (entry 1) is outside 0..3"));
  bool untouched = true;  // checked before any row moves
  for (std::size_t i = 0; i < target.size(); ++i) untouched = untouched && target[i] == 7.f;
  CHECK(untouched);
  // The repeat check remembers rows only within one call: the rows a refused map or an earlier
  // scatter marked are free targets again.
  CHECK_NOTHROW(B::scatter_rows(out, 3, {1, 0}, target));
  CHECK_NOTHROW(B::scatter_rows(out, 3, {1, 0}, target));
  sg::cpu::tensor<float> larger({6, 3}, sg::memory_use::workspace);
  CHECK_NOTHROW(B::scatter_rows(out, 3, {5, 1}, larger));
  CHECK_THROWS_WITH(B::scatter_rows(out, 3, {5, 5}, larger), Contains("row 5 is a target twice"));
  // Rows of no elements (a batch of empty sequences): nothing moves, so no map is wrong.
  sg::cpu::tensor<float> none_in({2, 0}, sg::memory_use::workspace), none_out({3, 0}, sg::memory_use::workspace);
  CHECK_NOTHROW(B::gather_rows(none_in, 0, {1, 0, 1}, none_out));
  CHECK_NOTHROW(B::scatter_rows(none_out, 0, {1, 1}, none_in));
}
