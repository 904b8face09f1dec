// LoRA: adapter gradients by finite differences under recipes that mix adapters and
// base weights; exact start and exact merge round trip; memory against the ledger;
// a task learned with the base frozen bit for bit.
#include "support/gradcheck.hpp"

#include "skillgraft/cl/lora.hpp"
#include "skillgraft/nn/memory_report.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;
using namespace sg::proj;
using sg::lora;

namespace {

template <class T>
void add_adapter(sg::nn::linear_weights<T>& l, std::size_t r, std::mt19937& rng) {
  l.lora.A = sg::cpu::tensor<T>({r, l.in_features()}, sg::memory_use::method_state);
  l.lora.B = sg::cpu::tensor<T>({l.out_features(), r}, sg::memory_use::method_state);
  sg::test::fill_normal(l.lora.A, rng, 0.0, 0.3);
  sg::test::fill_normal(l.lora.B, rng, 0.0, 0.3);  // non-zero, so every path is exercised
  l.lora_scale = T(1.5);
}

template <class T>
void adapt_everything(sg::nn::block_weights<T>& w, std::size_t r, std::mt19937& rng) {
  for (auto* l : {&w.self_attn.q_proj, &w.self_attn.k_proj, &w.self_attn.v_proj, &w.self_attn.o_proj, &w.mlp.gate_proj,
                  &w.mlp.up_proj, &w.mlp.down_proj})
    add_adapter(*l, r, rng);
}

constexpr auto lora_recipes = sg::hana::make_tuple(
    sg::trainable<lora<q>, lora<k>, lora<v>, lora<o>>, sg::trainable<lora<gate>, lora<up>>, sg::trainable<lora<down>>,
    sg::trainable<lora<v>, v>, sg::trainable<lora<q>, down, sg::group::mlp_norm>, sg::recipe::frozen);

}  // namespace

TEST_CASE("LoRA: adapter and input gradients of the block, with frozen adapters elsewhere") {
  for (bool bias : {false, true}) {
    const auto c = sg::test::tiny_config(bias);
    sg::nn::rope_table<double> table(c.head_dim, c.max_seq, c.rope_theta);
    std::mt19937 rng(3);
    sg::nn::block_weights<double> w(c);
    sg::test::fill_block(w, rng);
    adapt_everything(w, 3, rng);  // adapters the recipe does not name still act, frozen
    sg::hana::for_each(lora_recipes, [&](auto r) {
      using R = decltype(r);
      auto x = sg::test::random_tensor<double>({2, 5, std::size_t(c.hidden)}, 4);
      auto a = sg::test::gradcheck(sg::nn::decoder_block<double, R, true>(c, table), w, x);
      auto b = sg::test::gradcheck(sg::nn::decoder_block<double, R, false>(c, table), w, x);
      CHECK(a == b);
      std::size_t adapters = 0;
      for (const auto& n : a) adapters += n.find(".lora_") != std::string::npos;
      CHECK(adapters == 2 * std::size_t(sg::trains_v<lora<q>, R> + sg::trains_v<lora<k>, R> + sg::trains_v<lora<v>, R> +
                                        sg::trains_v<lora<o>, R> + sg::trains_v<lora<gate>, R> +
                                        sg::trains_v<lora<up>, R> + sg::trains_v<lora<down>, R>));
    });
  }
}

namespace {
sg::decoder_config lm_config(int rank) {
  auto c = sg::test::tiny_config(false, 3);
  c.vocab_size = 13;
  c.max_seq = 16;
  c.lora_rank = rank;
  c.lora_alpha = 8;
  return c;
}
template <class T>
sg::model::lm_weights<T> random_lm(const sg::decoder_config& c, unsigned seed) {
  sg::model::lm_weights<T> w(c);
  std::mt19937 rng(seed);
  for (auto& l : w.trunk.layers) sg::test::fill_block(l, rng);
  sg::test::fill_normal(w.embed_tokens, rng, 0.0, 1.0);
  sg::test::fill_normal(w.norm, rng, 1.0, 0.1);
  sg::test::fill_normal(w.lm_head, rng, 0.0, 0.5);
  return w;
}
const sg::token_ids ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}};
}  // namespace

