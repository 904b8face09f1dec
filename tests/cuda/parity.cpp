// The CUDA backend against the CPU backend: the same weights, inputs and recipe must give
// the same outputs, losses and gradients within float tolerance, and the device bytes must
// equal the memory plan.
//
// This one source builds twice (tests/cuda/CMakeLists.txt):
//   test_cuda_host    g++, THRUST_DEVICE_SYSTEM_CPP: the backend's Thrust code and plan run
//                     on the host, GEMMs through Eigen. Runs everywhere CI has the CUDA headers.
//   test_cuda_device  nvcc (parity_device.cu): Thrust on the GPU, GEMMs through cuBLAS.
//                     Skipped (exit code 77) when no CUDA device is present.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/backend/operations.hpp"
#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/model/parameters.hpp"
#include "skillgraft/nn/backend_transfer.hpp"
#include "skillgraft/nn/memory_report.hpp"
#include "skillgraft/policy/dispatch.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/optimizer_state.hpp"
#include "skillgraft/train/step.hpp"
#include "skillgraft/train/schedule.hpp"
#include "check.hpp"
#include "support/random.hpp"
#include "support/temp_dir.hpp"

namespace sg = skillgraft;
using sg::memory_use;
namespace dev = sg::cuda;
using sg::test::check_close;
using sg::test::check_gradients;
using sg::test::ledger_probe;
using sg::test::rel;

// Both backends provide every operation the layers are written in (checked by the host
// compiler; the same headers then build under nvcc for the device test).
#if !defined(__CUDACC__)
static_assert(sg::backend::operations_policy<sg::backend::cpu>);
static_assert(sg::backend::operations_policy<sg::backend::cuda>);
#endif

// Callable from a main() compiled without the CUDA headers (main_device.cpp).
bool skillgraft_test_device_available() { return dev::device_available(); }

