#pragma once
// Rotary embeddings on the CPU (math in nn/rope.hpp): tokens in parallel.
#include <cstddef>

namespace skillgraft::cpu {

struct rope_ops {
  // Rotates, in place, t laid out [batch, seq, heads, head_dim]; token s has position first_pos + s.
  // cos, sin: [max_seq, head_dim / 2]. inverse = true applies the transpose (backward).
  template <class T>
  static void rope_apply(const T* cos, const T* sin, T* t, int batch, int seq, int heads, int head_dim, int first_pos,
                         bool inverse) {
    const int hd = head_dim, half = hd / 2;
    const T sign = inverse ? T(-1) : T(1);
#pragma omp parallel for collapse(2) schedule(static) if (batch * seq * heads * hd > 32768)
    for (int b = 0; b < batch; ++b)
      for (int s = 0; s < seq; ++s) {
        const T* c = cos + std::size_t(first_pos + s) * std::size_t(half);
        const T* sn = sin + std::size_t(first_pos + s) * std::size_t(half);
        for (int h = 0; h < heads; ++h) {
          T* x = t + ((static_cast<std::size_t>(b) * seq + s) * heads + h) * hd;
          for (int i = 0; i < half; ++i) {
            const T a = x[i], bb = x[i + half], si = sign * sn[i];
            x[i] = a * c[i] - bb * si;
            x[i + half] = bb * c[i] + a * si;
          }
        }
      }
  }
};

}  // namespace skillgraft::cpu