TEST_CASE("LoRA: attached adapters start at the base model, merge and unmerge are exact") {
  const auto c = lm_config(4);
  auto w = random_lm<float>(c, 1);
  constexpr auto recipe = sg::trainable<lora<q>, lora<v>, lora<gate>, lora<up>>;
  sg::model::decoder_lm<float, decltype(recipe)> lm(c, recipe.on_layers(1, 2));
  sg::model::decoder_lm<float, decltype(sg::recipe::frozen)> plain(c, sg::recipe::frozen);
  decltype(plain)::saved_t s0;
  const auto base = plain.forward(w, ids, s0);
  const auto before_bytes = sg::ledger().live(sg::memory_use::method_state);
  CHECK(sg::cl::attach_lora(lm, w, {.rank = 4, .alpha = 8, .seed = 2}) == 8);  // 4 projections x layers 1, 2
  CHECK(sg::ledger().live(sg::memory_use::method_state) - before_bytes == std::int64_t(sg::cl::lora_bytes(w)));
  CHECK(!w.trunk.layers[0].self_attn.q_proj.has_lora());
  CHECK(w.trunk.layers[1].mlp.up_proj.has_lora());
  CHECK(w.trunk.layers[1].mlp.up_proj.lora_scale == 2.0f);
  decltype(plain)::saved_t s1;
  const auto start = plain.forward(w, ids, s1);
  CHECK(std::equal(start.data(), start.data() + start.size(), base.data()));  // B = 0: bit for bit the base model

  // Train the adapters a little so that they matter.
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.lr = 0.05});
  sg::train::micro_batch<float> mb{ids, {{-100, 4, 4, 4, 4}, {-100, 4, 4, 4, 4}}};
  auto gate_before = w.trunk.layers[1].mlp.gate_proj.weight.clone(sg::memory_use::workspace);
  for (int i = 0; i < 20; ++i) sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{0.05}, std::span(&mb, 1));
  CHECK(std::equal(gate_before.data(), gate_before.data() + gate_before.size(),
                   w.trunk.layers[1].mlp.gate_proj.weight.data()));  // the base stays frozen
  decltype(plain)::saved_t s2;
  const auto adapted = plain.forward(w, ids, s2);
  CHECK((adapted.vec() - base.vec()).cwiseAbs().maxCoeff() > 1e-2);

  {
    sg::cl::lora_merge<float> merge(w);
    CHECK(merge.merged() == 8);
    decltype(plain)::saved_t s3;
    const auto merged = plain.forward(w, ids, s3);
    CHECK((merged.vec() - adapted.vec()).cwiseAbs().maxCoeff() < 1e-4);
    merge.unmerge();
    CHECK(std::equal(gate_before.data(), gate_before.data() + gate_before.size(),
                     w.trunk.layers[1].mlp.gate_proj.weight.data()));  // exact round trip
    decltype(plain)::saved_t s4;
    const auto again = plain.forward(w, ids, s4);
    CHECK(std::equal(again.data(), again.data() + again.size(), adapted.data()));
  }
}

TEST_CASE("LoRA: memory plan equals the ledger, names follow PEFT") {
  const auto c = lm_config(2);
  auto w = sg::test::random_trunk<float>(c, 4);
  constexpr auto recipe = sg::trainable<lora<q>, lora<down>>;
  sg::nn::decoder_stack<float, decltype(recipe)> stack(c, recipe);
  std::mt19937 rng(5);
  for (auto& l : w.layers) {
    add_adapter(l.self_attn.q_proj, 2, rng);
    add_adapter(l.mlp.down_proj, 2, rng);
  }
  const auto plan = sg::plan_memory(stack, {2, 5});
  const auto g0 = sg::ledger().live(sg::memory_use::gradients), s0 = sg::ledger().live(sg::memory_use::saved_activations);
  auto g = stack.make_grads(w);
  CHECK(sg::ledger().live(sg::memory_use::gradients) - g0 == std::int64_t(plan.gradients));
  CHECK(plan.gradients == 3 * (2 * (16 + 16) + 2 * (24 + 16)) * sizeof(float));
  auto x = sg::test::random_tensor<float>({2, 5, 16}, 6);
  decltype(stack)::saved_t s;
  stack.forward(w, x, s);
  CHECK(sg::ledger().live(sg::memory_use::saved_activations) - s0 == std::int64_t(plan.saved_activations));
  std::vector<std::string> names;
  stack.for_each_trainable(w, g, [&](const std::string& n, auto&, auto&) { names.push_back(n); });
  CHECK(names.front() == "model.layers.0.self_attn.q_proj.lora_A.weight");
  CHECK(names[1] == "model.layers.0.self_attn.q_proj.lora_B.weight");
  CHECK(names[3] == "model.layers.0.mlp.down_proj.lora_B.weight");
  CHECK(sg::cl::peft_name(names[0]) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
}

TEST_CASE("LoRA: a recipe naming adapters that are not attached is refused") {
  const auto c = lm_config(4);
  auto w = random_lm<float>(c, 7);
  sg::model::decoder_lm<float, decltype(sg::trainable<lora<up>>)> lm(c, sg::trainable<lora<up>>);
  CHECK_THROWS_WITH(lm.make_grads(w), Catch::Contains("trains a LoRA adapter on up_proj, but it has none"));
  CHECK_THROWS_WITH(sg::cl::attach_lora(lm, w, {.rank = 3}), Catch::Contains("lora_rank 4 but adapters of rank 3"));
  sg::cl::attach_lora(lm, w, {.rank = 4});
  CHECK_THROWS_WITH(sg::cl::attach_lora(lm, w, {.rank = 4}), Catch::Contains("already has an adapter"));
  std::vector<std::string> a, b;
  auto g = lm.make_grads(w);
  lm.for_each_trainable(w, g, [&](const std::string& n, auto&, auto&) { a.push_back(n); });
  sg::model::for_each_trainable_weight(lm, w, [&](const std::string& n, auto&) { b.push_back(n); });
  CHECK(a == b);
  CHECK(a.size() == 6);
}