namespace {

// Recipes the parity tests walk: the paper's, and sets that exercise the other plans.
const auto recipes = sg::hana::make_tuple(
    sg::named_recipe{"sa_proj", sg::recipe::sa_proj}, sg::named_recipe{"mlp", sg::recipe::mlp},
    sg::named_recipe{"mlp_gate_up", sg::recipe::mlp_gate_up}, sg::named_recipe{"mlp_down", sg::recipe::mlp_down},
    sg::named_recipe{"llm", sg::recipe::llm}, sg::named_recipe{"frozen", sg::recipe::frozen},
    sg::named_recipe{"v", sg::trainable<sg::proj::v>}, sg::named_recipe{"q, k", sg::trainable<sg::proj::q, sg::proj::k>},
    sg::named_recipe{"norms, o", sg::trainable<sg::group::attn_norm, sg::group::mlp_norm, sg::proj::o>});

// --- compile time: the device block follows the CPU plan --------------------------------------
template <class R, bool Dx>
using cuda_block = sg::nn::decoder_block<float, std::remove_const_t<R>, Dx, sg::backend::cuda>;
using gate_up_r = decltype(sg::recipe::mlp_gate_up);
using frozen_r = decltype(sg::recipe::frozen);
using sa_r = decltype(sg::recipe::sa_proj);
template <class S>
concept has_mlp_m = requires(S s) { s.mlp.m; };
template <class S>
concept has_mlp_g_u_h = requires(S s) { s.mlp.g; s.mlp.u; s.mlp.h; };
template <class S>
concept has_attention = requires(S s) { s.attention; };
template <class S>
concept has_down_proj = requires(S g) { g.down_proj; };
template <class S>
concept has_gate_up = requires(S g) { g.gate_proj; g.up_proj; };
static_assert(cuda_block<frozen_r, false>::keeps_nothing && !cuda_block<frozen_r, false>::any_backward);
static_assert(!has_mlp_m<cuda_block<gate_up_r, false>::saved_t> && has_mlp_g_u_h<cuda_block<gate_up_r, false>::saved_t>);
static_assert(!has_attention<cuda_block<gate_up_r, false>::saved_t>);
static_assert(has_gate_up<cuda_block<gate_up_r, false>::grads_t> && !has_down_proj<cuda_block<gate_up_r, false>::grads_t>);
static_assert(std::is_empty_v<cuda_block<frozen_r, true>::grads_t>);
static_assert(std::is_same_v<decltype(sg::nn::grad<sg::proj::q, cuda_block<sa_r, false>>(
                                 std::declval<cuda_block<sa_r, false>::grads_t&>())),
                             sg::nn::linear_weights<float, sg::backend::cuda>&>);

// The same block on both backends; `prepare` changes the host weights first (adapters, ranges).
template <class R, bool Dx, class Mlp = sg::nn::default_mlp, class Prepare = void (*)(sg::nn::block_weights<float>&)>
void block_parity(const sg::decoder_config& c, sg::seq_shape sh, Prepare prepare = [](sg::nn::block_weights<float>&) {},
                  const typename Mlp::options& o = {}) {
  using cpu_t = sg::nn::decoder_block<float, std::remove_cvref_t<R>, Dx, sg::backend::cpu, Mlp>;
  using dev_t = sg::nn::decoder_block<float, std::remove_cvref_t<R>, Dx, sg::backend::cuda, Mlp>;
  INFO("input gradient " << Dx);
  auto hw_trunk = sg::test::random_trunk<float>(c, 11);
  auto& hw = hw_trunk.layers[0];
  prepare(hw);
  auto dw = sg::nn::to_backend<sg::backend::cuda>(hw);
  const sg::nn::rope_table<float> htable(c.head_dim, c.max_seq, c.rope_theta);
  const sg::nn::rope_table<float, sg::backend::cuda> dtable(c.head_dim, c.max_seq, c.rope_theta);
  const cpu_t cb(c, htable, o);
  const dev_t db(c, dtable, o);
  auto x = sg::test::random_tensor<float>({std::size_t(sh.batch), std::size_t(sh.seq), std::size_t(c.hidden)}, 12);
  auto dy = sg::test::random_tensor<float>(x.shape(), 13);
  const auto dx_dev = dev::tensor<float>::from_host(x, memory_use::workspace);
  const auto dy_dev = dev::tensor<float>::from_host(dy, memory_use::workspace);

  auto cg = cb.make_grads(hw);
  ledger_probe grads(memory_use::gradients), saved(memory_use::saved_activations);
  auto dg = db.make_grads(dw);
  CHECK(grads.delta() == std::int64_t(sg::plan_memory<dev_t>(c, sh, o).gradients));
  typename cpu_t::saved_t cs;
  typename dev_t::saved_t ds;
  const auto y = cb.forward(hw, x, cs);
  const auto y_dev = db.forward(dw, dx_dev, ds);
  CHECK(saved.delta() == std::int64_t(sg::plan_memory<dev_t>(c, sh, o).saved_activations));
  check_close("block output", y_dev, y);
  const auto dx = cb.backward(hw, cs, dy, cg);
  const auto dx_dev_out = db.backward(dw, ds, dy_dev, dg);
  if constexpr (Dx) check_close("block input gradient", dx_dev_out, dx);
  else CHECK(dx_dev_out.empty());
  std::vector<std::pair<std::string, const sg::cpu::tensor<float>*>> ref;
  cpu_t::for_each_trainable(hw, cg, [&](const std::string& n, auto&, auto& g) { ref.emplace_back(n, &g); });
  std::size_t i = 0;
  dev_t::for_each_trainable(dw, dg, [&](const std::string& n, auto&, auto& g) {
    REQUIRE(i < ref.size());
    CHECK(n == ref[i].first);
    check_close("gradient of " + n, g, *ref[i].second);
    ++i;
  });
  CHECK(i == ref.size());
}

}  // namespace

