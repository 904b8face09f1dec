// GateSkip (nn/gate_skip.hpp, nn/residual_gate.hpp, train/gate_sparsity.hpp): residual gates on
// the attention and MLP branches of a decoder block. Finite-difference gradients of the gated
// block under several recipes (vector and scalar gates), a fully open gate is the ungated
// block bit for bit, the memory plan equals the ledger, the sparsity objective's gradient by
// finite differences, train_step fine-tuning only the gates of a pretrained model, and skipped
// decoding against the masked computation (dense and mixture-of-experts MLPs).
#include "support/gradcheck.hpp"
#include "support/plan_ledger.hpp"
#include "support/random_lm.hpp"
#include "support/temp_dir.hpp"

#include <cstring>
#include <map>

#include "skillgraft/cl/moe.hpp"
#include "skillgraft/model/gate_skip.hpp"
#include "skillgraft/model/hf_checkpoint.hpp"
#include "skillgraft/model/parameters.hpp"
#include "skillgraft/nn/memory_report.hpp"
#include "skillgraft/policy/recipes.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/gate_sparsity.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;
using sg::memory_use;
using sg::token_ids;
using sg::test::random_tensor;
using namespace sg::proj;
using attn_gate = sg::group::residual_gate<sg::branch::attention>;
using mlp_gate = sg::group::residual_gate<sg::branch::mlp>;
using D = double;

namespace {

using vector_gates = sg::nn::gate_skip<>;
using scalar_gates = sg::nn::gate_skip<sg::nn::default_mlp, sg::nn::gate_shape::scalar>;
template <class R, bool Dx, class P = vector_gates, class T = D>
using block = sg::nn::decoder_block<T, std::remove_cvref_t<R>, Dx, sg::backend::cpu, P>;
using gates_r = decltype(sg::recipe::residual_gates);
using sa_r = decltype(sg::recipe::sa_proj);
using frozen_r = decltype(sg::recipe::frozen);

// --- types: what exists, from the recipe and the policy ----------------------------------------
// (member checks must be dependent to be soft: one concept per member path)
template <class S>
concept has_attn_gate_grad = requires(S g) { g.self_attn_residual_gate; };
template <class S>
concept has_mlp_gate_grad = requires(S g) { g.mlp_residual_gate; };
// Gates alone: gradients for both gates only.
static_assert(has_attn_gate_grad<block<gates_r, false>::grads_t> && has_mlp_gate_grad<block<gates_r, false>::grads_t>);

// Attention runs no backward (nothing below its gate trains); the MLP passes the gradient down
// to the attention gate.
template <class S>
concept has_mlp = requires(S s) { s.mlp; };
template <class S>
concept has_attention = requires(S s) { s.attention; };
static_assert(has_mlp<block<gates_r, false>::saved_t> && !has_attention<block<gates_r, false>::saved_t>);

// The gates keep their input h (for dWg), the branch output o (for dg) and g.
template <class S>
concept has_gate_h = requires(S s) { s.mlp_residual_gate.h; };
template <class S>
concept has_gate_o = requires(S s) { s.mlp_residual_gate.branch_out; };
static_assert(has_gate_h<block<gates_r, false>::saved_t> && has_gate_o<block<gates_r, false>::saved_t>);

// The MLP gate alone: neither branch runs backward.
using mlp_gate_r = decltype(sg::trainable<mlp_gate>);
static_assert(!has_mlp<block<mlp_gate_r, false>::saved_t> && !has_attention<block<mlp_gate_r, false>::saved_t>);
static_assert(!has_attn_gate_grad<block<mlp_gate_r, false>::grads_t>);
// Attention projections only, gates frozen: no gate gradients; the MLP gate keeps g and o (its
// dz reaches h2 and so the attention below), not h.
static_assert(!has_attn_gate_grad<block<sa_r, false>::grads_t> && !has_mlp_gate_grad<block<sa_r, false>::grads_t>);
static_assert(!has_gate_h<block<sa_r, false>::saved_t> && has_gate_o<block<sa_r, false>::saved_t>);
// The gate tags mean nothing to a block without gates: the same recipe there has no such member.
static_assert(!has_attn_gate_grad<sg::nn::decoder_block<D, std::remove_cvref_t<sa_r>, false>::grads_t>);
// A frozen gated block with nothing below still runs no backward (its saved state is the records).
static_assert(!block<frozen_r, false>::any_backward);
static_assert(std::is_same_v<decltype(sg::nn::grad<mlp_gate, block<gates_r, false>>(
                                 std::declval<block<gates_r, false>::grads_t&>())),
                             sg::nn::linear_weights<D>&>);

// A block's weights with gates that are neither saturated nor closed (so finite differences see
// every path), seeded.
template <class T>
sg::nn::block_weights<T> gated_weights(const sg::decoder_config& c, sg::nn::gate_shape shape, unsigned seed) {
  sg::nn::block_weights<T> w(c);
  std::mt19937 rng(seed);
  sg::test::fill_block(w, rng);
  sg::nn::add_residual_gates(w, c, shape, {.bias = 0.4, .weight_std = 0.4, .seed = seed});
  return w;
}

template <class T>
bool bitwise_equal(const sg::cpu::tensor<T>& a, const sg::cpu::tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

}  // namespace

TEST_CASE("GateSkip: gated block gradients by finite differences under several recipes") {
  for (bool bias : {false, true}) {
    const auto c = sg::test::tiny_config(bias);
    sg::nn::rope_table<D> table(c.head_dim, c.max_seq, c.rope_theta);
    auto recipes = sg::hana::make_tuple(
        sg::recipe::residual_gates, sg::trainable<attn_gate>, sg::trainable<mlp_gate, sg::group::mlp_norm>,
        sg::recipe::residual_gates | sg::recipe::sa_proj, sg::recipe::mlp_gate_up | sg::trainable<mlp_gate>,
        sg::recipe::sa_proj, sg::recipe::mlp_down, sg::trainable<v, attn_gate, sg::group::attn_norm>,
        sg::recipe::llm | sg::recipe::residual_gates, sg::recipe::frozen);
    auto check = [&](auto policy, sg::nn::gate_shape shape) {
      using P = typename decltype(policy)::type;
      auto w = gated_weights<D>(c, shape, 8);
      sg::hana::for_each(recipes, [&](auto r) {
        using R = std::remove_const_t<decltype(r)>;
        INFO((shape == sg::nn::gate_shape::vector ? "vector" : "scalar") << " gates, bias " << bias);
        auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 9);
        auto a = sg::test::gradcheck(block<R, true, P>(c, table), w, x);
        auto b = sg::test::gradcheck(block<R, false, P>(c, table), w, x);
        CHECK(a == b);
        CHECK(a.count("self_attn_residual_gate.weight") == std::size_t(sg::trains_v<attn_gate, R>));
        CHECK(a.count("self_attn_residual_gate.bias") == std::size_t(sg::trains_v<attn_gate, R>));
        CHECK(a.count("mlp_residual_gate.weight") == std::size_t(sg::trains_v<mlp_gate, R>));
      });
    };
    check(sg::hana::type_c<vector_gates>, sg::nn::gate_shape::vector);
    check(sg::hana::type_c<scalar_gates>, sg::nn::gate_shape::scalar);
  }
}

