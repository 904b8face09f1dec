#pragma once
// Evaluation: incremental decoding with a KV cache, greedy or temperature sampling,
// and log-probabilities of given continuations.
//
// Decoding runs the same layers without saving anything for backward: each new
// token's query attends to the cached keys and values of every earlier position
//   P = softmax(q K[0..p]^T / sqrt(hd)),  a = P V[0..p]
// so a step costs O(position) instead of re-running the whole prefix.
#include <cmath>
#include <random>
#include <vector>

#include "skillgraft/model/decoder_lm.hpp"

namespace skillgraft::model {

template <class T>
struct kv_cache {
  std::vector<tensor<T>> k, v;  // per layer [batch, capacity, kv_dim], rotated keys
  int length = 0;
  int capacity = 0;

  kv_cache(const decoder_config& c, int batch, int cap) : capacity(cap) {
    for (int i = 0; i < c.n_layers; ++i) {
      k.emplace_back(shape_t{std::size_t(batch), std::size_t(cap), std::size_t(c.kv_dim())}, memory_use::workspace);
      v.emplace_back(shape_t{std::size_t(batch), std::size_t(cap), std::size_t(c.kv_dim())}, memory_use::workspace);
    }
  }
};

namespace detail {

// Attention of n new positions (starting at cache.length) over the cache, one layer.
template <class T>
tensor<T> cached_attention(const decoder_config& c, const nn::rope_table<T>& table, const nn::attention_weights<T>& w,
                           const tensor<T>& h, tensor<T>& kc, tensor<T>& vc, int p0) {
  const int B = int(h.dim(0)), n = int(h.dim(1)), H = c.n_heads, KV = c.n_kv_heads, hd = c.head_dim;
  const int cap = int(kc.dim(1)), L = p0 + n, group = H / KV;
  tensor<T> q({std::size_t(B), std::size_t(n), std::size_t(c.q_dim())}, memory_use::workspace);
  tensor<T> k({std::size_t(B), std::size_t(n), std::size_t(c.kv_dim())}, memory_use::workspace);
  tensor<T> v({std::size_t(B), std::size_t(n), std::size_t(c.kv_dim())}, memory_use::workspace);
  nn::linear_forward(w.q_proj, h, q);
  nn::linear_forward(w.k_proj, h, k);
  nn::linear_forward(w.v_proj, h, v);
  nn::rope_apply(table, q.data(), B, n, H, p0, false);
  nn::rope_apply(table, k.data(), B, n, KV, p0, false);
  const std::size_t kvd = std::size_t(c.kv_dim());
  for (int b = 0; b < B; ++b) {
    std::copy_n(k.data() + std::size_t(b) * n * kvd, std::size_t(n) * kvd, kc.data() + (std::size_t(b) * cap + p0) * kvd);
    std::copy_n(v.data() + std::size_t(b) * n * kvd, std::size_t(n) * kvd, vc.data() + (std::size_t(b) * cap + p0) * kvd);
  }
  tensor<T> a({std::size_t(B), std::size_t(n), std::size_t(c.q_dim())}, memory_use::workspace);
  const T scale = T(1) / std::sqrt(T(hd));
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b)
    for (int head = 0; head < H; ++head) {
      auto Q = cpu::attention_detail::head_view(q.data(), b, head, n, H, hd);
      cpu::attention_detail::const_strided_map<T> K(kc.data() + std::size_t(b) * cap * kvd + std::size_t(head / group) * hd, L, hd,
                                         Eigen::OuterStride<>(KV * hd));
      cpu::attention_detail::const_strided_map<T> V(vc.data() + std::size_t(b) * cap * kvd + std::size_t(head / group) * hd, L, hd,
                                         Eigen::OuterStride<>(KV * hd));
      auto A = cpu::attention_detail::head_view(a.data(), b, head, n, H, hd);
      cpu::attention_detail::row_matrix<T> P = (Q * K.transpose()) * scale;
      for (int i = 0; i < n; ++i) {
        const int visible = p0 + i + 1;  // causal: keys 0..p0+i
        auto row = P.row(i).head(visible);
        const T mx = row.maxCoeff();
        row = (row.array() - mx).exp();
        row /= row.sum();
        P.row(i).tail(L - visible).setZero();
      }
      A.noalias() = P * V;
    }
  tensor<T> out({std::size_t(B), std::size_t(n), std::size_t(c.hidden)}, memory_use::workspace);
  nn::linear_forward(w.o_proj, a, out);
  return out;
}

}  // namespace detail