TEST_CASE("GEMM interface: both transposes, row strides and strided batches against a naive product") {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (float beta : {0.f, 1.f, 0.5f}) {
        const int m = 5, n = 7, k = 3, batch = 3;
        const dev::op oa = ta ? dev::op::t : dev::op::n, ob = tb ? dev::op::t : dev::op::n;
        // Stored shapes, with row strides wider than the rows.
        const int a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
        const int lda = a_cols + 2, ldb = b_cols + 1, ldc = n + 3;
        const long long sa = (long long)a_rows * lda + 4, sb = (long long)b_rows * ldb, sc = (long long)m * ldc + 1;
        sg::cpu::tensor<float> A({std::size_t(sa * batch)}, memory_use::workspace),
            B({std::size_t(sb * batch)}, memory_use::workspace), C({std::size_t(sc * batch)}, memory_use::workspace);
        for (auto* t : {&A, &B, &C})
          for (std::size_t i = 0; i < t->size(); ++i) (*t)[i] = nd(rng);
        auto dA = dev::tensor<float>::from_host(A, memory_use::workspace), dB = dev::tensor<float>::from_host(B, memory_use::workspace),
             dC = dev::tensor<float>::from_host(C, memory_use::workspace);
        const float alpha = 0.75f;
        sg::backend::cuda::gemm_strided_batched("test", oa, ob, m, n, k, alpha, dA.data(), lda, sa, dB.data(), ldb, sb, beta, dC.data(), ldc,
                                  sc, batch);
        auto expect = C.clone();
        for (int p = 0; p < batch; ++p)
          for (int i = 0; i < m; ++i)
            for (int j = 0; j < n; ++j) {
              double s = 0;
              for (int l = 0; l < k; ++l) {
                const double a = ta ? A[p * sa + l * lda + i] : A[p * sa + i * lda + l];
                const double b = tb ? B[p * sb + j * ldb + l] : B[p * sb + l * ldb + j];
                s += a * b;
              }
              float& c = expect[std::size_t(p * sc + i * ldc + j)];
              c = float(alpha * s + (beta == 0.f ? 0.0 : double(beta) * double(c)));
            }
        INFO("op(A) " << (ta ? "T" : "N") << ", op(B) " << (tb ? "T" : "N") << ", beta " << beta);
        check_close("C", dC, expect, 1e-6);
        // Elements between the rows (padding) are never written.
        const auto got = dC.to_host();
        CHECK(got[std::size_t(n)] == C[std::size_t(n)]);
      }
  dev::tensor<float> a({4, 4}, memory_use::workspace);
  CHECK_THROWS_WITH(sg::backend::cuda::gemm("q_proj: y = x W^T", dev::op::n, dev::op::n, 4, 4, 4, 1.f, a.data(), 3, a.data(), 4, 0.f,
                              a.data(), 4),
                    Catch::Contains("q_proj: y = x W^T") && Catch::Contains("lda=3"));
}

TEST_CASE("device tensors: upload, download, clone, zero initialisation and the device ledger") {
  const ledger_probe weights(memory_use::weights), work(memory_use::workspace);
  const auto host_live = sg::ledger().live(memory_use::weights);
  {
    auto h = sg::test::random_tensor<float>({3, 5}, 2);
    auto d = dev::tensor<float>::from_host(h, memory_use::weights);
    CHECK(weights.delta() == 60);
    CHECK(sg::ledger().live(memory_use::weights) == host_live);  // device bytes are not host bytes
    auto c = d.clone(memory_use::workspace);
    CHECK(work.delta() == 60);
    check_close("round trip", c, h, 0.0);
    dev::tensor<float> z({2, 2}, memory_use::workspace);
    const auto zh = z.to_host();
    for (std::size_t i = 0; i < zh.size(); ++i) CHECK(zh[i] == 0.f);
    z.fill(2.5f);
    CHECK(z.to_host()[3] == 2.5f);
    sg::cpu::tensor<float> wrong({5, 3}, memory_use::workspace);
    CHECK_THROWS_WITH(d.copy_from(wrong), Catch::Contains("[5, 3]") && Catch::Contains("[3, 5]"));
    CHECK_THROWS_WITH(d.copy_to(wrong), Catch::Contains("[5, 3]") && Catch::Contains("[3, 5]"));
    // The pool hands a freed block of the same size back without asking the device.
    const auto reserved = dev::device_pool::instance().reserved();
    { dev::tensor<float> t({1000}, memory_use::workspace); }
    const auto after_first = dev::device_pool::instance().reserved();
    { dev::tensor<float> t({1000}, memory_use::workspace); }
    CHECK(dev::device_pool::instance().reserved() == after_first);
    CHECK(after_first >= reserved);
  }
  CHECK(weights.delta() == 0);
  CHECK(work.delta() == 0);
}

TEST_CASE("decoder block: device output, input gradient and weight gradients equal the CPU's, every recipe") {
  const sg::seq_shape sh{2, 7};
  for (bool bias : {false, true}) {
    INFO("attention bias " << bias);
    const auto c = sg::test::tiny_config(bias, 1);
    sg::hana::for_each(recipes, [&](const auto& nr) {
      INFO("recipe " << nr.name);
      block_parity<decltype(nr.value), false>(c, sh);
      block_parity<decltype(nr.value), true>(c, sh);
    });
  }
}

