#pragma once
// Token embeddings on the CPU (math in model/decoder_lm.hpp): row gathers into [prefix ; E[ids]],
// the deterministic scatter-add of their gradient, and the prefix's slice of a gradient.
#include <algorithm>
#include <cstdint>

#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::cpu {

struct embedding_ops {
  // x[b] = [prefix[b] ; E[ids[b, 0]] ... E[ids[b, S-1]]]; ids: B x S host ids (checked by the caller),
  // prefix [B, P, d] or null (P = 0); x [B, P + S, d].
  template <class T>
  static void embed_rows(const tensor<T>& E, const std::int64_t* ids, std::size_t B, std::size_t S,
                         const tensor<T>* prefix, tensor<T>& x) {
    const std::size_t d = E.dim(1), P = x.dim(1) - S;
    for (std::size_t b = 0; b < B; ++b) {
      if (P) std::copy_n(prefix->data() + b * P * d, P * d, x.data() + b * (P + S) * d);
      for (std::size_t s = 0; s < S; ++s)
        std::copy_n(E.data() + std::size_t(ids[b * S + s]) * d, d, x.data() + (b * (P + S) + P + s) * d);
    }
  }

  // dE[ids[b, s]] += dx[b, P + s]: serial, so repeated ids add in (b, s) order (deterministic).
  template <class T>
  static void embedding_backward(const std::int64_t* ids, std::size_t B, std::size_t S, const tensor<T>& dx,
                                 tensor<T>& dE) {
    const std::size_t Tn = dx.dim(1), P = Tn - S, d = dx.dim(2);
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t t = P; t < Tn; ++t) {
        T* row = dE.data() + std::size_t(ids[b * S + t - P]) * d;
        const T* src = dx.data() + (b * Tn + t) * d;
        for (std::size_t j = 0; j < d; ++j) row[j] += src[j];
      }
  }

  // out [B, P, d] = x[:, :P] of x [B, Tn, d].
  template <class T>
  static void leading_positions(const tensor<T>& x, tensor<T>& out) {
    const std::size_t B = x.dim(0), Tn = x.dim(1), P = out.dim(1), d = x.dim(2);
    for (std::size_t b = 0; b < B; ++b) std::copy_n(x.data() + b * Tn * d, P * d, out.data() + b * P * d);
  }
};

}  // namespace skillgraft::cpu