TEST_CASE("GateSkip around another MLP policy: gates on an xSiLU block, its range trained with them") {
  const auto c = sg::test::tiny_config(false);
  sg::nn::rope_table<D> table(c.head_dim, c.max_seq, c.rope_theta);
  using P = sg::nn::gate_skip<sg::nn::swiglu<sg::nn::act::xsilu>>;
  auto w = gated_weights<D>(c, sg::nn::gate_shape::vector, 13);
  sg::nn::add_act_range(w.mlp, 0.3);
  auto recipes = sg::hana::make_tuple(sg::recipe::residual_gates | sg::trainable<sg::group::act_range>,
                                      sg::trainable<up, mlp_gate>);
  sg::hana::for_each(recipes, [&](auto r) {
    using R = std::remove_const_t<decltype(r)>;
    auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 14);
    auto a = sg::test::gradcheck(block<R, true, P>(c, table), w, x);
    CHECK(a.count("mlp.act_fn.alpha") == std::size_t(sg::trains_v<sg::group::act_range, R>));
    CHECK(a.count("mlp_residual_gate.weight") == 1);
  });
}

TEST_CASE("GateSkip around a mixture of experts: gates, router and the newest expert by finite differences") {
  const auto c = sg::test::tiny_config(false);
  sg::nn::rope_table<D> table(c.head_dim, c.max_seq, c.rope_theta);
  using P = sg::nn::gate_skip<sg::nn::moe<sg::nn::act::silu, 2>>;
  auto w = gated_weights<D>(c, sg::nn::gate_shape::vector, 17);
  std::mt19937 rng(18);
  w.mlp.router = sg::cpu::tensor<D>({3, std::size_t(c.hidden)}, sg::memory_use::weights);
  sg::test::fill_normal(w.mlp.router, rng, 0.0, 1.0);
  for (int e = 1; e < 3; ++e) {
    w.mlp.experts.push_back(w.mlp.clone_expert(sg::memory_use::weights));
    for (auto* p : {&w.mlp.experts.back().gate_proj, &w.mlp.experts.back().up_proj, &w.mlp.experts.back().down_proj})
      sg::test::fill_linear(*p, rng);
  }
  typename P::options o{};
  o.experts = 3;
  auto recipes = sg::hana::make_tuple(sg::recipe::residual_gates | sg::trainable<sg::group::router>,
                                      sg::recipe::mlp | sg::trainable<sg::group::router, mlp_gate>,
                                      sg::recipe::sa_proj | sg::trainable<attn_gate>);
  sg::hana::for_each(recipes, [&](auto r) {
    using R = std::remove_const_t<decltype(r)>;
    auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 19);
    auto a = sg::test::gradcheck(block<R, true, P>(c, table, o), w, x);
    auto b = sg::test::gradcheck(block<R, false, P>(c, table, o), w, x);
    CHECK(a == b);
    CHECK(a.count("mlp.router.weight") == std::size_t(sg::trains_v<sg::group::router, R>));
    CHECK(a.count("mlp.experts.2.gate_proj.weight") == std::size_t(sg::trains_v<gate, R>));
    CHECK(a.count("mlp_residual_gate.weight") == std::size_t(sg::trains_v<mlp_gate, R>));
    CHECK(a.count("self_attn_residual_gate.weight") == std::size_t(sg::trains_v<attn_gate, R>));
  });
}

