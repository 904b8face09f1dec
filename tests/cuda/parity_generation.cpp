// Generation on the CUDA backend against the CPU backend: KV-cached decoding, sampling,
// continuation scores, generation probes and GateSkip's skipping decoder are one generic code
// (model/generate.hpp, model/gate_skip.hpp), run through the device backend (Thrust on the host
// in test_cuda_host, on the GPU in test_cuda_device).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/cl/moe.hpp"
#include "skillgraft/cl/probes.hpp"
#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/model/gate_skip.hpp"
#include "skillgraft/model/generate.hpp"
#include "check.hpp"
#include "support/random.hpp"
#include "support/random_lm.hpp"

namespace sg = skillgraft;
using sg::memory_use;
using sg::token_ids;
using sg::test::check_close;
using device_b = sg::backend::cuda;
using frozen_r = std::remove_const_t<decltype(sg::recipe::frozen)>;

namespace {

// The GQA configuration of the parity tests (4 query heads over 2 KV heads), 3 layers, room
// for a prompt, soft tokens and the generated steps.
sg::decoder_config generation_config() {
  auto c = sg::test::tiny_lm_config(3);
  c.max_seq = 24;
  return c;
}

const token_ids prompt = {{1, 5, 7, 2, 11, 4}, {3, 8, 12, 0, 4, 9}};  // no token repeated at positions 0 and 1

bool same_tokens(const token_ids& a, const token_ids& b) { return a.shape() == b.shape() && a == b; }

// Hidden states, caches, tokens and scores of one model on both backends.
template <class Mlp>
void generation_parity(const sg::model::lm_weights<float>& hw, const typename Mlp::options& o = {}) {
  const auto c = generation_config();
  const auto dw = sg::model::to_backend<device_b>(hw);
  const sg::model::decoder_lm<float, frozen_r, sg::backend::cpu, Mlp> cm(c, sg::recipe::frozen, o);
  const sg::model::decoder_lm<float, frozen_r, device_b, Mlp> dm(c, sg::recipe::frozen, o);
  const auto soft = sg::test::random_tensor<float>({2, 2, std::size_t(c.hidden)}, 61);
  const auto dsoft = device_b::upload(soft, memory_use::workspace);

  // The prompt after two soft tokens in one call, then single-token steps (generation's pattern).
  sg::model::kv_cache<float> cc(c, 2, 12);
  sg::model::kv_cache<float, device_b> dc(c, 2, 12);
  check_close("prompt's hidden states", sg::model::decode(dm, dw, dc, dm.embed(dw, prompt, &dsoft)),
              sg::model::decode(cm, hw, cc, cm.embed(hw, prompt, &soft)), 1e-5);
  for (std::int64_t t : {4, 9, 1}) {
    INFO("step token " << t);
    const token_ids step = {{t}, {t + 2}};
    check_close("step's hidden states", sg::model::decode(dm, dw, dc, dm.embed(dw, step, nullptr)),
                sg::model::decode(cm, hw, cc, cm.embed(hw, step, nullptr)), 1e-5);
  }
  CHECK(dc.length == cc.length);
  for (std::size_t l = 0; l < cc.k.size(); ++l) {
    check_close("cached keys", dc.k[l], cc.k[l], 1e-5);
    check_close("cached values", dc.v[l], cc.v[l], 1e-5);
  }

  sg::model::sampling greedy;
  greedy.max_new_tokens = 5;
  CHECK(same_tokens(sg::model::generate(dm, dw, prompt, greedy, &dsoft), sg::model::generate(cm, hw, prompt, greedy, &soft)));
  sg::model::sampling sampled = greedy;
  sampled.temperature = 1.0;
  sampled.seed = 9;
  sampled.allowed = {2, 3, 5, 8, 11};
  const auto drawn = sg::model::generate(cm, hw, prompt, sampled);
  CHECK(same_tokens(sg::model::generate(dm, dw, prompt, sampled), drawn));
  for (const std::int64_t t : drawn) CHECK((t == 2 || t == 3 || t == 5 || t == 8 || t == 11));

  const token_ids answer = {{2, 6, 6}, {8, 1, 0}};
  const auto cl = sg::model::continuation_logprob(cm, hw, prompt, answer, &soft);
  const auto dl = sg::model::continuation_logprob(dm, dw, prompt, answer, &dsoft);
  REQUIRE(dl.size() == cl.size());
  for (std::size_t b = 0; b < cl.size(); ++b) {
    CHECK(cl[b] < -0.1);
    CHECK(std::abs(dl[b] - cl[b]) <= 1e-5 * std::abs(cl[b]));
  }
}

}  // namespace

TEST_CASE("generation on the device: cached decoding, greedy and sampled tokens, and continuation scores equal the CPU's") {
  SECTION("dense SwiGLU") { generation_parity<sg::nn::default_mlp>(sg::test::random_lm<float>(generation_config(), 62)); }
  SECTION("a mixture of two experts, top-2") {
    auto hw = sg::test::random_lm<float>(generation_config(), 63);
    sg::cl::add_expert(hw);
    std::mt19937 rng(64);
    sg::test::randomize_experts(hw, rng);
    generation_parity<sg::nn::moe<sg::nn::act::silu, 2>>(hw, sg::nn::moe_options{2});
  }
}

