#pragma once
// Causal grouped-query self-attention with rotary embeddings (LLaMA / Qwen2).
// With config.causal = false every position sees every other (no mask), and with
// config.rotary = false q and k are not rotated: the vision encoder's (ViT) attention.
//
//   forward   q = h Wq^T (+bq), k = h Wk^T (+bk), v = h Wv^T (+bv); q, k rotated
//             per head: P = softmax(q k^T / sqrt(hd) + causal mask), a = P v
//             (query head j reads kv head j / (n_heads / n_kv_heads))
//             out = a Wo^T
//   backward  dWo += dout^T a;  da = dout Wo
//             dP = da v^T;  dv += P^T da;  dS = P * (dP - rowsum(dP * P))
//             dq = dS k / sqrt(hd);  dk += dS^T q / sqrt(hd);  un-rotate dq, dk
//             dWq += dq^T h (likewise k, v);  dh = dq Wq + dk Wk + dv Wv
//
// Under a recipe only the needed branches exist: with only V trainable, q and k
// are not kept and dq, dk are never formed; with nothing trainable and no input
// gradient wanted, forward keeps nothing at all.
#include <cmath>
#include <limits>

#include "skillgraft/nn/config.hpp"
#include "skillgraft/nn/linear.hpp"
#include "skillgraft/nn/optional_member.hpp"
#include "skillgraft/nn/rope.hpp"
#include "skillgraft/policy/trainable.hpp"

namespace skillgraft::nn {

template <class T>
struct attention_weights {
  linear_weights<T> q_proj, k_proj, v_proj, o_proj;