TEST_CASE("GateSkip: a fully open gate reproduces the ungated block bit for bit") {
  // sigmoid(40) rounds to 1 in double: y = x + 1 * o = x + o, and dz = dg g (1 - g) = 0.
  const auto c = sg::test::tiny_config(true);
  sg::nn::rope_table<D> table(c.head_dim, c.max_seq, c.rope_theta);
  using R = std::remove_const_t<decltype(sg::recipe::llm)>;
  for (auto shape : {sg::nn::gate_shape::vector, sg::nn::gate_shape::scalar}) {
    sg::nn::block_weights<D> w(c);
    std::mt19937 rng(3);
    sg::test::fill_block(w, rng);
    auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 4);
    auto dy = random_tensor<D>(x.shape(), 5);

    sg::nn::decoder_block<D, R, true> plain(c, table);
    decltype(plain)::saved_t s0;
    auto y0 = plain.forward(w, x, s0);
    auto g0 = plain.make_grads(w);
    auto dx0 = plain.backward(w, s0, dy, g0);

    sg::nn::add_residual_gates(w, c, shape, {.bias = 40.0, .weight_std = 0.0});
    auto check = [&](auto gated) {
      typename decltype(gated)::saved_t s1;
      auto y1 = gated.forward(w, x, s1);
      CHECK(bitwise_equal(y1, y0));
      auto g1 = gated.make_grads(w);
      auto dx1 = gated.backward(w, s1, dy, g1);
      CHECK(bitwise_equal(dx1, dx0));
      std::map<std::string, const sg::cpu::tensor<D>*> ref;
      decltype(plain)::for_each_trainable(w, g0, [&](const std::string& n, auto&, auto& g) { ref[n] = &g; });
      std::size_t compared = 0;
      decltype(gated)::for_each_trainable(w, g1, [&](const std::string& n, auto&, auto& g) {
        if (!ref.count(n)) return;
        INFO(n);
        CHECK(bitwise_equal(g, *ref[n]));
        ++compared;
      });
      CHECK(compared == ref.size());
    };
    if (shape == sg::nn::gate_shape::vector) check(block<R, true, vector_gates>(c, table));
    else check(block<R, true, scalar_gates>(c, table));
    // ... and a gate that is not open changes the output (the comparison above can fail).
    w.mlp_gate.bias[0] = 0.0;
    block<R, true, vector_gates> half(c, table);
    if (shape == sg::nn::gate_shape::vector) {
      decltype(half)::saved_t s2;
      CHECK(!bitwise_equal(half.forward(w, x, s2), y0));
    }
  }
}

namespace {
template <class Policy, class R>
void check_plan_against_ledger(R recipe, const sg::decoder_config& c, sg::seq_shape sh, sg::nn::gate_shape shape) {
  sg::test::check_plan_against_ledger(
      [&] {
        auto w = sg::test::random_trunk<float>(c, 5);
        sg::nn::add_residual_gates(w, shape);
        return w;
      },
      [&] { return sg::nn::decoder_stack<float, R, false, sg::backend::cpu, Policy>(c, recipe); }, sh);
}
}  // namespace

TEST_CASE("GateSkip: the memory plan of gated stacks equals what the code allocates") {
  const auto c = sg::test::tiny_config(true, 4);
  const sg::seq_shape sh{3, 7};
  auto recipes = sg::hana::make_tuple(sg::recipe::frozen, sg::recipe::residual_gates, sg::trainable<mlp_gate>,
                                      sg::recipe::sa_proj, sg::recipe::mlp_gate_up | sg::recipe::residual_gates,
                                      sg::recipe::llm);
  sg::hana::for_each(recipes, [&](auto r) {
    INFO("vector gates");
    check_plan_against_ledger<vector_gates>(r, c, sh, sg::nn::gate_shape::vector);
    check_plan_against_ledger<vector_gates>(r.on_layers(1, 2), c, sh, sg::nn::gate_shape::vector);
    INFO("scalar gates");
    check_plan_against_ledger<scalar_gates>(r, c, sh, sg::nn::gate_shape::scalar);
  });
}

namespace {
const token_ids ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}};
const token_ids targets = {{-100, -100, 2, 11, 9}, {-100, 12, 0, 4, -100}};

template <class Policy, class R>
void check_objective(R recipe, sg::nn::gate_shape shape, sg::train::gate_sparsity_options o) {
  const auto c = sg::test::tiny_lm_config(3);
  auto w = sg::test::random_lm<D>(c, 31);
  sg::nn::add_residual_gates(w.trunk, shape, {.bias = 0.3, .weight_std = 0.4, .seed = 2});
  sg::model::decoder_lm<D, R, sg::backend::cpu, Policy> lm(c, recipe);
  using lm_t = decltype(lm);
  auto loss = [&] {
    typename lm_t::saved_t s;
    auto h = lm.forward(w, ids, s);
    const double ce = sg::train::masked_cross_entropy<D>(h, w.head(), targets, sg::train::no_head_grad, {.want_dh = false}).loss;
    return ce + sg::train::gate_penalty_of(lm, s, o, 1.0, false).penalty;
  };
  typename lm_t::saved_t s;
  auto g = lm.make_grads(w);
  auto h = lm.forward(w, ids, s);
  const sg::train::gate_sparsity_objective objective{o};
  const sg::train::micro_batch<D> mb{ids, targets};
  auto r = objective.micro(lm, w, g, mb, h, targets, 0, s);
  CHECK(r.loss == Approx(loss()).epsilon(1e-12));
  lm.backward(w, s, r.dh, g);
  std::size_t gate_tensors = 0;
  lm.for_each_trainable(w, g, [&](const std::string& n, sg::cpu::tensor<D>& p, sg::cpu::tensor<D>& dp) {
    sg::test::check_tensor(n, p, dp, loss, {});
    gate_tensors += n.find("residual_gate") != std::string::npos;
  });
  CHECK(gate_tensors == std::size_t(2 * (int(sg::trains_v<attn_gate, R>) + int(sg::trains_v<mlp_gate, R>)) *
                                    (recipe.layers.all() ? 3 : recipe.layers.last - recipe.layers.first + 1)));
}
}  // namespace

TEST_CASE("GateSkip objective: cross-entropy plus the gate penalty, gradients by finite differences") {
  using sg::train::gate_penalty;
  for (auto kind : {gate_penalty::l2, gate_penalty::l1}) {
    INFO((kind == gate_penalty::l2 ? "l2" : "l1"));
    const sg::train::gate_sparsity_options o{.lambda = 0.7, .kind = kind};
    check_objective<vector_gates>(sg::recipe::residual_gates, sg::nn::gate_shape::vector, o);
    check_objective<scalar_gates>(sg::recipe::residual_gates, sg::nn::gate_shape::scalar, o);
    // The penalty of frozen gates still reaches trainable projections below them through h.
    check_objective<vector_gates>(sg::recipe::sa_proj.on_layers(0, 1), sg::nn::gate_shape::vector, o);
    check_objective<vector_gates>((sg::recipe::residual_gates | sg::trainable<q>).on_layers(1, 2),
                                  sg::nn::gate_shape::vector, o);
  }
}

