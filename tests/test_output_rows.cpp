// The forward of the rows with a target (nn/output_rows.hpp): the top block's MLP half and the
// final norm on those rows alone give the loss and every gradient of the forward of every row,
// under recipes whose top layer trains, passes the gradient only, or is a gated or mixture
// block (those select after the block); finite differences through the selected path; train_step
// with and without it; the saved bytes it keeps; and the errors it gives.
#include "support/gradcheck.hpp"
#include "support/random_lm.hpp"
#include "support/random_multimodal.hpp"

#include "skillgraft/cl/memory_plan.hpp"
#include "skillgraft/cl/moe.hpp"
#include "skillgraft/model/parameters.hpp"
#include "skillgraft/nn/gate_skip.hpp"
#include "skillgraft/nn/moe_mlp.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;
using sg::token_ids;
using sg::memory_use;
using tensor = sg::cpu::tensor<double>;

namespace {

const token_ids ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}};
// Six targets: a prompt, then answers; row 1 ends without one.
const token_ids targets = {{-100, -100, 2, 11, 9}, {-100, 12, 0, 4, -100}};

template <class R, class Mlp = sg::nn::default_mlp>
using lm_t = sg::model::decoder_lm<double, std::remove_cvref_t<R>, sg::backend::cpu, Mlp>;

// (name, gradient) of every trainable tensor, copied.
template <class LM>
std::vector<std::pair<std::string, tensor>> gradients(const LM& lm, sg::model::lm_weights<double>& w,
                                                      typename LM::grads_t& g) {
  std::vector<std::pair<std::string, tensor>> out;
  lm.for_each_trainable(w, g, [&](const std::string& n, tensor&, tensor& dp) {
    out.emplace_back(n, dp.clone(memory_use::workspace));
  });
  return out;
}

// The loss and gradients of the forward of the target rows against those of every row.
template <class LM>
void same_as_every_row(const LM& lm, sg::model::lm_weights<double>& w) {
  typename LM::saved_t every;
  auto g_every = lm.make_grads(w);
  auto h = lm.forward(w, ids, every);
  auto r = sg::train::masked_cross_entropy(lm, w, g_every, h, targets);
  lm.backward(w, every, r.dh, g_every);

  const auto [rows, compact] = sg::train::detail::target_rows(lm, sg::train::micro_batch<double>{ids, targets});
  REQUIRE(rows.count() == 6);
  CHECK(rows.index == std::vector<std::int64_t>{2, 3, 4, 6, 7, 8});
  typename LM::saved_t selected;
  auto g_rows = lm.make_grads(w);
  auto hr = lm.forward(w, ids, selected, nullptr, &rows);
  REQUIRE(hr.shape() == sg::shape_t{1, 6, std::size_t(lm.config().hidden)});
  for (std::size_t k = 0; k < rows.count(); ++k)
    for (std::size_t j = 0; j < hr.dim(2); ++j) {
      INFO("row " << rows.index[k] << " feature " << j);
      CHECK(hr[k * hr.dim(2) + j] == Approx(h[std::size_t(rows.index[k]) * h.dim(2) + j]).epsilon(1e-13).margin(1e-13));
    }
  auto rr = sg::train::masked_cross_entropy(lm, w, g_rows, hr, compact);
  CHECK(rr.count == r.count);
  CHECK(rr.loss == Approx(r.loss).epsilon(1e-13));
  lm.backward(w, selected, rr.dh, g_rows);
  const auto a = gradients(lm, w, g_every), b = gradients(lm, w, g_rows);
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    INFO(a[i].first);
    REQUIRE(a[i].first == b[i].first);
    const double scale = std::max(1.0, a[i].second.vec().cwiseAbs().maxCoeff());
    CHECK((a[i].second.vec() - b[i].second.vec()).cwiseAbs().maxCoeff() <= 1e-12 * scale);
    CHECK(a[i].second.vec().cwiseAbs().maxCoeff() > 0);  // a gradient that reaches the tensor
  }
}

}  // namespace

