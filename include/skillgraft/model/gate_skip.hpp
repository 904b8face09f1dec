#pragma once
// GateSkip at inference: token-wise skipping of the attention and MLP branches of a gate_skip
// model (nn/gate_skip.hpp), in KV-cached generation and in scoring.
//
// A token's importance for a branch is the mean of its gate values g = sigmoid(h Wg^T + bg)
// (the gate reads the branch's input, so it is known before the branch runs). Per layer and
// branch a threshold turns a budget into a decision: calibrate_skipping ranks the tokens of a
// calibration batch and puts the threshold between the kept top fraction `keep` and the rest.
// A skipped token
//   - does not run the branch: its hidden state passes on unchanged (x2 = x, y = x2),
//   - in attention, gets this layer's key and value from the layer below (the cache entries
//     at its position in layer l - 1), so later queries still find an entry there.
// Layer 0 always runs (there is no layer below to carry keys and values from).
//
//   skip_mode::skip     kept tokens are gathered and only they run: the savings are real
//   skip_mode::masked   every token runs and skipped tokens' updates are masked afterwards
//                       (their K, V replaced by the layer below's, their outputs zeroed): the
//                       reference the skipping path must equal (tests/test_gateskip.cpp)
//
// skip_stats counts the GEMM and attention FLOPs (2 per multiply-add) that ran against those
// of the full model, the branch-token pairs skipped, and the wall time of the decoding steps.
// With keep = 1 no token is skipped and decoding is model::decode's, bit for bit.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "skillgraft/model/generate.hpp"