TEST_CASE("GateSkip objective: the penalty value and its gradient seeds, scaled by a micro-batch share") {
  const auto c = sg::test::tiny_lm_config(2);
  auto w = sg::test::random_lm<D>(c, 7);
  sg::nn::add_residual_gates(w.trunk, sg::nn::gate_shape::vector, {.bias = 0.3, .weight_std = 0.4, .seed = 2});
  sg::model::decoder_lm<D, gates_r, sg::backend::cpu, vector_gates> lm(c, sg::recipe::residual_gates);
  decltype(lm)::saved_t s;
  lm.forward(w, ids, s);
  // The penalty written out: lambda / M * sum over gates of mean(g^2), from the gate values.
  double expected = 0, mean = 0;
  std::size_t elements = 0;
  int M = 0;
  lm.for_each_gate_record(s, [&](int, const sg::nn::gate_record& r) {
    ++M;
    expected += r.sum_sq / double(r.count);
    mean += r.sum;
    elements += r.count;
  });
  CHECK(M == 4);
  CHECK(elements == std::size_t(4 * 2 * 5 * c.hidden));
  const auto v = sg::train::gate_penalty_of(lm, s, {.lambda = 0.5}, 0.25);
  CHECK(v.gates == 4);
  CHECK(v.penalty == Approx(0.25 * 0.5 * expected / 4).epsilon(1e-14));
  CHECK(v.mean_gate == Approx(mean / double(elements)).epsilon(1e-14));
  CHECK(v.mean_gate > 0.3);
  CHECK(v.mean_gate < 0.9);
  // The records' seeds carry the gradient: coefficient scale * lambda / (M n), l2 only.
  lm.for_each_gate_record(s, [&](int, const sg::nn::gate_record& r) {
    CHECK(r.seed_l1 == 0);
    CHECK(r.seed_l2 == Approx(0.25 * 0.5 / (4.0 * double(r.count))).epsilon(1e-14));
  });
  CHECK_THROWS_WITH(sg::train::gate_penalty_of(lm, s, {.lambda = -1}), Catch::Contains("lambda must be >= 0"));
}

TEST_CASE("GateSkip: train_step fine-tunes only the gates of a pretrained model and closes them where it can") {
  const auto c = sg::test::tiny_lm_config(2);
  auto w = sg::test::random_lm<float>(c, 11);
  sg::nn::add_residual_gates(w.trunk);  // the paper's start: bias 5, weights N(0, 0.01^2)
  std::map<std::string, std::vector<float>> before;
  sg::model::for_each_parameter(w, [&](const std::string& n, sg::cpu::tensor<float>& t, auto, int) {
    before[n].assign(t.data(), t.data() + t.size());
  });
  constexpr auto r = sg::recipe::residual_gates;
  sg::model::decoder_lm<float, decltype(r), sg::backend::cpu, vector_gates> lm(c, r);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.weight_decay = 0.0});
  const sg::train::constant_schedule sched{.lr = 0.05};
  const sg::train::micro_batch<float> mb{ids, targets};
  const sg::train::gate_sparsity_objective objective{{.lambda = 1.0}};
  auto mean_gate = [&] {
    decltype(lm)::saved_t s;
    lm.forward(w, ids, s);
    return sg::train::gate_penalty_of(lm, s, objective.options, 1.0, false).mean_gate;
  };
  const double start = mean_gate();
  CHECK(start > 0.99);
  double first_loss = 0, last_loss = 0;
  for (int step = 0; step < 30; ++step) {
    auto st = sg::train::train_step(lm, w, g, opt, sched, std::span(&mb, 1), {}, objective);
    if (step == 0) first_loss = st.loss;
    last_loss = st.loss;
  }
  CHECK(last_loss < first_loss);
  CHECK(mean_gate() < start - 0.05);
  // Only the gates moved; every other tensor is bit for bit what it was.
  std::size_t moved = 0;
  sg::model::for_each_parameter(w, [&](const std::string& n, sg::cpu::tensor<float>& t, auto, int) {
    const bool same = std::memcmp(before[n].data(), t.data(), t.bytes()) == 0;
    INFO(n);
    if (n.find("residual_gate") == std::string::npos) CHECK(same);
    else moved += !same;
  });
  CHECK(moved == 8);  // weight and bias of two gates in two layers
}

TEST_CASE("GateSkip: gate weights are checked by name against the block's policy") {
  const auto c = sg::test::tiny_lm_config(2);
  auto w = sg::test::random_lm<float>(c, 12);
  sg::model::decoder_lm<float, gates_r, sg::backend::cpu, vector_gates> gated(c, sg::recipe::residual_gates);
  CHECK_THROWS_WITH(gated.make_grads(w), Catch::Contains("model.layers.0.self_attn_residual_gate.weight is missing"));
  sg::nn::add_residual_gates(w.trunk, sg::nn::gate_shape::scalar);
  CHECK_THROWS_WITH(gated.make_grads(w),
                    Catch::Contains("model.layers.0.self_attn_residual_gate.weight") && Catch::Contains("[1, 16]"));
  sg::model::decoder_lm<float, frozen_r, sg::backend::cpu> plain(c, sg::recipe::frozen);
  decltype(plain)::saved_t s;
  CHECK_THROWS_WITH(plain.forward(w, ids, s), Catch::Contains("self_attn_residual_gate.weight present") &&
                                                  Catch::Contains("no residual gates"));
  CHECK_THROWS_WITH(sg::nn::add_residual_gates(w.trunk), Catch::Contains("has residual gates already"));
}

// --- inference: skipping tokens per layer --------------------------------------------------------