TEST_CASE("Output rows: the loss and every gradient of the forward of every row, dense recipes") {
  const auto c = sg::test::tiny_lm_config(3);
  auto w = sg::test::random_lm<double>(c, 41);
  same_as_every_row(lm_t<decltype(sg::recipe::llm)>(c, sg::recipe::llm), w);  // the top MLP trains
  same_as_every_row(lm_t<decltype(sg::recipe::mlp_gate_up)>(c, sg::recipe::mlp_gate_up), w);
  same_as_every_row(lm_t<decltype(sg::recipe::mlp_down)>(c, sg::recipe::mlp_down), w);
  same_as_every_row(lm_t<decltype(sg::recipe::sa_proj)>(c, sg::recipe::sa_proj), w);  // the top MLP passes dx only
  // The top layer frozen above the trained ones: it selects, then passes the gradient down.
  const auto low = sg::recipe::mlp_gate_up.on_layers(0, 1);
  same_as_every_row(lm_t<decltype(low)>(c, low), w);
}

TEST_CASE("Output rows: the top attention forms queries and output for those rows, under Q, O, biases and adapters") {
  // The top block's q = h[rows] Wq^T (+ bq) and out = a[rows] Wo^T; dq is zero outside the rows,
  // so dWq, dA_q and dh's Q term read those rows only. Biases (Qwen2) and adapters on all four
  // projections ride on the same rows.
  auto c = sg::test::tiny_config(true, 3);
  c.vocab_size = 13;
  c.max_seq = 16;
  c.lora_rank = 2;
  c.lora_alpha = 4;
  auto w = sg::test::random_lm<double>(c, 43);
  std::mt19937 rng(44);
  for (auto& l : w.trunk.layers)  // non-zero B, so every adapter path carries a gradient
    sg::nn::attention_projections::for_each([&](auto p) {
      auto& proj = decltype(p)::weight(l.self_attn);
      proj.lora.A = tensor({2, proj.in_features()}, memory_use::method_state);
      proj.lora.B = tensor({proj.out_features(), 2}, memory_use::method_state);
      sg::test::fill_normal(proj.lora.A, rng, 0.0, 0.3);
      sg::test::fill_normal(proj.lora.B, rng, 0.0, 0.3);
      proj.lora_scale = 2.0;
    });
  using sg::lora;
  using namespace sg::proj;
  constexpr auto q_only = sg::trainable<q>;
  constexpr auto o_only = sg::trainable<o>;
  constexpr auto adapters = sg::trainable<lora<q>, lora<k>, lora<v>, lora<o>>;
  constexpr auto q_and_adapted_o = sg::trainable<q, lora<o>, sg::group::embed>;  // dh wanted below the stack
  same_as_every_row(lm_t<decltype(q_only)>(c, q_only), w);
  same_as_every_row(lm_t<decltype(o_only)>(c, o_only), w);
  same_as_every_row(lm_t<decltype(adapters)>(c, adapters), w);
  same_as_every_row(lm_t<decltype(q_and_adapted_o)>(c, q_and_adapted_o), w);

  // The plan counts a[rows] and the rows' adapter inputs of Q and O, as the ledger sees them:
  // four rows fewer of a (qd) and of u_q, u_o (rank 2 each) than the forward of every row, besides
  // the top MLP half's (its norm's x and 1/rms, the g and u that pass dh) and the final norm's.
  using LM = lm_t<decltype(adapters)>;
  LM lm(c, adapters);
  const sg::seq_shape sh{2, 5};
  const auto plan_rows = sg::cl::plan_method_memory(lm, sg::cl::method::none, sh, sg::cl::optimizer_kind::adamw, 6);
  const auto plan_every = sg::cl::plan_method_memory(lm, sg::cl::method::none, sh);
  const std::size_t d = std::size_t(c.hidden), I = std::size_t(c.intermediate);
  CHECK(plan_every.saved_activations - plan_rows.saved_activations ==
        4 * (std::size_t(c.q_dim()) + 2 * 2 + 2 * (d + 1) + 2 * I) * sizeof(double));
  const auto [rows, compact] = sg::train::detail::target_rows(lm, sg::train::micro_batch<double>{ids, targets});
  const auto before = sg::ledger().live(memory_use::saved_activations);
  typename LM::saved_t s;
  lm.forward(w, ids, s, nullptr, &rows);
  CHECK(sg::ledger().live(memory_use::saved_activations) - before == std::int64_t(plan_rows.saved_activations));
}