TEST_CASE("decoder block: LoRA adapters on every projection run on the device as on the CPU") {
  const sg::seq_shape sh{2, 7};
  constexpr int r = 3;
  for (bool bias : {false, true}) {
    INFO("attention bias " << bias);
    auto c = sg::test::tiny_config(bias, 1);
    c.lora_rank = r;
    auto attach = [](sg::nn::block_weights<float>& w) {
      unsigned seed = 40;
      auto adapt = [&](sg::nn::linear_weights<float>& p) {
        p.lora.A = sg::test::random_tensor<float>({std::size_t(r), p.in_features()}, seed++, 0.3);
        p.lora.B = sg::test::random_tensor<float>({p.out_features(), std::size_t(r)}, seed++, 0.3);  // non-zero: dA flows
        p.lora_scale = 16.f / r;
      };
      for (auto* p : {&w.self_attn.q_proj, &w.self_attn.k_proj, &w.self_attn.v_proj, &w.self_attn.o_proj,
                      &w.mlp.gate_proj, &w.mlp.up_proj, &w.mlp.down_proj})
        adapt(*p);
    };
    using namespace sg::proj;
    using all_adapters = decltype(sg::trainable<sg::lora<q>, sg::lora<k>, sg::lora<v>, sg::lora<o>, sg::lora<gate>,
                                                sg::lora<up>, sg::lora<down>>);
    using qv_adapters = decltype(sg::trainable<sg::lora<q>, sg::lora<v>>);
    using adapters_and_o = decltype(sg::trainable<sg::lora<q>, o, sg::lora<down>>);
    block_parity<all_adapters, false>(c, sh, attach);
    block_parity<all_adapters, true>(c, sh, attach);
    block_parity<qv_adapters, false>(c, sh, attach);
    block_parity<adapters_and_o, true>(c, sh, attach);
    // Frozen adapters still change the output: forward folds them in on the device too.
    block_parity<std::remove_cv_t<decltype(sg::recipe::mlp_gate_up)>, false>(c, sh, attach);
  }
}

TEST_CASE("decoder block: expanded activations (xSiLU, xGELU, xATLU) and their range alpha on the device") {
  const sg::seq_shape sh{2, 7};
  const auto c = sg::test::tiny_config(false, 1);
  auto range = [](sg::nn::block_weights<float>& w) { sg::nn::add_act_range(w.mlp, 0.35f); };
  using namespace sg::proj;
  using with_range = decltype(sg::trainable<gate, up, sg::group::act_range>);
  using range_only = decltype(sg::trainable<sg::group::act_range>);
  using xsilu = sg::nn::swiglu<sg::nn::act::xsilu>;
  using xgelu = sg::nn::swiglu<sg::nn::act::xgelu>;
  block_parity<with_range, false, xsilu>(c, sh, range);
  block_parity<with_range, true, xsilu>(c, sh, range);
  block_parity<range_only, false, xgelu>(c, sh, range);
  block_parity<with_range, true, xgelu>(c, sh, range);
  block_parity<std::remove_cv_t<decltype(sg::recipe::sa_proj)>, true, xgelu>(c, sh, range);
  using xatlu = sg::nn::swiglu<sg::nn::act::xatlu>;
  block_parity<range_only, false, xatlu>(c, sh, range);
  block_parity<with_range, true, xatlu>(c, sh, range);
  block_parity<std::remove_cv_t<decltype(sg::recipe::mlp)>, false, xatlu>(c, sh, range);
}

TEST_CASE("decoder block: GateSkip residual gates (vector and scalar) on the device") {
  const sg::seq_shape sh{2, 7};
  const auto c = sg::test::tiny_config(true, 1);
  using namespace sg::proj;
  using attn_gate = sg::group::residual_gate<sg::branch::attention>;
  using gates_only = std::remove_cv_t<decltype(sg::recipe::residual_gates)>;
  using gates_and_q = decltype(sg::trainable<q, attn_gate, sg::group::mlp_norm>);
  using sa = std::remove_cv_t<decltype(sg::recipe::sa_proj)>;
  using vector_gates = sg::nn::gate_skip<>;
  using scalar_gates = sg::nn::gate_skip<sg::nn::default_mlp, sg::nn::gate_shape::scalar>;
  auto vector = [&](sg::nn::block_weights<float>& w) {
    sg::nn::add_residual_gates(w, c, sg::nn::gate_shape::vector, {.bias = 0.4, .weight_std = 0.4, .seed = 3});
  };
  auto scalar = [&](sg::nn::block_weights<float>& w) {
    sg::nn::add_residual_gates(w, c, sg::nn::gate_shape::scalar, {.bias = 0.4, .weight_std = 0.4, .seed = 3});
  };
  block_parity<gates_only, false, vector_gates>(c, sh, vector);
  block_parity<gates_and_q, true, vector_gates>(c, sh, vector);
  block_parity<sa, false, vector_gates>(c, sh, vector);
  block_parity<gates_only, true, scalar_gates>(c, sh, scalar);
  block_parity<gates_and_q, false, scalar_gates>(c, sh, scalar);
  // The training-time budget: the lowest-importance tokens dropped (ranked on the host).
  vector_gates::options drop;
  drop.train_skip = 0.3;
  block_parity<gates_and_q, true, vector_gates>(c, sh, vector, drop);
  scalar_gates::options drop_scalar;
  drop_scalar.train_skip = 0.5;
  block_parity<gates_only, false, scalar_gates>(c, sh, scalar, drop_scalar);
}