namespace {
template <class T>
sg::model::lm_weights<T> gated_lm(const sg::decoder_config& c, unsigned seed) {
  auto w = sg::test::random_lm<T>(c, seed);
  sg::nn::add_residual_gates(w.trunk, sg::nn::gate_shape::vector, {.bias = 0.5, .weight_std = 0.5, .seed = seed});
  return w;
}
const token_ids prompt = {{1, 5, 7, 2, 11, 4}, {3, 3, 12, 0, 4, 9}};
// Skipped decoding (cache a, stats sa) against the masked computation (b, sb): the same keys and
// values in every layer, the same tokens skipped, some skipped, and FLOPs saved only by skipping.
void check_as_masked(const sg::model::kv_cache<D>& ca, const sg::model::kv_cache<D>& cb, const sg::model::skip_stats& sa,
                     const sg::model::skip_stats& sb) {
  for (std::size_t l = 0; l < ca.k.size(); ++l) {
    CHECK((ca.k[l].vec() - cb.k[l].vec()).cwiseAbs().maxCoeff() < 1e-12);
    CHECK((ca.v[l].vec() - cb.v[l].vec()).cwiseAbs().maxCoeff() < 1e-12);
  }
  CHECK(sa.branch_skipped == sb.branch_skipped);
  CHECK(sa.branch_skipped > 0);
  CHECK(sa.flops_run < sa.flops_full);
  CHECK(sb.flops_run == sb.flops_full);  // the masked reference computes everything
  CHECK(sa.flops_full == sb.flops_full);
}
}  // namespace

TEST_CASE("GateSkip inference: a gated model decodes what its forward computes, and budget 100 % skips nothing, bit for bit") {
  const auto c = sg::test::tiny_lm_config(3);
  auto w = gated_lm<D>(c, 21);
  sg::model::decoder_lm<D, frozen_r, sg::backend::cpu, vector_gates> lm(c, sg::recipe::frozen);
  // Cached decoding applies the gates: it equals the training path's forward.
  decltype(lm)::saved_t s;
  auto h_full = lm.forward(w, prompt, s);
  auto x = lm.embed(w, prompt, nullptr);
  sg::model::kv_cache<D> c0(c, 2, 10), c1(c, 2, 10), c2(c, 2, 10);
  auto h0 = sg::model::decode(lm, w, c0, x);
  CHECK((h0.vec() - h_full.vec()).cwiseAbs().maxCoeff() < 1e-12);
  // ... and the gates matter (the comparison above would fail without them).
  sg::model::decoder_lm<D, frozen_r> plain(c, sg::recipe::frozen);
  auto w_plain = sg::test::random_lm<D>(c, 21);
  decltype(plain)::saved_t sp;
  CHECK((plain.forward(w_plain, prompt, sp).vec() - h_full.vec()).cwiseAbs().maxCoeff() > 1e-3);

  sg::model::skip_stats st;
  auto h1 = sg::model::decode_skipping(lm, w, c1, x, sg::model::keep_all(c.n_layers), &st);
  auto h2 = sg::model::decode_skipping(lm, w, c2, x, sg::model::calibrate_skipping(lm, w, prompt, 1.0));
  CHECK(bitwise_equal(h1, h0));
  CHECK(bitwise_equal(h2, h0));
  for (int l = 0; l < c.n_layers; ++l) {
    CHECK(bitwise_equal(c1.k[std::size_t(l)], c0.k[std::size_t(l)]));
    CHECK(bitwise_equal(c1.v[std::size_t(l)], c0.v[std::size_t(l)]));
  }
  CHECK(st.branch_skipped == 0);
  CHECK(st.branch_tokens == std::size_t(2 * 3 * 12));
  CHECK(st.flops_run == st.flops_full);
  // Generation and scoring: the same tokens and log-probabilities, bit for bit.
  sg::model::sampling smp;
  smp.max_new_tokens = 4;
  const token_ids skipped = sg::model::generate_skipping(lm, w, prompt, smp, sg::model::keep_all(c.n_layers));
  const token_ids full = sg::model::generate(lm, w, prompt, smp);
  CHECK(skipped == full);
  const token_ids answer = {{2, 6}, {8, 1}};
  CHECK(sg::model::continuation_logprob_skipping(lm, w, prompt, answer, sg::model::keep_all(c.n_layers)) ==
        sg::model::continuation_logprob(lm, w, prompt, answer));
}

TEST_CASE("GateSkip inference: skipped decoding equals the full computation with masked updates, KV cache included") {
  const auto c = sg::test::tiny_lm_config(4);
  auto w = gated_lm<D>(c, 23);
  sg::model::decoder_lm<D, frozen_r, sg::backend::cpu, vector_gates> lm(c, sg::recipe::frozen);
  for (double keep : {0.9, 0.5}) {
    INFO("keep " << keep);
    auto plan = sg::model::calibrate_skipping(lm, w, prompt, keep);
    auto masked = plan;
    masked.mode = sg::model::skip_mode::masked;
    sg::model::kv_cache<D> ca(c, 2, 12), cb(c, 2, 12);
    sg::model::skip_stats sa, sb;
    // The prompt in one call, then single-token steps (generation's pattern).
    auto x = lm.embed(w, prompt, nullptr);
    std::vector<std::pair<sg::cpu::tensor<D>, sg::cpu::tensor<D>>> outs;
    outs.emplace_back(sg::model::decode_skipping(lm, w, ca, x, plan, &sa),
                      sg::model::decode_skipping(lm, w, cb, x, masked, &sb));
    for (std::int64_t t : {4, 9, 1}) {
      auto step = lm.embed(w, token_ids{{t}, {t + 1}}, nullptr);
      outs.emplace_back(sg::model::decode_skipping(lm, w, ca, step, plan, &sa),
                        sg::model::decode_skipping(lm, w, cb, step, masked, &sb));
    }
    for (auto& [a, b] : outs) CHECK((a.vec() - b.vec()).cwiseAbs().maxCoeff() < 1e-12);
    check_as_masked(ca, cb, sa, sb);
    // A skipped token's keys and values at a layer are the layer below's, exactly: find one.
    std::size_t carried = 0;
    const std::size_t kvd = std::size_t(c.kv_dim());
    for (int l = 1; l < c.n_layers; ++l)
      for (std::size_t b = 0; b < 2; ++b)
        for (std::size_t pos = 0; pos < 9; ++pos) {  // the positions written: 6 of the prompt, 3 steps
          const std::size_t at = (b * 12 + pos) * kvd;
          carried += std::memcmp(ca.k[std::size_t(l)].data() + at, ca.k[std::size_t(l - 1)].data() + at,
                                 kvd * sizeof(D)) == 0;
        }
    CHECK(carried > 0);
    // Skipping changes the result (the comparisons above compare different computations).
    sg::model::kv_cache<D> cf(c, 2, 12);
    CHECK((sg::model::decode(lm, w, cf, x).vec() - outs[0].first.vec()).cwiseAbs().maxCoeff() > 1e-9);
  }
}