// Runs n new positions x [batch, n, hidden] (embeddings) through the model, appending to
// the cache; returns the final hidden states of those positions.
template <class T, class R, class Bk, class M>
tensor<T> decode(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T>& w, kv_cache<T>& cache, const tensor<T>& x) {
  const auto& c = model.config();
  const int n = int(x.dim(1)), p0 = cache.length;
  if (p0 + n > cache.capacity)
    throw std::invalid_argument("skillgraft: decoding " + std::to_string(p0 + n) + " positions exceeds the KV cache (" +
                                std::to_string(cache.capacity) + ")");
  model.stack().rope().check_positions(p0, n);
  if (p0 == 0) {  // weights that do not fit the model's config or MLP policy are refused, as by forward
    model.check_weights(w);
    model.stack().check_weights(w.trunk);
  }
  using frozen_r = std::remove_cv_t<decltype(recipe::frozen)>;
  nn::rmsnorm<T, false, false> norm{c.rms_norm_eps};
  // The model's own MLP policy (dense, xSiLU/xGELU or a mixture of experts), frozen.
  typename M::template layer<T, frozen_r, false> mlp{c, model.mlp_options()};
  typename decltype(norm)::saved_t ns;
  typename decltype(mlp)::saved_t ms;
  tensor<T> hcur = x.clone(memory_use::workspace);
  for (int l = 0; l < c.n_layers; ++l) {
    const auto& lw = w.trunk.layers[std::size_t(l)];
    auto h1 = norm.forward(lw.attn_norm, hcur, ns);
    auto x2 = detail::cached_attention(c, model.stack().rope(), lw.self_attn, h1, cache.k[std::size_t(l)],
                                       cache.v[std::size_t(l)], p0);
    // GateSkip models (nn/gate_skip.hpp): x2 = x + ga * attention(h1), y = x2 + gm * mlp(h2)
    if constexpr (nn::has_residual_gates_v<M>) x2 = nn::gated_residual(hcur, x2, nn::gate_values(lw.attn_gate, h1));
    else x2.vec() += hcur.vec();
    auto h2 = norm.forward(lw.mlp_norm, x2, ns);
    auto y = mlp.forward(lw.mlp, h2, ms);
    if constexpr (nn::has_residual_gates_v<M>) y = nn::gated_residual(x2, y, nn::gate_values(lw.mlp_gate, h2));
    else y.vec() += x2.vec();
    hcur = std::move(y);
  }
  cache.length += n;
  return norm.forward(w.norm, hcur, ns);
}

struct sampling {
  int max_new_tokens = 16;
  double temperature = 0.0;  // 0: greedy (argmax)
  std::uint64_t seed = 0;
  std::int64_t eos = -1;     // stop a row once it emits this token (then pads with it)
  std::vector<std::int64_t> allowed;  // restrict decoding to these tokens (empty: all)
};

