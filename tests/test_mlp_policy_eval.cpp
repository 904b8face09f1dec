// Evaluation and continual-learning tools on models whose MLP is not the default dense SiLU
// one: generation and continuation scoring (model::generate, continuation_logprob), the LwF
// teacher, and the output-distribution probe must all run the model's own MLP policy (an
// xSiLU range, a mixture of experts) — checked against a full forward of that model; a dense
// model given such weights refuses them instead of silently running expert 0 or plain SiLU.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>

#include "skillgraft/cl/moe.hpp"
#include "skillgraft/cl/probes.hpp"
#include "skillgraft/cl/teacher.hpp"
#include "skillgraft/model/generate.hpp"
#include "skillgraft/nn/moe_mlp.hpp"
#include "skillgraft/policy/recipes.hpp"
#include "support/random_lm.hpp"

namespace sg = skillgraft;
namespace act = sg::nn::act;
using sg::memory_use;
using frozen_r = std::remove_cv_t<decltype(sg::recipe::frozen)>;
using xsilu_mlp = sg::nn::swiglu<act::xsilu>;
using moe2 = sg::nn::moe<act::silu, 2>;

namespace {

// A random LM; `kind` 1 adds xSiLU ranges (alpha != 0), 2 a mixture of 3 experts per layer
// with random experts and router (expert 0 is the original MLP).
sg::model::lm_weights<float> random_lm(const sg::decoder_config& c, int kind, unsigned seed) {
  auto w = sg::test::random_lm<float>(c, seed);
  std::mt19937 rng(seed + 1000);
  if (kind == 1) sg::nn::add_act_range(w.trunk, 0.7f);
  if (kind == 2) {
    sg::cl::add_expert(w);
    sg::cl::add_expert(w);
    sg::test::randomize_experts(w, rng);
  }
  return w;
}

bool bitwise_equal(const sg::cpu::tensor<float>& a, const sg::cpu::tensor<float>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

// log-softmax of row `pos` of z [B, T, V] at token j, in double.
double log_prob(const sg::cpu::tensor<float>& z, std::size_t b, std::size_t pos, std::int64_t j) {
  const std::size_t T = z.dim(1), V = z.dim(2);
  const float* r = z.data() + (b * T + pos) * V;
  double mx = r[0], s = 0;
  for (std::size_t i = 1; i < V; ++i) mx = std::max(mx, double(r[i]));
  for (std::size_t i = 0; i < V; ++i) s += std::exp(double(r[i]) - mx);
  return double(r[j]) - mx - std::log(s);
}

template <class Model>
sg::cpu::tensor<float> full_logits(const Model& m, const sg::model::lm_weights<float>& w, const sg::token_ids& ids) {
  typename Model::saved_t s;
  return m.logits(w, m.forward(w, ids, s));
}

const sg::token_ids prompt = {{1, 5, 7}, {3, 3, 12}};

// Greedy generation with the KV cache against argmax of a full forward over the prompt and
// the tokens generated so far; continuation_logprob against log-softmax of a full forward.
template <class Mlp>
void check_generation(const sg::model::lm_weights<float>& w, const typename Mlp::options& o) {
  const auto c = w.config;
  sg::model::decoder_lm<float, frozen_r, sg::backend::cpu, Mlp> m(c, sg::recipe::frozen, o);
  sg::model::sampling s;
  s.max_new_tokens = 5;
  const auto out = sg::model::generate(m, w, prompt, s);
  const std::size_t B = prompt.shape(0), P = prompt.shape(1), G = out.shape(1);
  sg::token_ids all = sg::token_ids::from_shape({B, P + G});
  for (std::size_t b = 0; b < B; ++b) {
    for (std::size_t t = 0; t < P; ++t) all(b, t) = prompt(b, t);
    for (std::size_t t = 0; t < G; ++t) all(b, P + t) = out(b, t);
  }
  const auto z = full_logits(m, w, all);
  const std::size_t V = std::size_t(c.vocab_size);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t t = 0; t < G; ++t) {
      const float* r = z.data() + (b * (P + G) + P - 1 + t) * V;
      CHECK(out(b, t) == std::max_element(r, r + V) - r);
    }
  const auto lp = sg::model::continuation_logprob(m, w, prompt, out);
  for (std::size_t b = 0; b < B; ++b) {
    double want = 0;
    for (std::size_t t = 0; t < G; ++t) want += log_prob(z, b, P - 1 + t, out(b, t));
    CHECK(lp[b] == Approx(want).epsilon(1e-5));
  }
  // A dense model refuses these weights rather than decode with expert 0 or without alpha.
  sg::model::decoder_lm<float, frozen_r> dense(c, sg::recipe::frozen);
  CHECK_THROWS_WITH(sg::model::generate(dense, w, prompt, s), Catch::Contains("model.layers.0.mlp."));
  CHECK_THROWS_WITH(sg::model::continuation_logprob(dense, w, prompt, out), Catch::Contains("model.layers.0.mlp."));
}

}  // namespace