TEST_CASE("GateSkip inference: a step counts a branch idle only when every one of its tokens skips it") {
  const auto c = sg::test::tiny_lm_config(4);
  auto w = gated_lm<D>(c, 23);
  sg::model::decoder_lm<D, frozen_r, sg::backend::cpu, vector_gates> lm(c, sg::recipe::frozen);
  const auto plan = sg::model::calibrate_skipping(lm, w, prompt, 0.5);
  const std::size_t per_step = 2 * std::size_t(c.n_layers);  // (layer, branch) pairs
  // What the importances the step computes say: (layer, branch) pairs every token skips, and
  // those only some skip. Layer 0 always runs.
  std::size_t all_skip = 0, some_skip = 0;
  const auto count = [&](int l, int branch, const std::vector<double>& imp) {
    if (l == 0) return;
    const double threshold = (branch == 0 ? plan.attention : plan.mlp)[std::size_t(l)];
    std::size_t below = 0;
    for (double v : imp) below += v < threshold;
    all_skip += below == imp.size();
    some_skip += below > 0 && below < imp.size();
  };
  // One token a step: each branch-token skipped is a branch the step does not run at all.
  sg::model::kv_cache<D> one(c, 1, 12);
  sg::model::skip_stats s1;
  for (std::int64_t t : {1, 5, 7, 2, 11, 4, 9, 3})
    sg::model::decode_skipping(lm, w, one, lm.embed(w, token_ids{{t}}, nullptr), plan, &s1, count);
  CHECK(s1.branch_steps == 8 * per_step);
  CHECK(s1.branch_skipped > 0);
  CHECK(s1.branch_steps_skipped == s1.branch_skipped);
  CHECK(s1.branch_steps_skipped == all_skip);
  CHECK(s1.idle_fraction() == double(s1.branch_skipped) / double(8 * per_step));
  // Twelve tokens in one step: idle only where all twelve skip. Some branch is skipped by some
  // tokens only (so counting "any token skips" would fail here).
  all_skip = some_skip = 0;
  sg::model::kv_cache<D> many(c, 2, 12);
  sg::model::skip_stats s2;
  sg::model::decode_skipping(lm, w, many, lm.embed(w, prompt, nullptr), plan, &s2, count);
  CHECK(s2.branch_steps == per_step);
  CHECK(some_skip > 0);
  CHECK(s2.branch_steps_skipped == all_skip);
  // The masked reference runs every branch for every token: nothing idle.
  auto masked = plan;
  masked.mode = sg::model::skip_mode::masked;
  sg::model::kv_cache<D> one_masked(c, 1, 12);
  sg::model::skip_stats s3;
  for (std::int64_t t : {1, 5, 7, 2, 11, 4, 9, 3})
    sg::model::decode_skipping(lm, w, one_masked, lm.embed(w, token_ids{{t}}, nullptr), masked, &s3);
  CHECK(s3.branch_skipped == s1.branch_skipped);
  CHECK(s3.branch_steps_skipped == 0);
}

TEST_CASE("GateSkip inference around a mixture of experts: only the kept tokens run the experts, as the masked computation") {
  // The skipping MLP branch gathers the kept rows and runs the policy's forward on them alone;
  // under a mixture of experts each row is routed by itself, so that must equal the masked
  // computation (every token routed and run, the skipped ones' updates zeroed).
  using moe_gates = sg::nn::gate_skip<sg::nn::moe<sg::nn::act::silu, 2>>;
  const auto c = sg::test::tiny_lm_config(3);
  auto w = gated_lm<D>(c, 27);
  sg::cl::add_expert(w);
  sg::cl::add_expert(w);
  std::mt19937 rng(28);
  sg::test::randomize_experts(w, rng);
  moe_gates::options o{};
  o.experts = 3;
  sg::model::decoder_lm<D, frozen_r, sg::backend::cpu, moe_gates> lm(c, sg::recipe::frozen, o);
  auto x = lm.embed(w, prompt, nullptr);
  {  // budget 100 %: the full model's decoding, bit for bit
    sg::model::kv_cache<D> c0(c, 2, 8), c1(c, 2, 8);
    CHECK(bitwise_equal(sg::model::decode_skipping(lm, w, c1, x, sg::model::keep_all(c.n_layers)),
                        sg::model::decode(lm, w, c0, x)));
  }
  const auto plan = sg::model::calibrate_skipping(lm, w, prompt, 0.5);
  auto masked = plan;
  masked.mode = sg::model::skip_mode::masked;
  sg::model::kv_cache<D> ca(c, 2, 8), cb(c, 2, 8), cf(c, 2, 8);
  sg::model::skip_stats sa, sb;
  const auto a = sg::model::decode_skipping(lm, w, ca, x, plan, &sa);
  const auto b = sg::model::decode_skipping(lm, w, cb, x, masked, &sb);
  CHECK((a.vec() - b.vec()).cwiseAbs().maxCoeff() < 1e-12);
  check_as_masked(ca, cb, sa, sb);
  // The experts matter, and so does skipping: neither comparison above is between equal things.
  CHECK((sg::model::decode(lm, w, cf, x).vec() - a.vec()).cwiseAbs().maxCoeff() > 1e-9);
  auto w_dense = gated_lm<D>(c, 27);
  sg::model::decoder_lm<D, frozen_r, sg::backend::cpu, vector_gates> dense(c, sg::recipe::frozen);
  sg::model::kv_cache<D> cd(c, 2, 8);
  CHECK((sg::model::decode_skipping(dense, w_dense, cd, x, plan).vec() - a.vec()).cwiseAbs().maxCoeff() > 1e-6);
}

