// MLP policies in training: the memory plan against the ledger for activation ranges and
// mixtures, earlier experts untouched by AdamW, the exact start of a mixture grown from a
// dense model, a task learned while the original expert stays itself, and weights that do
// not fit a policy refused by name. (Split from test_mlp_variants to compile in parallel.)
#include "support/mlp_variants.hpp"
#include "support/plan_ledger.hpp"

namespace {
template <class Mlp, class R>
void check_plan_against_ledger(R recipe, const sg::decoder_config& c, sg::seq_shape sh, int experts, bool range) {
  typename Mlp::options o{};
  if constexpr (requires { o.experts; }) o.experts = experts;
  sg::test::check_plan_against_ledger(
      [&] {
        auto w = sg::test::random_trunk<float>(c, 5);
        if (range) sg::nn::add_act_range(w, 0.25f);
        for (int e = 1; e < experts; ++e) sg::cl::add_expert(w);
        return w;
      },
      [&] { return sg::nn::decoder_stack<float, R, false, sg::backend::cpu, Mlp>(c, recipe, o); }, sh);
}
}  // namespace

TEST_CASE("memory plan equals what the code allocates, for activation ranges and mixtures") {
  const auto c = sg::test::tiny_config(true, 4);
  const sg::seq_shape sh{3, 7};
  auto recipes = sg::hana::make_tuple(sg::recipe::frozen, sg::recipe::mlp_gate_up, sg::recipe::mlp_down,
                                      sg::recipe::sa_proj, sg::recipe::llm, sg::trainable<act_range>,
                                      sg::trainable<router>, sg::trainable<gate, up, router, act_range>,
                                      sg::trainable<v, router>);
  sg::hana::for_each(recipes, [&](auto r) {
    using R = std::remove_const_t<decltype(r)>;
    if constexpr (!sg::trains_v<router, R>) {
      INFO("dense xsilu");
      check_plan_against_ledger<xsilu_mlp>(r, c, sh, 1, true);
      check_plan_against_ledger<xsilu_mlp>(r.on_layers(1, 2), c, sh, 1, true);
    }
    if constexpr (!sg::trains_v<act_range, R>) {
      INFO("mixture, top-2");
      check_plan_against_ledger<moe2>(r, c, sh, 3, false);
      check_plan_against_ledger<moe2>(r.on_layers(2, 3), c, sh, 2, false);
      INFO("mixture, top-1 softmax");
      check_plan_against_ledger<switch1>(r, c, sh, 3, false);
    }
    INFO("mixture of xsilu experts");
    check_plan_against_ledger<xmoe2>(r, c, sh, 2, true);
  });
}

TEST_CASE("mixture of experts: earlier experts are bit-identical after AdamW steps") {
  auto c = lm_config(3);
  auto w = random_lm<float>(c, 90);
  sg::nn::add_act_range(w.trunk, 0.0f);
  sg::cl::add_expert(w);
  sg::cl::add_expert(w);
  std::mt19937 rng(91);
  for (auto& l : w.trunk.layers) make_mixture(l.mlp, c, 3, true, rng);
  constexpr auto recipe = sg::trainable<gate, up, down, router, act_range, q>;
  sg::model::decoder_lm<float, decltype(recipe), sg::backend::cpu, xmoe2> lm(c, recipe.on_layers(1, 2), {3});
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.lr = 1e-2, .weight_decay = 0.1});
  std::set<std::string> trainable;
  lm.for_each_trainable(w, g, [&](const std::string& n, auto&, auto&) { trainable.insert(n); });
  CHECK(trainable.size() == 2 * 6);
  CHECK(opt.state_bytes() == 2 * lm.trainable_elements() * sizeof(float));
  const auto before = snapshot(w);
  sg::train::micro_batch<float> mb{ids, {{-100, 4, 4, 4, 4}, {-100, 4, 4, 4, 4}}};
  for (int i = 0; i < 2; ++i)
    sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-2}, std::span(&mb, 1));
  const auto after = snapshot(w);
  std::size_t frozen_experts = 0;
  for (const auto& [name, bytes] : before) {
    INFO(name);
    if (trainable.count(name)) {
      CHECK(after.at(name) != bytes);
    } else {
      CHECK(after.at(name) == bytes);
      frozen_experts += name.find(".experts.0.") != std::string::npos || name.find(".experts.1.") != std::string::npos;
    }
  }
  CHECK(frozen_experts == 3 * 2 * 4);  // experts 0 and 1 of every layer: gate, up, down, alpha
}

