// The continual-learning methods (cl/) on the CUDA backend against the CPU backend: the same
// generic code, run through the device backend (Thrust on the host in test_cuda_host, on the
// GPU in test_cuda_device).
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/cl/ewc.hpp"
#include "skillgraft/cl/lwf.hpp"
#include "skillgraft/cl/moe.hpp"
#include "skillgraft/cl/probes.hpp"
#include "skillgraft/cl/wise_ft.hpp"
#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/model/parameters.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"
#include "check.hpp"
#include "support/random.hpp"
#include "support/random_lm.hpp"

namespace sg = skillgraft;
using sg::memory_use;
using sg::test::check_close;
using sg::test::ledger_probe;
using sg::test::random_tensor;
using device_b = sg::backend::cuda;

namespace {

sg::cuda::tensor<float> up(const sg::cpu::tensor<float>& t) { return device_b::upload(t, memory_use::workspace); }

// Micro-batches with repeated ids and a prompt position without a target, on both backends.
template <class Backend>
std::vector<sg::train::micro_batch<float, Backend>> batches(std::size_t vocab, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<sg::train::micro_batch<float, Backend>> mbs(2);
  for (auto& mb : mbs) {
    mb.ids = sg::token_ids::from_shape({2, 6});
    for (auto& t : mb.ids) t = std::int64_t(rng() % vocab);
    mb.ids(1, 4) = mb.ids(0, 1);
    mb.targets = sg::shift_labels(mb.ids);
    mb.targets(0, 0) = sg::ignore_index;
  }
  return mbs;
}

}  // namespace

TEST_CASE("LwF loss on the device: loss, CE, KL, hidden and head gradients equal the CPU's, any chunking") {
  const std::size_t B = 2, P = 5, d = 8, V = 23;
  const auto h = random_tensor<float>({B, P, d}, 1), ht = random_tensor<float>({B, P, d}, 2);
  const auto W = random_tensor<float>({V, d}, 3, 0.5), Wt = random_tensor<float>({V, d}, 4, 0.5);
  sg::token_ids targets = sg::token_ids::from_shape({B, P});
  std::mt19937 rng(5);
  for (auto& y : targets) y = std::int64_t(rng() % V);
  targets(0, 0) = targets(1, 3) = sg::ignore_index;
  const auto dh_ = up(h), dht = up(ht), dW_ = up(W), dWt = up(Wt);
  for (const sg::cl::lwf_options o :
       {sg::cl::lwf_options{}, sg::cl::lwf_options{.lambda = 0.5, .temperature = 3.0, .rows = 3, .vocab = 7},
        sg::cl::lwf_options{.lambda = 2.0, .all_positions = true, .rows = 4, .vocab = 5}}) {
    INFO("rows " << o.rows << ", vocab chunk " << o.vocab << ", all positions " << o.all_positions);
    sg::cpu::tensor<float> gW({V, d}, memory_use::gradients);
    sg::cuda::tensor<float> gWd({V, d}, memory_use::gradients);
    const auto c = sg::cl::lwf_loss(h, W, ht, Wt, targets, &gW, o, 11, o.all_positions ? 0 : 11);
    const auto g = sg::cl::lwf_loss(dh_, dW_, dht, dWt, targets, &gWd, o, 11, o.all_positions ? 0 : 11);
    CHECK(g.count == c.count);
    CHECK(c.kl > 0);
    CHECK(std::abs(g.loss - c.loss) <= 1e-6 * std::abs(c.loss));
    CHECK(std::abs(g.ce - c.ce) <= 1e-6 * std::abs(c.ce));
    CHECK(std::abs(g.kl - c.kl) <= 1e-6 * std::abs(c.kl));
    check_close("d loss / d h", g.dh, c.dh);
    check_close("d loss / d W", gWd, gW);
  }
}

