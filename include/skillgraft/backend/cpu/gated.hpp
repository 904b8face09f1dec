#pragma once
// The gated MLP's element-wise core on the CPU (math in nn/swiglu.hpp and nn/activation.hpp):
// m = phi(g; alpha) * u and its backward, for any gate policy Act (Act::gate, Act::gate_grad,
// Act::has_range). SiLU keeps its expressions z * s * u and d u s (1 + z (1 - s)).
//
// Gates whose formula compiles over packets (simd::packet_gate: SiLU, xSiLU) run a packet at a
// time, every element through the packet exp (the last partial packet padded), so an element's
// bits do not depend on n or on where it lies; the others run one element at a time.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "skillgraft/backend/cpu/reduction.hpp"
#include "skillgraft/backend/cpu/simd.hpp"
#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::cpu {

// m = phi(g; alpha) * u over n elements at raw pointers (the mixture of experts calls this on
// the rows routed to one expert).
template <class Act, class T>
void gated_product_n(const T* gp, const T* up, T alpha, T* mp, std::size_t n) {
  if constexpr (simd::packet_gate<Act> && simd::vectorised<T>) {
    using V = simd::vec<T>;
    const T* const in[2] = {gp, up};
    T* const out[1] = {mp};
    simd::for_each_packet<T>(n, in, out, [alpha](const T* const (&g_u)[2], T* const (&m)[1]) {
      const V z = V::load(g_u[0]);
      if constexpr (!Act::has_range)
        (z * Act::gate(z) * V::load(g_u[1])).store(m[0]);
      else
        (Act::phi(z, V(alpha)) * V::load(g_u[1])).store(m[0]);
    });
  } else if constexpr (!Act::has_range) {
    (void)alpha;
#pragma omp parallel for schedule(static) if (n > 32768)
    for (std::size_t i = 0; i < n; ++i) mp[i] = gp[i] * Act::gate(gp[i]) * up[i];
  } else {
#pragma omp parallel for schedule(static) if (n > 32768)
    for (std::size_t i = 0; i < n; ++i) mp[i] = Act::phi(gp[i], alpha) * up[i];
  }
}

// Backward of m = phi(g; alpha) * u over n elements: dm (in place) becomes dg when NeedDg,
// du = dm * phi(g) when NeedDu; returns d alpha = sum(dm * u * dphi/dalpha) when NeedDalpha.
template <class Act, bool NeedDg, bool NeedDu, bool NeedDalpha, class T>
T gated_product_backward_n(const T* gp, const T* up, T alpha, T* dmp, T* dup, std::size_t n) {
  T dalpha = T(0);
  if constexpr (NeedDalpha)  // before dm is overwritten by dg
    dalpha = deterministic_sum<T>(n, [&](std::size_t i) { return dmp[i] * up[i] * Act::dphi_dalpha(gp[i]); });
  if constexpr (simd::packet_gate<Act> && simd::vectorised<T> && (NeedDg || NeedDu)) {
    using V = simd::vec<T>;
    const T* const in[2] = {gp, up};  // u is null when only du is wanted
    T* const out[2] = {dmp, dup};
    simd::for_each_packet<T>(n, in, out, [alpha](const T* const (&g_u)[2], T* const (&dm_du)[2]) {
      const V z = V::load(g_u[0]), d = V::load(dm_du[0]);
      if constexpr (!Act::has_range) {
        const V sg = Act::gate(z);
        if constexpr (NeedDu) (d * z * sg).store(dm_du[1]);
        if constexpr (NeedDg) (d * V::load(g_u[1]) * sg * (T(1) + z * (T(1) - sg))).store(dm_du[0]);
      } else {
        if constexpr (NeedDu) (d * Act::phi(z, V(alpha))).store(dm_du[1]);
        if constexpr (NeedDg) (d * V::load(g_u[1]) * Act::dphi_dz(z, V(alpha))).store(dm_du[0]);
      }
    });
  } else if constexpr (!Act::has_range) {
#pragma omp parallel for schedule(static) if (n > 32768)
    for (std::size_t i = 0; i < n; ++i) {
      const T z = gp[i], sg = Act::gate(z), d = dmp[i];
      if constexpr (NeedDu) dup[i] = d * z * sg;
      if constexpr (NeedDg) dmp[i] = d * up[i] * sg * (T(1) + z * (T(1) - sg));
    }
  } else if constexpr (NeedDg || NeedDu) {
#pragma omp parallel for schedule(static) if (n > 32768)
    for (std::size_t i = 0; i < n; ++i) {
      const T z = gp[i], d = dmp[i];
      if constexpr (NeedDu) dup[i] = d * Act::phi(z, alpha);
      if constexpr (NeedDg) dmp[i] = d * up[i] * Act::dphi_dz(z, alpha);
    }
  }
  return dalpha;
}

struct gated_ops {
  // m = phi(g; alpha) * u over n elements (rows of larger tensors: a mixture's experts write
  // into their range of the saved buffers); alpha: the range [1], or null for a policy without one.
  template <class Act, class T>
  static void gated_product(const T* g, const T* u, const tensor<T>* alpha, T* m, std::size_t n) {
    gated_product_n<Act>(g, u, alpha ? (*alpha)[0] : T(0), m, n);
  }

  // Backward of m = phi(g; alpha) * u: dm (in place) becomes dg when NeedDg, du = dm * phi(g)
  // when NeedDu; dalpha[0] += sum(dm * u * dphi/dalpha) when NeedDalpha. u may be null
  // unless NeedDg or NeedDalpha.
  template <class Act, bool NeedDg, bool NeedDu, bool NeedDalpha, class T>
  static void gated_product_backward(const T* g, const T* u, const tensor<T>* alpha, T* dm, T* du,
                                     std::type_identity_t<tensor<T>>* dalpha, std::size_t n) {
    const T da = gated_product_backward_n<Act, NeedDg, NeedDu, NeedDalpha>(g, u, alpha ? (*alpha)[0] : T(0), dm, du, n);
    if constexpr (NeedDalpha) (*dalpha)[0] += da;
  }
};

}  // namespace skillgraft::cpu