TEST_CASE("decoder stack: parity with the CPU and memory plan equal to the device ledger, with layer ranges") {
  const auto c = sg::test::tiny_config(true, 4);
  const sg::seq_shape sh{3, 7};
  auto run = [&](auto recipe) {
    using R = std::remove_const_t<decltype(recipe)>;
    ledger_probe weights(memory_use::weights), constants(memory_use::constants), grads(memory_use::gradients),
        opt(memory_use::optimizer_state), saved(memory_use::saved_activations);
    auto hw = sg::test::random_trunk<float>(c, 21);
    auto dw = sg::nn::to_backend<sg::backend::cuda>(hw);
    sg::nn::decoder_stack<float, R> cs(c, recipe);
    sg::nn::decoder_stack<float, R, false, sg::backend::cuda> ds(c, recipe);
    const auto plan = sg::plan_memory(ds, sh);
    CHECK(plan.saved_activations == sg::plan_memory(cs, sh).saved_activations);
    CHECK(plan.gradients == sg::plan_memory(cs, sh).gradients);
    CHECK(ds.flops(sh).forward == cs.flops(sh).forward);
    CHECK(ds.flops(sh).backward == cs.flops(sh).backward);
    CHECK(weights.delta() == std::int64_t(plan.weights));
    CHECK(constants.delta() == std::int64_t(plan.constants));
    auto cg = cs.make_grads(hw);
    auto dg = ds.make_grads(dw);
    CHECK(grads.delta() == std::int64_t(plan.gradients));
    sg::train::adamw<float, sg::backend::cuda> adam(ds, dw, dg);
    CHECK(opt.delta() == std::int64_t(plan.optimizer_state));
    CHECK(adam.state_bytes() == plan.optimizer_state);
    auto x = sg::test::random_tensor<float>({std::size_t(sh.batch), std::size_t(sh.seq), std::size_t(c.hidden)}, 22);
    const auto xd = dev::tensor<float>::from_host(x, memory_use::workspace);
    {
      typename decltype(cs)::saved_t chs;
      typename decltype(ds)::saved_t dhs;
      auto y = cs.forward(hw, x, chs);
      auto yd = ds.forward(dw, xd, dhs);
      CHECK(saved.delta() == std::int64_t(plan.saved_activations));
      check_close("stack output", yd, y);
      cs.backward(hw, chs, y, cg);
      ds.backward(dw, dhs, yd, dg);
      CHECK(grads.delta() == std::int64_t(plan.gradients));
      CHECK(saved.delta() == std::int64_t(plan.saved_activations));
    }
    CHECK(saved.delta() == 0);
    if constexpr (decltype(ds)::any_trainable) CHECK(check_gradients(cs, hw, cg, ds, dw, dg) > 0);
  };
  SECTION("sa_proj") { run(sg::recipe::sa_proj); }
  SECTION("mlp_gate_up on layers 1..2") { run(sg::recipe::mlp_gate_up.on_layers(1, 2)); }
  SECTION("llm") { run(sg::recipe::llm); }
  SECTION("mlp_down on the top layer") { run(sg::recipe::mlp_down.on_layers(3, 3)); }
  SECTION("frozen") { run(sg::recipe::frozen); }
}