// generate and continuation_logprob with the decoding step `dec(cache, x) -> h` given (the
// full model's `decode`, or GateSkip's decoding with skipped tokens, model/gate_skip.hpp).
template <class T, class R, class Bk, class M, class Decode>
token_ids generate_with(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T>& w, const token_ids& prompt,
                        const sampling& s, const tensor<T>* prefix, Decode&& dec) {
  const auto& c = model.config();
  const std::size_t B = prompt.shape(0);
  auto x = model.embed(w, prompt, prefix);
  kv_cache<T> cache(c, int(B), int(x.dim(1)) + s.max_new_tokens);
  auto h = dec(cache, x);
  token_ids out = xt::full_like(token_ids::from_shape({B, std::size_t(s.max_new_tokens)}), s.eos >= 0 ? s.eos : 0);
  std::vector<bool> done(B, false);
  std::mt19937_64 rng(s.seed);
  for (int t = 0; t < s.max_new_tokens; ++t) {
    // Logits of each row's last position.
    const std::size_t last = h.dim(1) - 1, d = std::size_t(c.hidden);
    tensor<T> hl({B, 1, d}, memory_use::workspace);
    for (std::size_t b = 0; b < B; ++b) std::copy_n(h.data() + (b * h.dim(1) + last) * d, d, hl.data() + b * d);
    auto z = model.logits(w, hl);
    token_ids next = token_ids::from_shape({B, 1});
    for (std::size_t b = 0; b < B; ++b) {
      const T* zr = z.data() + b * std::size_t(c.vocab_size);
      std::vector<std::int64_t> cand = s.allowed;
      if (cand.empty())
        for (int j = 0; j < c.vocab_size; ++j) cand.push_back(j);
      std::int64_t pick = cand[0];
      if (s.temperature <= 0) {
        for (auto j : cand)
          if (zr[j] > zr[pick]) pick = j;
      } else {
        std::vector<double> p(cand.size());
        double mx = -1e300;
        for (std::size_t i = 0; i < cand.size(); ++i) mx = std::max(mx, double(zr[cand[i]]) / s.temperature);
        for (std::size_t i = 0; i < cand.size(); ++i) p[i] = std::exp(double(zr[cand[i]]) / s.temperature - mx);
        pick = cand[std::discrete_distribution<std::size_t>(p.begin(), p.end())(rng)];
      }
      if (done[b]) pick = s.eos;
      out(b, std::size_t(t)) = pick;
      next(b, 0) = pick;
      if (s.eos >= 0 && pick == s.eos) done[b] = true;
    }
    if (t + 1 == s.max_new_tokens) break;
    h = dec(cache, model.embed(w, next, nullptr));
  }
  return out;
}

// Appends up to max_new_tokens to each row of `prompt` (after optional soft tokens);
// returns the new tokens [batch, max_new_tokens].
template <class T, class R, class Bk, class M>
token_ids generate(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T>& w, const token_ids& prompt,
                   const sampling& s = {}, const tensor<T>* prefix = nullptr) {
  return generate_with(model, w, prompt, s, prefix,
                       [&](kv_cache<T>& cache, const tensor<T>& x) { return decode(model, w, cache, x); });
}

template <class T, class R, class Bk, class M, class Decode>
std::vector<double> continuation_logprob_with(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T>& w,
                                              const token_ids& prompt, const token_ids& continuation,
                                              const tensor<T>* prefix, Decode&& dec) {
  const std::size_t B = prompt.shape(0), P0 = prompt.shape(1), C = continuation.shape(1);
  if (continuation.shape(0) != B || C == 0 || P0 == 0)
    throw std::invalid_argument("skillgraft: prompt and continuation need the same batch and at least one token each");
  token_ids all = token_ids::from_shape({B, P0 + C});
  for (std::size_t b = 0; b < B; ++b) {
    for (std::size_t s = 0; s < P0; ++s) all(b, s) = prompt(b, s);
    for (std::size_t s = 0; s < C; ++s) all(b, P0 + s) = continuation(b, s);
  }
  auto x = model.embed(w, all, prefix);
  kv_cache<T> cache(model.config(), int(B), int(x.dim(1)));
  auto h = dec(cache, x);
  auto z = model.logits(w, h);
  const std::size_t V = std::size_t(model.config().vocab_size), Tn = h.dim(1), off = Tn - (P0 + C);
  std::vector<double> lp(B, 0.0);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t s = 0; s < C; ++s) {
      const T* zr = z.data() + (b * Tn + off + P0 + s - 1) * V;  // position predicting continuation[s]
      double mx = zr[0];
      for (std::size_t j = 1; j < V; ++j) mx = std::max(mx, double(zr[j]));
      double sum = 0;
      for (std::size_t j = 0; j < V; ++j) sum += std::exp(double(zr[j]) - mx);
      lp[b] += double(zr[continuation(b, s)]) - mx - std::log(sum);
    }
  return lp;
}

// log p(continuation | prompt) summed over the continuation's tokens, one value per row.
template <class T, class R, class Bk, class M>
std::vector<double> continuation_logprob(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T>& w,
                                         const token_ids& prompt, const token_ids& continuation,
                                         const tensor<T>* prefix = nullptr) {
  return continuation_logprob_with(model, w, prompt, continuation, prefix,
                                   [&](kv_cache<T>& cache, const tensor<T>& x) { return decode(model, w, cache, x); });
}

}  // namespace skillgraft::model