TEST_CASE("LwF on the device: the teacher's snapshot lives in device memory and a step equals the CPU's") {
  auto c = sg::test::tiny_config(false, 2);
  c.vocab_size = 37;
  auto hw = sg::test::random_lm<float>(c, 7);
  auto dw = sg::model::to_backend<device_b>(hw);
  using R = std::remove_const_t<decltype(sg::recipe::mlp)>;
  sg::model::decoder_lm<float, R> cm(c, sg::recipe::mlp);
  sg::model::decoder_lm<float, R, device_b> dm(c, sg::recipe::mlp);
  auto cg = cm.make_grads(hw);
  auto dg = dm.make_grads(dw);
  const sg::train::adamw_options ao{.lr = 1e-2, .weight_decay = 0.0};
  sg::train::adamw<float> copt(cm, hw, cg, ao);
  sg::train::adamw<float, device_b> dopt(dm, dw, dg, ao);
  sg::cl::teacher<float> cteach(cm, hw);
  const ledger_probe state(memory_use::method_state);
  sg::cl::teacher<float, device_b> dteach(dm, dw);
  CHECK(dteach.state_bytes() == cteach.state_bytes());
  CHECK(state.delta() == std::int64_t(dteach.state_bytes()));  // the snapshot is on the device
  const auto cb = batches<sg::backend::cpu>(c.vocab_size, 8);
  const auto db = batches<device_b>(c.vocab_size, 8);
  const sg::train::constant_schedule lr{1e-2};
  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    const sg::cl::lwf_objective<float> cobj{&cteach, {.lambda = 1.5, .temperature = 2.0, .rows = 5}};
    const sg::cl::lwf_objective<float, device_b> dobj{&dteach, {.lambda = 1.5, .temperature = 2.0, .rows = 5}};
    const auto cs = sg::train::train_step(cm, hw, cg, copt, lr, std::span(cb), {}, cobj);
    const auto ds = sg::train::train_step(dm, dw, dg, dopt, lr, std::span(db), {}, dobj);
    CHECK(std::abs(ds.loss - cs.loss) <= 1e-5 * std::abs(cs.loss));
    CHECK(std::abs(ds.grad_norm - cs.grad_norm) <= 1e-4 * cs.grad_norm);
    CHECK(sg::test::check_gradients(cm, hw, cg, dm, dw, dg) == 3 * std::size_t(c.n_layers));
  }
  // The teacher still gives the model before the task: the snapshot was swapped back each time.
  typename decltype(cm)::saved_t s0;
  auto h_now = cm.forward(hw, cb[0].ids, s0);
  const auto t_cpu = cteach.hidden(hw, cb[0].ids);
  const auto t_dev = dteach.hidden(dw, db[0].ids);
  check_close("teacher hidden states", t_dev, t_cpu);
  double moved = 0;
  for (std::size_t i = 0; i < h_now.size(); ++i) moved = std::max(moved, double(std::abs(h_now[i] - t_cpu[i])));
  CHECK(moved > 1e-4);  // the student did move away from its teacher
}

namespace {

// A model with its AdamW on both backends, the device weights uploaded from the CPU's.
template <class R>
struct twin_models {
  sg::model::lm_weights<float> hw;
  sg::model::lm_weights<float, device_b> dw;
  sg::model::decoder_lm<float, R> cm;
  sg::model::decoder_lm<float, R, device_b> dm;
  typename sg::model::decoder_lm<float, R>::grads_t cg;
  typename sg::model::decoder_lm<float, R, device_b>::grads_t dg;
  sg::train::adamw<float> copt;
  sg::train::adamw<float, device_b> dopt;

  twin_models(const sg::decoder_config& c, R recipe, unsigned seed)
      : hw(sg::test::random_lm<float>(c, seed)),
        dw(sg::model::to_backend<device_b>(hw)),
        cm(c, recipe),
        dm(c, recipe),
        cg(cm.make_grads(hw)),
        dg(dm.make_grads(dw)),
        copt(cm, hw, cg, {.lr = 1e-2, .weight_decay = 0.0}),
        dopt(dm, dw, dg, {.lr = 1e-2, .weight_decay = 0.0}) {}

  // The device's trainable tensors, downloaded, against the CPU's.
  void check_weights(const std::string& what) {
    std::vector<const sg::cpu::tensor<float>*> ref;
    sg::model::for_each_trainable_weight(cm, hw, [&](const std::string&, const sg::cpu::tensor<float>& t) { ref.push_back(&t); });
    std::size_t i = 0;
    sg::model::for_each_trainable_weight(dm, dw, [&](const std::string& n, const sg::cuda::tensor<float>& t) {
      REQUIRE(i < ref.size());
      check_close(what + ": " + n, t, *ref[i++]);
    });
    CHECK(i == ref.size());
  }
};

sg::decoder_config method_config() {
  auto c = sg::test::tiny_config(true, 2);
  c.vocab_size = 31;
  return c;
}

}  // namespace

