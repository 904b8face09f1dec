// MLP policies of the decoder block: expanded gating activations (xSiLU, xGELU, xATLU with a
// trainable range alpha) and a mixture of experts on the MLP (frozen original beside tuned
// copies, learned top-k router). Finite-difference gradients of every new tensor and the
// input under several recipes; SiLU unchanged bit for bit; alpha = 0 equivalence; frozen
// experts untouched by AdamW; memory plan against the ledger; exact start of a mixture
// grown from a dense model; a task learned while the original expert stays exactly itself.
#include "support/mlp_variants.hpp"

#include <bit>
#include <cstdint>
#include <limits>

// --- types: what exists, from the recipe and the policy --------------------------------------
// The default policy is the dense SiLU MLP; spelling it out names the same block.
static_assert(std::is_same_v<sg::nn::decoder_block<float, std::remove_const_t<gate_up_r>, false>,
                             block<gate_up_r, false, sg::nn::swiglu<act::silu>>>);
static_assert(std::is_same_v<sg::nn::decoder_stack<float, std::remove_const_t<gate_up_r>>::lowest_t::mlp_t,
                             sg::nn::swiglu_mlp<float, std::remove_const_t<gate_up_r>, false>>);
// SiLU has no range, a dense MLP no router.
static_assert(!has_act_alpha<block<decltype(sg::recipe::llm), false, sg::nn::default_mlp>::grads_t>);
static_assert(!has_router<block<decltype(sg::recipe::llm), false, sg::nn::default_mlp>::grads_t>);
// xSiLU, alpha alone: keeps g and u (dalpha = sum dm u dphi/dalpha), not h (no weight trains) nor m.
static_assert(has_act_alpha<block<range_r, false, xsilu_mlp>::grads_t>);
static_assert(!has_gate_proj<block<range_r, false, xsilu_mlp>::grads_t>);
static_assert(has_mlp_g_u<block<range_r, false, xsilu_mlp>::saved_t>);
static_assert(!has_mlp_h<block<range_r, false, xsilu_mlp>::saved_t>);
static_assert(!has_mlp_m<block<range_r, false, xsilu_mlp>::saved_t>);
// xSiLU model trained with a recipe that does not name the range: alpha stays frozen.
static_assert(!has_act_alpha<block<gate_up_r, false, xsilu_mlp>::grads_t>);
// Mixture, Gate+Up of the newest expert and the router: h (router and Gate/Up inputs), the
// chosen experts' outputs (for the router), g and u; no m, no softmax (renormalised).
static_assert(has_router<block<gate_up_router_r, false, moe2>::grads_t>);
static_assert(has_gate_proj<block<gate_up_router_r, false, moe2>::grads_t>);
static_assert(!has_down_proj<block<gate_up_router_r, false, moe2>::grads_t>);
static_assert(has_mlp_route<block<gate_up_router_r, false, moe2>::saved_t>);
static_assert(has_mlp_x<block<gate_up_router_r, false, moe2>::saved_t>);
static_assert(has_mlp_y<block<gate_up_router_r, false, moe2>::saved_t>);
static_assert(has_mlp_g_u<block<gate_up_router_r, false, moe2>::saved_t>);
static_assert(!has_mlp_m<block<gate_up_router_r, false, moe2>::saved_t>);
static_assert(!has_mlp_probs<block<gate_up_router_r, false, moe2>::saved_t>);
// Router alone: h and the chosen outputs only, no expert internals.
static_assert(has_mlp_x<block<router_r, false, moe2>::saved_t>);
static_assert(has_mlp_y<block<router_r, false, moe2>::saved_t>);
static_assert(!has_mlp_g<block<router_r, false, moe2>::saved_t>);
static_assert(!has_mlp_u<block<router_r, false, moe2>::saved_t>);
// Switch (top-1 softmax) keeps the whole softmax for the router's gradient.
static_assert(has_mlp_probs<block<router_r, false, switch1>::saved_t>);
// Attention below trains: every expert passes dh through (g, u of all chosen pairs), the router's
// dz comes from that pass (no y), and no h is kept (nothing of the MLP trains).
static_assert(has_mlp_g_u<block<sa_router_r, false, moe2>::saved_t>);
static_assert(!has_mlp_y<block<sa_router_r, false, moe2>::saved_t>);
static_assert(has_mlp_x<block<sa_router_r, false, moe2>::saved_t>);
static_assert(!has_mlp_x<block<decltype(sg::recipe::sa_proj), false, moe2>::saved_t>);
// Down of the newest expert alone: its m, the choice; nothing else.
static_assert(has_mlp_m<block<down_r, false, moe2>::saved_t>);
static_assert(!has_mlp_g<block<down_r, false, moe2>::saved_t>);
static_assert(!has_mlp_x<block<down_r, false, moe2>::saved_t>);
// A frozen mixture with nothing below keeps nothing.
static_assert(block<frozen_r, false, moe2>::keeps_nothing);
static_assert(!has_mlp<block<frozen_r, false, moe2>::saved_t>);