  attention_weights() = default;
  attention_weights(const decoder_config& c, memory_use use)
      : q_proj(std::size_t(c.q_dim()), std::size_t(c.hidden), c.attention_bias, use),
        k_proj(std::size_t(c.kv_dim()), std::size_t(c.hidden), c.attention_bias, use),
        v_proj(std::size_t(c.kv_dim()), std::size_t(c.hidden), c.attention_bias, use),
        o_proj(std::size_t(c.hidden), std::size_t(c.q_dim()), false, use) {}
  std::size_t elements() const {
    return q_proj.elements() + k_proj.elements() + v_proj.elements() + o_proj.elements();
  }
};

// Which parts of attention's backward run, from a recipe and whether dh is wanted.
template <class Recipe, bool NeedsInputGrad>
struct attention_plan {
  static constexpr bool train_q = trains_v<proj::q, Recipe>;
  static constexpr bool train_k = trains_v<proj::k, Recipe>;
  static constexpr bool train_v = trains_v<proj::v, Recipe>;
  static constexpr bool train_o = trains_v<proj::o, Recipe>;
  static constexpr bool adapt_q = trains_v<lora<proj::q>, Recipe>;
  static constexpr bool adapt_k = trains_v<lora<proj::k>, Recipe>;
  static constexpr bool adapt_v = trains_v<lora<proj::v>, Recipe>;
  static constexpr bool adapt_o = trains_v<lora<proj::o>, Recipe>;
  static constexpr bool need_dq = train_q || adapt_q || NeedsInputGrad;
  static constexpr bool need_dk = train_k || adapt_k || NeedsInputGrad;
  static constexpr bool need_dv = train_v || adapt_v || NeedsInputGrad;
  static constexpr bool need_da = need_dq || need_dk || need_dv;  // gradient of the input of Wo
  static constexpr bool active = need_da || train_o || adapt_o;    // any backward at all
  // What forward keeps, and why.
  static constexpr bool save_h = train_q || train_k || train_v || adapt_q || adapt_k || adapt_v;  // dW = dy^T h, dA
  static constexpr bool save_q = need_dk;                        // dk = dS^T q
  static constexpr bool save_k = need_dq;                        // dq = dS k
  static constexpr bool save_v = need_dq || need_dk;             // dP = da v^T
  static constexpr bool save_probs = need_da;                    // dv = P^T da, dS from P
  static constexpr bool save_a = train_o || adapt_o;             // dWo = dout^T a, dA_o
};

// Gradients of the trainable projections only; the same type whether or not dh is wanted.
template <class T, class Recipe>
struct attention_grads : members::optional_q_proj<trains_v<proj::q, Recipe>, linear_weights<T>>,
                         members::optional_k_proj<trains_v<proj::k, Recipe>, linear_weights<T>>,
                         members::optional_v_proj<trains_v<proj::v, Recipe>, linear_weights<T>>,
                         members::optional_o_proj<trains_v<proj::o, Recipe>, linear_weights<T>>,
                         members::optional_q_lora<trains_v<lora<proj::q>, Recipe>, lora_factors<T>>,
                         members::optional_k_lora<trains_v<lora<proj::k>, Recipe>, lora_factors<T>>,
                         members::optional_v_lora<trains_v<lora<proj::v>, Recipe>, lora_factors<T>>,
                         members::optional_o_lora<trains_v<lora<proj::o>, Recipe>, lora_factors<T>> {};

namespace detail {
template <class T>
using strided_map =
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
using const_strided_map = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
                                     Eigen::Unaligned, Eigen::OuterStride<>>;

// Rows of one head inside a [batch, seq, heads * hd] tensor.
inline std::size_t head_offset(int b, int head, int seq, int heads, int hd) {
  return (static_cast<std::size_t>(b) * seq * heads + static_cast<std::size_t>(head)) * hd;
}
template <class T>
strided_map<T> head_view(T* base, int b, int head, int seq, int heads, int hd) {
  return {base + head_offset(b, head, seq, heads, hd), seq, hd, Eigen::OuterStride<>(heads * hd)};
}
template <class T>
const_strided_map<T> head_view(const T* base, int b, int head, int seq, int heads, int hd) {
  return {base + head_offset(b, head, seq, heads, hd), seq, hd, Eigen::OuterStride<>(heads * hd)};
}

// In-place causal softmax of a seq x seq block of scores.
template <class T, class M>
void causal_softmax(M& p) {
  const Eigen::Index n = p.rows();
  for (Eigen::Index i = 0; i < n; ++i) {
    T mx = p(i, 0);
    for (Eigen::Index j = 1; j <= i; ++j) mx = std::max(mx, p(i, j));
    T sum = 0;
    for (Eigen::Index j = 0; j <= i; ++j) {
      p(i, j) = std::exp(p(i, j) - mx);
      sum += p(i, j);
    }
    const T inv = T(1) / sum;
    for (Eigen::Index j = 0; j <= i; ++j) p(i, j) *= inv;
    for (Eigen::Index j = i + 1; j < n; ++j) p(i, j) = T(0);
  }
}

// In-place softmax of every row (bidirectional attention).
template <class T, class M>
void full_softmax(M& p) {
  const Eigen::Index n = p.rows(), m = p.cols();
  for (Eigen::Index i = 0; i < n; ++i) {
    T mx = p(i, 0);
    for (Eigen::Index j = 1; j < m; ++j) mx = std::max(mx, p(i, j));
    T sum = 0;
    for (Eigen::Index j = 0; j < m; ++j) {
      p(i, j) = std::exp(p(i, j) - mx);
      sum += p(i, j);
    }
    const T inv = T(1) / sum;
    for (Eigen::Index j = 0; j < m; ++j) p(i, j) *= inv;
  }
}
}  // namespace detail

template <class T, class Recipe, bool NeedsInputGrad>
struct causal_attention {
  using value_type = T;
  using weights_t = attention_weights<T>;
  using plan = attention_plan<Recipe, NeedsInputGrad>;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  struct saved_t : members::optional_h<plan::save_h, tensor<T>>,
                   members::optional_q<plan::save_q, tensor<T>>,
                   members::optional_k<plan::save_k, tensor<T>>,
                   members::optional_v<plan::save_v, tensor<T>>,
                   members::optional_probs<plan::save_probs, tensor<T>>,
                   members::optional_attn<plan::save_a, tensor<T>>,
                   members::optional_u_q<plan::adapt_q, tensor<T>>,
                   members::optional_u_k<plan::adapt_k, tensor<T>>,
                   members::optional_u_v<plan::adapt_v, tensor<T>>,
                   members::optional_u_o<plan::adapt_o, tensor<T>> {};
  using grads_t = attention_grads<T, Recipe>;

