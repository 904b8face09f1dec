#pragma once
// The attention core on the CUDA backend (math in nn/attention.hpp): the head GEMMs as strided
// batched cuBLAS calls over the KV heads (one call per batch and group member), the masked row
// softmax and its backward as segmented reductions. The scores [batch, heads, seq, seq] always
// exist here (a workspace buffer when backward does not keep them).
#include <limits>

#include "skillgraft/backend/attention_dims.hpp"
#include "skillgraft/backend/cuda/algorithms.hpp"
#include "skillgraft/backend/cuda/gemm.hpp"
#include "skillgraft/backend/cuda/tensor.hpp"

namespace skillgraft::cuda {

namespace kernels {
// Which scores a row sees. Training: row r of the [.., S, S] scores is query position i = r % S;
// it sees keys j <= i (all keys when not causal).
struct sees {
  index_t S;
  bool causal;
  SKILLGRAFT_HD bool operator()(index_t row, index_t j) const { return !causal || j <= row % S; }
};
// The masked row softmax and its backward over rows of length `len`, for a mask as above.
template <class T, class Mask>
struct masked_score {  // element (row, j) of the scores, -inf where masked
  const T* p;
  index_t len;
  Mask mask;
  SKILLGRAFT_HD T operator()(index_t row, index_t j) const {
    return mask(row, j) ? p[row * len + j] : -std::numeric_limits<T>::infinity();
  }
};
template <class T, class Mask>
struct masked_exp {  // exp(p - max) where seen
  const T* p;
  const T* mx;
  index_t len;
  Mask mask;
  SKILLGRAFT_HD T operator()(index_t row, index_t j) const { return mask(row, j) ? exp_(p[row * len + j] - mx[row]) : T(0); }
};
template <class T, class Mask>
struct softmax_normalise {  // p = exp(p - max) / sum where seen, else 0
  T* p;
  const T* mx;
  const T* sum;
  index_t len;
  Mask mask;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t row = e / len, j = e % len;
    p[e] = mask(row, j) ? exp_(p[e] - mx[row]) * (T(1) / sum[row]) : T(0);
  }
};
template <class T, class Mask>
struct masked_dot {  // element (row, j): dP * P where seen
  const T* dp;
  const T* p;
  index_t len;
  Mask mask;
  SKILLGRAFT_HD T operator()(index_t row, index_t j) const {
    return mask(row, j) ? dp[row * len + j] * p[row * len + j] : T(0);
  }
};
template <class T, class Mask>
struct softmax_backward {  // dS = P * (dP - dot) where seen, else 0; stored over dP
  T* dp;
  const T* p;
  const T* dot;
  index_t len;
  Mask mask;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t row = e / len, j = e % len;
    dp[e] = mask(row, j) ? p[e] * (dp[e] - dot[row]) : T(0);
  }
};
}  // namespace kernels

// In-place softmax of `rows` rows of length len: P = softmax(scores + mask).
template <class T, class Mask>
void masked_softmax(T* p, index_t rows, index_t len, Mask mask) {
  tensor<T> mx({std::size_t(rows)}, memory_use::workspace), sum({std::size_t(rows)}, memory_use::workspace);
  segmented_reduce(rows, len, kernels::masked_score<T, Mask>{p, len, mask}, mx.data(), maximum<T>());
  segmented_sum(rows, len, kernels::masked_exp<T, Mask>{p, mx.data(), len, mask}, sum.data());
  for_each_index(rows * len, kernels::softmax_normalise<T, Mask>{p, mx.data(), sum.data(), len, mask});
}