TEST_CASE("generate and continuation_logprob run the model's MLP policy (xSiLU, mixture of experts)") {
  const auto c = sg::test::tiny_lm_config();
  SECTION("xSiLU") { check_generation<xsilu_mlp>(random_lm(c, 1, 11), {}); }
  SECTION("mixture of 3 experts, top 2") { check_generation<moe2>(random_lm(c, 2, 12), {3}); }
}

TEST_CASE("LwF teacher of a mixture-of-experts student: the student's policy, its own router copy") {
  const auto c = sg::test::tiny_lm_config();
  auto w = random_lm(c, 2, 21);
  constexpr auto recipe = sg::trainable<sg::group::router, sg::proj::gate>;
  sg::model::decoder_lm<float, std::remove_cv_t<decltype(recipe)>, sg::backend::cpu, moe2> student(c, recipe, {3});
  sg::model::decoder_lm<float, frozen_r, sg::backend::cpu, moe2> frozen(c, sg::recipe::frozen, {3});
  sg::model::decoder_lm<float, frozen_r> dense(c, sg::recipe::frozen);
  const sg::token_ids ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}};
  sg::cl::teacher<float> teacher(student, w);
  // Snapshot: per layer the router and the Gate of the newest expert (the one that trains);
  // the earlier experts are frozen, hence shared.
  CHECK(teacher.snapshot().size() == std::size_t(c.n_layers) * 2);
  CHECK(teacher.snapshot().find("model.layers.1.mlp.router.weight") != nullptr);
  CHECK(teacher.snapshot().find("model.layers.1.mlp.experts.2.gate_proj.weight") != nullptr);
  CHECK(teacher.snapshot().find("model.layers.1.mlp.experts.1.gate_proj.weight") == nullptr);
  decltype(frozen)::saved_t s;
  const auto before = frozen.forward(w, ids, s);
  CHECK(bitwise_equal(teacher.hidden(w, ids), before));
  decltype(dense)::saved_t sd;
  CHECK_THROWS_WITH(dense.forward(w, ids, sd), Catch::Contains("router.weight present"));
  // The student moves its router: the teacher still answers as the model before the task.
  std::mt19937 rng(22);
  for (auto& l : w.trunk.layers) sg::test::fill_normal(l.mlp.router, rng, 0.0, 1.0);
  CHECK_FALSE(bitwise_equal(frozen.forward(w, ids, s), before));
  CHECK(bitwise_equal(teacher.hidden(w, ids), before));
}

TEST_CASE("distribution probe of an xSiLU model and of a mixture: its policy, against a full softmax") {
  const auto c = sg::test::tiny_lm_config();
  const sg::cl::token_set numbers({2, 3, 4, 5}, c.vocab_size, "numbers");
  const sg::token_ids ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}};
  const sg::cl::position_mask mask = xt::ones<bool>({2, 5});
  auto check = [&](const auto& model, const sg::model::lm_weights<float>& w) {
    auto probe = sg::cl::make_distribution_probe(model, {});
    sg::cl::probe_accumulator acc(numbers, true);
    probe.teacher_forced(acc, w, ids, mask, nullptr, sg::cl::weights_reference<float>{&w});
    const auto z = full_logits(model, w, ids);
    REQUIRE(acc.kept().size() == 10);
    double mass = 0;
    for (std::size_t b = 0; b < 2; ++b)
      for (std::size_t t = 0; t < 5; ++t)
        for (auto j : {2, 3, 4, 5}) mass += std::exp(log_prob(z, b, t, j));
    const auto mean = acc.positions().mean;
    CHECK(mean.set_mass == Approx(mass / 10).epsilon(1e-5));
    CHECK(mean.kl_ref_model == 0.0);  // the same weights through the same frozen forward
    // A dense probe refuses these weights.
    sg::cl::distribution_probe<float> dense(c);
    sg::cl::probe_accumulator by_dense(numbers);
    CHECK_THROWS_WITH(dense.teacher_forced(by_dense, w, ids, mask), Catch::Contains("model.layers.0.mlp."));
  };
  SECTION("xSiLU") {
    const auto w = random_lm(c, 1, 31);
    check(sg::model::decoder_lm<float, frozen_r, sg::backend::cpu, xsilu_mlp>(c, sg::recipe::frozen), w);
  }
  SECTION("mixture of 3 experts, top 2") {
    const auto w = random_lm(c, 2, 32);
    check(sg::model::decoder_lm<float, frozen_r, sg::backend::cpu, moe2>(c, sg::recipe::frozen, {3}), w);
  }
}