  decoder_config config;
  const rope_table<T>* table = nullptr;
  int first_pos = 0;

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    if constexpr (plan::train_q) g.q_proj = w.q_proj.like(memory_use::gradients);
    if constexpr (plan::train_k) g.k_proj = w.k_proj.like(memory_use::gradients);
    if constexpr (plan::train_v) g.v_proj = w.v_proj.like(memory_use::gradients);
    if constexpr (plan::train_o) g.o_proj = w.o_proj.like(memory_use::gradients);
    if constexpr (plan::adapt_q) g.q_lora = (require_lora(w.q_proj, "q_proj"), w.q_proj.lora.like(memory_use::gradients));
    if constexpr (plan::adapt_k) g.k_lora = (require_lora(w.k_proj, "k_proj"), w.k_proj.lora.like(memory_use::gradients));
    if constexpr (plan::adapt_v) g.v_lora = (require_lora(w.v_proj, "v_proj"), w.v_proj.lora.like(memory_use::gradients));
    if constexpr (plan::adapt_o) g.o_lora = (require_lora(w.o_proj, "o_proj"), w.o_proj.lora.like(memory_use::gradients));
    return g;
  }

  tensor<T> forward(const weights_t& w, const tensor<T>& h, saved_t& s) const {
    const auto& c = config;
    if (h.rank() != 3 || h.dim(2) != std::size_t(c.hidden))
      throw std::invalid_argument("skillgraft: attention input has shape " + h.shape().str() +
                                  ", expected [batch, seq, " + std::to_string(c.hidden) + "]");
    const int B = int(h.dim(0)), S = int(h.dim(1)), H = c.n_heads, KV = c.n_kv_heads, hd = c.head_dim;
    if (c.rotary) table->check_positions(first_pos, S);
    auto kept = [](bool keep) { return keep ? memory_use::saved_activations : memory_use::workspace; };

    tensor<T> q({std::size_t(B), std::size_t(S), std::size_t(c.q_dim())}, kept(plan::save_q));
    tensor<T> k({std::size_t(B), std::size_t(S), std::size_t(c.kv_dim())}, kept(plan::save_k));
    tensor<T> v({std::size_t(B), std::size_t(S), std::size_t(c.kv_dim())}, kept(plan::save_v));
    auto adapter_input = [&](bool adapt, const linear_weights<T>& p, const char* name) {
      if (!adapt) return tensor<T>();
      require_lora(p, name);
      return tensor<T>({std::size_t(B), std::size_t(S), p.lora.rank()}, memory_use::saved_activations);
    };
    tensor<T> uq = adapter_input(plan::adapt_q, w.q_proj, "q_proj"), uk = adapter_input(plan::adapt_k, w.k_proj, "k_proj"),
              uv = adapter_input(plan::adapt_v, w.v_proj, "v_proj"), uo = adapter_input(plan::adapt_o, w.o_proj, "o_proj");
    linear_forward(w.q_proj, h, q, plan::adapt_q ? &uq : nullptr);
    linear_forward(w.k_proj, h, k, plan::adapt_k ? &uk : nullptr);
    linear_forward(w.v_proj, h, v, plan::adapt_v ? &uv : nullptr);
    if (c.rotary) {
      rope_apply(*table, q.data(), B, S, H, first_pos, false);
      rope_apply(*table, k.data(), B, S, KV, first_pos, false);
    }

    tensor<T> a({std::size_t(B), std::size_t(S), std::size_t(c.q_dim())}, kept(plan::save_a));
    tensor<T> probs;
    if constexpr (plan::save_probs)
      probs = tensor<T>({std::size_t(B), std::size_t(H), std::size_t(S), std::size_t(S)}, memory_use::saved_activations);
    const T scale = T(1) / std::sqrt(T(hd));
    const int group = H / KV;
#pragma omp parallel
    {
      detail::row_matrix<T> scratch;
      if constexpr (!plan::save_probs) scratch.resize(S, S);
#pragma omp for collapse(2) schedule(static)
      for (int b = 0; b < B; ++b)
        for (int head = 0; head < H; ++head) {
          auto Q = detail::head_view(q.data(), b, head, S, H, hd);
          auto K = detail::head_view(k.data(), b, head / group, S, KV, hd);
          auto V = detail::head_view(v.data(), b, head / group, S, KV, hd);
          auto A = detail::head_view(a.data(), b, head, S, H, hd);
          T* pp = plan::save_probs ? probs.data() + (std::size_t(b) * H + std::size_t(head)) * S * S : scratch.data();
          Eigen::Map<detail::row_matrix<T>> P(pp, S, S);
          P.noalias() = (Q * K.transpose()) * scale;
          if (c.causal) detail::causal_softmax<T>(P);
          else detail::full_softmax<T>(P);
          A.noalias() = P * V;
        }
    }
    tensor<T> out({std::size_t(B), std::size_t(S), std::size_t(c.hidden)}, memory_use::workspace);
    linear_forward(w.o_proj, a, out, plan::adapt_o ? &uo : nullptr);

    if constexpr (plan::adapt_q) s.u_q = std::move(uq);
    if constexpr (plan::adapt_k) s.u_k = std::move(uk);
    if constexpr (plan::adapt_v) s.u_v = std::move(uv);
    if constexpr (plan::adapt_o) s.u_o = std::move(uo);
    if constexpr (plan::save_h) s.h = h.clone(memory_use::saved_activations);
    if constexpr (plan::save_q) s.q = std::move(q);
    if constexpr (plan::save_k) s.k = std::move(k);
    if constexpr (plan::save_v) s.v = std::move(v);
    if constexpr (plan::save_probs) s.probs = std::move(probs);
    if constexpr (plan::save_a) s.attn = std::move(a);
    return out;
  }