TEST_CASE("AdamW on the device: a finite gradient that would overflow a moment is refused before anything changes") {
  const auto c = sg::test::tiny_config(false, 1);
  using R = std::remove_const_t<decltype(sg::recipe::mlp_down)>;
  auto hw = sg::test::random_trunk<float>(c, 9);
  auto dw = sg::nn::to_backend<sg::backend::cuda>(hw), dw2 = sg::nn::to_backend<sg::backend::cuda>(hw);
  sg::nn::decoder_stack<float, R, false, sg::backend::cuda> ds(c, sg::recipe::mlp_down);
  auto dg = ds.make_grads(dw);
  sg::train::adamw<float, sg::backend::cuda> adam(ds, dw, dg), fresh(ds, dw2, dg);
  auto g = sg::test::random_tensor<float>(dg.layer(0).down_proj.weight.shape(), 5);
  const float ok = g[5];
  g[5] = 1e30f;  // finite, but its square is not
  dg.layer(0).down_proj.weight.copy_from(g);
  const auto before = dw.layers[0].mlp.down_proj.weight.to_host();
  CHECK_THROWS_WITH(adam.step(ds, dw, dg),
                    "skillgraft: the gradient of model.layers.0.mlp.down_proj.weight at element 5 (1e+30) makes the AdamW "
                    "second moment overflow; no weight was changed (clip the gradients, or lower the loss scale)");
  const auto after = dw.layers[0].mlp.down_proj.weight.to_host();
  CHECK(std::memcmp(after.data(), before.data(), before.bytes()) == 0);
  CHECK(adam.steps() == 0);
  // Nothing changed: the next good step is bit for bit the first step of a fresh optimizer.
  g[5] = ok;
  dg.layer(0).down_proj.weight.copy_from(g);
  adam.step(ds, dw, dg);
  fresh.step(ds, dw2, dg);
  const auto a = dw.layers[0].mlp.down_proj.weight.to_host(), b = dw2.layers[0].mlp.down_proj.weight.to_host();
  CHECK(std::memcmp(a.data(), b.data(), a.bytes()) == 0);
  CHECK(a[5] != before[5]);
}

namespace {

sg::model::lm_weights<float> random_lm(const sg::decoder_config& c, unsigned seed) {
  sg::model::lm_weights<float> w(c);
  std::mt19937 rng(seed);
  sg::test::fill_normal(w.embed_tokens, rng, 0.0, 0.5);
  if (!c.tie_word_embeddings) sg::test::fill_normal(w.lm_head, rng, 0.0, 0.5);
  sg::test::fill_normal(w.norm, rng, 1.0, 0.1);
  for (auto& l : w.trunk.layers) sg::test::fill_block(l, rng);
  return w;
}

// Every tensor's bytes, by Hugging Face name.
std::map<std::string, std::vector<unsigned char>> snapshot(sg::model::lm_weights<float>& w) {
  std::map<std::string, std::vector<unsigned char>> out;
  sg::model::for_each_parameter(w, [&](const std::string& n, const sg::cpu::tensor<float>& t, auto, int) {
    std::vector<unsigned char> b(t.bytes());
    if (t.bytes()) std::memcpy(b.data(), t.data(), t.bytes());
    out[n] = std::move(b);
  });
  return out;
}

template <class R>
void lm_step_parity(R recipe, sg::decoder_config c) {
  c.vocab_size = 61;
  auto hw = random_lm(c, 31);
  auto dw = sg::model::to_backend<sg::backend::cuda>(hw);
  sg::model::decoder_lm<float, R> cm(c, recipe);
  sg::model::decoder_lm<float, R, sg::backend::cuda> dm(c, recipe);
  auto cg = cm.make_grads(hw);
  auto dg = dm.make_grads(dw);
  const sg::train::adamw_options o{.lr = 1e-2, .weight_decay = 0.1};
  sg::train::adamw<float> copt(cm, hw, cg, o);
  sg::train::adamw<float, sg::backend::cuda> dopt(dm, dw, dg, o);

  // Two micro-batches; repeated token ids (the embedding gradient adds them); a prompt without targets.
  std::mt19937 rng(32);
  std::vector<sg::train::micro_batch<float>> cb(2);
  std::vector<sg::train::micro_batch<float, sg::backend::cuda>> db(2);
  for (std::size_t k = 0; k < 2; ++k) {
    cb[k].ids = sg::token_ids::from_shape({2, 6});
    for (auto& t : cb[k].ids) t = std::int64_t(rng() % 61);
    cb[k].ids(1, 4) = cb[k].ids(0, 1);
    cb[k].targets = sg::shift_labels(cb[k].ids);
    cb[k].targets(0, 0) = sg::ignore_index;
    db[k].ids = cb[k].ids;
    db[k].targets = cb[k].targets;
  }
  const sg::train::constant_schedule lr{1e-2};
  const sg::train::step_options so{.max_grad_norm = 0.5};
  const auto before = snapshot(hw);
  const auto cst = sg::train::train_step(cm, hw, cg, copt, lr, std::span<const sg::train::micro_batch<float>>(cb), so);
  const auto dst = sg::train::train_step(dm, dw, dg, dopt, lr, std::span<const sg::train::micro_batch<float, sg::backend::cuda>>(db), so);
  CHECK(dst.targets == cst.targets);
  CHECK(std::abs(dst.loss - cst.loss) <= 1e-5 * std::abs(cst.loss));
  CHECK(std::abs(dst.grad_norm - cst.grad_norm) <= rel * cst.grad_norm);
  CHECK(dst.lr == cst.lr);
  // Gradients after clipping (the step keeps them), tensor by tensor.
  const std::size_t n = check_gradients(cm, hw, cg, dm, dw, dg);
  CHECK(n > 0);
  // After the step: trainable tensors moved, frozen ones are bit-identical, on the device too.
  std::set<std::string> trainable;
  dm.for_each_trainable(dw, dg, [&](const std::string& name, auto&, auto&) { trainable.insert(name); });
  auto back = random_lm(c, 99);
  sg::model::download(dw, back);
  const auto after = snapshot(back);
  for (const auto& [name, bytes] : before) {
    INFO(name);
    if (trainable.count(name)) CHECK(after.at(name) != bytes);
    else CHECK(after.at(name) == bytes);
  }
}

}  // namespace