// dS = P * (dP - rowsum(dP * P)), in place over dP.
template <class T, class Mask>
void masked_softmax_backward(T* dp, const T* p, index_t rows, index_t len, Mask mask) {
  tensor<T> dot({std::size_t(rows)}, memory_use::workspace);
  segmented_sum(rows, len, kernels::masked_dot<T, Mask>{dp, p, len, mask}, dot.data());
  for_each_index(rows * len, kernels::softmax_backward<T, Mask>{dp, p, dot.data(), len, mask});
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

struct attention_ops {
  template <class T>
  static void attention_forward(const attention_dims& d, T scale, const tensor<T>& q, const tensor<T>& k,
                                const tensor<T>& v, tensor<T>& a, tensor<T>* probs) {
    const int S = d.seq, hd = d.head_dim;
    const head_batch hb{d.batch, S, d.heads, d.kv_heads, hd};
    tensor<T> scratch;
    if (!probs)
      scratch = tensor<T>({std::size_t(d.batch), std::size_t(d.heads), std::size_t(S), std::size_t(S)},
                          memory_use::workspace);
    T* p = probs ? probs->data() : scratch.data();
    for (int b = 0; b < d.batch; ++b)
      for (int g = 0; g < hb.group(); ++g)  // P = q k^T scale
        gemm_ops::gemm_strided_batched("attention scores: P = q k^T / sqrt(hd)", op::n, op::t, S, S, hd, scale,
                             q.data() + hb.q_offset(b, g), hb.q_ld(), hb.q_stride(), k.data() + hb.kv_offset(b),
                             hb.kv_ld(), hb.kv_stride(), T(0), p + hb.p_offset(b, g), S, hb.p_stride(), d.kv_heads);
    masked_softmax(p, index_t(d.batch) * d.heads * S, S, kernels::sees{S, d.causal});
    for (int b = 0; b < d.batch; ++b)
      for (int g = 0; g < hb.group(); ++g)  // a = P v
        gemm_ops::gemm_strided_batched("attention output: a = P v", op::n, op::n, S, hd, S, T(1), p + hb.p_offset(b, g), S,
                             hb.p_stride(), v.data() + hb.kv_offset(b), hb.kv_ld(), hb.kv_stride(), T(0),
                             a.data() + hb.q_offset(b, g), hb.q_ld(), hb.q_stride(), d.kv_heads);
  }

  template <class T>
  static void attention_backward(const attention_dims& d, T scale, const tensor<T>& probs, const tensor<T>* q,
                                 const tensor<T>* k, const tensor<T>* v, const tensor<T>& da, tensor<T>* dq,
                                 tensor<T>* dk, tensor<T>* dv) {
    const int S = d.seq, hd = d.head_dim, KV = d.kv_heads;
    const head_batch hb{d.batch, S, d.heads, KV, hd};
    if (dv)
      for (int b = 0; b < d.batch; ++b)
        for (int g = 0; g < hb.group(); ++g)  // dv += P^T da (the group's query heads add in order)
          gemm_ops::gemm_strided_batched("attention: dv += P^T da", op::t, op::n, S, hd, S, T(1), probs.data() + hb.p_offset(b, g),
                               S, hb.p_stride(), da.data() + hb.q_offset(b, g), hb.q_ld(), hb.q_stride(), T(1),
                               dv->data() + hb.kv_offset(b), hb.kv_ld(), hb.kv_stride(), KV);
    if (!dq && !dk) return;
    tensor<T> dp({std::size_t(d.batch), std::size_t(d.heads), std::size_t(S), std::size_t(S)}, memory_use::workspace);
    for (int b = 0; b < d.batch; ++b)
      for (int g = 0; g < hb.group(); ++g)  // dP = da v^T
        gemm_ops::gemm_strided_batched("attention: dP = da v^T", op::n, op::t, S, S, hd, T(1), da.data() + hb.q_offset(b, g),
                             hb.q_ld(), hb.q_stride(), v->data() + hb.kv_offset(b), hb.kv_ld(), hb.kv_stride(), T(0),
                             dp.data() + hb.p_offset(b, g), S, hb.p_stride(), KV);
    masked_softmax_backward(dp.data(), probs.data(), index_t(d.batch) * d.heads * S, S, kernels::sees{S, d.causal});  // dS, over dP
    for (int b = 0; b < d.batch; ++b)
      for (int g = 0; g < hb.group(); ++g) {
        if (dq)  // dq = dS k scale
          gemm_ops::gemm_strided_batched("attention: dq = dS k / sqrt(hd)", op::n, op::n, S, hd, S, scale,
                               dp.data() + hb.p_offset(b, g), S, hb.p_stride(), k->data() + hb.kv_offset(b), hb.kv_ld(),
                               hb.kv_stride(), T(0), dq->data() + hb.q_offset(b, g), hb.q_ld(), hb.q_stride(), KV);
        if (dk)  // dk += dS^T q scale
          gemm_ops::gemm_strided_batched("attention: dk += dS^T q / sqrt(hd)", op::t, op::n, S, hd, S, scale,
                               dp.data() + hb.p_offset(b, g), S, hb.p_stride(), q->data() + hb.q_offset(b, g), hb.q_ld(),
                               hb.q_stride(), T(1), dk->data() + hb.kv_offset(b), hb.kv_ld(), hb.kv_stride(), KV);
      }
  }
};

}  // namespace skillgraft::cuda
