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
  double seconds = 0;             // wall time inside the decoding steps
  double flops_saved() const { return flops_full > 0 ? 1.0 - flops_run / flops_full : 0.0; }
  double skipped_fraction() const { return branch_tokens ? double(branch_skipped) / double(branch_tokens) : 0.0; }
};

// A plan that skips nothing (every threshold -infinity).
inline skip_plan keep_all(int layers) {
  const double none = -std::numeric_limits<double>::infinity();
  return {1.0, std::vector<double>(std::size_t(layers), none), std::vector<double>(std::size_t(layers), none)};
}

namespace detail {

// Mean of each row of g [rows, width]: a token's importance.
template <class T>
std::vector<double> row_means(const tensor<T>& g) {
  const std::size_t rows = g.rows(), width = g.cols();
  std::vector<double> m(rows);
  for (std::size_t r = 0; r < rows; ++r) {
    double s = 0;
    for (std::size_t j = 0; j < width; ++j) s += double(g.data()[r * width + j]);
    m[r] = s / double(width);
  }
  return m;
}

// Attention of the tokens with run[t] over the cache, one layer (t = b * n + i at position p0 + i).
// Tokens with carry[t] take this layer's key and value from the layer below's cache; the
// others' are computed. Rows of tokens that do not run are zero.
template <class T>
tensor<T> cached_attention_rows(const decoder_config& c, const nn::rope_table<T>& table,
                                const nn::attention_weights<T>& w, const tensor<T>& h, const std::vector<char>& run,
                                const std::vector<char>& carry, tensor<T>& kc, tensor<T>& vc, const tensor<T>& kc_below,
                                const tensor<T>& vc_below, int p0) {
  const int B = int(h.dim(0)), n = int(h.dim(1)), H = c.n_heads, KV = c.n_kv_heads, hd = c.head_dim;
  const std::size_t d = std::size_t(c.hidden), qd = std::size_t(c.q_dim()), kvd = std::size_t(c.kv_dim()),
                    cap = kc.dim(1);
  const int group = H / KV;
  tensor<T> out({std::size_t(B), std::size_t(n), d}, memory_use::workspace);
  std::vector<std::int64_t> rows, computed;  // tokens whose query runs; tokens whose K, V are computed
  for (int t = 0; t < B * n; ++t) {
    if (run[std::size_t(t)]) rows.push_back(t);
    if (!carry[std::size_t(t)]) computed.push_back(t);
  }
  auto at = [&](std::int64_t t) { return (std::size_t(t / n) * cap + std::size_t(p0 + int(t % n))) * kvd; };
  for (int t = 0; t < B * n; ++t)
    if (carry[std::size_t(t)]) {
      std::copy_n(kc_below.data() + at(t), kvd, kc.data() + at(t));
      std::copy_n(vc_below.data() + at(t), kvd, vc.data() + at(t));
    }
  auto gather = [&](const std::vector<std::int64_t>& from) {
    tensor<T> r({1, from.size(), d}, memory_use::workspace);
    for (std::size_t i = 0; i < from.size(); ++i) std::copy_n(h.data() + std::size_t(from[i]) * d, d, r.data() + i * d);
    return r;
  };
  if (!computed.empty()) {  // keys and values of the tokens that do not carry them
    const auto hk = gather(computed);
    tensor<T> k({1, computed.size(), kvd}, memory_use::workspace), v({1, computed.size(), kvd}, memory_use::workspace);
    nn::linear_forward(w.k_proj, hk, k);
    nn::linear_forward(w.v_proj, hk, v);
    for (std::size_t i = 0; i < computed.size(); ++i) {
      nn::rope_apply(table, k.data() + i * kvd, 1, 1, KV, p0 + int(computed[i] % n), false);
      std::copy_n(k.data() + i * kvd, kvd, kc.data() + at(computed[i]));
      std::copy_n(v.data() + i * kvd, kvd, vc.data() + at(computed[i]));
    }
  }
  if (rows.empty()) return out;
  const auto hr = gather(rows);
  const std::size_t R = rows.size();
  tensor<T> q({1, R, qd}, memory_use::workspace), a({1, R, qd}, memory_use::workspace);
  nn::linear_forward(w.q_proj, hr, q);
  for (std::size_t i = 0; i < R; ++i) nn::rope_apply(table, q.data() + i * qd, 1, 1, H, p0 + int(rows[i] % n), false);
  const T scale = T(1) / std::sqrt(T(hd));
  using vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
#pragma omp parallel for collapse(2) schedule(static)
  for (std::size_t i = 0; i < R; ++i)
    for (int head = 0; head < H; ++head) {
      const std::size_t b = std::size_t(rows[i] / n);
      const int L = p0 + int(rows[i] % n) + 1;  // causal: keys 0 .. its position
      Eigen::Map<const vec> qv(q.data() + i * qd + std::size_t(head) * std::size_t(hd), hd);
      const std::size_t base = b * cap * kvd + std::size_t(head / group) * std::size_t(hd);
      cpu::attention_detail::const_strided_map<T> K(kc.data() + base, L, hd, Eigen::OuterStride<>(KV * hd));
      cpu::attention_detail::const_strided_map<T> V(vc.data() + base, L, hd, Eigen::OuterStride<>(KV * hd));
      vec p = (K * qv) * scale;
      p = (p.array() - p.maxCoeff()).exp();
      p /= p.sum();
      Eigen::Map<vec>(a.data() + i * qd + std::size_t(head) * std::size_t(hd), hd).noalias() = V.transpose() * p;
    }
  tensor<T> o({1, R, d}, memory_use::workspace);
  nn::linear_forward(w.o_proj, a, o);
  for (std::size_t i = 0; i < R; ++i) std::copy_n(o.data() + i * d, d, out.data() + std::size_t(rows[i]) * d);
  return out;
}

}  // namespace detail