TEST_CASE("language model: one training step gives the CPU's loss, gradient norm and clipped gradients") {
  SECTION("Llama-style, untied, every parameter") { lm_step_parity(sg::recipe::llm, sg::test::tiny_config(false, 3)); }
  SECTION("Qwen2-style, tied and biased, every parameter") {
    auto c = sg::test::tiny_config(true, 3);
    c.tie_word_embeddings = true;
    lm_step_parity(sg::recipe::llm, c);
  }
  SECTION("attention projections on layers 1..2") { lm_step_parity(sg::recipe::sa_proj.on_layers(1, 2), sg::test::tiny_config(true, 3)); }
  SECTION("MLP gate and up") { lm_step_parity(sg::recipe::mlp_gate_up, sg::test::tiny_config(false, 3)); }
}

TEST_CASE("language model: logits, soft-token prefix and its gradient equal the CPU's") {
  auto c = sg::test::tiny_config(false, 2);
  c.vocab_size = 29;
  auto hw = random_lm(c, 41);
  auto dw = sg::model::to_backend<sg::backend::cuda>(hw);
  constexpr auto r = sg::trainable<sg::group::projector, sg::proj::v>;
  sg::model::decoder_lm<float, std::remove_const_t<decltype(r)>> cm(c, r);
  sg::model::decoder_lm<float, std::remove_const_t<decltype(r)>, sg::backend::cuda> dm(c, r);
  auto ids = sg::token_ids::from_shape({2, 5});
  std::mt19937 rng(42);
  for (auto& t : ids) t = std::int64_t(rng() % 29);
  auto prefix = sg::test::random_tensor<float>({2, 3, std::size_t(c.hidden)}, 43);
  const auto dprefix_in = dev::tensor<float>::from_host(prefix, memory_use::workspace);
  typename decltype(cm)::saved_t cs;
  typename decltype(dm)::saved_t ds;
  auto h = cm.forward(hw, ids, cs, &prefix);
  auto hd = dm.forward(dw, ids, ds, &dprefix_in);
  check_close("hidden states", hd, h);
  check_close("logits", dm.logits(dw, hd), cm.logits(hw, h));
  auto cg = cm.make_grads(hw);
  auto dg = dm.make_grads(dw);
  auto dh = sg::test::random_tensor<float>(h.shape(), 44);
  const auto dh_dev = dev::tensor<float>::from_host(dh, memory_use::workspace);
  auto dp = cm.backward(hw, cs, dh, cg);
  auto dp_dev = dm.backward(dw, ds, dh_dev, dg);
  check_close("prefix gradient", dp_dev, dp);
  CHECK(check_gradients(cm, hw, cg, dm, dw, dg) > 0);
}