namespace skillgraft::model {

enum class skip_mode { skip, masked };

// Thresholds on importance per layer and branch: a token is skipped when importance < threshold.
struct skip_plan {
  double keep = 1.0;
  std::vector<double> attention, mlp;
  skip_mode mode = skip_mode::skip;
};

struct skip_stats {
  double flops_full = 0;          // FLOPs of the blocks without skipping
  double flops_run = 0;           // FLOPs that ran
  std::size_t branch_tokens = 0;  // (token, layer, branch) triples
  std::size_t branch_skipped = 0; // ... of them skipped
  // (step, layer, branch) triples, and those no token of the step ran (skip_mode::skip; the
  // masked reference runs every branch): only there are the branch's weights not read, which is
  // what a step of a few tokens saves in time (it reads the weights at the speed of memory; its
  // few rows' FLOPs hardly count).
  std::size_t branch_steps = 0;
  std::size_t branch_steps_skipped = 0;
  double seconds = 0;             // wall time inside the decoding steps
  double flops_saved() const { return flops_full > 0 ? 1.0 - flops_run / flops_full : 0.0; }
  double skipped_fraction() const { return branch_tokens ? double(branch_skipped) / double(branch_tokens) : 0.0; }
  double idle_fraction() const { return branch_steps ? double(branch_steps_skipped) / double(branch_steps) : 0.0; }
};

// A plan that skips nothing (every threshold -infinity).
inline skip_plan keep_all(int layers) {
  const double none = -std::numeric_limits<double>::infinity();
  return {1.0, std::vector<double>(std::size_t(layers), none), std::vector<double>(std::size_t(layers), none)};
}

namespace detail {

// Mean of each row of g [rows, width]: a token's importance, read on the host.
template <class Tensor>
std::vector<double> row_means(const Tensor& g) {
  using T = typename Tensor::value_type;
  tensor<T> host(g.shape(), memory_use::workspace);
  backend_of<Tensor>::type::download(g, host);
  const std::size_t rows = std::size_t(host.rows()), width = std::size_t(host.cols());
  std::vector<double> m(rows);
  for (std::size_t r = 0; r < rows; ++r) {
    double s = 0;
    for (std::size_t j = 0; j < width; ++j) s += double(host.data()[r * width + j]);
    m[r] = s / double(width);
  }
  return m;
}

// Sets the rows `list` of t to zero.
template <class Tensor>
void zero_rows(Tensor& t, const std::vector<std::int64_t>& list) {
  if (list.empty()) return;
  const std::size_t width = std::size_t(t.cols());
  const Tensor zeros(shape_t{list.size(), width}, memory_use::workspace);
  backend_of<Tensor>::type::scatter_rows(zeros, width, list, t);
}

// The tokens t with flag[t] (want = true) or without it (want = false), in order.
inline std::vector<std::int64_t> tokens_where(const std::vector<char>& flag, bool want) {
  std::vector<std::int64_t> list;
  for (std::size_t t = 0; t < flag.size(); ++t)
    if (bool(flag[t]) == want) list.push_back(std::int64_t(t));
  return list;
}

}  // namespace detail

// decode() for a gate_skip model, skipping by `plan`; adds what ran to `stats`. `observe(layer,
// branch, importances)` (branch 0: attention, 1: MLP) sees every layer's importances. Runs on
// the model's backend; the importances (one value per token) are read on the host to decide.
template <class T, class R, class Bk, class M, class Observe = std::nullptr_t>
typename Bk::template tensor<T> decode_skipping(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T, Bk>& w,
                                                kv_cache<T, Bk>& cache, const typename Bk::template tensor<T>& x,
                                                const skip_plan& plan, skip_stats* stats = nullptr,
                                                Observe observe = nullptr) {
  static_assert(nn::has_residual_gates_v<M>, "skillgraft: decode_skipping needs a gate_skip model (nn::gate_skip<...>)");
  using tensor_t = typename Bk::template tensor<T>;
  const auto start = std::chrono::steady_clock::now();
  const auto& c = model.config();
  const int B = int(x.dim(0)), n = int(x.dim(1)), p0 = cache.length, layers = c.n_layers;
  if (int(plan.attention.size()) != layers || int(plan.mlp.size()) != layers)
    throw std::invalid_argument("skillgraft: the skip plan has " + std::to_string(plan.attention.size()) + " and " +
                                std::to_string(plan.mlp.size()) + " thresholds, the model " + std::to_string(layers) +
                                " layers (make it with calibrate_skipping or keep_all)");
  if (p0 + n > cache.capacity)
    throw std::invalid_argument("skillgraft: decoding " + std::to_string(p0 + n) + " positions exceeds the KV cache (" +
                                std::to_string(cache.capacity) + ")");
  model.stack().rope().check_positions(p0, n);
  if (p0 == 0) {
    model.check_weights(w);
    model.stack().check_weights(w.trunk);
  }
  using frozen_r = std::remove_cv_t<decltype(recipe::frozen)>;
  using mlp_t = typename M::template layer<T, frozen_r, false, Bk>;
  nn::rmsnorm<T, false, false, Bk> norm{c.rms_norm_eps};
  mlp_t mlp{c, model.mlp_options()};
  typename decltype(norm)::saved_t ns;
  typename mlp_t::saved_t ms;
  const std::size_t N = std::size_t(B) * std::size_t(n), d = std::size_t(c.hidden), cap = std::size_t(cache.capacity);
  const double qd = c.q_dim(), kvd = c.kv_dim(), dd = double(d);
  // FLOPs of one branch for `tokens` tokens, and of the attention core of the tokens that run.
  // A branch's gate runs for every token (it decides): 2 N d width.
  const double gate_flops = 2.0 * double(N) * dd * double(w.trunk.layers[0].attn_gate.out_features());
  auto attention_flops = [&](double tokens) { return 2 * tokens * dd * (qd + 2 * kvd) + 2 * tokens * qd * dd; };
  auto core_flops = [&](const std::vector<char>& run) {
    double f = 0;
    for (std::size_t t = 0; t < N; ++t)
      if (run[t]) f += 2.0 * 2.0 * c.n_heads * c.head_dim * double(p0 + int(t % std::size_t(n)) + 1);
    return f;
  };
  auto mlp_flops = [&](std::size_t tokens) {
    return tokens ? mlp_t::flops(c, seq_shape{1, int(tokens)}, model.mlp_options()).forward : 0.0;
  };
  skip_stats local;
  tensor_t hcur = x.clone(memory_use::workspace);
  const std::vector<char> everyone(N, 1);
  const auto all = detail::every_token(N);
  for (int l = 0; l < layers; ++l) {
    const auto& lw = w.trunk.layers[std::size_t(l)];
    // Which tokens run a branch: importance (mean gate) at or above the layer's threshold.
    auto decide = [&](const tensor_t& g, int branch, double threshold, std::vector<char>& run) {
      const auto imp = detail::row_means(g);
      if constexpr (!std::is_same_v<Observe, std::nullptr_t>) observe(l, branch, imp);
      std::size_t kept = 0;
      for (std::size_t t = 0; t < N; ++t) kept += (run[t] = char(l == 0 || !(imp[t] < threshold)));
      local.branch_tokens += N;
      local.branch_skipped += N - kept;
      local.branch_steps += 1;
      local.branch_steps_skipped += kept == 0 && plan.mode == skip_mode::skip;  // masked: every token runs
      return kept;
    };
    std::vector<char> run_a(N), run_m(N);
    auto h1 = norm.forward(lw.attn_norm, hcur, ns);
    auto ga = nn::gate_values(lw.attn_gate, h1);
    const std::size_t kept_a = decide(ga, 0, plan.attention[std::size_t(l)], run_a);
    auto& kc = cache.k[std::size_t(l)];
    auto& vc = cache.v[std::size_t(l)];
    tensor_t o;
    if (kept_a == N) {  // the full model's decoding step, bit for bit
      o = detail::cached_attention(c, model.stack().rope(), lw.self_attn, h1, all, all, kc, vc, p0);
      local.flops_run += attention_flops(double(N)) + core_flops(everyone);
    } else {
      // Skipped tokens carry this layer's key and value over from the layer below.
      const auto kept = detail::tokens_where(run_a, true), carried = detail::tokens_where(run_a, false);
      std::vector<std::int64_t> slots(carried.size());
      for (std::size_t i = 0; i < carried.size(); ++i)
        slots[i] = std::int64_t(std::size_t(carried[i] / n) * cap + std::size_t(p0 + int(carried[i] % n)));
      for (auto [below, here] : {std::pair{&cache.k[std::size_t(l - 1)], &kc}, std::pair{&cache.v[std::size_t(l - 1)], &vc}}) {
        tensor_t rows({slots.size(), std::size_t(c.kv_dim())}, memory_use::workspace);
        Bk::gather_rows(*below, std::size_t(c.kv_dim()), slots, rows);
        Bk::scatter_rows(rows, std::size_t(c.kv_dim()), slots, *here);
      }
      const bool masked = plan.mode == skip_mode::masked;
      o = detail::cached_attention(c, model.stack().rope(), lw.self_attn, h1, masked ? all : kept, kept, kc, vc, p0);
      if (masked) detail::zero_rows(o, carried);
      local.flops_run += masked ? attention_flops(double(N)) + core_flops(everyone)
                                : attention_flops(double(kept_a)) + core_flops(run_a);
    }
    local.flops_full += attention_flops(double(N)) + core_flops(everyone) + gate_flops;
    local.flops_run += gate_flops;
    auto x2 = nn::gated_residual(hcur, o, ga);  // skipped rows: o = 0, so x2 = x there

    auto h2 = norm.forward(lw.mlp_norm, x2, ns);
    auto gm = nn::gate_values(lw.mlp_gate, h2);
    const std::size_t kept_m = decide(gm, 1, plan.mlp[std::size_t(l)], run_m);
    tensor_t y;
    if (kept_m == N || plan.mode == skip_mode::masked) {
      y = mlp.forward(lw.mlp, h2, ms);
      detail::zero_rows(y, detail::tokens_where(run_m, false));
      local.flops_run += mlp_flops(N);
    } else {  // only the kept rows run the MLP
      const auto kept = detail::tokens_where(run_m, true);
      if (kept.empty()) {
        y = tensor_t(x2.shape(), memory_use::workspace);
      } else {
        tensor_t buffer;
        y = detail::spread(mlp.forward(lw.mlp, detail::rows_of(h2, kept, buffer), ms), kept, std::size_t(B),
                           std::size_t(n));
      }
      local.flops_run += mlp_flops(kept_m);
    }
    local.flops_full += mlp_flops(N) + gate_flops;
    local.flops_run += gate_flops;
    hcur = nn::gated_residual(x2, y, gm);
  }
  cache.length += n;
  auto out = norm.forward(w.norm, hcur, ns);
  local.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (stats) {
    stats->flops_full += local.flops_full;
    stats->flops_run += local.flops_run;
    stats->branch_tokens += local.branch_tokens;
    stats->branch_skipped += local.branch_skipped;
    stats->branch_steps += local.branch_steps;
    stats->branch_steps_skipped += local.branch_steps_skipped;
    stats->seconds += local.seconds;
  }
  return out;
}

// One batch of calibration tokens: ids [batch, seq] after optional soft tokens [batch, prefix, hidden].
template <class T, class Bk = backend::cpu>
struct calibration_batch {
  const token_ids* ids = nullptr;
  const typename Bk::template tensor<T>* prefix = nullptr;
};

// Thresholds for a budget: the tokens of every batch run through the model without skipping
// (batches of other lengths, with or without soft tokens, pool their importances); per layer and
// branch the top fraction `keep` of the importances is kept, the threshold put halfway between
// the last kept and the first skipped importance.
template <class T, class R, class Bk, class M>
skip_plan calibrate_skipping(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T, Bk>& w,
                             const std::vector<calibration_batch<T, Bk>>& batches, double keep) {
  if (!(keep > 0 && keep <= 1))
    throw std::invalid_argument("skillgraft: a skip budget keeps a fraction in (0, 1], got " + std::to_string(keep));
  const int layers = model.config().n_layers;
  std::vector<std::vector<double>> seen(2 * std::size_t(layers));
  for (const auto& batch : batches) {
    auto x = model.embed(w, *batch.ids, batch.prefix);
    kv_cache<T, Bk> cache(model.config(), int(x.dim(0)), int(x.dim(1)));
    decode_skipping(model, w, cache, x, keep_all(layers), nullptr, [&](int l, int branch, const std::vector<double>& imp) {
      auto& v = seen[2 * std::size_t(l) + std::size_t(branch)];
      v.insert(v.end(), imp.begin(), imp.end());
    });
  }
  skip_plan plan = keep_all(layers);
  plan.keep = keep;
  for (int l = 1; l < layers; ++l)
    for (int branch = 0; branch < 2; ++branch) {
      auto v = seen[2 * std::size_t(l) + std::size_t(branch)];
      std::sort(v.begin(), v.end(), std::greater<double>());
      const std::size_t kept = std::size_t(std::ceil(keep * double(v.size()) - 1e-9));
      if (kept >= v.size()) continue;
      const double threshold = kept == 0 ? v[0] + 1 : 0.5 * (v[kept - 1] + v[kept]);
      (branch == 0 ? plan.attention : plan.mlp)[std::size_t(l)] = threshold;
    }
  return plan;
}
template <class T, class R, class Bk, class M>
skip_plan calibrate_skipping(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T, Bk>& w, const token_ids& ids,
                             double keep, const typename Bk::template tensor<T>* prefix = nullptr) {
  return calibrate_skipping(model, w, std::vector<calibration_batch<T, Bk>>{{&ids, prefix}}, keep);
}

// generate and continuation_logprob of a gate_skip model, skipping by `plan`.
template <class T, class R, class Bk, class M>
token_ids generate_skipping(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T, Bk>& w, const token_ids& prompt,
                            const sampling& s, const skip_plan& plan, skip_stats* stats = nullptr,
                            const typename Bk::template tensor<T>* prefix = nullptr) {
  return generate_with(model, w, prompt, s, prefix, [&](kv_cache<T, Bk>& cache, const typename Bk::template tensor<T>& x) {
    return decode_skipping(model, w, cache, x, plan, stats);
  });
}
template <class T, class R, class Bk, class M>
std::vector<double> continuation_logprob_skipping(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T, Bk>& w,
                                                  const token_ids& prompt, const token_ids& continuation,
                                                  const skip_plan& plan, skip_stats* stats = nullptr,
                                                  const typename Bk::template tensor<T>* prefix = nullptr) {
  return continuation_logprob_with(model, w, prompt, continuation, prefix,
                                   [&](kv_cache<T, Bk>& cache, const typename Bk::template tensor<T>& x) {
    return decode_skipping(model, w, cache, x, plan, stats);
  });
}

}  // namespace skillgraft::model