TEST_CASE("EWC on the device: the Fisher (empirical and sampled), its state and penalised steps equal the CPU's") {
  using R = std::remove_const_t<decltype(sg::recipe::sa_proj)>;
  twin_models<R> m(method_config(), sg::recipe::sa_proj, 21);
  const auto cb = batches<sg::backend::cpu>(31, 22);
  const auto db = batches<device_b>(31, 22);
  for (const auto kind : {sg::cl::fisher_kind::empirical, sg::cl::fisher_kind::sampled}) {
    INFO((kind == sg::cl::fisher_kind::empirical ? "empirical" : "sampled") << " Fisher");
    const sg::cl::fisher_options fo{.kind = kind, .seed = 5, .samples = 2};
    const auto cf = sg::cl::estimate_fisher(m.cm, m.hw, std::span(cb), fo);
    const auto df = sg::cl::estimate_fisher(m.dm, m.dw, std::span(db), fo);
    CHECK(df.examples() == cf.examples());
    std::size_t n = 0;
    cf.for_each([&](const std::string& name, const sg::cpu::tensor<float>& f) {
      REQUIRE(df.find(name) != nullptr);
      check_close("Fisher of " + name, *df.find(name), f);
      ++n;
    });
    CHECK(n == 7 * 2);  // q, k, v, o and the q, k, v biases of both layers
  }
  sg::cl::ewc<float> cs(m.cm, m.hw, {.lambda = 50.0});
  const ledger_probe state(memory_use::method_state);
  sg::cl::ewc<float, device_b> ds(m.dm, m.dw, {.lambda = 50.0});
  CHECK(ds.state_bytes() == cs.state_bytes());
  CHECK(state.delta() == std::int64_t(ds.state_bytes()));  // F and θ* in device memory
  cs.consolidate(m.cm, m.hw, std::span(cb));
  ds.consolidate(m.dm, m.dw, std::span(db));
  const sg::train::constant_schedule lr{1e-2};
  const sg::cl::ewc_objective<float> cobj{&cs};
  const sg::cl::ewc_objective<float, sg::train::masked_ce_objective, device_b> dobj{&ds};
  double penalty = 0;
  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    const auto c = sg::train::train_step(m.cm, m.hw, m.cg, m.copt, lr, std::span(cb), {}, cobj);
    const auto d = sg::train::train_step(m.dm, m.dw, m.dg, m.dopt, lr, std::span(db), {}, dobj);
    CHECK(std::abs(d.loss - c.loss) <= 1e-5 * std::abs(c.loss));
    sg::test::check_gradients(m.cm, m.hw, m.cg, m.dm, m.dw, m.dg);
    penalty = cs.penalty(m.cm, m.hw);
    CHECK(std::abs(ds.penalty(m.dm, m.dw) - penalty) <= 1e-3 * penalty + 1e-12);
  }
  CHECK(penalty > 0);  // the steps moved the weights away from the anchor
  m.check_weights("after penalised steps");
  // A Fisher of another recipe is refused on the device as on the CPU.
  using Q = std::remove_const_t<decltype(sg::recipe::mlp)>;
  sg::model::decoder_lm<float, Q, device_b> other(method_config(), sg::recipe::mlp);
  CHECK_THROWS_WITH(ds.consolidate(m.dm, m.dw, sg::cl::estimate_fisher(other, m.dw, std::span(db))),
                    Catch::Contains("estimated under another recipe or model"));
}