  // Returns dh when NeedsInputGrad, else an empty tensor.
  tensor<T> backward(const weights_t& w, const saved_t& s, const tensor<T>& dout, grads_t& g) const {
    const auto& c = config;
    const int B = int(dout.dim(0)), S = int(dout.dim(1)), H = c.n_heads, KV = c.n_kv_heads, hd = c.head_dim;
    if constexpr (plan::train_o) linear_backward_weight(s.attn, dout, g.o_proj);
    if constexpr (plan::adapt_o) lora_backward(w.o_proj, s.attn, s.u_o, dout, g.o_lora);
    if constexpr (!plan::need_da) {
      return {};
    } else {
      tensor<T> da({std::size_t(B), std::size_t(S), std::size_t(c.q_dim())}, memory_use::workspace);
      linear_backward_input(w.o_proj, dout, da, false);
      tensor<T> dq, dk, dv;
      if constexpr (plan::need_dq) dq = tensor<T>({std::size_t(B), std::size_t(S), std::size_t(c.q_dim())}, memory_use::workspace);
      if constexpr (plan::need_dk) dk = tensor<T>({std::size_t(B), std::size_t(S), std::size_t(c.kv_dim())}, memory_use::workspace);
      if constexpr (plan::need_dv) dv = tensor<T>({std::size_t(B), std::size_t(S), std::size_t(c.kv_dim())}, memory_use::workspace);
      const T scale = T(1) / std::sqrt(T(hd));
      const int group = H / KV;
      // One task per (batch, kv head): the query heads sharing a kv head add into the
      // same dk, dv rows, so they run in one task, in order, with no races.
#pragma omp parallel
      {
        detail::row_matrix<T> dP(S, S);
#pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; ++b)
          for (int kvh = 0; kvh < KV; ++kvh)
            for (int head = kvh * group; head < (kvh + 1) * group; ++head) {
              Eigen::Map<const detail::row_matrix<T>> P(s.probs.data() + (std::size_t(b) * H + std::size_t(head)) * S * S,
                                                       S, S);
              auto dA = detail::head_view(da.data(), b, head, S, H, hd);
              if constexpr (plan::need_dv) {
                auto dV = detail::head_view(dv.data(), b, kvh, S, KV, hd);
                dV.noalias() += P.transpose() * dA;
              }
              if constexpr (plan::need_dq || plan::need_dk) {
                auto V = detail::head_view(s.v.data(), b, kvh, S, KV, hd);
                dP.noalias() = dA * V.transpose();
                // dS = P * (dP - rowsum(dP * P)), stored over dP (row i sees keys 0..i, or all when not causal)
                for (int i = 0; i < S; ++i) {
                  const int seen = c.causal ? i + 1 : S;
                  T dot = 0;
                  for (int j = 0; j < seen; ++j) dot += dP(i, j) * P(i, j);
                  for (int j = 0; j < seen; ++j) dP(i, j) = P(i, j) * (dP(i, j) - dot);
                  for (int j = seen; j < S; ++j) dP(i, j) = T(0);
                }
                if constexpr (plan::need_dq) {
                  auto K = detail::head_view(s.k.data(), b, kvh, S, KV, hd);
                  auto dQ = detail::head_view(dq.data(), b, head, S, H, hd);
                  dQ.noalias() = (dP * K) * scale;
                }
                if constexpr (plan::need_dk) {
                  auto Q = detail::head_view(s.q.data(), b, head, S, H, hd);
                  auto dK = detail::head_view(dk.data(), b, kvh, S, KV, hd);
                  dK.noalias() += (dP.transpose() * Q) * scale;
                }
              }
            }
      }
      if constexpr (plan::need_dq)
        if (c.rotary) rope_apply(*table, dq.data(), B, S, H, first_pos, true);
      if constexpr (plan::need_dk)
        if (c.rotary) rope_apply(*table, dk.data(), B, S, KV, first_pos, true);
      if constexpr (plan::train_q) linear_backward_weight(s.h, dq, g.q_proj);
      if constexpr (plan::train_k) linear_backward_weight(s.h, dk, g.k_proj);
      if constexpr (plan::train_v) linear_backward_weight(s.h, dv, g.v_proj);
      if constexpr (plan::adapt_q) lora_backward(w.q_proj, s.h, s.u_q, dq, g.q_lora);
      if constexpr (plan::adapt_k) lora_backward(w.k_proj, s.h, s.u_k, dk, g.k_lora);
      if constexpr (plan::adapt_v) lora_backward(w.v_proj, s.h, s.u_v, dv, g.v_lora);
      if constexpr (NeedsInputGrad) {
        tensor<T> dh({std::size_t(B), std::size_t(S), std::size_t(c.hidden)}, memory_use::workspace);
        linear_backward_input(w.q_proj, dq, dh, false);
        linear_backward_input(w.k_proj, dk, dh, true);
        linear_backward_input(w.v_proj, dv, dh, true);
        return dh;
      } else {
        return {};
      }
    }
  }

