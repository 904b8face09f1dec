#pragma once
// The attention core on the CPU (math in nn/attention.hpp): one OpenMP task per (batch, head)
// forward and per (batch, kv head) backward, each a few Eigen GEMMs on strided head views and
// a row softmax, so the scores of one head stay in cache. When the scores are not kept for
// backward, each thread reuses one seq x seq scratch instead of holding [batch, heads, seq, seq].
#include <algorithm>
#include <cmath>

#include "skillgraft/backend/attention_dims.hpp"
#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::cpu {

namespace attention_detail {
template <class T>
using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using strided_map = Eigen::Map<row_matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using const_strided_map = Eigen::Map<const row_matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

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

// In-place softmax of each row of a seq x seq block; row i sees keys 0..i when causal.
template <class T, class M>
void softmax_rows(M& p, bool causal) {
  const Eigen::Index n = p.rows(), m = p.cols();
  for (Eigen::Index i = 0; i < n; ++i) {
    const Eigen::Index seen = causal ? i + 1 : m;
    T mx = p(i, 0);
    for (Eigen::Index j = 1; j < seen; ++j) mx = std::max(mx, p(i, j));
    T sum = 0;
    for (Eigen::Index j = 0; j < seen; ++j) {
      p(i, j) = std::exp(p(i, j) - mx);
      sum += p(i, j);
    }
    const T inv = T(1) / sum;
    for (Eigen::Index j = 0; j < seen; ++j) p(i, j) *= inv;
    for (Eigen::Index j = seen; j < m; ++j) p(i, j) = T(0);
  }
}
}  // namespace attention_detail

struct attention_ops {
  // a = softmax(q k^T scale + mask) v per head; the scores P go to probs [batch, heads, seq, seq]
  // when it is non-null.
  template <class T>
  static void attention_forward(const attention_dims& d, T scale, const tensor<T>& q, const tensor<T>& k,
                                const tensor<T>& v, tensor<T>& a, tensor<T>* probs) {
    using namespace attention_detail;
    const int B = d.batch, S = d.seq, H = d.heads, KV = d.kv_heads, hd = d.head_dim, group = d.group();
    const bool keep = probs != nullptr;
#pragma omp parallel
    {
      row_matrix<T> scratch;
      if (!keep) scratch.resize(S, S);
#pragma omp for collapse(2) schedule(static)
      for (int b = 0; b < B; ++b)
        for (int head = 0; head < H; ++head) {
          auto Q = head_view(q.data(), b, head, S, H, hd);
          auto K = head_view(k.data(), b, head / group, S, KV, hd);
          auto V = head_view(v.data(), b, head / group, S, KV, hd);
          auto A = head_view(a.data(), b, head, S, H, hd);
          T* pp = keep ? probs->data() + (std::size_t(b) * H + std::size_t(head)) * S * S : scratch.data();
          Eigen::Map<row_matrix<T>> P(pp, S, S);
          P.noalias() = (Q * K.transpose()) * scale;
          softmax_rows<T>(P, d.causal);
          A.noalias() = P * V;
        }
    }
  }

  // From da (the gradient of a): dv += P^T da when dv is non-null; with dS = P * (dP - rowsum(dP * P)),
  // dP = da v^T: dq = dS k scale when dq is non-null, dk += dS^T q scale when dk is non-null.
  // q is read only for dk, k only for dq, v only for dq or dk.
  template <class T>
  static void attention_backward(const attention_dims& d, T scale, const tensor<T>& probs, const tensor<T>* q,
                                 const tensor<T>* k, const tensor<T>* v, const tensor<T>& da, tensor<T>* dq,
                                 tensor<T>* dk, tensor<T>* dv) {
    using namespace attention_detail;
    const int B = d.batch, S = d.seq, H = d.heads, KV = d.kv_heads, hd = d.head_dim, group = d.group();
    const bool need_ds = dq || dk;
    // One task per (batch, kv head): the query heads sharing a kv head add into the same dk, dv
    // rows, so they run in one task, in order, with no races.
#pragma omp parallel
    {
      row_matrix<T> dP(need_ds ? S : 0, need_ds ? S : 0);
#pragma omp for collapse(2) schedule(static)
      for (int b = 0; b < B; ++b)
        for (int kvh = 0; kvh < KV; ++kvh)
          for (int head = kvh * group; head < (kvh + 1) * group; ++head) {
            Eigen::Map<const row_matrix<T>> P(probs.data() + (std::size_t(b) * H + std::size_t(head)) * S * S, S, S);
            auto dA = head_view(da.data(), b, head, S, H, hd);
            if (dv) {
              auto dV = head_view(dv->data(), b, kvh, S, KV, hd);
              dV.noalias() += P.transpose() * dA;
            }
            if (!need_ds) continue;
            auto V = head_view(v->data(), b, kvh, S, KV, hd);
            dP.noalias() = dA * V.transpose();
            // dS = P * (dP - rowsum(dP * P)), stored over dP (row i sees keys 0..i, or all when not causal)
            for (int i = 0; i < S; ++i) {
              const int seen = d.causal ? i + 1 : S;
              T dot = 0;
              for (int j = 0; j < seen; ++j) dot += dP(i, j) * P(i, j);
              for (int j = 0; j < seen; ++j) dP(i, j) = P(i, j) * (dP(i, j) - dot);
              for (int j = seen; j < S; ++j) dP(i, j) = T(0);
            }
            if (dq) {
              auto K = head_view(k->data(), b, kvh, S, KV, hd);
              auto dQ = head_view(dq->data(), b, head, S, H, hd);
              dQ.noalias() = (dP * K) * scale;
            }
            if (dk) {
              auto Q = head_view(q->data(), b, head, S, H, hd);
              auto dK = head_view(dk->data(), b, kvh, S, KV, hd);
              dK.noalias() += (dP.transpose() * Q) * scale;
            }
          }
    }
  }
};

}  // namespace skillgraft::cpu
