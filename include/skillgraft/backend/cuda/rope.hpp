#pragma once
// Rotary embeddings on the CUDA backend (math in nn/rope.hpp): one thread per rotated pair.
#include "skillgraft/backend/cuda/algorithms.hpp"

namespace skillgraft::cuda {

namespace kernels {
template <class T>
struct rope_rotate {  // one (token, head, pair i) of t [batch, seq, heads, head_dim]
  T* t;
  const T* cos;
  const T* sin;
  index_t seq, heads, half, first_pos;
  T sign;  // +1 forward, -1 backward
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t i = e % half, token_head = e / half, token = token_head / heads, s = token % seq;
    T* x = t + token_head * 2 * half;
    const T c = cos[(first_pos + s) * half + i], sn = sign * sin[(first_pos + s) * half + i];
    const T a = x[i], b = x[i + half];
    x[i] = a * c - b * sn;
    x[i + half] = b * c + a * sn;
  }
};
}  // namespace kernels

struct rope_ops {
  // Rotates t [batch, seq, heads * head_dim] in place; cos, sin: [max_seq, head_dim / 2] in device
  // memory; inverse = true applies the transpose.
  template <class T>
  static void rope_apply(const T* cos, const T* sin, T* t, int batch, int seq, int heads, int head_dim, int first_pos,
                         bool inverse) {
    const index_t half = head_dim / 2;
    for_each_index(index_t(batch) * seq * heads * half,
                   kernels::rope_rotate<T>{t, cos, sin, seq, heads, half, first_pos, inverse ? T(-1) : T(1)});
  }
};

}  // namespace skillgraft::cuda