TEST_CASE("SiLU times u on the CPU: within a few ulp of the double formula, the same bits at any length and offset") {
  // The packet kernels (every element through the packet exp, the last partial packet padded)
  // against m = z sigmoid(z) u, du = d z s, dg = d u s (1 + z (1 - s)) in double.
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 3.f);
  const std::size_t n = 70001;  // past the OpenMP threshold, not a whole number of packets
  std::vector<float> g(n), u(n), d(n);
  for (std::size_t i = 0; i < n; ++i) g[i] = nd(rng), u[i] = nd(rng), d[i] = nd(rng);
  g[0] = 0.f, g[1] = -90.f, g[2] = 90.f, g[3] = -1e-30f;  // sigmoid's ends and a tiny input
  std::vector<float> m(n), dg(d), du(n);
  sg::cpu::gated_product_n<act::silu>(g.data(), u.data(), 0.f, m.data(), n);
  sg::cpu::gated_product_backward_n<act::silu, true, true, false>(g.data(), u.data(), 0.f, dg.data(), du.data(), n);
  // Float's own rounding of three or four products and the exp's 1-2 ulp: 8 ulp of the
  // largest term, measured against the exact value (double).
  const double ulp = std::numeric_limits<float>::epsilon();
  double worst = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double z = g[i], s = 1.0 / (1.0 + std::exp(-z));
    const double mr = z * s * u[i], dur = d[i] * z * s, dgr = d[i] * u[i] * s * (1.0 + z * (1.0 - s));
    const double scale_m = std::abs(z * u[i]) + 1e-30, scale_g = std::abs(d[i] * u[i]) * (1.0 + std::abs(z)) + 1e-30;
    worst = std::max({worst, std::abs(m[i] - mr) / scale_m, std::abs(du[i] - dur) / std::abs(d[i] * z + 1e-30),
                      std::abs(dg[i] - dgr) / scale_g});
  }
  CHECK(worst < 8 * ulp);
  // The same element at another length (so in another packet or the padded tail) and offset.
  for (std::size_t len : {std::size_t(1), std::size_t(5), std::size_t(17), std::size_t(33)})
    for (std::size_t off : {std::size_t(0), std::size_t(3), std::size_t(11)}) {
      std::vector<float> m2(len), dg2(d.begin() + off, d.begin() + off + len), du2(len);
      sg::cpu::gated_product_n<act::silu>(g.data() + off, u.data() + off, 0.f, m2.data(), len);
      sg::cpu::gated_product_backward_n<act::silu, true, true, false>(g.data() + off, u.data() + off, 0.f, dg2.data(),
                                                                      du2.data(), len);
      for (std::size_t i = 0; i < len; ++i) {
        CHECK(std::bit_cast<std::uint32_t>(m2[i]) == std::bit_cast<std::uint32_t>(m[off + i]));
        CHECK(std::bit_cast<std::uint32_t>(dg2[i]) == std::bit_cast<std::uint32_t>(dg[off + i]));
        CHECK(std::bit_cast<std::uint32_t>(du2[i]) == std::bit_cast<std::uint32_t>(du[off + i]));
      }
    }
}