TEST_CASE("generation probes on the device: the generated tokens and their set mass equal the CPU's") {
  const auto c = generation_config();
  const auto hw = sg::test::random_lm<float>(c, 65);
  const auto dw = sg::model::to_backend<device_b>(hw);
  const sg::model::decoder_lm<float, frozen_r> cm(c, sg::recipe::frozen);
  const sg::model::decoder_lm<float, frozen_r, device_b> dm(c, sg::recipe::frozen);
  const auto cprobe = sg::cl::make_distribution_probe(cm, {.rows = 4, .vocab = 5});
  const auto dprobe = sg::cl::make_distribution_probe(dm, {.rows = 4, .vocab = 5});
  const sg::cl::token_set numbers({3, 4, 5}, c.vocab_size, "numbers");
  sg::cl::probe_accumulator cacc(numbers, true), dacc(numbers, true);
  sg::model::sampling s;
  s.max_new_tokens = 4;
  CHECK(same_tokens(dprobe.generated(dacc, dw, prompt, s), cprobe.generated(cacc, hw, prompt, s)));
  REQUIRE(dacc.kept().size() == cacc.kept().size());
  REQUIRE(cacc.kept().size() == 8);
  for (std::size_t i = 0; i < cacc.kept().size(); ++i) {
    const auto &dv = dacc.kept()[i].value, &cv = cacc.kept()[i].value;
    CHECK(cv.set_mass > 0);
    CHECK(std::abs(dv.set_mass - cv.set_mass) <= 1e-5 * cv.set_mass);
  }
}

TEST_CASE("GateSkip on the device: calibration, skipped and masked decoding, caches and counts equal the CPU's") {
  const auto c = generation_config();
  auto hw = sg::test::random_lm<float>(c, 66);
  sg::nn::add_residual_gates(hw.trunk, sg::nn::gate_shape::vector, {.bias = 0.4, .weight_std = 0.4, .seed = 67});
  const auto dw = sg::model::to_backend<device_b>(hw);
  using gates = sg::nn::gate_skip<>;
  const sg::model::decoder_lm<float, frozen_r, sg::backend::cpu, gates> cm(c, sg::recipe::frozen);
  const sg::model::decoder_lm<float, frozen_r, device_b, gates> dm(c, sg::recipe::frozen);
  const auto plan = sg::model::calibrate_skipping(cm, hw, prompt, 0.5);
  const auto dplan = sg::model::calibrate_skipping(dm, dw, prompt, 0.5);
  for (int l = 1; l < c.n_layers; ++l) {
    CHECK(std::abs(dplan.attention[std::size_t(l)] - plan.attention[std::size_t(l)]) <= 1e-5);
    CHECK(std::abs(dplan.mlp[std::size_t(l)] - plan.mlp[std::size_t(l)]) <= 1e-5);
  }
  for (auto mode : {sg::model::skip_mode::skip, sg::model::skip_mode::masked}) {
    INFO((mode == sg::model::skip_mode::skip ? "skip" : "masked"));
    auto p = plan;  // the CPU's thresholds on both sides: the same tokens are skipped
    p.mode = mode;
    // ... provided no importance lies within rounding of its threshold: two tokens with equal
    // hidden states (one token id at positions 0 and 1 of a sequence: V carries no rotation, so
    // position 1 attends to two equal values) tie, and the GPU's and the CPU's last bits then
    // choose different tokens at equal counts. The prompt avoids such pairs; this says so.
    double margin = std::numeric_limits<double>::infinity();
    {
      sg::model::kv_cache<float> wc(c, 2, 10);
      auto watch = [&](int l, int branch, const std::vector<double>& imp) {
        const double threshold = (branch == 0 ? p.attention : p.mlp)[std::size_t(l)];
        if (l > 0)
          for (double v : imp) margin = std::min(margin, std::abs(v - threshold));
      };
      sg::model::decode_skipping(cm, hw, wc, cm.embed(hw, prompt, nullptr), p, nullptr, watch);
      for (std::int64_t t : {4, 9})
        sg::model::decode_skipping(cm, hw, wc, cm.embed(hw, token_ids{{t}, {t + 1}}, nullptr), p, nullptr, watch);
    }
    REQUIRE(margin > 1e-4);
    sg::model::kv_cache<float> cc(c, 2, 10);
    sg::model::kv_cache<float, device_b> dc(c, 2, 10);
    sg::model::skip_stats cs, ds;
    check_close("prompt", sg::model::decode_skipping(dm, dw, dc, dm.embed(dw, prompt, nullptr), p, &ds),
                sg::model::decode_skipping(cm, hw, cc, cm.embed(hw, prompt, nullptr), p, &cs), 1e-5);
    for (std::int64_t t : {4, 9}) {
      const token_ids step = {{t}, {t + 1}};
      check_close("step", sg::model::decode_skipping(dm, dw, dc, dm.embed(dw, step, nullptr), p, &ds),
                  sg::model::decode_skipping(cm, hw, cc, cm.embed(hw, step, nullptr), p, &cs), 1e-5);
    }
    for (std::size_t l = 0; l < cc.k.size(); ++l) {
      check_close("cached keys", dc.k[l], cc.k[l], 1e-5);
      check_close("cached values", dc.v[l], cc.v[l], 1e-5);
    }
    CHECK(cs.branch_skipped > 0);
    CHECK(ds.branch_skipped == cs.branch_skipped);
    CHECK(ds.flops_run == cs.flops_run);
    CHECK(ds.flops_full == cs.flops_full);
  }
  sg::model::sampling s;
  s.max_new_tokens = 4;
  CHECK(same_tokens(sg::model::generate_skipping(dm, dw, prompt, s, plan), sg::model::generate_skipping(cm, hw, prompt, s, plan)));
}
