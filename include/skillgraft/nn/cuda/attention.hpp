#pragma once
// Causal grouped-query self-attention on the CUDA backend (LLaMA / Qwen2).
//
// With config.causal = false every position sees every other, and with config.rotary = false
// q and k are not rotated (the vision encoder's attention), as on the CPU.
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
// The per-head products are strided-batched GEMMs straight on the [batch, seq, heads * hd]
// layout (no transposes): for batch b and group member g, the query heads kvh * group + g,
// kvh in [0, KV), are KV matrices group * hd apart, and their kv heads KV matrices hd apart.
// The plan (which branches exist, what forward keeps) is the CPU one: nn::attention_plan.
#include <limits>

#include "skillgraft/nn/attention.hpp"
#include "skillgraft/nn/cuda/rope.hpp"

namespace skillgraft::nn::cuda {

template <class T>
struct attention_weights {
  linear_weights<T> q_proj, k_proj, v_proj, o_proj;

  attention_weights() = default;
  attention_weights(const decoder_config& c, memory_use use)
      : q_proj(std::size_t(c.q_dim()), std::size_t(c.hidden), c.attention_bias, use),
        k_proj(std::size_t(c.kv_dim()), std::size_t(c.hidden), c.attention_bias, use),
        v_proj(std::size_t(c.kv_dim()), std::size_t(c.hidden), c.attention_bias, use),
        o_proj(std::size_t(c.hidden), std::size_t(c.q_dim()), false, use) {}
  std::size_t elements() const { return q_proj.elements() + k_proj.elements() + v_proj.elements() + o_proj.elements(); }
};

template <class T, class Recipe>
struct attention_grads : members::optional_q_proj<trains_v<proj::q, Recipe>, linear_weights<T>>,
                         members::optional_k_proj<trains_v<proj::k, Recipe>, linear_weights<T>>,
                         members::optional_v_proj<trains_v<proj::v, Recipe>, linear_weights<T>>,
                         members::optional_o_proj<trains_v<proj::o, Recipe>, linear_weights<T>> {};

namespace kernels {
// Row r of the scores is query position i = r % S; it sees keys j <= i (all keys when not causal).
struct sees {
  index_t S;
  bool causal;
  SKILLGRAFT_HD bool operator()(index_t row, index_t j) const { return !causal || j <= row % S; }
};
template <class T>
struct masked_score {  // element (row, j) of the scores, -inf where masked
  const T* p;
  sees mask;
  SKILLGRAFT_HD T operator()(index_t row, index_t j) const {
    return mask(row, j) ? p[row * mask.S + j] : -std::numeric_limits<T>::infinity();
  }
};
template <class T>
struct masked_exp {  // exp(p - max) where seen
  const T* p;
  const T* mx;
  sees mask;
  SKILLGRAFT_HD T operator()(index_t row, index_t j) const {
    return mask(row, j) ? skillgraft::cuda::exp_(p[row * mask.S + j] - mx[row]) : T(0);
  }
};
template <class T>
struct softmax_normalise {  // p = exp(p - max) / sum where seen, else 0
  T* p;
  const T* mx;
  const T* sum;
  sees mask;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t row = e / mask.S, j = e % mask.S;
    p[e] = mask(row, j) ? skillgraft::cuda::exp_(p[e] - mx[row]) * (T(1) / sum[row]) : T(0);
  }
};
template <class T>
struct masked_dot {  // element (row, j): dP * P where seen
  const T* dp;
  const T* p;
  sees mask;
  SKILLGRAFT_HD T operator()(index_t row, index_t j) const {
    return mask(row, j) ? dp[row * mask.S + j] * p[row * mask.S + j] : T(0);
  }
};
template <class T>
struct softmax_backward {  // dS = P * (dP - dot) where seen, else 0; stored over dP
  T* dp;
  const T* p;
  const T* dot;
  sees mask;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t row = e / mask.S, j = e % mask.S;
    dp[e] = mask(row, j) ? p[e] * (dp[e] - dot[row]) : T(0);
  }
};
}  // namespace kernels