TEST_CASE("SiLU MLP: the default policy composes the projections as the MLP did before, bit for bit") {
  // The dense SiLU MLP as written before activation policies (forward and backward under
  // recipe::mlp with the input gradient), against swiglu_mlp; sizes past the OpenMP threshold.
  // The element-wise SiLU * u is the CPU kernel's (checked against the formula above): this
  // case pins the order of the products and accumulations around it.
  auto c = sg::test::tiny_config();
  c.hidden = 64;
  c.intermediate = 1024;
  sg::nn::mlp_weights<float> w(c, memory_use::weights);
  std::mt19937 rng(1);
  for (auto* l : {&w.gate_proj, &w.up_proj, &w.down_proj}) sg::test::fill_linear(*l, rng);
  auto h = random_tensor<float>({2, 32, 64}, 2);
  auto dout = random_tensor<float>({2, 32, 64}, 3);

  using sg::cpu::tensor;
  tensor<float> g({2, 32, 1024}, memory_use::workspace), u({2, 32, 1024}, memory_use::workspace),
      m({2, 32, 1024}, memory_use::workspace), ref({2, 32, 64}, memory_use::workspace);
  sg::nn::linear_forward(w.gate_proj, h, g);
  sg::nn::linear_forward(w.up_proj, h, u);
  sg::cpu::gated_product_n<act::silu>(g.data(), u.data(), 0.f, m.data(), g.size());
  sg::nn::linear_forward(w.down_proj, m, ref);
  auto dWd = w.down_proj.like(memory_use::workspace), dWg = w.gate_proj.like(memory_use::workspace),
       dWu = w.up_proj.like(memory_use::workspace);
  sg::nn::linear_backward_weight(m, dout, dWd);
  tensor<float> dm(g.shape(), memory_use::workspace), du(g.shape(), memory_use::workspace),
      dh(h.shape(), memory_use::workspace);
  sg::nn::linear_backward_input(w.down_proj, dout, dm, false);
  sg::cpu::gated_product_backward_n<act::silu, true, true, false>(g.data(), u.data(), 0.f, dm.data(), du.data(),
                                                                  dm.size());
  sg::nn::linear_backward_weight(h, dm, dWg);
  sg::nn::linear_backward_weight(h, du, dWu);
  sg::nn::linear_backward_input(w.gate_proj, dm, dh, false);
  sg::nn::linear_backward_input(w.up_proj, du, dh, true);

  using R = std::remove_const_t<decltype(sg::recipe::mlp)>;
  sg::nn::swiglu_mlp<float, R, true> mlp{c};
  decltype(mlp)::saved_t s;
  auto y = mlp.forward(w, h, s);
  auto gr = mlp.make_grads(w);
  auto dx = mlp.backward(w, s, dout, gr);
  CHECK(bitwise_equal(y, ref));
  CHECK(bitwise_equal(dx, dh));
  CHECK(bitwise_equal(gr.gate_proj.weight, dWg.weight));
  CHECK(bitwise_equal(gr.up_proj.weight, dWu.weight));
  CHECK(bitwise_equal(gr.down_proj.weight, dWd.weight));
}

