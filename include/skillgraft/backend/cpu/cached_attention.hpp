#pragma once
// Attention over a KV cache on the CPU (math in model/generate.hpp): one OpenMP task per
// (run of consecutive query tokens, head), each two products through the backend's GEMM (as the
// training core's, attention.hpp) against the run's prefix of the cache and a row softmax in between, so decoding one token per sequence and scoring a whole
// prompt are the same code.
#include <cstdint>
#include <vector>

#include "skillgraft/backend/cached_attention_dims.hpp"
#include "skillgraft/backend/cpu/attention.hpp"
#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::cpu {

struct cached_attention_ops {
  // a[t] = softmax(q[t] K[0..p]^T scale) V[0..p] for every token t in `rows` at position p, K
  // and V the cached keys and values of t's sequence; rows of a not listed are left as they are.
  template <class T>
  static void cached_attention(const cached_attention_dims& d, T scale, const tensor<T>& q, const tensor<T>& k_cache,
                               const tensor<T>& v_cache, const std::vector<std::int64_t>& rows, tensor<T>& a) {
    using namespace attention_detail;
    const auto runs = token_runs(d, rows);
    const int H = d.heads, KV = d.kv_heads, hd = d.head_dim, group = d.group(), R = int(runs.size());
    const std::size_t kv_rows = std::size_t(KV) * std::size_t(hd);
    // One token per sequence at a small model's size is less work than a parallel region costs
    // (attention.hpp's worth_threads): such calls run on this thread, with the same bits.
    std::int64_t work = 0;
    for (const auto& run : runs) work += std::int64_t(run.count) * (d.position_of(run.first) + run.count);
    work *= std::int64_t(H) * hd;
#pragma omp parallel for collapse(2) schedule(dynamic) if (work > 32768)
    for (int r = 0; r < R; ++r)
      for (int head = 0; head < H; ++head) {
        const std::int64_t t0 = runs[std::size_t(r)].first;
        const int n = runs[std::size_t(r)].count, p0 = d.position_of(t0), L = p0 + n;
        const std::size_t q_at = std::size_t(t0) * std::size_t(H) * std::size_t(hd) + std::size_t(head) * std::size_t(hd);
        const std::size_t kv_at = std::size_t(d.sequence_of(t0)) * std::size_t(d.capacity) * kv_rows +
                                  std::size_t(head / group) * std::size_t(hd);
        const_strided_map<T> Q(q.data() + q_at, n, hd, Eigen::OuterStride<>(H * hd));
        const_strided_map<T> K(k_cache.data() + kv_at, L, hd, Eigen::OuterStride<>(KV * hd));
        const_strided_map<T> V(v_cache.data() + kv_at, L, hd, Eigen::OuterStride<>(KV * hd));
        strided_map<T> A(a.data() + q_at, n, hd, Eigen::OuterStride<>(H * hd));
        row_matrix<T> P(n, L);
        product(op::n, op::t, scale, Q, K, T(0), P);
        for (int i = 0; i < n; ++i) {  // query i of the run sits at position p0 + i: keys 0..p0 + i
          row::softmax(&P(i, 0), std::size_t(p0 + i + 1));  // as training's attention core does
          P.row(i).tail(L - (p0 + i + 1)).setZero();
        }
        product(op::n, op::n, T(1), P, V, T(0), A);
      }
  }
};

}  // namespace skillgraft::cpu
