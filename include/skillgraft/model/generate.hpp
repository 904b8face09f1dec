#pragma once
// Evaluation: incremental decoding with a KV cache, greedy or temperature sampling,
// and log-probabilities of given continuations.
//
// Decoding runs the same layers without saving anything for backward: each new
// token's query attends to the cached keys and values of every earlier position
//   P = softmax(q K[0..p]^T / sqrt(hd)),  a = P V[0..p]
// so a step costs O(position) instead of re-running the whole prefix. Written once over the
// backend (Backend::cached_attention is the core); the sampler reads each step's last logits
// on the host.
#include <cmath>
#include <random>
#include <vector>

#include "skillgraft/backend/cached_attention_dims.hpp"
#include "skillgraft/model/decoder_lm.hpp"

namespace skillgraft::model {

template <class T, class Backend = backend::cpu>
struct kv_cache {
  using tensor_t = typename Backend::template tensor<T>;
  std::vector<tensor_t> k, v;  // per layer [batch, capacity, kv_dim], rotated keys
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

// Token indices 0..n-1.
inline std::vector<std::int64_t> every_token(std::size_t n) {
  std::vector<std::int64_t> all(n);
  for (std::size_t t = 0; t < n; ++t) all[t] = std::int64_t(t);
  return all;
}

// Rows `list` of x ([.., width]) as [1, |list|, width]; x itself when the list is every row.
template <class Tensor>
const Tensor& rows_of(const Tensor& x, const std::vector<std::int64_t>& list, Tensor& buffer) {
  using B = typename backend_of<Tensor>::type;
  if (list.size() == std::size_t(x.rows())) return x;
  const std::size_t width = std::size_t(x.cols());
  buffer = Tensor(shape_t{1, list.size(), width}, memory_use::workspace);
  B::gather_rows(x, width, list, buffer);
  return buffer;
}

// [batch, n, width] holding the rows of `part` at tokens `list`, zero elsewhere; `part` itself
// when the list is every token.
template <class Tensor>
Tensor spread(Tensor part, const std::vector<std::int64_t>& list, std::size_t batch, std::size_t n) {
  using B = typename backend_of<Tensor>::type;
  const std::size_t width = std::size_t(part.cols());
  if (list.size() == batch * n) {
    part.reshape({batch, n, width});
    return part;
  }
  Tensor all(shape_t{batch, n, width}, memory_use::workspace);
  B::scatter_rows(part, width, list, all);
  return all;
}

// Attention of one layer for n new positions per sequence (token t = b * n + i at position
// p0 + i), h [batch, n, hidden]: the tokens `computed` get their rotated keys and values
// computed and written to the cache; the tokens `run` attend over the cache,
//   a = softmax(q K[0..p]^T / sqrt(hd)) V[0..p],  out = a Wo^T,
// and the rows of tokens that do not run are zero. With every token in both lists this is the
// full model's step; GateSkip (model/gate_skip.hpp) passes fewer, having filled the other
// tokens' cache entries itself.
template <class T, class Backend>
typename Backend::template tensor<T> cached_attention(const decoder_config& c, const nn::rope_table<T, Backend>& table,
                                                      const nn::attention_weights<T, Backend>& w,
                                                      const typename Backend::template tensor<T>& h,
                                                      const std::vector<std::int64_t>& run,
                                                      const std::vector<std::int64_t>& computed,
                                                      typename Backend::template tensor<T>& kc,
                                                      typename Backend::template tensor<T>& vc, int p0) {
  using tensor_t = typename Backend::template tensor<T>;
  const std::size_t B = h.dim(0), n = h.dim(1), cap = kc.dim(1);
  const cached_attention_dims dims{int(B), int(n), p0, int(cap), c.n_heads, c.n_kv_heads, c.head_dim};
  const auto project = [&](const nn::linear_weights<T, Backend>& p, const std::vector<std::int64_t>& list, int heads) {
    tensor_t buffer;
    const tensor_t& x = rows_of(h, list, buffer);
    tensor_t y(nn::with_last(x.shape(), p.out_features()), memory_use::workspace);
    nn::linear_forward(p, x, y);
    y = spread(std::move(y), list, B, n);
    if (heads) nn::rope_apply(table, y.data(), int(B), int(n), heads, p0, false);
    return y;
  };
  if (!computed.empty()) {
    std::vector<std::int64_t> slots(computed.size());  // cache rows b * capacity + p0 + i
    for (std::size_t i = 0; i < computed.size(); ++i)
      slots[i] = std::int64_t(std::size_t(dims.sequence_of(computed[i])) * cap + std::size_t(dims.position_of(computed[i])));
    const auto to_cache = [&](const tensor_t& all, tensor_t& cache) {
      tensor_t buffer;
      const tensor_t& part = rows_of(all, computed, buffer);
      Backend::scatter_rows(part, std::size_t(part.cols()), slots, cache);
    };
    to_cache(project(w.k_proj, computed, c.n_kv_heads), kc);
    to_cache(project(w.v_proj, computed, 0), vc);
  }
  tensor_t out({B, n, std::size_t(c.hidden)}, memory_use::workspace);
  if (run.empty()) return out;
  const auto q = project(w.q_proj, run, c.n_heads);
  tensor_t a(q.shape(), memory_use::workspace);
  Backend::cached_attention(dims, T(1) / std::sqrt(T(c.head_dim)), q, kc, vc, run, a);
  tensor_t buffer;
  const tensor_t& ar = rows_of(a, run, buffer);
  tensor_t o(nn::with_last(ar.shape(), std::size_t(c.hidden)), memory_use::workspace);
  nn::linear_forward(w.o_proj, ar, o);
  return spread(std::move(o), run, B, n);
}

}  // namespace detail

// Runs n new positions x [batch, n, hidden] (embeddings) through the model, appending to
// the cache; returns the final hidden states of those positions.
template <class T, class R, class Bk, class M>
typename Bk::template tensor<T> decode(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T, Bk>& w,
                                       kv_cache<T, Bk>& cache, const typename Bk::template tensor<T>& x) {
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
  nn::rmsnorm<T, false, false, Bk> norm{c.rms_norm_eps};
  // The model's own MLP policy (dense, xSiLU/xGELU or a mixture of experts), frozen.
  typename M::template layer<T, frozen_r, false, Bk> mlp{c, model.mlp_options()};
  typename decltype(norm)::saved_t ns;
  typename decltype(mlp)::saved_t ms;
  const auto all = detail::every_token(std::size_t(x.rows()));
  auto hcur = x.clone(memory_use::workspace);
  for (int l = 0; l < c.n_layers; ++l) {
    const auto& lw = w.trunk.layers[std::size_t(l)];
    auto h1 = norm.forward(lw.attn_norm, hcur, ns);
    auto x2 = detail::cached_attention(c, model.stack().rope(), lw.self_attn, h1, all, all, cache.k[std::size_t(l)],
                                       cache.v[std::size_t(l)], p0);
    // GateSkip models (nn/gate_skip.hpp): x2 = x + ga * attention(h1), y = x2 + gm * mlp(h2)
    if constexpr (nn::has_residual_gates_v<M>) x2 = nn::gated_residual(hcur, x2, nn::gate_values(lw.attn_gate, h1));
    else Bk::add_into(x2, hcur);
    auto h2 = norm.forward(lw.mlp_norm, x2, ns);
    auto y = mlp.forward(lw.mlp, h2, ms);
    if constexpr (nn::has_residual_gates_v<M>) y = nn::gated_residual(x2, y, nn::gate_values(lw.mlp_gate, h2));
    else Bk::add_into(y, x2);
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
  std::vector<std::int64_t> allowed{};  // restrict decoding to these tokens (empty: all)
};

// generate and continuation_logprob with the decoding step `dec(cache, x) -> h` given (the
// full model's `decode`, or GateSkip's decoding with skipped tokens, model/gate_skip.hpp). The
// model runs on its backend; only the logits the sampler or the score reads come to the host.
template <class T, class R, class Bk, class M, class Decode>
token_ids generate_with(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T, Bk>& w, const token_ids& prompt,
                        const sampling& s, const typename Bk::template tensor<T>* prefix, Decode&& dec) {
  const auto& c = model.config();
  const std::size_t B = prompt.shape(0), V = std::size_t(c.vocab_size);
  auto x = model.embed(w, prompt, prefix);
  kv_cache<T, Bk> cache(c, int(B), int(x.dim(1)) + s.max_new_tokens);
  auto h = dec(cache, x);
  token_ids out = xt::full_like(token_ids::from_shape({B, std::size_t(s.max_new_tokens)}), s.eos >= 0 ? s.eos : 0);
  std::vector<bool> done(B, false);
  std::mt19937_64 rng(s.seed);
  std::vector<std::int64_t> last(B);
  tensor<T> z({B, 1, V}, memory_use::workspace);
  for (int t = 0; t < s.max_new_tokens; ++t) {
    // Logits of each row's last position.
    for (std::size_t b = 0; b < B; ++b) last[b] = std::int64_t((b + 1) * h.dim(1) - 1);
    typename Bk::template tensor<T> hl({B, 1, std::size_t(c.hidden)}, memory_use::workspace);
    Bk::gather_rows(h, std::size_t(c.hidden), last, hl);
    Bk::download(model.logits(w, hl), z);
    token_ids next = token_ids::from_shape({B, 1});
    for (std::size_t b = 0; b < B; ++b) {
      const T* zr = z.data() + b * V;
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
token_ids generate(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T, Bk>& w, const token_ids& prompt,
                   const sampling& s = {}, const typename Bk::template tensor<T>* prefix = nullptr) {
  return generate_with(model, w, prompt, s, prefix, [&](kv_cache<T, Bk>& cache, const typename Bk::template tensor<T>& x) {
    return decode(model, w, cache, x);
  });
}

template <class T, class R, class Bk, class M, class Decode>
std::vector<double> continuation_logprob_with(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T, Bk>& w,
                                              const token_ids& prompt, const token_ids& continuation,
                                              const typename Bk::template tensor<T>* prefix, Decode&& dec) {
  const std::size_t B = prompt.shape(0), P0 = prompt.shape(1), C = continuation.shape(1);
  if (continuation.shape(0) != B || C == 0 || P0 == 0)
    throw std::invalid_argument("skillgraft: prompt and continuation need the same batch and at least one token each");
  token_ids all = token_ids::from_shape({B, P0 + C});
  for (std::size_t b = 0; b < B; ++b) {
    for (std::size_t s = 0; s < P0; ++s) all(b, s) = prompt(b, s);
    for (std::size_t s = 0; s < C; ++s) all(b, P0 + s) = continuation(b, s);
  }
  auto x = model.embed(w, all, prefix);
  kv_cache<T, Bk> cache(model.config(), int(B), int(x.dim(1)));
  auto h = dec(cache, x);
  // Logits of the positions predicting continuation[:, s] only: [1, B * C, V].
  const std::size_t V = std::size_t(model.config().vocab_size), Tn = h.dim(1), off = Tn - (P0 + C);
  std::vector<std::int64_t> predicting;
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t s = 0; s < C; ++s) predicting.push_back(std::int64_t(b * Tn + off + P0 + s - 1));
  const std::size_t d = std::size_t(h.cols());
  typename Bk::template tensor<T> hp({1, B * C, d}, memory_use::workspace);
  Bk::gather_rows(h, d, predicting, hp);
  tensor<T> z({1, B * C, V}, memory_use::workspace);
  Bk::download(model.logits(w, hp), z);
  std::vector<double> lp(B, 0.0);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t s = 0; s < C; ++s) {
      const T* zr = z.data() + (b * C + s) * V;
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
std::vector<double> continuation_logprob(const decoder_lm<T, R, Bk, M>& model, const lm_weights<T, Bk>& w,
                                         const token_ids& prompt, const token_ids& continuation,
                                         const typename Bk::template tensor<T>* prefix = nullptr) {
  return continuation_logprob_with(model, w, prompt, continuation, prefix,
                                   [&](kv_cache<T, Bk>& cache, const typename Bk::template tensor<T>& x) {
                                     return decode(model, w, cache, x);
                                   });
}

}  // namespace skillgraft::model