TEST_CASE("WiSE-FT on the device: snapshots, interpolation and the running average equal the CPU's") {
  using R = std::remove_const_t<decltype(sg::recipe::llm)>;
  twin_models<R> m(method_config(), sg::recipe::llm, 31);
  const auto cb = batches<sg::backend::cpu>(31, 32);
  const auto db = batches<device_b>(31, 32);
  const sg::train::constant_schedule lr{1e-2};
  sg::cl::weight_snapshot<float> cbefore(m.cm, m.hw);
  sg::cl::weight_snapshot<float, device_b> dbefore(m.dm, m.dw);
  sg::cl::running_average<float> cavg(m.cm, m.hw);
  sg::cl::running_average<float, device_b> davg(m.dm, m.dw);
  for (int step = 0; step < 2; ++step) {
    sg::train::train_step(m.cm, m.hw, m.cg, m.copt, lr, std::span(cb));
    sg::train::train_step(m.dm, m.dw, m.dg, m.dopt, lr, std::span(db));
  }
  sg::cl::weight_snapshot<float> cafter(m.cm, m.hw);
  sg::cl::weight_snapshot<float, device_b> dafter(m.dm, m.dw);
  const sg::cl::group_alpha alpha{.attention = 0.25, .mlp = 0.75, .norm = 0.0, .embedding = 1.0, .head = 0.5};
  sg::cl::interpolate(m.cm, m.hw, cbefore, cafter, alpha);
  sg::cl::interpolate(m.dm, m.dw, dbefore, dafter, alpha);
  m.check_weights("interpolated");
  sg::cl::wise_ft(m.cm, m.hw, cbefore, 0.5);
  sg::cl::wise_ft(m.dm, m.dw, dbefore, 0.5);
  m.check_weights("WiSE-FT in place");
  cavg.after_task(m.cm, m.hw);
  davg.after_task(m.dm, m.dw);
  m.check_weights("running average written back");
  CHECK(davg.tasks() == 1);
  CHECK(davg.state_bytes() == cavg.state_bytes());
  CHECK_THROWS_WITH(sg::cl::interpolate(m.dm, m.dw, dbefore, dafter, 1.5), Catch::Contains("expected a value in [0, 1]"));
}

TEST_CASE("distribution probes on the device: set mass and both KLs, against other weights and a teacher, equal the CPU's") {
  using R = std::remove_const_t<decltype(sg::recipe::mlp)>;
  twin_models<R> m(method_config(), sg::recipe::mlp, 41);
  sg::cl::teacher<float> cteach(m.cm, m.hw);
  sg::cl::teacher<float, device_b> dteach(m.dm, m.dw);
  const auto cb = batches<sg::backend::cpu>(31, 42);
  const auto db = batches<device_b>(31, 42);
  const sg::train::constant_schedule lr{3e-2};
  for (int step = 0; step < 2; ++step) {  // the student moves away from its teacher
    sg::train::train_step(m.cm, m.hw, m.cg, m.copt, lr, std::span(cb));
    sg::train::train_step(m.dm, m.dw, m.dg, m.dopt, lr, std::span(db));
  }
  const auto base = sg::test::random_lm<float>(method_config(), 43);
  const auto dbase = sg::model::to_backend<device_b>(base);
  const sg::cl::token_set numbers({3, 4, 5, 17, 30}, 31, "numbers");
  const auto cprobe = sg::cl::make_distribution_probe(m.cm, {.rows = 5, .vocab = 8});
  const auto dprobe = sg::cl::make_distribution_probe(m.dm, {.rows = 5, .vocab = 8});
  const sg::cl::position_mask mask = sg::cl::mask_from_targets(cb[1].targets);
  auto same = [](const sg::cl::probe_accumulator& d, const sg::cl::probe_accumulator& c, bool kl) {
    REQUIRE(d.kept().size() == c.kept().size());
    REQUIRE(c.kept().size() > 5);
    for (std::size_t i = 0; i < c.kept().size(); ++i) {
      INFO("position " << i);
      const auto &dv = d.kept()[i].value, &cv = c.kept()[i].value;
      CHECK(std::abs(dv.set_mass - cv.set_mass) <= 1e-5 * cv.set_mass);
      CHECK(std::abs(dv.set_max_logit - cv.set_max_logit) <= 1e-5 * (1 + std::abs(cv.set_max_logit)));
      if (kl) {
        CHECK(cv.kl_ref_model > 1e-4);
        CHECK(std::abs(dv.kl_ref_model - cv.kl_ref_model) <= 1e-3 * cv.kl_ref_model);
        CHECK(std::abs(dv.kl_model_ref - cv.kl_model_ref) <= 1e-3 * cv.kl_model_ref);
      }
    }
  };
  {
    sg::cl::probe_accumulator c(numbers, true), d(numbers, true);
    cprobe.teacher_forced(c, m.hw, cb[1].ids, mask);
    dprobe.teacher_forced(d, m.dw, db[1].ids, mask);
    same(d, c, false);
  }
  {
    sg::cl::probe_accumulator c(numbers, true), d(numbers, true);
    cprobe.teacher_forced(c, m.hw, cb[1].ids, mask, nullptr, sg::cl::weights_reference<float>{&base});
    dprobe.teacher_forced(d, m.dw, db[1].ids, mask, nullptr, sg::cl::weights_reference<float, device_b>{&dbase});
    same(d, c, true);
  }
  {
    sg::cl::probe_accumulator c(numbers, true), d(numbers, true);
    cprobe.teacher_forced(c, m.hw, cb[1].ids, mask, nullptr, sg::cl::teacher_reference<float>{&cteach, &m.hw});
    dprobe.teacher_forced(d, m.dw, db[1].ids, mask, nullptr, sg::cl::teacher_reference<float, device_b>{&dteach, &m.dw});
    same(d, c, true);
  }
}

