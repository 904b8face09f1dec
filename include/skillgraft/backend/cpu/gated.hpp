#pragma once
// The gated MLP's element-wise core on the CPU (math in nn/swiglu.hpp and nn/activation.hpp):
// m = phi(g; alpha) * u and its backward, for any gate policy Act (Act::gate, Act::gate_grad,
// Act::has_range). Policies without a range keep SiLU's original expression, bit for bit.
#include <algorithm>
#include <cstddef>
#include <type_traits>

#include "skillgraft/backend/cpu/reduction.hpp"
#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::cpu {

// m = phi(g; alpha) * u over n elements at raw pointers (the mixture of experts calls this on
// the rows routed to one expert).
template <class Act, class T>
void gated_product_n(const T* gp, const T* up, T alpha, T* mp, std::size_t n) {
  if constexpr (!Act::has_range) {
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
  if constexpr (!Act::has_range) {
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