// In-place softmax of `rows` rows of length S: P = softmax(scores + mask).
template <class T>
void masked_softmax(T* p, index_t rows, index_t S, bool causal) {
  const kernels::sees mask{S, causal};
  tensor<T> mx({std::size_t(rows)}, memory_use::workspace), sum({std::size_t(rows)}, memory_use::workspace);
  skillgraft::cuda::segmented_reduce(rows, S, kernels::masked_score<T>{p, mask}, mx.data(), skillgraft::cuda::maximum<T>());
  skillgraft::cuda::segmented_sum(rows, S, kernels::masked_exp<T>{p, mx.data(), mask}, sum.data());
  skillgraft::cuda::for_each_index(rows * S, kernels::softmax_normalise<T>{p, mx.data(), sum.data(), mask});
}

// dS = P * (dP - rowsum(dP * P)), in place over dP.
template <class T>
void masked_softmax_backward(T* dp, const T* p, index_t rows, index_t S, bool causal) {
  const kernels::sees mask{S, causal};
  tensor<T> dot({std::size_t(rows)}, memory_use::workspace);
  skillgraft::cuda::segmented_sum(rows, S, kernels::masked_dot<T>{dp, p, mask}, dot.data());
  skillgraft::cuda::for_each_index(rows * S, kernels::softmax_backward<T>{dp, p, dot.data(), mask});
}

// decoder_config's attention options (`causal`, `rotary`: the vision encoder's bidirectional,
// unrotated attention), read where the config has them; a decoder's are both true.
template <class C>
bool is_causal(const C& c) {
  if constexpr (requires { c.causal; }) return c.causal;
  else return true;
}
template <class C>
bool uses_rotary(const C& c) {
  if constexpr (requires { c.rotary; }) return c.rotary;
  else return true;
}

// Where the matrices of one strided-batched call start and how far apart they are:
// batch b, group member g; the batch runs over the KV kv heads.
struct head_batch {
  int B, S, H, KV, hd;
  int group() const { return H / KV; }
  // rows of query head kvh * group + g in [B, S, H * hd]: ld H * hd, stride group * hd
  long long q_offset(int b, int g) const { return (static_cast<long long>(b) * S * H + g) * hd; }
  int q_ld() const { return H * hd; }
  long long q_stride() const { return static_cast<long long>(group()) * hd; }
  // rows of kv head kvh in [B, S, KV * hd]: ld KV * hd, stride hd
  long long kv_offset(int b) const { return static_cast<long long>(b) * S * KV * hd; }
  int kv_ld() const { return KV * hd; }
  long long kv_stride() const { return hd; }
  // scores of head kvh * group + g in [B, H, S, S]: ld S, stride group * S * S
  long long p_offset(int b, int g) const { return (static_cast<long long>(b) * H + g) * S * S; }
  long long p_stride() const { return static_cast<long long>(group()) * S * S; }
};