TEST_CASE("xSiLU / xGELU: alpha = 0 is SiLU / GELU gating, alpha widens the gate's range") {
  const auto c = sg::test::tiny_config(true);
  sg::nn::rope_table<D> table(c.head_dim, c.max_seq, c.rope_theta);
  std::mt19937 rng(4);
  sg::nn::block_weights<D> w(c);
  sg::test::fill_block(w, rng);
  auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 5);
  using R = std::remove_const_t<decltype(sg::recipe::llm)>;

  sg::nn::decoder_block<D, R, true> silu(c, table);
  decltype(silu)::saved_t s0;
  auto y0 = silu.forward(w, x, s0);
  auto g0 = silu.make_grads(w);
  auto r = random_tensor<D>(y0.shape(), 6);
  auto dx0 = silu.backward(w, s0, r, g0);

  sg::nn::add_act_range(w.mlp, 0.0);
  sg::nn::decoder_block<D, R, true, sg::backend::cpu, xsilu_mlp> xs(c, table);
  decltype(xs)::saved_t s1;
  auto y1 = xs.forward(w, x, s1);
  CHECK(bitwise_equal(y1, y0));  // z ((1 + 0) s - 0) rounds to z s
  auto g1 = xs.make_grads(w);
  auto dx1 = xs.backward(w, s1, r, g1);
  CHECK((dx1.vec() - dx0.vec()).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((g1.gate_proj.weight.vec() - g0.gate_proj.weight.vec()).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((g1.up_proj.weight.vec() - g0.up_proj.weight.vec()).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((g1.down_proj.weight.vec() - g0.down_proj.weight.vec()).cwiseAbs().maxCoeff() < 1e-12);

  // xGELU at alpha = 0 against the GELU-gated MLP written out: out = (g Phi(g) * u) Wd^T.
  const auto& mw = w.mlp;
  auto h = random_tensor<D>({3, std::size_t(c.hidden)}, 7);
  Eigen::MatrixXd g = h.mat() * mw.gate_proj.weight.mat().transpose(), u = h.mat() * mw.up_proj.weight.mat().transpose();
  Eigen::MatrixXd m = g.unaryExpr([](double z) { return z * 0.5 * std::erfc(-z / std::sqrt(2.0)); }).cwiseProduct(u);
  Eigen::MatrixXd ref = m * mw.down_proj.weight.mat().transpose();
  sg::nn::swiglu_mlp<D, std::remove_const_t<frozen_r>, false, act::xgelu> gelu{c};
  decltype(gelu)::saved_t sg0;
  auto yg = gelu.forward(mw, h, sg0);
  CHECK((yg.mat() - ref).cwiseAbs().maxCoeff() < 1e-12);

  // alpha = 1: the gate spans [-1, 2]: phi(z) = z (3 s - 1). Below z = -log 2 the gate is
  // negative, so negative inputs give positive outputs (SiLU's stay negative).
  CHECK(sg::nn::gated<act::xsilu>(0.1, 1.0) == Approx(0.1 * (3 * sg::nn::sigmoid(0.1) - 1)).epsilon(1e-15));
  CHECK(sg::nn::gated<act::xsilu>(-1.0, 0.0) < 0);
  CHECK(sg::nn::gated<act::xsilu>(-1.0, 1.0) > 0);
  CHECK(sg::nn::gated<act::xsilu>(-20.0, 1.0) == Approx(20.0).epsilon(1e-6));  // gate -> -alpha: -z * -1
  CHECK(sg::nn::gated<act::xgelu>(-20.0, 0.5) == Approx(10.0).epsilon(1e-6));
}

TEST_CASE("xSiLU / xGELU: alpha, weight and input gradients by finite differences") {
  for (bool bias : {false, true}) {
    const auto c = sg::test::tiny_config(bias);
    sg::nn::rope_table<D> table(c.head_dim, c.max_seq, c.rope_theta);
    std::mt19937 rng(8);
    sg::nn::block_weights<D> w(c);
    sg::test::fill_block(w, rng);
    sg::nn::add_act_range(w.mlp, 0.35);
    auto recipes = sg::hana::make_tuple(sg::trainable<act_range>, sg::trainable<gate, up, act_range>,
                                        sg::trainable<down, act_range>, sg::recipe::mlp, sg::recipe::sa_proj,
                                        sg::trainable<q, act_range, sg::group::mlp_norm>, sg::recipe::frozen);
    auto check = [&](auto act_tag) {
      using A = typename decltype(act_tag)::type;
      using P = sg::nn::swiglu<A>;
      sg::hana::for_each(recipes, [&](auto r) {
        using R = std::remove_const_t<decltype(r)>;
        INFO("activation " << A::name);
        auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 9);
        gradcheck(sg::nn::swiglu_mlp<D, R, true, A>{c}, w.mlp, x);
        gradcheck(sg::nn::swiglu_mlp<D, R, false, A>{c}, w.mlp, x);
        auto a = gradcheck(sg::nn::decoder_block<D, R, true, sg::backend::cpu, P>(c, table), w, x);
        auto b = gradcheck(sg::nn::decoder_block<D, R, false, sg::backend::cpu, P>(c, table), w, x);
        CHECK(a == b);
        CHECK(a.count("mlp.act_fn.alpha") == std::size_t(sg::trains_v<act_range, R>));
      });
    };
    check(sg::hana::type_c<act::xsilu>);
    check(sg::hana::type_c<act::xgelu>);
    check(sg::hana::type_c<act::xatlu>);
  }
}

TEST_CASE("xATLU: alpha = 0 is the arctan unit exactly, phi, dphi/dz and dphi/dalpha by finite differences") {
  constexpr double pi = 3.14159265358979323846;
  const double zs[] = {-30.0, -4.0, -1.3, -0.2, 0.0, 0.05, 0.7, 2.5, 40.0};
  for (double z : zs) {
    INFO("z = " << z);
    // ATLU: z (arctan(z) / pi + 1/2); the expanded form at alpha = 0 is that product bit for bit
    // (float too: what a pretrained ATLU model computes is unchanged).
    CHECK(act::xatlu::phi(z, 0.0) == z * act::arctan_gate::gate(z));
    CHECK(act::xatlu::phi(float(z), 0.f) == float(z) * act::arctan_gate::gate(float(z)));
    CHECK(act::arctan_gate::gate(z) == Approx(std::atan(z) / pi + 0.5).epsilon(1e-15).margin(1e-16));
    // The gate spans [-alpha, 1 + alpha]: gate(z) (1 + 2a) - a at the tails.
    for (double a : {0.0, 0.35, 1.0}) {
      INFO("alpha = " << a);
      const double e = 1e-6;
      const double dz = (act::xatlu::phi(z + e, a) - act::xatlu::phi(z - e, a)) / (2 * e);
      const double da = (act::xatlu::phi(z, a + e) - act::xatlu::phi(z, a - e)) / (2 * e);
      CHECK(act::xatlu::dphi_dz(z, a) == Approx(dz).epsilon(1e-7).margin(1e-8));
      CHECK(act::xatlu::dphi_dalpha(z) == Approx(da).epsilon(1e-7).margin(1e-8));
      CHECK(act::xatlu::phi(z, a) == Approx(z * ((1 + 2 * a) * (std::atan(z) / pi + 0.5) - a)).epsilon(1e-14).margin(1e-15));
    }
  }
  // alpha = 1: far left the gate tends to -1, so phi(-1e6) is about +1e6 (ATLU's stays negative).
  CHECK(sg::nn::gated<act::xatlu>(-1e6, 1.0) == Approx(1e6).epsilon(1e-5));
  CHECK(sg::nn::gated<act::xatlu>(-1e6, 0.0) < 0);

  // A whole xATLU MLP at alpha = 0 against the ATLU-gated MLP written out.
  const auto c = sg::test::tiny_config(false);
  std::mt19937 rng(12);
  sg::nn::block_weights<D> w(c);
  sg::test::fill_block(w, rng);
  sg::nn::add_act_range(w.mlp, 0.0);
  const auto& mw = w.mlp;
  auto h = random_tensor<D>({3, std::size_t(c.hidden)}, 13);
  Eigen::MatrixXd g = h.mat() * mw.gate_proj.weight.mat().transpose(), u = h.mat() * mw.up_proj.weight.mat().transpose();
  Eigen::MatrixXd m = g.unaryExpr([](double z) { return z * (std::atan(z) / pi + 0.5); }).cwiseProduct(u);
  Eigen::MatrixXd ref = m * mw.down_proj.weight.mat().transpose();
  sg::nn::swiglu_mlp<D, std::remove_const_t<frozen_r>, false, act::xatlu> atlu{c};
  decltype(atlu)::saved_t s0;
  auto y = atlu.forward(mw, h, s0);
  CHECK((y.mat() - ref).cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("mixture of experts: router, newest expert and input gradients by finite differences") {
  const auto c = sg::test::tiny_config(true);
  sg::nn::rope_table<D> table(c.head_dim, c.max_seq, c.rope_theta);
  auto recipes = sg::hana::make_tuple(
      sg::trainable<router>, sg::trainable<gate, up, router>, sg::trainable<gate, up>, sg::trainable<down>,
      sg::trainable<gate, up, down, router, act_range>, sg::trainable<act_range, router>, sg::trainable<up>,
      sg::trainable<q, v>, sg::trainable<k, router, sg::group::mlp_norm>, sg::recipe::frozen);
  auto some = sg::hana::make_tuple(sg::trainable<router>, sg::trainable<gate, up, down, router, act_range>,
                                   sg::trainable<q, v>, sg::trainable<k, router, sg::group::mlp_norm>);
  auto check = [&](auto policy, int E, unsigned seed, auto list) {
    using P = typename decltype(policy)::type;
    using A = typename P::activation;
    INFO("activation " << A::name << ", top-" << P::top_k << (P::renormalise ? " renormalised" : " softmax") << ", "
                       << E << " experts");
    std::mt19937 rng(seed);
    sg::nn::block_weights<D> w(c);
    sg::test::fill_block(w, rng);
    make_mixture(w.mlp, c, E, A::has_range, rng);
    auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, seed + 1);
    if (E > P::top_k) REQUIRE(routing_margin(w.mlp, x, P::top_k) > 1e-3);  // no tie near the inputs
    const sg::nn::moe_options o{E};
    sg::hana::for_each(list, [&](auto r) {
      using R = std::remove_const_t<decltype(r)>;
      // (a renormalised top-1 weight is constant: that policy refuses to train the router)
      if constexpr (!(sg::trains_v<act_range, R> && !A::has_range) &&
                    !(P::top_k == 1 && P::renormalise && sg::trains_v<router, R>)) {
        gradcheck(sg::nn::moe_mlp<D, R, true, P>{c, o}, w.mlp, x);
        auto names = gradcheck(sg::nn::moe_mlp<D, R, false, P>{c, o}, w.mlp, x);
        const std::string newest = "experts." + std::to_string(E - 1) + ".";
        std::set<std::string> expected;
        if (sg::trains_v<router, R>) expected.insert("router.weight");
        if (sg::trains_v<gate, R>) expected.insert(newest + "gate_proj.weight");
        if (sg::trains_v<up, R>) expected.insert(newest + "up_proj.weight");
        if (sg::trains_v<down, R>) expected.insert(newest + "down_proj.weight");
        if (sg::trains_v<act_range, R>) expected.insert(newest + "act_fn.alpha");
        CHECK(names == expected);
        // The whole block (attention below the mixture trains for some recipes: dh through every expert).
        auto a = gradcheck(sg::nn::decoder_block<D, R, true, sg::backend::cpu, P>(c, table, o), w, x);
        auto b = gradcheck(sg::nn::decoder_block<D, R, false, sg::backend::cpu, P>(c, table, o), w, x);
        CHECK(a == b);
      }
    });
  };
  check(sg::hana::type_c<moe2>, 3, 20, recipes);
  check(sg::hana::type_c<moe2>, 2, 30, some);  // every expert chosen: no selection at all
  check(sg::hana::type_c<xmoe2>, 3, 40, recipes);
  check(sg::hana::type_c<switch1>, 3, 50, recipes);
  check(sg::hana::type_c<sg::nn::moe<act::xgelu, 1>>, 2, 60, some);
  check(sg::hana::type_c<sg::nn::moe<act::silu, 1, true>>, 3, 70, some);  // renormalised top-1: weight 1, no router
}

TEST_CASE("mixture of experts: a layer-scoped stack by finite differences, names as for_each_parameter's") {
  auto c = lm_config(3);
  auto w = random_lm<D>(c, 80);
  sg::nn::add_act_range(w.trunk, 0.0);
  CHECK(sg::cl::add_expert(w) == 2);
  CHECK(sg::cl::add_expert(w) == 3);
  std::mt19937 rng(81);
  for (auto& l : w.trunk.layers) make_mixture(l.mlp, c, 3, true, rng);
  constexpr auto recipe = sg::trainable<gate, up, router, act_range>;
  for (bool dx : {false, true}) {
    auto x = random_tensor<D>({2, 5, std::size_t(c.hidden)}, 82);
    auto run = [&](auto stack) {
      auto names = sg::test::gradcheck_stack(stack, w.trunk, x);
      std::set<std::string> expected;
      for (const char* n : {"mlp.router.weight", "mlp.experts.2.gate_proj.weight", "mlp.experts.2.up_proj.weight",
                            "mlp.experts.2.act_fn.alpha"})
        expected.insert(std::string("model.layers.1.") + n);
      CHECK(names == expected);
    };
    if (dx) run(sg::nn::decoder_stack<D, decltype(recipe), true, sg::backend::cpu, xmoe2>(c, recipe.on_layers(1, 1), {3}));
    else run(sg::nn::decoder_stack<D, decltype(recipe), false, sg::backend::cpu, xmoe2>(c, recipe.on_layers(1, 1), {3}));
  }
  // The model's trainable tensors, its parameter walk and the checkpoint names agree.
  sg::model::decoder_lm<D, decltype(recipe), sg::backend::cpu, xmoe2> lm(c, recipe, {3});
  auto g = lm.make_grads(w);
  std::vector<std::string> a, b, all;
  lm.for_each_trainable(w, g, [&](const std::string& n, auto&, auto&) { a.push_back(n); });
  sg::model::for_each_trainable_weight(lm, w, [&](const std::string& n, auto&) { b.push_back(n); });
  sg::model::for_each_parameter(w, [&](const std::string& n, auto&, auto, int) { all.push_back(n); });
  CHECK(a == b);
  CHECK(a.size() == 3 * 4);
  CHECK(a.front() == "model.layers.0.mlp.router.weight");
  CHECK(std::find(all.begin(), all.end(), "model.layers.2.mlp.experts.0.gate_proj.weight") != all.end());
  CHECK(std::find(all.begin(), all.end(), "model.layers.2.mlp.experts.1.act_fn.alpha") != all.end());
  CHECK(std::find(all.begin(), all.end(), "model.layers.2.mlp.gate_proj.weight") == all.end());
  CHECK(sg::nn::grad<router, decltype(lm)::stack_t::lowest_t>(g.layers.layer(0)).shape() == sg::cpu::shape_t{3, 16});
}