TEST_CASE("GateSkip inference: calibration keeps the top fraction of a layer's tokens by importance") {
  const auto c = sg::test::tiny_lm_config(3);
  auto w = gated_lm<D>(c, 25);
  sg::model::decoder_lm<D, frozen_r, sg::backend::cpu, vector_gates> lm(c, sg::recipe::frozen);
  for (double keep : {0.75, 0.5, 0.25}) {
    INFO("keep " << keep);
    const auto plan = sg::model::calibrate_skipping(lm, w, prompt, keep);
    CHECK(plan.attention[0] == -std::numeric_limits<double>::infinity());  // layer 0 always runs
    // Layer 1's attention sees the same inputs as in calibration (layer 0 never skips): exactly
    // ceil(keep * 12) of the 12 tokens run there.
    auto x = lm.embed(w, prompt, nullptr);
    sg::model::kv_cache<D> cache(c, 2, 6);
    std::size_t kept = 0;
    sg::model::decode_skipping(lm, w, cache, x, plan, nullptr, [&](int l, int branch, const std::vector<double>& imp) {
      if (l == 1 && branch == 0)
        for (double v : imp) kept += !(v < plan.attention[1]);
    });
    CHECK(kept == std::size_t(std::ceil(keep * 12)));
  }
  CHECK_THROWS_WITH(sg::model::calibrate_skipping(lm, w, prompt, 0.0), Catch::Contains("(0, 1]"));
  sg::model::kv_cache<D> cache(c, 2, 6);
  CHECK_THROWS_WITH(sg::model::decode_skipping(lm, w, cache, lm.embed(w, prompt, nullptr), sg::model::keep_all(2)),
                    Catch::Contains("the model 3 layers"));
}

// --- checkpoints: the gates' own names, round-tripped --------------------------------------------

TEST_CASE("GateSkip checkpoints: gate tensors and their config field round-trip by name") {
  sg::test::temp_dir dir;
  const auto c = sg::test::tiny_lm_config(2);
  for (auto shape : {sg::nn::gate_shape::vector, sg::nn::gate_shape::scalar}) {
    const bool vector = shape == sg::nn::gate_shape::vector;
    INFO((vector ? "vector" : "scalar"));
    auto w = gated_lm<float>(c, 41);
    if (!vector) {
      w = sg::test::random_lm<float>(c, 41);
      sg::nn::add_residual_gates(w.trunk, shape, {.bias = 0.5, .weight_std = 0.5, .seed = 41});
    }
    std::map<std::string, std::vector<float>> saved;
    sg::model::for_each_parameter(w, [&](const std::string& n, sg::cpu::tensor<float>& t, auto, int) {
      saved[n].assign(t.data(), t.data() + t.size());
    });
    CHECK(saved.count("model.layers.1.self_attn_residual_gate.weight") == 1);
    CHECK(saved.count("model.layers.1.mlp_residual_gate.bias") == 1);
    sg::model::save_hf_checkpoint(dir / "full", w);
    const auto config = sg::io::read_json_file(dir / "full" / "config.json");
    CHECK(config["skillgraft_residual_gates"] == (vector ? "vector" : "scalar"));
    sg::io::safetensors_file file(dir / "full" / "model.safetensors");
    const std::size_t width = vector ? std::size_t(c.hidden) : 1;
    CHECK(file.info("model.layers.0.mlp_residual_gate.weight").shape ==
          std::vector<std::size_t>{width, std::size_t(c.hidden)});
    // Loaded back: the same tensors, bit for bit, gates included.
    auto back = sg::model::load_hf_checkpoint<float>(dir / "full");
    std::size_t compared = 0;
    sg::model::for_each_parameter(back, [&](const std::string& n, sg::cpu::tensor<float>& t, auto, int) {
      INFO(n);
      REQUIRE(saved.count(n) == 1);
      CHECK(std::memcmp(saved[n].data(), t.data(), t.bytes()) == 0);
      ++compared;
    });
    CHECK(compared == saved.size());
    // A task checkpoint of the gates recipe holds the gates only; applied over a base with fresh gates.
    sg::model::decoder_lm<float, gates_r, sg::backend::cpu, vector_gates> lm(c, sg::recipe::residual_gates);
    if (vector) {
      sg::model::save_task_checkpoint(dir / "task", lm, w);
      auto base = sg::test::random_lm<float>(c, 41);
      sg::nn::add_residual_gates(base.trunk);
      const auto names = sg::model::apply_task_checkpoint(dir / "task", base);
      CHECK(names.size() == std::size_t(4 * c.n_layers));
      for (const auto& n : names) CHECK(n.find("_residual_gate.") != std::string::npos);
      sg::model::for_each_parameter(base, [&](const std::string& n, sg::cpu::tensor<float>& t, auto, int) {
        INFO(n);
        CHECK(std::memcmp(saved[n].data(), t.data(), t.bytes()) == 0);
      });
    }
  }
  // A config field that names no shape is refused by name.
  auto j = sg::io::read_json_file(dir / "full" / "config.json");
  j["skillgraft_residual_gates"] = "diagonal";
  sg::io::write_json_file(dir / "full" / "config.json", j);
  CHECK_THROWS_WITH(sg::model::load_hf_checkpoint<float>(dir / "full"),
                    Catch::Contains("skillgraft_residual_gates") && Catch::Contains("diagonal"));
}

