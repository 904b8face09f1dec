#pragma once
// Attention over a KV cache on the CUDA backend (math in model/generate.hpp). The listed
// queries are packed into consecutive rows; per run of consecutive tokens of one sequence and per
// member of a query-head group, one strided-batched cuBLAS call over the KV heads forms the
// scores against the run's prefix of the cache and one forms a = P v; the masked softmax runs
// over all packed rows at once, each row seeing the keys up to its own position.
#include <cstdint>
#include <vector>

#include "skillgraft/backend/cached_attention_dims.hpp"
#include "skillgraft/backend/cuda/attention.hpp"
#include "skillgraft/backend/cuda/elementwise.hpp"
#include "skillgraft/backend/cuda/gemm.hpp"
#include "skillgraft/backend/cuda/tensor.hpp"

namespace skillgraft::cuda {

namespace kernels {
// Row r of the scores [heads, packed, keys] is packed query r % packed; it sees keys up to its position.
struct sees_up_to {
  const std::int64_t* position;
  index_t packed;
  SKILLGRAFT_HD bool operator()(index_t row, index_t j) const { return j <= position[row % packed]; }
};
}  // namespace kernels

struct cached_attention_ops {
  template <class T>
  static void cached_attention(const cached_attention_dims& d, T scale, const tensor<T>& q, const tensor<T>& k_cache,
                               const tensor<T>& v_cache, const std::vector<std::int64_t>& rows, tensor<T>& a) {
    const auto runs = token_runs(d, rows);
    if (runs.empty()) return;
    const int H = d.heads, KV = d.kv_heads, hd = d.head_dim, G = d.group(), L = d.keys();
    const index_t R = index_t(rows.size()), qd = index_t(H) * hd, kvd = index_t(KV) * hd;
    tensor<T> qr({std::size_t(R), std::size_t(qd)}, memory_use::workspace), ar(qr.shape(), memory_use::workspace);
    elementwise_ops::gather_rows(q, std::size_t(qd), rows, qr);
    std::vector<std::int64_t> position(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) position[i] = d.position_of(rows[i]);
    const auto d_position = upload_indices(position);
    // P [heads, packed, keys]: query head kvh * G + g of packed row i at ((kvh * G + g) * R + i) * L.
    tensor<T> p({std::size_t(H), std::size_t(R), std::size_t(L)}, memory_use::workspace);
    const long long q_stride = static_cast<long long>(G) * hd, p_stride = static_cast<long long>(G) * R * L;
    // f(run, its first packed row, group member g, offset of its sequence's cache rows)
    auto for_each_run = [&](auto&& f) {
      index_t start = 0;
      for (const auto& run : runs) {
        const index_t cache_at = index_t(d.sequence_of(run.first)) * d.capacity * kvd;
        for (int g = 0; g < G; ++g) f(run, start, g, cache_at);
        start += run.count;
      }
    };
    const auto keys_of = [&](const token_run& run) { return d.position_of(run.first) + run.count; };
    for_each_run([&](const token_run& run, index_t start, int g, index_t cache_at) {  // P = q k^T scale
      gemm_ops::gemm_strided_batched("cached attention scores: P = q k^T / sqrt(hd)", op::n, op::t, run.count,
                                     keys_of(run), hd, scale, qr.data() + start * qd + index_t(g) * hd, int(qd), q_stride,
                                     k_cache.data() + cache_at, int(kvd), (long long)hd, T(0),
                                     p.data() + (index_t(g) * R + start) * L, L, p_stride, KV);
    });
    masked_softmax(p.data(), index_t(H) * R, index_t(L), kernels::sees_up_to{d_position.data(), R});
    for_each_run([&](const token_run& run, index_t start, int g, index_t cache_at) {  // a = P v
      gemm_ops::gemm_strided_batched("cached attention output: a = P v", op::n, op::n, run.count, hd, keys_of(run), T(1),
                                     p.data() + (index_t(g) * R + start) * L, L, p_stride, v_cache.data() + cache_at,
                                     int(kvd), (long long)hd, T(0), ar.data() + start * qd + index_t(g) * hd, int(qd),
                                     q_stride, KV);
    });
    elementwise_ops::scatter_rows(ar, std::size_t(qd), rows, a);
  }
};

}  // namespace skillgraft::cuda