TEST_CASE("mixture grown from a dense model starts at the base model, bit for bit") {
  auto c = lm_config(3);
  auto w = random_lm<float>(c, 100);
  sg::model::decoder_lm<float, frozen_r> dense(c, sg::recipe::frozen);
  decltype(dense)::saved_t s0;
  const auto base = dense.forward(w, ids, s0);
  const auto weight_bytes = sg::ledger().live(memory_use::weights);
  REQUIRE(sg::cl::add_expert(w) == 2);
  CHECK(sg::ledger().live(memory_use::weights) - weight_bytes ==
        std::int64_t(3 * (2 * 16 + 3 * 16 * 24) * sizeof(float)));  // router [2, d] + one expert per layer
  CHECK(bitwise_equal(w.trunk.layers[1].mlp.experts[0].down_proj.weight, w.trunk.layers[1].mlp.down_proj.weight));
  {
    sg::model::decoder_lm<float, frozen_r, sg::backend::cpu, moe2> top2(c, sg::recipe::frozen, {2});
    decltype(top2)::saved_t s;
    CHECK(bitwise_equal(top2.forward(w, ids, s), base));  // f / 2 + f / 2 = f exactly
  }
  {
    sg::model::decoder_lm<float, frozen_r, sg::backend::cpu, sg::nn::moe<act::silu, 1, true>> top1(
        c, sg::recipe::frozen, {2});
    decltype(top1)::saved_t s;
    CHECK(bitwise_equal(top1.forward(w, ids, s), base));  // tie: the original, weight 1
  }
  // A third expert copies the newest (expert 1) and its router row; the old rows stay.
  std::mt19937 rng(101);
  for (auto& l : w.trunk.layers) sg::test::fill_normal(l.mlp.router, rng, 0.0, 0.5);
  auto& m = w.trunk.layers[2].mlp;
  const auto old_router = m.router.clone(memory_use::workspace);
  REQUIRE(sg::cl::add_expert(w.trunk) == 3);
  REQUIRE(m.router.shape() == sg::cpu::shape_t{3, 16});
  CHECK(std::memcmp(m.router.data(), old_router.data(), old_router.bytes()) == 0);
  CHECK(std::memcmp(m.router.data() + 32, m.router.data() + 16, 16 * sizeof(float)) == 0);
  CHECK(bitwise_equal(m.experts[1].gate_proj.weight, m.experts[0].gate_proj.weight));
  CHECK(sg::cl::expert_count(w.trunk) == 3);
  w.trunk.layers[0].mlp.router = {};
  w.trunk.layers[0].mlp.experts.clear();
  CHECK_THROWS_WITH(sg::cl::expert_count(w.trunk), Catch::Contains("model.layers.1.mlp has 3 experts, layer 0 has 1"));
}

TEST_CASE("mixture of experts: a new mapping is learned while the original expert stays itself") {
  auto c = lm_config(2);
  auto w = random_lm<float>(c, 110);
  sg::model::decoder_lm<float, frozen_r> dense(c, sg::recipe::frozen);
  decltype(dense)::saved_t s0;
  const auto base = dense.forward(w, ids, s0);
  // The original MLP's output on some inputs of earlier tasks.
  auto old_inputs = random_tensor<float>({4, 5, std::size_t(c.hidden)}, 111);
  auto expert0 = [&] {
    sg::nn::swiglu_mlp<float, std::remove_const_t<frozen_r>, false> f{c};
    decltype(f)::saved_t s;
    return f.forward(w.trunk.layers[1].mlp, old_inputs, s);
  };
  const auto old_out = expert0();

  sg::cl::add_expert(w);
  constexpr auto recipe = sg::trainable<gate, up, down, router>;
  sg::model::decoder_lm<float, decltype(recipe), sg::backend::cpu, moe2> lm(c, recipe, {2});
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.lr = 0.05});
  sg::train::micro_batch<float> mb{ids, {{-100, 4, 9, 4, 9}, {-100, 9, 4, 9, 4}}};
  double first = 0, last = 0;
  for (int i = 0; i < 40; ++i) {
    const auto st = sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{0.05}, std::span(&mb, 1));
    (i == 0 ? first : last) = st.loss;
  }
  INFO("loss " << first << " -> " << last);
  CHECK(last < 0.25 * first);
  CHECK(bitwise_equal(expert0(), old_out));  // expert 0 was never written
  // Routing every token to the original expert (a zero router, top-1: ties go to expert 0)
  // gives back the base model exactly: the old skill is still there, untouched.
  for (auto& l : w.trunk.layers) l.mlp.router.set_zero();
  sg::model::decoder_lm<float, frozen_r, sg::backend::cpu, sg::nn::moe<act::silu, 1, true>> original(
      c, sg::recipe::frozen, {2});
  decltype(original)::saved_t s1;
  CHECK(bitwise_equal(original.forward(w, ids, s1), base));
}

TEST_CASE("MLP policies: weights that do not fit the policy are refused, naming the tensor") {
  auto c = lm_config(2);
  auto w = random_lm<float>(c, 120);
  using Catch::Contains;
  using frozen = std::remove_const_t<frozen_r>;
  sg::model::decoder_lm<float, frozen, sg::backend::cpu, xsilu_mlp> xs(c, sg::recipe::frozen);
  decltype(xs)::saved_t s;
  CHECK_THROWS_WITH(xs.forward(w, ids, s), Contains("model.layers.0.mlp.act_fn.alpha is missing"));
  sg::cl::add_expert(w);
  sg::model::decoder_lm<float, frozen> dense(c, sg::recipe::frozen);
  decltype(dense)::saved_t sd;
  CHECK_THROWS_WITH(dense.forward(w, ids, sd), Contains("model.layers.0.mlp.router.weight present"));
  sg::model::decoder_lm<float, frozen, sg::backend::cpu, moe2> three(c, sg::recipe::frozen, {3});
  decltype(three)::saved_t s3;
  CHECK_THROWS_WITH(three.forward(w, ids, s3),
                    Contains("model.layers.0.mlp.router.weight has shape [2, 16], expected [3, 16]"));
  sg::model::decoder_lm<float, frozen, sg::backend::cpu, sg::nn::moe<act::silu, 3>> top3(c, sg::recipe::frozen, {2});
  decltype(top3)::saved_t s4;
  CHECK_THROWS_WITH(top3.forward(w, ids, s4), Contains("moe_options.experts is 2, fewer than the 3 experts chosen"));
  sg::model::decoder_lm<float, frozen, sg::backend::cpu, moe2> two(c, sg::recipe::frozen, {2});
  decltype(two)::saved_t s2;
  CHECK_NOTHROW(two.forward(w, ids, s2));
  CHECK_THROWS_WITH(sg::cl::add_expert(w, {.source = 5}), Contains("cannot copy expert 5 of 2"));
}
