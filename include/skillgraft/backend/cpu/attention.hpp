#pragma once
// The attention core on the CPU (math in nn/attention.hpp): one OpenMP task per (batch, head)
// forward and per (batch, kv head) backward, each a few single-threaded GEMMs (the backend's,
// gemm.hpp, so the BLAS library's kernels) on strided head views and a row softmax, so the
// scores of one head stay in cache. When the scores are not kept for
// backward, each thread reuses one seq x seq scratch instead of holding [batch, heads, seq, seq].
//
// Causal attention is worked in blocks of query rows [r0, r1): their rows of P see keys
// 0 .. r1 - 1 at most, so every product stops at column r1 (for QK^T, P V, dP = da V^T,
// dS K, dS^T Q, P^T da). That skips all but the diagonal blocks of the masked upper half:
// about (1 + block / seq) / 2 of the full square's multiply-adds. The masked entries of a
// kept P are still written as zeros, so P's layout is unchanged.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "skillgraft/backend/attention_dims.hpp"
#include "skillgraft/backend/cpu/gemm.hpp"
#include "skillgraft/backend/cpu/row_math.hpp"
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

// c = alpha op(a) op(b) + beta c on row-major Eigen maps or blocks of them, through the
// backend's GEMM (one thread inside the callers' OpenMP region).
template <class T, class A, class B, class C>
void product(op ta, op tb, T alpha, const A& a, const B& b, T beta, C&& c) {
  const int k = int(ta == op::n ? a.cols() : a.rows());
  gemm_ops::gemm("attention core", ta, tb, int(c.rows()), int(c.cols()), k, alpha, a.data(), int(a.outerStride()),
                 b.data(), int(b.outerStride()), beta, c.data(), int(c.outerStride()));
}

// Query rows per block of the causal tiling: small enough to skip most of the masked half,
// large enough that each block's products still run at GEMM speed.
constexpr int query_block = 64;

// Without a mask there is nothing to skip: one block of all rows, the whole square at once.
inline int rows_per_block(int seq, bool causal) { return causal ? std::min(seq, query_block) : seq; }

// The keys query rows [r0, r1) can see: all of them, or 0 .. r1 - 1 when causal.
inline int keys_seen(int r1, int seq, bool causal) { return causal ? r1 : seq; }

// In-place softmax of each row of a block of P whose first row is query row r0; row i sees
// keys 0..i when causal, and the columns it cannot see are set to 0.
template <class T, class M>
void softmax_rows(M& p, Eigen::Index r0, bool causal) {
  const Eigen::Index n = p.rows(), m = p.cols();
  for (Eigen::Index i = 0; i < n; ++i) {
    const Eigen::Index seen = causal ? r0 + i + 1 : m;
    row::softmax(&p(i, 0), std::size_t(seen));  // row_math.hpp: the same bits at any address
    p.row(i).tail(m - seen).setZero();
  }
}
// Whether the heads are worth a parallel region: one costs about as much as a few tens of
// thousands of multiply-adds, and a tiny model's attention (a test's, a draft model's) is called
// thousands of times. A head is one thread's work either way, so the bits do not change.
inline bool worth_threads(const attention_dims& d) {
  return std::int64_t(d.batch) * d.heads * d.seq * d.seq * d.head_dim > 32768;
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
    const int block = rows_per_block(S, d.causal);
#pragma omp parallel if (attention_detail::worth_threads(d))
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
          for (int r0 = 0; r0 < S; r0 += block) {
            const int r1 = std::min(S, r0 + block), rows = r1 - r0, seen = keys_seen(r1, S, d.causal);
            strided_map<T> P(pp + std::size_t(r0) * S, rows, seen, Eigen::OuterStride<>(S));
            product(op::n, op::t, scale, Q.middleRows(r0, rows), K.topRows(seen), T(0), P);
            softmax_rows<T>(P, r0, d.causal);
            product(op::n, op::n, T(1), P, V.topRows(seen), T(0), A.middleRows(r0, rows));
            if (keep && seen < S)  // the masked keys no block product reached
              strided_map<T>(pp + std::size_t(r0) * S + seen, rows, S - seen, Eigen::OuterStride<>(S)).setZero();
          }
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
    const int block = rows_per_block(S, d.causal);
    // One task per (batch, kv head): the query heads sharing a kv head add into the same dk, dv
    // rows, so they run in one task, in order, with no races.
#pragma omp parallel if (attention_detail::worth_threads(d))
    {
      row_matrix<T> dP(need_ds ? block : 0, need_ds ? S : 0);  // one block's dP, then dS
#pragma omp for collapse(2) schedule(static)
      for (int b = 0; b < B; ++b)
        for (int kvh = 0; kvh < KV; ++kvh)
          for (int head = kvh * group; head < (kvh + 1) * group; ++head) {
            const T* pp = probs.data() + (std::size_t(b) * H + std::size_t(head)) * S * S;
            auto dA = head_view(da.data(), b, head, S, H, hd);
            for (int r0 = 0; r0 < S; r0 += block) {
              const int r1 = std::min(S, r0 + block), rows = r1 - r0, seen = keys_seen(r1, S, d.causal);
              const_strided_map<T> P(pp + std::size_t(r0) * S, rows, seen, Eigen::OuterStride<>(S));
              const auto dA_rows = dA.middleRows(r0, rows);
              if (dv) {
                auto dV = head_view(dv->data(), b, kvh, S, KV, hd);
                product(op::t, op::n, T(1), P, dA_rows, T(1), dV.topRows(seen));
              }
              if (!need_ds) continue;
              auto V = head_view(v->data(), b, kvh, S, KV, hd);
              auto dS = dP.topLeftCorner(rows, seen);
              product(op::n, op::t, T(1), dA_rows, V.topRows(seen), T(0), dS);
              // dS = P * (dP - rowsum(dP * P)), over dP (row i sees keys 0..i, or all when not causal)
              for (int i = 0; i < rows; ++i) {
                const int row_seen = d.causal ? r0 + i + 1 : S;
                T* ds = &dS(i, 0);
                const T* p = P.data() + std::size_t(i) * std::size_t(P.outerStride());
                const T dot = row::lane_sum<T>(std::size_t(row_seen), [&](std::size_t j) { return ds[j] * p[j]; });
                for (int j = 0; j < row_seen; ++j) ds[j] = p[j] * (ds[j] - dot);
                dS.row(i).segment(row_seen, seen - row_seen).setZero();
              }
              if (dq) {
                auto K = head_view(k->data(), b, kvh, S, KV, hd);
                auto dQ = head_view(dq->data(), b, head, S, H, hd);
                product(op::n, op::n, scale, dS, K.topRows(seen), T(0), dQ.middleRows(r0, rows));
              }
              if (dk) {
                auto Q = head_view(q->data(), b, head, S, H, hd);
                auto dK = head_view(dk->data(), b, kvh, S, KV, hd);
                product(op::t, op::n, scale, dS, Q.middleRows(r0, rows), T(1), dK.topRows(seen));
              }
            }
          }
    }
  }
};

}  // namespace skillgraft::cpu