// decode() for a gate_skip model, skipping by `plan`; adds what ran to `stats`. `observe(layer,
// branch, importances)` (branch 0: attention, 1: MLP) sees every layer's importances.
template <class T, class R, class Bk, class M, class Observe = std::nullptr_t>
tensor<T> decode_skipping(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T>& w, kv_cache<T>& cache,
                          const tensor<T>& x, const skip_plan& plan, skip_stats* stats = nullptr,
                          Observe observe = nullptr) {
  static_assert(nn::has_residual_gates_v<M>, "skillgraft: decode_skipping needs a gate_skip model (nn::gate_skip<...>)");
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
  using mlp_t = typename M::template layer<T, frozen_r, false>;
  nn::rmsnorm<T, false, false> norm{c.rms_norm_eps};
  mlp_t mlp{c, model.mlp_options()};
  typename decltype(norm)::saved_t ns;
  typename mlp_t::saved_t ms;
  const std::size_t N = std::size_t(B) * std::size_t(n), d = std::size_t(c.hidden);
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
  tensor<T> hcur = x.clone(memory_use::workspace);
  const std::vector<char> everyone(N, 1), nobody(N, 0);
  for (int l = 0; l < layers; ++l) {
    const auto& lw = w.trunk.layers[std::size_t(l)];
    // Which tokens run a branch: importance (mean gate) at or above the layer's threshold.
    auto decide = [&](const tensor<T>& g, int branch, double threshold, std::vector<char>& run) {
      const auto imp = detail::row_means(g);
      if constexpr (!std::is_same_v<Observe, std::nullptr_t>) observe(l, branch, imp);
      std::size_t kept = 0;
      for (std::size_t t = 0; t < N; ++t) kept += (run[t] = char(l == 0 || !(imp[t] < threshold)));
      local.branch_tokens += N;
      local.branch_skipped += N - kept;
      return kept;
    };
    std::vector<char> run_a(N), run_m(N);
    auto h1 = norm.forward(lw.attn_norm, hcur, ns);
    auto ga = nn::gate_values(lw.attn_gate, h1);
    const std::size_t kept_a = decide(ga, 0, plan.attention[std::size_t(l)], run_a);
    tensor<T> o;
    if (kept_a == N) {  // the full model's decoding step, bit for bit
      o = detail::cached_attention(c, model.stack().rope(), lw.self_attn, h1, cache.k[std::size_t(l)],
                                   cache.v[std::size_t(l)], p0);
      local.flops_run += attention_flops(double(N)) + core_flops(everyone);
    } else {
      std::vector<char> carry(N);
      for (std::size_t t = 0; t < N; ++t) carry[t] = char(!run_a[t]);
      const bool masked = plan.mode == skip_mode::masked;
      o = detail::cached_attention_rows(c, model.stack().rope(), lw.self_attn, h1, masked ? everyone : run_a, carry,
                                        cache.k[std::size_t(l)], cache.v[std::size_t(l)], cache.k[std::size_t(l - 1)],
                                        cache.v[std::size_t(l - 1)], p0);
      if (masked)
        for (std::size_t t = 0; t < N; ++t)
          if (!run_a[t]) std::fill_n(o.data() + t * d, d, T(0));
      local.flops_run += masked ? attention_flops(double(N)) + core_flops(everyone)
                                : attention_flops(double(kept_a)) + core_flops(run_a);
    }
    local.flops_full += attention_flops(double(N)) + core_flops(everyone) + gate_flops;
    local.flops_run += gate_flops;
    auto x2 = nn::gated_residual(hcur, o, ga);  // skipped rows: o = 0, so x2 = x there

    auto h2 = norm.forward(lw.mlp_norm, x2, ns);
    auto gm = nn::gate_values(lw.mlp_gate, h2);
    const std::size_t kept_m = decide(gm, 1, plan.mlp[std::size_t(l)], run_m);
    tensor<T> y;
    if (kept_m == N || plan.mode == skip_mode::masked) {
      y = mlp.forward(lw.mlp, h2, ms);
      for (std::size_t t = 0; t < N; ++t)
        if (!run_m[t]) std::fill_n(y.data() + t * d, d, T(0));
      local.flops_run += mlp_flops(N);
    } else {  // only the kept rows run the MLP
      y = tensor<T>(x2.shape(), memory_use::workspace);
      std::vector<std::size_t> rows;
      for (std::size_t t = 0; t < N; ++t)
        if (run_m[t]) rows.push_back(t);
      if (!rows.empty()) {
        tensor<T> hk({1, rows.size(), d}, memory_use::workspace);
        for (std::size_t i = 0; i < rows.size(); ++i) std::copy_n(h2.data() + rows[i] * d, d, hk.data() + i * d);
        auto yk = mlp.forward(lw.mlp, hk, ms);
        for (std::size_t i = 0; i < rows.size(); ++i) std::copy_n(yk.data() + i * d, d, y.data() + rows[i] * d);
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
    stats->seconds += local.seconds;
  }
  return out;
}

// Thresholds for a budget: the tokens of `ids` (after optional soft tokens) run through the
// model without skipping; per layer and branch the top fraction `keep` of their importances is
// kept, the threshold put halfway between the last kept and the first skipped importance.
template <class T, class R, class Bk, class M>
skip_plan calibrate_skipping(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T>& w, const token_ids& ids,
                             double keep, const tensor<T>* prefix = nullptr) {
  if (!(keep > 0 && keep <= 1))
    throw std::invalid_argument("skillgraft: a skip budget keeps a fraction in (0, 1], got " + std::to_string(keep));
  const int layers = model.config().n_layers;
  std::vector<std::vector<double>> seen(2 * std::size_t(layers));
  auto x = model.embed(w, ids, prefix);
  kv_cache<T> cache(model.config(), int(x.dim(0)), int(x.dim(1)));
  decode_skipping(model, w, cache, x, keep_all(layers), nullptr, [&](int l, int branch, const std::vector<double>& imp) {
    auto& v = seen[2 * std::size_t(l) + std::size_t(branch)];
    v.insert(v.end(), imp.begin(), imp.end());
  });
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

// generate and continuation_logprob of a gate_skip model, skipping by `plan`.
template <class T, class R, class Bk, class M>
token_ids generate_skipping(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T>& w, const token_ids& prompt,
                            const sampling& s, const skip_plan& plan, skip_stats* stats = nullptr,
                            const tensor<T>* prefix = nullptr) {
  return generate_with(model, w, prompt, s, prefix, [&](kv_cache<T>& cache, const tensor<T>& x) {
    return decode_skipping(model, w, cache, x, plan, stats);
  });
}
template <class T, class R, class Bk, class M>
std::vector<double> continuation_logprob_skipping(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T>& w,
                                                  const token_ids& prompt, const token_ids& continuation,
                                                  const skip_plan& plan, skip_stats* stats = nullptr,
                                                  const tensor<T>* prefix = nullptr) {
  return continuation_logprob_with(model, w, prompt, continuation, prefix, [&](kv_cache<T>& cache, const tensor<T>& x) {
    return decode_skipping(model, w, cache, x, plan, stats);
  });
}

}  // namespace skillgraft::model