  // Per projection: base weight (and bias), then its adapter, as for_each_parameter orders them.
  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    auto both = [&](const char* name, linear_weights<T>& p, linear_weights<T>& dp) {
      f(std::string(name) + ".weight", p.weight, dp.weight);
      if (p.has_bias()) f(std::string(name) + ".bias", p.bias, dp.bias);
    };
    auto factors = [&](const char* name, linear_weights<T>& p, lora_factors<T>& dp) {
      f(std::string(name) + ".lora_A.weight", p.lora.A, dp.A);
      f(std::string(name) + ".lora_B.weight", p.lora.B, dp.B);
    };
    if constexpr (plan::train_q) both("q_proj", w.q_proj, g.q_proj);
    if constexpr (plan::adapt_q) factors("q_proj", w.q_proj, g.q_lora);
    if constexpr (plan::train_k) both("k_proj", w.k_proj, g.k_proj);
    if constexpr (plan::adapt_k) factors("k_proj", w.k_proj, g.k_lora);
    if constexpr (plan::train_v) both("v_proj", w.v_proj, g.v_proj);
    if constexpr (plan::adapt_v) factors("v_proj", w.v_proj, g.v_lora);
    if constexpr (plan::train_o) both("o_proj", w.o_proj, g.o_proj);
    if constexpr (plan::adapt_o) factors("o_proj", w.o_proj, g.o_lora);
  }

};

}  // namespace skillgraft::nn