namespace {

// A mixture of `experts` experts per layer (random router and experts) trained one step on
// both backends under recipe R: loss, gradient norm, every gradient and the saved bytes agree.
template <class Mlp, class R>
void moe_step_parity(R recipe, int experts) {
  auto c = method_config();
  auto hw = sg::test::random_lm<float>(c, 51);
  std::mt19937 rng(52);
  for (int e = 1; e < experts; ++e) sg::cl::add_expert(hw);
  sg::test::randomize_experts(hw, rng);
  if constexpr (Mlp::activation::has_range) sg::nn::add_act_range(hw.trunk, 0.4f);
  auto dw = sg::model::to_backend<device_b>(hw);
  const sg::nn::moe_options o{experts};
  sg::model::decoder_lm<float, R, sg::backend::cpu, Mlp> cm(c, recipe, o);
  sg::model::decoder_lm<float, R, device_b, Mlp> dm(c, recipe, o);
  auto cg = cm.make_grads(hw);
  auto dg = dm.make_grads(dw);
  sg::train::adamw<float> copt(cm, hw, cg, {.lr = 1e-2});
  sg::train::adamw<float, device_b> dopt(dm, dw, dg, {.lr = 1e-2});
  const auto cb = batches<sg::backend::cpu>(31, 53);
  const auto db = batches<device_b>(31, 53);
  const sg::train::constant_schedule lr{1e-2};
  for (int step = 0; step < 2; ++step) {
    INFO("step " << step);
    const auto cs = sg::train::train_step(cm, hw, cg, copt, lr, std::span(cb));
    const ledger_probe saved(memory_use::saved_activations);
    const auto ds = sg::train::train_step(dm, dw, dg, dopt, lr, std::span(db));
    CHECK(saved.delta() == 0);  // everything forward kept was released by backward
    CHECK(std::abs(ds.loss - cs.loss) <= 1e-5 * std::abs(cs.loss));
    CHECK(std::abs(ds.grad_norm - cs.grad_norm) <= 1e-4 * cs.grad_norm);
    CHECK(sg::test::check_gradients(cm, hw, cg, dm, dw, dg) > 0);
  }
  // What forward keeps on the device is what it keeps on the CPU (the mixture's plan; the CPU's
  // own test checks that against the ledger), and the stack's share of it is the plan's.
  const std::int64_t cpu0 = sg::ledger().live(memory_use::saved_activations);
  typename decltype(cm)::saved_t cs;
  const auto ch = cm.forward(hw, cb[0].ids, cs);
  const std::int64_t cpu_saved = sg::ledger().live(memory_use::saved_activations) - cpu0;
  const ledger_probe saved(memory_use::saved_activations);
  typename decltype(dm)::saved_t s;
  const auto h = dm.forward(dw, db[0].ids, s);
  CHECK(saved.delta() == cpu_saved);
  CHECK(saved.delta() >= std::int64_t(sizeof(float) * dm.stack().saved_elements({2, 6})));
  check_close("hidden states", h, ch);
}

}  // namespace

TEST_CASE("mixture of experts on the device: routing, experts and router gradients equal the CPU's") {
  using moe2 = sg::nn::moe<sg::nn::act::silu, 2>;
  SECTION("top-2 renormalised, newest expert and router, every layer (input gradients through all experts)") {
    moe_step_parity<moe2>(sg::recipe::mlp | sg::trainable<sg::group::router>, 3);
  }
  SECTION("top-2, router only, upper layer (no input gradient)") {
    moe_step_parity<moe2>(sg::trainable<sg::group::router>.on_layers(1, 1), 3);
  }
  SECTION("top-1 softmax (Switch) with xSiLU experts and their ranges") {
    moe_step_parity<sg::nn::moe<sg::nn::act::xsilu, 1>>(
        sg::trainable<sg::proj::gate, sg::proj::down, sg::group::act_range, sg::group::router>, 3);
  }
  SECTION("top-2 with the attention trained below (experts pass gradients through, none train)") {
    moe_step_parity<moe2>(sg::recipe::sa_proj, 2);
  }
}
