#pragma once
// What a backend is: an operations policy. Layers, models, training and the continual-learning
// methods are written once against it (`Backend::tensor<T>`, `Backend::gemm(...)`,
// `Backend::rmsnorm_forward(...)`), so a new backend is one folder under backend/ whose type
// passes this concept, and a new layer is one file in nn/ that works on every backend.
//
//   tensor<T>                     move-only, byte-accounted, row-major, up to 4 dimensions;
//                                 (shape, memory_use) constructor, zero-filled; clone, reshape
//   upload(host, use), download   crossing from and to a cpu::tensor (a copy on the CPU)
//   gemm, gemm_strided_batched    backend/gemm_op.hpp's row-major interface
//   add_into, add_bias, add_column_sums, map, multiply_by_map, gather_rows, scatter_rows
//   for_each_index, sum_index, find_first_index, value_at   index-space work (optimizers, clipping)
//   embed_rows, embedding_backward, leading_positions, softmax_cross_entropy_rows
//   rmsnorm_forward, rmsnorm_backward
//   rope_apply                    rotate_half rotary embeddings from cos/sin tables of this backend
//   gated_product, gated_product_backward   m = phi(g; alpha) u for a gate policy (nn/activation.hpp),
//                                 over n elements from raw pointers (a whole buffer or an expert's rows)
//   attention_forward, attention_backward   the core softmax(q k^T scale + mask) v per head
//   cached_attention              the same core for listed query tokens over a KV cache (decoding)
//
// Every operation's math is written next to the layer that calls it (nn/), and each backend's
// header in backend/<name>/ says how it is computed there.
#include <concepts>
#include <cstdint>
#include <vector>

#include "skillgraft/backend/attention_dims.hpp"
#include "skillgraft/backend/cached_attention_dims.hpp"
#include "skillgraft/backend/cpu/tensor.hpp"
#include "skillgraft/backend/gemm_op.hpp"
#include "skillgraft/backend/memory.hpp"

namespace skillgraft::backend {

// The gate policy used to check the gated operations (SiLU's shape: no range).
struct probe_gate {
  static constexpr bool has_range = false;
  static float gate(float z) { return z; }
  static float phi(float z, float) { return z; }
  static float dphi_dz(float, float) { return 1; }
  static float dphi_dalpha(float) { return 0; }
};
// An element functor of the index-space operations.
struct probe_index {
  bool operator()(std::int64_t) const { return false; }
};
struct probe_map {
  float operator()(float x) const { return x; }
};

template <class B>
concept operations_policy = requires(typename B::template tensor<float>& t, const typename B::template tensor<float>& c,
                                     typename B::template tensor<float>* p, const cpu::tensor<float>& host,
                                     cpu::tensor<float>& host_out, const attention_dims& dims, const cached_attention_dims& cached, float* raw,
                                     const float* craw, const std::int64_t* ids,
                                     const std::vector<std::int64_t>& rows) {
  { B::name } -> std::convertible_to<const char*>;
  typename B::template tensor<float>;
  { B::template upload<float>(host, memory_use::weights) } -> std::same_as<typename B::template tensor<float>>;
  B::download(c, host_out);
  B::gemm("", op::n, op::t, 1, 1, 1, 1.f, craw, 1, craw, 1, 0.f, raw, 1);
  B::gemm_strided_batched("", op::n, op::t, 1, 1, 1, 1.f, craw, 1, 1LL, craw, 1, 1LL, 0.f, raw, 1, 1LL, 1);
  B::add_into(t, c);
  B::add_bias(t, c);
  B::add_column_sums(c, t);
  B::map(c, t, probe_map{});
  B::multiply_by_map(t, c, probe_map{});
  B::gather_rows(c, std::size_t(1), rows, t);
  B::scatter_rows(c, std::size_t(1), rows, t);
  B::for_each_index(std::int64_t(1), probe_index{});
  { B::template sum_index<double>(std::int64_t(1), probe_index{}) } -> std::same_as<double>;
  { B::find_first_index(std::int64_t(1), probe_index{}) } -> std::same_as<std::int64_t>;
  { B::value_at(c, std::size_t(0)) } -> std::same_as<float>;
  B::embed_rows(c, ids, std::size_t(1), std::size_t(1), p, t);
  B::embedding_backward(ids, std::size_t(1), std::size_t(1), c, t);
  B::leading_positions(c, t);
  { B::softmax_cross_entropy_rows(t, std::size_t(1), ids, 1.0) } -> std::same_as<double>;
  B::rmsnorm_forward(c, c, 1e-6, t, p);
  B::rmsnorm_backward(c, c, c, c, p, p, false);
  B::rope_apply(craw, craw, raw, 1, 1, 1, 2, 0, false);
  B::template gated_product<probe_gate>(craw, craw, &c, raw, std::size_t(1));
  B::template gated_product_backward<probe_gate, true, true, true>(craw, craw, &c, raw, raw, p, std::size_t(1));
  B::attention_forward(dims, 1.f, c, c, c, t, p);
  B::attention_backward(dims, 1.f, c, &c, &c, &c, c, p, p, p);
  B::cached_attention(cached, 1.f, c, c, c, rows, t);
};

}  // namespace skillgraft::backend