template <class T, class Recipe, bool NeedsInputGrad>
struct causal_attention {
  static_assert(!(attention_plan<Recipe, NeedsInputGrad>::adapt_q || attention_plan<Recipe, NeedsInputGrad>::adapt_k ||
                  attention_plan<Recipe, NeedsInputGrad>::adapt_v || attention_plan<Recipe, NeedsInputGrad>::adapt_o),
                "skillgraft: LoRA adapters (lora<P> tags) are not implemented on the CUDA backend yet");
  using value_type = T;
  using weights_t = attention_weights<T>;
  using plan = attention_plan<Recipe, NeedsInputGrad>;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  struct saved_t : members::optional_h<plan::save_h, tensor<T>>,
                   members::optional_q<plan::save_q, tensor<T>>,
                   members::optional_k<plan::save_k, tensor<T>>,
                   members::optional_v<plan::save_v, tensor<T>>,
                   members::optional_probs<plan::save_probs, tensor<T>>,
                   members::optional_attn<plan::save_a, tensor<T>> {};
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
    return g;
  }

  tensor<T> forward(const weights_t& w, const tensor<T>& h, saved_t& s) const {
    using skillgraft::cuda::gemm_strided_batched;
    const auto& c = config;
    if (h.rank() != 3 || h.dim(2) != std::size_t(c.hidden))
      throw std::invalid_argument("skillgraft: attention input has shape " + h.shape().str() + ", expected [batch, seq, " +
                                  std::to_string(c.hidden) + "]");
    const int B = int(h.dim(0)), S = int(h.dim(1)), H = c.n_heads, KV = c.n_kv_heads, hd = c.head_dim;
    const bool rotary = uses_rotary(c);
    if (rotary) table->check_positions(first_pos, S);
    const head_batch hb{B, S, H, KV, hd};
    auto kept = [](bool keep) { return keep ? memory_use::saved_activations : memory_use::workspace; };

    tensor<T> q({std::size_t(B), std::size_t(S), std::size_t(c.q_dim())}, kept(plan::save_q));
    tensor<T> k({std::size_t(B), std::size_t(S), std::size_t(c.kv_dim())}, kept(plan::save_k));
    tensor<T> v({std::size_t(B), std::size_t(S), std::size_t(c.kv_dim())}, kept(plan::save_v));
    linear_forward(w.q_proj, h, q, "q_proj: q = h Wq^T");
    linear_forward(w.k_proj, h, k, "k_proj: k = h Wk^T");
    linear_forward(w.v_proj, h, v, "v_proj: v = h Wv^T");
    if (rotary) {
      rope_apply(*table, q.data(), B, S, H, first_pos, false);
      rope_apply(*table, k.data(), B, S, KV, first_pos, false);
    }

    tensor<T> a({std::size_t(B), std::size_t(S), std::size_t(c.q_dim())}, kept(plan::save_a));
    tensor<T> probs({std::size_t(B), std::size_t(H), std::size_t(S), std::size_t(S)}, kept(plan::save_probs));
    const T scale = T(1) / std::sqrt(T(hd));
    for (int b = 0; b < B; ++b)
      for (int g = 0; g < hb.group(); ++g)  // P = q k^T / sqrt(hd)
        gemm_strided_batched("attention scores: P = q k^T / sqrt(hd)", op::n, op::t, S, S, hd, scale,
                             q.data() + hb.q_offset(b, g), hb.q_ld(), hb.q_stride(), k.data() + hb.kv_offset(b),
                             hb.kv_ld(), hb.kv_stride(), T(0), probs.data() + hb.p_offset(b, g), S, hb.p_stride(), KV);
    masked_softmax(probs.data(), index_t(B) * H * S, S, is_causal(c));
    for (int b = 0; b < B; ++b)
      for (int g = 0; g < hb.group(); ++g)  // a = P v
        gemm_strided_batched("attention output: a = P v", op::n, op::n, S, hd, S, T(1), probs.data() + hb.p_offset(b, g),
                             S, hb.p_stride(), v.data() + hb.kv_offset(b), hb.kv_ld(), hb.kv_stride(), T(0),
                             a.data() + hb.q_offset(b, g), hb.q_ld(), hb.q_stride(), KV);
    tensor<T> out({std::size_t(B), std::size_t(S), std::size_t(c.hidden)}, memory_use::workspace);
    linear_forward(w.o_proj, a, out, "o_proj: out = a Wo^T");

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
    using skillgraft::cuda::gemm_strided_batched;
    const auto& c = config;
    const int B = int(dout.dim(0)), S = int(dout.dim(1)), H = c.n_heads, KV = c.n_kv_heads, hd = c.head_dim;
    const head_batch hb{B, S, H, KV, hd};
    if constexpr (plan::train_o) linear_backward_weight(s.attn, dout, g.o_proj, "o_proj: dWo += dout^T a");
    if constexpr (!plan::need_da) {
      return {};
    } else {
      tensor<T> da({std::size_t(B), std::size_t(S), std::size_t(c.q_dim())}, memory_use::workspace);
      linear_backward_input(w.o_proj, dout, da, false, "o_proj: da = dout Wo");
      tensor<T> dq, dk, dv, dp;
      if constexpr (plan::need_dq) dq = tensor<T>({std::size_t(B), std::size_t(S), std::size_t(c.q_dim())}, memory_use::workspace);
      if constexpr (plan::need_dk) dk = tensor<T>({std::size_t(B), std::size_t(S), std::size_t(c.kv_dim())}, memory_use::workspace);
      if constexpr (plan::need_dv) dv = tensor<T>({std::size_t(B), std::size_t(S), std::size_t(c.kv_dim())}, memory_use::workspace);
      const T scale = T(1) / std::sqrt(T(hd));
      if constexpr (plan::need_dv)
        for (int b = 0; b < B; ++b)
          for (int g = 0; g < hb.group(); ++g)  // dv += P^T da (the group's query heads add in order)
            gemm_strided_batched("attention: dv += P^T da", op::t, op::n, S, hd, S, T(1), s.probs.data() + hb.p_offset(b, g),
                                 S, hb.p_stride(), da.data() + hb.q_offset(b, g), hb.q_ld(), hb.q_stride(), T(1),
                                 dv.data() + hb.kv_offset(b), hb.kv_ld(), hb.kv_stride(), KV);
      if constexpr (plan::need_dq || plan::need_dk) {
        dp = tensor<T>({std::size_t(B), std::size_t(H), std::size_t(S), std::size_t(S)}, memory_use::workspace);
        for (int b = 0; b < B; ++b)
          for (int g = 0; g < hb.group(); ++g)  // dP = da v^T
            gemm_strided_batched("attention: dP = da v^T", op::n, op::t, S, S, hd, T(1), da.data() + hb.q_offset(b, g),
                                 hb.q_ld(), hb.q_stride(), s.v.data() + hb.kv_offset(b), hb.kv_ld(), hb.kv_stride(), T(0),
                                 dp.data() + hb.p_offset(b, g), S, hb.p_stride(), KV);
        masked_softmax_backward(dp.data(), s.probs.data(), index_t(B) * H * S, S, is_causal(c));  // dS, over dP
        for (int b = 0; b < B; ++b)
          for (int g = 0; g < hb.group(); ++g) {
            if constexpr (plan::need_dq)  // dq = dS k / sqrt(hd)
              gemm_strided_batched("attention: dq = dS k / sqrt(hd)", op::n, op::n, S, hd, S, scale,
                                   dp.data() + hb.p_offset(b, g), S, hb.p_stride(), s.k.data() + hb.kv_offset(b),
                                   hb.kv_ld(), hb.kv_stride(), T(0), dq.data() + hb.q_offset(b, g), hb.q_ld(),
                                   hb.q_stride(), KV);
            if constexpr (plan::need_dk)  // dk += dS^T q / sqrt(hd)
              gemm_strided_batched("attention: dk += dS^T q / sqrt(hd)", op::t, op::n, S, hd, S, scale,
                                   dp.data() + hb.p_offset(b, g), S, hb.p_stride(), s.q.data() + hb.q_offset(b, g),
                                   hb.q_ld(), hb.q_stride(), T(1), dk.data() + hb.kv_offset(b), hb.kv_ld(),
                                   hb.kv_stride(), KV);
          }
      }
      if constexpr (plan::need_dq)
        if (uses_rotary(c)) rope_apply(*table, dq.data(), B, S, H, first_pos, true);
      if constexpr (plan::need_dk)
        if (uses_rotary(c)) rope_apply(*table, dk.data(), B, S, KV, first_pos, true);
      if constexpr (plan::train_q) linear_backward_weight(s.h, dq, g.q_proj, "q_proj: dWq += dq^T h");
      if constexpr (plan::train_k) linear_backward_weight(s.h, dk, g.k_proj, "k_proj: dWk += dk^T h");
      if constexpr (plan::train_v) linear_backward_weight(s.h, dv, g.v_proj, "v_proj: dWv += dv^T h");
      if constexpr (NeedsInputGrad) {
        tensor<T> dh({std::size_t(B), std::size_t(S), std::size_t(c.hidden)}, memory_use::workspace);
        linear_backward_input(w.q_proj, dq, dh, false, "q_proj: dh = dq Wq");
        linear_backward_input(w.k_proj, dk, dh, true, "k_proj: dh += dk Wk");
        linear_backward_input(w.v_proj, dv, dh, true, "v_proj: dh += dv Wv");
        return dh;
      } else {
        return {};
      }
    }
  }

  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    if constexpr (plan::train_q) visit_linear("q_proj", w.q_proj, g.q_proj, f);
    if constexpr (plan::train_k) visit_linear("k_proj", w.k_proj, g.k_proj, f);
    if constexpr (plan::train_v) visit_linear("v_proj", w.v_proj, g.v_proj, f);
    if constexpr (plan::train_o) visit_linear("o_proj", w.o_proj, g.o_proj, f);
  }
};

}  // namespace skillgraft::nn::cuda