TEST_CASE("Output rows: gated and mixture blocks run every row and the stack selects after them") {
  const auto c = sg::test::tiny_lm_config(2);
  {
    using P = sg::nn::gate_skip<>;
    static_assert(!sg::nn::decoder_block<double, decltype(sg::recipe::sa_proj), true, sg::backend::cpu, P>::selects_rows);
    auto w = sg::test::random_lm<double>(c, 42);
    sg::nn::add_residual_gates(w.trunk, sg::nn::gate_shape::vector, {.bias = 1.0, .weight_std = 0.1, .seed = 3});
    same_as_every_row(lm_t<decltype(sg::recipe::sa_proj), P>(c, sg::recipe::sa_proj), w);
  }
  {
    using P = sg::nn::moe<sg::nn::act::silu, 2>;
    static_assert(!sg::nn::decoder_block<double, decltype(sg::recipe::sa_proj), true, sg::backend::cpu, P>::selects_rows);
    auto w = sg::test::random_lm<double>(c, 43);
    REQUIRE(sg::cl::add_expert(w) == 2);
    std::mt19937 rng(7);
    for (auto& l : w.trunk.layers) sg::test::fill_normal(l.mlp.router, rng, 0.0, 0.5);
    same_as_every_row(lm_t<decltype(sg::recipe::sa_proj), P>(c, sg::recipe::sa_proj, {2}), w);
  }
  static_assert(sg::nn::decoder_block<double, decltype(sg::recipe::sa_proj), true>::selects_rows);
}

TEST_CASE("Output rows: finite differences through the forward of the target rows") {
  const auto c = sg::test::tiny_lm_config(2);
  auto w = sg::test::random_lm<double>(c, 44);
  lm_t<decltype(sg::recipe::llm)> lm(c, sg::recipe::llm);
  const auto [rows, compact] = sg::train::detail::target_rows(lm, sg::train::micro_batch<double>{ids, targets});
  auto loss = [&, &rows = rows, &compact = compact] {
    decltype(lm)::saved_t s;
    auto h = lm.forward(w, ids, s, nullptr, &rows);
    return sg::train::masked_cross_entropy<double>(h, w.head(), compact, sg::train::no_head_grad, {.want_dh = false}).loss;
  };
  decltype(lm)::saved_t s;
  auto g = lm.make_grads(w);
  auto h = lm.forward(w, ids, s, nullptr, &rows);
  auto r = sg::train::masked_cross_entropy(lm, w, g, h, compact);
  lm.backward(w, s, r.dh, g);
  std::size_t checked = 0;
  lm.for_each_trainable(w, g, [&](const std::string& n, tensor& p, tensor& dp) {
    sg::test::check_tensor(n, p, dp, loss, {});
    ++checked;
  });
  CHECK(checked == 2 * 9 + 3);  // nine tensors per layer, embeddings, final norm, head
}