TEST_CASE("AdamW on the device: the CPU update on the same gradients, and non-finite gradients change nothing") {
  const auto c = sg::test::tiny_config(false, 1);
  auto hw = sg::test::random_trunk<float>(c, 51);
  auto dw = sg::nn::to_backend<sg::backend::cuda>(hw);
  constexpr auto r = sg::recipe::mlp_down;
  sg::nn::decoder_stack<float, std::remove_const_t<decltype(r)>> cs(c, r);
  sg::nn::decoder_stack<float, std::remove_const_t<decltype(r)>, false, sg::backend::cuda> ds(c, r);
  auto cg = cs.make_grads(hw);
  auto dg = ds.make_grads(dw);
  auto& g = cg.layer(0).down_proj.weight;
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = float(std::sin(0.37 * double(i)));
  dg.layer(0).down_proj.weight.copy_from(g);
  const sg::train::adamw_options o{.lr = 0.01, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.05};
  sg::train::adamw<float> ca(cs, hw, cg, o);
  sg::train::adamw<float, sg::backend::cuda> da(ds, dw, dg, o);
  for (int t = 0; t < 3; ++t) {
    ca.step(cs, hw, cg);
    da.step(ds, dw, dg);
  }
  check_close("down_proj after three steps", dw.layers[0].mlp.down_proj.weight, hw.layers[0].mlp.down_proj.weight, 1e-6);

  g[17] = std::numeric_limits<float>::quiet_NaN();
  dg.layer(0).down_proj.weight.copy_from(g);
  const auto before = dw.layers[0].mlp.down_proj.weight.to_host();
  CHECK_THROWS_WITH(da.step(ds, dw, dg), Catch::Contains("model.layers.0.mlp.down_proj.weight") &&
                                             Catch::Contains("element 17") && Catch::Contains("no weight was changed"));
  check_close("down_proj after the refused step", dw.layers[0].mlp.down_proj.weight, before, 0.0);
  CHECK(da.steps() == 3);

  // The device optimizer's state, saved, resumes on the CPU (and back): one more step each.
  g[17] = 0.5f;
  dg.layer(0).down_proj.weight.copy_from(g);
  sg::test::temp_dir dir;
  sg::train::save_optimizer_state(da, dir / "device.safetensors");
  sg::train::adamw<float> resumed(cs, hw, cg, {});
  sg::train::load_optimizer_state(resumed, dir / "device.safetensors");
  CHECK(resumed.steps() == 3);
  CHECK(resumed.options().beta2 == 0.99);
  sg::train::adamw<float, sg::backend::cuda> back(ds, dw, dg, {});
  sg::train::save_optimizer_state(resumed, dir / "host.safetensors");
  sg::train::load_optimizer_state(back, dir / "host.safetensors");
  resumed.step(cs, hw, cg);
  back.step(ds, dw, dg);
  check_close("down_proj after a resumed step", dw.layers[0].mlp.down_proj.weight, hw.layers[0].mlp.down_proj.weight, 1e-6);
  back.for_each_state([&](const std::string& name, const auto& m, const auto&) {
    resumed.for_each_state([&](const std::string& n, const auto& hm, const auto&) {
      if (n == name) check_close(name + " first moment", m, hm, 1e-6);
    });
  });
}

TEST_CASE("bad input on the device names the tensor and the shapes") {
  const auto c = sg::test::tiny_config(false, 2);
  auto hw = sg::test::random_trunk<float>(c, 61);
  auto dw = sg::nn::to_backend<sg::backend::cuda>(hw);
  sg::nn::decoder_stack<float, std::remove_const_t<decltype(sg::recipe::sa_proj)>, false, sg::backend::cuda> ds(
      c, sg::recipe::sa_proj);
  typename decltype(ds)::saved_t s;
  dev::tensor<float> x({2, 3, std::size_t(c.hidden + 1)}, memory_use::workspace);
  CHECK_THROWS_WITH(ds.forward(dw, x, s), Catch::Contains("[2, 3, 17]") && Catch::Contains("16"));
  dev::tensor<float> too_long({1, std::size_t(c.max_seq + 1), std::size_t(c.hidden)}, memory_use::workspace);
  CHECK_THROWS_WITH(ds.forward(dw, too_long, s), Catch::Contains("rotary table"));
  dw.layers[1].self_attn.v_proj.weight = dev::tensor<float>({3, 16}, memory_use::weights);
  CHECK_THROWS_WITH(ds.forward(dw, x, s), Catch::Contains("model.layers.1.self_attn.v_proj.weight") &&
                                              Catch::Contains("[3, 16]") && Catch::Contains("[8, 16]"));
  // The loss checks targets on the host, before any device work.
  dev::tensor<float> h({1, 2, 16}, memory_use::workspace), head({5, 16}, memory_use::weights);
  auto targets = sg::token_ids::from_shape({1, 2});
  targets(0, 0) = 1;
  targets(0, 1) = 5;
  CHECK_THROWS_WITH(sg::train::masked_cross_entropy(h, head, targets, sg::train::no_head_grad),
                    Catch::Contains("target [0, 1] is 5") && Catch::Contains("[0, 5)"));
}