// --- training-time dropping (the paper's budget during fine-tuning) -------------------------------

TEST_CASE("GateSkip training budget: dropped tokens by finite differences, the lowest-importance ones, and the schedule") {
  const auto c = sg::test::tiny_config(true);
  sg::nn::rope_table<D> table(c.head_dim, c.max_seq, c.rope_theta);
  auto recipes = sg::hana::make_tuple(sg::recipe::residual_gates, sg::recipe::residual_gates | sg::recipe::sa_proj,
                                      sg::recipe::mlp_gate_up, sg::recipe::llm | sg::recipe::residual_gates);
  auto check = [&](auto policy, sg::nn::gate_shape shape) {
    using P = typename decltype(policy)::type;
    auto w = gated_weights<D>(c, shape, 17);
    typename P::options o;
    o.train_skip = 0.3;  // 3 of the 10 tokens per branch
    sg::hana::for_each(recipes, [&](auto r) {
      using R = std::remove_const_t<decltype(r)>;
      auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 18);
      auto a = sg::test::gradcheck(block<R, true, P>(c, table, o), w, x);
      auto b = sg::test::gradcheck(block<R, false, P>(c, table, o), w, x);
      CHECK(a == b);
    });
    // The dropped tokens are the 3 of lowest mean gate, per branch.
    block<gates_r, false, P> blk(c, table, o);
    auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 19);
    typename decltype(blk)::saved_t s;
    blk.forward(w, x, s);
    for (const auto* gs : {&s.self_attn_residual_gate.gate_value, &s.mlp_residual_gate.gate_value}) {
      const auto& keep = gs == &s.self_attn_residual_gate.gate_value ? s.self_attn_residual_gate.keep : s.mlp_residual_gate.keep;
      REQUIRE(keep.size() == 10);
      const auto imp = sg::model::detail::row_means(*gs);
      double max_dropped = -1, min_kept = 2;
      std::size_t dropped = 0;
      for (std::size_t t = 0; t < 10; ++t) {
        if (keep[t] == 0) max_dropped = std::max(max_dropped, imp[t]), ++dropped;
        else min_kept = std::min(min_kept, imp[t]);
      }
      CHECK(dropped == 3);
      CHECK(max_dropped <= min_kept);
    }
    // Every token dropped: each branch adds nothing, the block is the identity, exactly.
    o.train_skip = 1.0;
    block<gates_r, false, P> all(c, table, o);
    typename decltype(all)::saved_t s1;
    CHECK(bitwise_equal(all.forward(w, x, s1), x));
  };
  check(sg::hana::type_c<vector_gates>, sg::nn::gate_shape::vector);
  check(sg::hana::type_c<scalar_gates>, sg::nn::gate_shape::scalar);

  const sg::train::skip_schedule ramp{.start = 0.005, .end = 0.1, .steps = 5000};
  CHECK(ramp(0) == 0.005);
  CHECK(ramp(2500) == Approx(0.0525));
  CHECK(ramp(5000) == 0.1);
  CHECK(ramp(9000) == 0.1);
  vector_gates::options bad;
  bad.train_skip = 1.5;
  block<gates_r, false> blk(c, table, bad);
  auto w = gated_weights<D>(c, sg::nn::gate_shape::vector, 17);
  auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 19);
  decltype(blk)::saved_t s;
  CHECK_THROWS_WITH(blk.forward(w, x, s), Catch::Contains("train_skip must be in [0, 1]"));
}

TEST_CASE("GateSkip training budget: the memory plan counts the keep masks, and train_step follows a schedule") {
  const auto c = sg::test::tiny_config(true, 4);
  vector_gates::options o;
  o.train_skip = 0.25;
  auto recipes = sg::hana::make_tuple(sg::recipe::frozen, sg::recipe::residual_gates, sg::recipe::sa_proj);
  sg::hana::for_each(recipes, [&](auto r) {
    using R = std::remove_const_t<decltype(r)>;
    sg::test::check_plan_against_ledger(
        [&] {
          auto w = sg::test::random_trunk<float>(c, 5);
          sg::nn::add_residual_gates(w);
          return w;
        },
        [&] { return sg::nn::decoder_stack<float, R, false, sg::backend::cpu, vector_gates>(c, r, o); }, {3, 7});
  });

  const auto lc = sg::test::tiny_lm_config(2);
  auto w = sg::test::random_lm<float>(lc, 11);
  sg::nn::add_residual_gates(w.trunk);
  constexpr auto r = sg::recipe::residual_gates;
  sg::model::decoder_lm<float, decltype(r), sg::backend::cpu, vector_gates> lm(lc, r);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g);
  const sg::train::micro_batch<float> mb{ids, targets};
  const sg::train::skip_schedule ramp{.start = 0.0, .end = 0.5, .steps = 4};
  for (int step = 0; step < 6; ++step) {
    auto opts = lm.mlp_options();
    opts.train_skip = ramp(opt.steps());
    lm.set_mlp_options(opts);
    auto st = sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{.lr = 0.01}, std::span(&mb, 1), {},
                                    sg::train::gate_sparsity_objective{});
    CHECK(std::isfinite(st.loss));
  }
  CHECK(lm.mlp_options().train_skip == 0.5);
  decltype(lm)::saved_t s;
  lm.forward(w, ids, s);
  std::size_t zeros = 0;
  for (std::size_t i = 0; i < s.trunk.lowest->mlp_residual_gate.keep.size(); ++i)
    zeros += s.trunk.lowest->mlp_residual_gate.keep[i] == 0;
  CHECK(zeros == 5);  // half of the 10 tokens
}