TEST_CASE("Output rows: train_step gives the same steps with and without them, and keeps fewer bytes") {
  const auto c = sg::test::tiny_lm_config(3);
  using LM = lm_t<decltype(sg::recipe::llm)>;
  LM lm(c, sg::recipe::llm);
  auto w1 = sg::test::random_lm<double>(c, 45), w2 = sg::test::random_lm<double>(c, 45);
  auto g1 = lm.make_grads(w1), g2 = lm.make_grads(w2);
  sg::train::adamw<double> o1(lm, w1, g1, {.lr = 1e-2}), o2(lm, w2, g2, {.lr = 1e-2});
  const sg::train::micro_batch<double> mb{ids, targets};
  for (int step = 0; step < 3; ++step) {
    const auto a = sg::train::train_step(lm, w1, g1, o1, sg::train::constant_schedule{1e-2}, std::span(&mb, 1),
                                         {.target_rows_only = true});
    const auto b = sg::train::train_step(lm, w2, g2, o2, sg::train::constant_schedule{1e-2}, std::span(&mb, 1),
                                         {.target_rows_only = false});
    CHECK(a.targets == 6);
    CHECK(a.loss == Approx(b.loss).epsilon(1e-12));
    CHECK(a.grad_norm == Approx(b.grad_norm).epsilon(1e-12));
  }
  double worst = 0;
  lm.for_each_trainable(w1, g1, [&, i = 0](const std::string&, tensor& p, tensor&) mutable {
    int j = 0;
    lm.for_each_trainable(w2, g2, [&](const std::string&, tensor& q, tensor&) {
      if (j++ == i) worst = std::max(worst, (p.vec() - q.vec()).cwiseAbs().maxCoeff());
    });
    ++i;
  });
  CHECK(worst < 1e-10);

  // Saved activations: the top block's MLP half and the final norm keep the six rows only, as
  // the plan with the target count says; fewer than the forward of every row keeps.
  const sg::seq_shape sh{2, 5};
  const auto plan_rows = sg::cl::plan_method_memory(lm, sg::cl::method::none, sh, sg::cl::optimizer_kind::adamw, 6);
  const auto plan_every = sg::cl::plan_method_memory(lm, sg::cl::method::none, sh);
  const std::size_t d = std::size_t(c.hidden), I = std::size_t(c.intermediate);
  // rmsnorm (x, 1/rms) and the MLP's h, g, u, m (llm trains all three projections), and the
  // attention output a that dWo reads: 4 rows fewer.
  const std::size_t qd = std::size_t(c.q_dim());
  CHECK(plan_every.saved_activations - plan_rows.saved_activations ==
        4 * ((d + 1) + (d + 1) + d + 3 * I + qd) * sizeof(double));
  const auto [rows, compact] = sg::train::detail::target_rows(lm, mb);
  const auto before = sg::ledger().live(memory_use::saved_activations);
  {
    LM::saved_t s;
    lm.forward(w1, ids, s, nullptr, &rows);
    CHECK(sg::ledger().live(memory_use::saved_activations) - before == std::int64_t(plan_rows.saved_activations));
  }
  {
    LM::saved_t s;
    lm.forward(w1, ids, s);
    CHECK(sg::ledger().live(memory_use::saved_activations) - before == std::int64_t(plan_every.saved_activations));
  }
  // LwF reads every row: its plan ignores the target count.
  CHECK(sg::cl::plan_method_memory(lm, sg::cl::method::lwf, sh, sg::cl::optimizer_kind::adamw, 6).saved_activations ==
        plan_every.saved_activations);
  CHECK_THROWS_WITH(sg::cl::plan_method_memory(lm, sg::cl::method::none, sh, sg::cl::optimizer_kind::adamw, 11),
                    "skillgraft: memory plan: 11 target rows in a micro-batch of 10 positions");
}

TEST_CASE("Output rows: the multimodal model with images, train_step with and without them") {
  const auto c = sg::test::tiny_multimodal();
  const auto recipe = sg::recipe::full;  // every part trains: the soft tokens' gradient too
  sg::model::multimodal_lm<double, std::remove_cvref_t<decltype(recipe)>> mm(c, recipe);
  auto w1 = sg::test::random_multimodal<double>(c, 47), w2 = sg::test::random_multimodal<double>(c, 47);
  auto g1 = mm.make_grads(w1), g2 = mm.make_grads(w2);
  sg::train::adamw<double> o1(mm, w1, g1, {.lr = 1e-2}), o2(mm, w2, g2, {.lr = 1e-2});
  const auto images = sg::test::random_tensor<double>({2, 8, 8, 3}, 48);
  const std::size_t P = std::size_t(mm.image_tokens());
  sg::train::micro_batch<double> mb{ids, xt::full_like(token_ids::from_shape({2, P + 5}), sg::ignore_index), &images};
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t s = 2; s + 1 < 5; ++s) mb.targets(b, P + s) = ids(b, s + 1);
  const auto [rows, compact] = sg::train::detail::target_rows(mm, mb);
  CHECK(rows.index == std::vector<std::int64_t>{std::int64_t(P + 2), std::int64_t(P + 3), std::int64_t(2 * P + 7),
                                                std::int64_t(2 * P + 8)});
  for (int step = 0; step < 3; ++step) {
    const auto a = sg::train::train_step(mm, w1, g1, o1, sg::train::constant_schedule{1e-2}, std::span(&mb, 1),
                                         {.target_rows_only = true});
    const auto b = sg::train::train_step(mm, w2, g2, o2, sg::train::constant_schedule{1e-2}, std::span(&mb, 1),
                                         {.target_rows_only = false});
    CHECK(a.loss == Approx(b.loss).epsilon(1e-12));
    CHECK(a.grad_norm == Approx(b.grad_norm).epsilon(1e-12));
  }
  double worst = 0, moved = 0;
  auto w0 = sg::test::random_multimodal<double>(c, 47);
  std::map<std::string, tensor> after_rows, at_start;
  sg::model::for_each_multimodal_parameter(w1, [&](const std::string& n, tensor& t) { after_rows.emplace(n, t.clone(memory_use::workspace)); });
  sg::model::for_each_multimodal_parameter(w0, [&](const std::string& n, tensor& t) { at_start.emplace(n, t.clone(memory_use::workspace)); });
  sg::model::for_each_multimodal_parameter(w2, [&](const std::string& n, tensor& t) {
    worst = std::max(worst, (after_rows.at(n).vec() - t.vec()).cwiseAbs().maxCoeff());
    moved = std::max(moved, (at_start.at(n).vec() - t.vec()).cwiseAbs().maxCoeff());
  });
  CHECK(moved > 1e-3);
  CHECK(worst < 1e-10);
}

