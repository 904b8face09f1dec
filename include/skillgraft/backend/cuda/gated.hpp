#pragma once
// The gated MLP's element-wise core on the CUDA backend (math in nn/swiglu.hpp and
// nn/activation.hpp), for any gate policy Act whose functions are SKILLGRAFT_HD. The range
// alpha stays in device memory: kernels read alpha[0], and d alpha is a reduction added there.
#include <type_traits>

#include "skillgraft/backend/cuda/algorithms.hpp"
#include "skillgraft/backend/cuda/tensor.hpp"

namespace skillgraft::cuda {

namespace kernels {
template <class Act, class T>
struct gated_forward {  // m = phi(g; alpha) * u (SiLU's own expression when Act has no range)
  T* m;
  const T* g;
  const T* u;
  const T* alpha;
  SKILLGRAFT_HD void operator()(index_t i) const {
    if constexpr (!Act::has_range) m[i] = g[i] * Act::gate(g[i]) * u[i];
    else m[i] = Act::phi(g[i], alpha[0]) * u[i];
  }
};
template <class Act, class T, bool NeedDg, bool NeedDu>
struct gated_backward {  // du = dm phi(g); dg = dm u phi'(g), written over dm
  T* dm;
  T* du;
  const T* g;
  const T* u;
  const T* alpha;
  SKILLGRAFT_HD void operator()(index_t i) const {
    const T z = g[i], d = dm[i];
    if constexpr (!Act::has_range) {
      const T s = Act::gate(z);
      if constexpr (NeedDu) du[i] = d * z * s;
      if constexpr (NeedDg) dm[i] = d * u[i] * s * (T(1) + z * (T(1) - s));
    } else {
      if constexpr (NeedDu) du[i] = d * Act::phi(z, alpha[0]);
      if constexpr (NeedDg) dm[i] = d * u[i] * Act::dphi_dz(z, alpha[0]);
    }
  }
};
template <class Act, class T>
struct dalpha_term {  // dm * u * dphi/dalpha
  const T* dm;
  const T* u;
  const T* g;
  SKILLGRAFT_HD T operator()(index_t i) const { return dm[i] * u[i] * Act::dphi_dalpha(g[i]); }
};
template <class T>
struct add_scalar {  // y[0] += v
  T* y;
  T v;
  SKILLGRAFT_HD void operator()(index_t) const { y[0] += v; }
};
}  // namespace kernels

struct gated_ops {
  template <class Act, class T>
  static void gated_product(const T* g, const T* u, const tensor<T>* alpha, T* m, std::size_t n) {
    for_each_index(index_t(n), kernels::gated_forward<Act, T>{m, g, u, alpha ? alpha->data() : nullptr});
  }

  template <class Act, bool NeedDg, bool NeedDu, bool NeedDalpha, class T>
  static void gated_product_backward(const T* g, const T* u, const tensor<T>* alpha, T* dm, T* du,
                                     std::type_identity_t<tensor<T>>* dalpha, std::size_t n_) {
    const index_t n = index_t(n_);
    if constexpr (NeedDalpha) {  // before dm is overwritten by dg
      const T sum = sum_index<T>(n, kernels::dalpha_term<Act, T>{dm, u, g});
      for_each_index(1, kernels::add_scalar<T>{dalpha->data(), sum});
    }
    if constexpr (NeedDg || NeedDu)
      for_each_index(n, kernels::gated_backward<Act, T, NeedDg, NeedDu>{dm, du, g, u, alpha ? alpha->data() : nullptr});
  }
};

}  // namespace skillgraft::cuda
