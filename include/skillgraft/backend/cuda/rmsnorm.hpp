#pragma once
// RMSNorm on the CUDA backend (math in nn/rmsnorm.hpp): row sums in double, as on the CPU.
#include "skillgraft/backend/cuda/algorithms.hpp"
#include "skillgraft/backend/cuda/tensor.hpp"

namespace skillgraft::cuda {

namespace kernels {
template <class T>
struct squares {  // x_ij^2, row i
  const T* x;
  index_t d;
  SKILLGRAFT_HD double operator()(index_t i, index_t j) const {
    const double v = double(x[i * d + j]);
    return v * v;
  }
};
template <class T>
struct rstd_of {  // r_i = 1 / sqrt(ss_i / d + eps)
  const double* ss;
  double d, eps;
  SKILLGRAFT_HD T operator()(index_t i) const { return T(1.0 / sqrt_(ss[i] / d + eps)); }
};
template <class T>
struct rms_scale {  // y_ij = w_j (x_ij r_i)
  T* y;
  const T* x;
  const T* w;
  const T* r;
  index_t d;
  SKILLGRAFT_HD void operator()(index_t i) const { y[i] = w[i % d] * (x[i] * r[i / d]); }
};
template <class T>
struct dy_xhat {  // element (j, i): dy_ij xhat_ij, reduced over rows i for dw_j
  const T* dy;
  const T* x;
  const T* r;
  index_t d;
  SKILLGRAFT_HD T operator()(index_t j, index_t i) const { return dy[i * d + j] * (x[i * d + j] * r[i]); }
};
template <class T>
struct w_dy_xhat {  // element (i, j): w_j dy_ij xhat_ij, reduced over j
  const T* w;
  const T* dy;
  const T* x;
  const T* r;
  index_t d;
  SKILLGRAFT_HD double operator()(index_t i, index_t j) const {
    return double(w[j]) * double(dy[i * d + j]) * double(x[i * d + j] * r[i]);
  }
};
template <class T>
struct rms_dx {  // dx_ij (+)= r_i (w_j dy_ij - xhat_ij mean_i)
  T* dx;
  const T* w;
  const T* dy;
  const T* x;
  const T* r;
  const double* dot;
  index_t d;
  bool accumulate;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t i = e / d, j = e % d;
    const T ri = r[i], mean = T(dot[i] / double(d));
    const T g = ri * (w[j] * dy[e] - (x[e] * ri) * mean);
    dx[e] = accumulate ? dx[e] + g : g;
  }
};
}  // namespace kernels

struct rmsnorm_ops {
  // y = rmsnorm(x; w); writes r (one per row) into rstd when non-null.
  template <class T>
  static void rmsnorm_forward(const tensor<T>& w, const tensor<T>& x, double eps, tensor<T>& y, tensor<T>* rstd) {
    const index_t n = index_t(x.rows()), d = index_t(x.cols());
    tensor<double> ss({std::size_t(n)}, memory_use::workspace);
    segmented_sum(n, d, kernels::squares<T>{x.data(), d}, ss.data());
    tensor<T> r_local;
    if (!rstd) r_local = tensor<T>({std::size_t(n)}, memory_use::workspace);
    tensor<T>& r = rstd ? *rstd : r_local;
    transform_n(n, kernels::rstd_of<T>{ss.data(), double(d), eps}, r.data());
    for_each_index(n * d, kernels::rms_scale<T>{y.data(), x.data(), w.data(), r.data(), d});
  }

  // Accumulates dw (when non-null) and writes or adds dx (when non-null).
  template <class T>
  static void rmsnorm_backward(const tensor<T>& w, const tensor<T>& x, const tensor<T>& rstd, const tensor<T>& dy,
                               tensor<T>* dw, tensor<T>* dx, bool accumulate_dx) {
    const index_t n = index_t(x.rows()), d = index_t(x.cols());
    if (dw) {
      tensor<T> sums({std::size_t(d)}, memory_use::workspace);
      segmented_sum(d, n, kernels::dy_xhat<T>{dy.data(), x.data(), rstd.data(), d}, sums.data());
      add_into(dw->data(), sums.data(), d);
    }
    if (dx) {
      tensor<double> dot({std::size_t(n)}, memory_use::workspace);
      segmented_sum(n, d, kernels::w_dy_xhat<T>{w.data(), dy.data(), x.data(), rstd.data(), d}, dot.data());
      for_each_index(n * d, kernels::rms_dx<T>{dx->data(), w.data(), dy.data(), x.data(), rstd.data(), dot.data(), d,
                                               accumulate_dx});
    }
  }
};

}  // namespace skillgraft::cuda