TEST_CASE("Output rows: bad rows and gradients of the wrong shape are named") {
  const auto c = sg::test::tiny_lm_config(2);
  auto w = sg::test::random_lm<double>(c, 46);
  lm_t<decltype(sg::recipe::sa_proj)> lm(c, sg::recipe::sa_proj);
  decltype(lm)::saved_t s;
  sg::nn::output_rows rows{{3, 2}, 2, 5};
  CHECK_THROWS_WITH(lm.forward(w, ids, s, nullptr, &rows),
                    "skillgraft: output row 1 is 2: rows must increase and lie in [0, 10)");
  rows.index = {0, 10};
  CHECK_THROWS_WITH(lm.forward(w, ids, s, nullptr, &rows),
                    "skillgraft: output row 1 is 10: rows must increase and lie in [0, 10)");
  rows = {{0, 1}, 2, 6};
  CHECK_THROWS_WITH(lm.forward(w, ids, s, nullptr, &rows),
                    Catch::Contains("the trunk's input has shape [2, 5, 16], the output rows were chosen for [2, 6, hidden]"));
  rows = {{1, 4, 9}, 2, 5};
  auto h = lm.forward(w, ids, s, nullptr, &rows);
  CHECK(h.shape() == sg::shape_t{1, 3, 16});
  auto g = lm.make_grads(w);
  tensor every_row({2, 5, 16}, memory_use::workspace);
  CHECK_THROWS_WITH(lm.backward(w, s, every_row, g),
                    "skillgraft: gradient of the hidden states has shape [2, 5, 16], expected [1, 3, 16] (forward "
                    "returned the output rows only)");
  // The attention layer on its own: rows chosen for another shape, and a gradient of every row
  // where forward returned the rows.
  {
    sg::nn::rope_table<double> table(c.head_dim, c.max_seq, c.rope_theta);
    sg::nn::self_attention<double, std::remove_cvref_t<decltype(sg::recipe::sa_proj)>, true> attn{c, &table};
    tensor x({2, 5, 16}, memory_use::workspace);
    x.fill(0.25);
    decltype(attn)::saved_t as;
    const sg::nn::output_rows other{{0, 1}, 2, 6};
    CHECK_THROWS_WITH(attn.forward(w.trunk.layers[0].self_attn, x, as, &other),
                      Catch::Contains("the attention input has shape [2, 5, 16], the output rows were chosen for [2, 6, hidden]"));
    auto out = attn.forward(w.trunk.layers[0].self_attn, x, as, &rows);
    CHECK(out.shape() == sg::shape_t{1, 3, 16});
    auto ag = attn.make_grads(w.trunk.layers[0].self_attn);
    CHECK_THROWS_WITH(attn.backward(w.trunk.layers[0].self_attn, as, every_row, ag, &rows),
                      "skillgraft: attention output gradient has shape [2, 5, 16], expected [1, 3, hidden] (the output rows)");
  }
  // train_step names a target outside the vocabulary by its place in the batch, as the loss does.
  token_ids bad = targets;
  bad(1, 2) = 13;
  sg::train::adamw<double> opt(lm, w, g);
  const sg::train::micro_batch<double> mb{ids, bad};
  CHECK_THROWS_WITH(sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-3}, std::span(&mb, 1)),
                    "skillgraft: target [1, 2] is 13, outside the vocabulary [0, 13)");
}
