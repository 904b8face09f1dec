#pragma once
// RMSNorm on the CPU (math in nn/rmsnorm.hpp): rows in parallel, sums of squares in double
// (row_math.hpp: in lanes of a fixed order, the same bits at any address and thread count);
// the weight gradient in parallel over columns.
#include <cmath>

#include "skillgraft/backend/cpu/reduction.hpp"
#include "skillgraft/backend/cpu/row_math.hpp"
#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::cpu {

struct rmsnorm_ops {
  // y = rmsnorm(x; w); writes r (one per row) when rstd is non-null.
  template <class T>
  static void rmsnorm_forward(const tensor<T>& w, const tensor<T>& x, double eps, tensor<T>& y, tensor<T>* rstd) {
    const Eigen::Index n = x.rows(), d = x.cols();
    const T* xp = x.data();
    const T* wp = w.data();
    T* yp = y.data();
#pragma omp parallel for schedule(static) if (n * d > 32768)
    for (Eigen::Index i = 0; i < n; ++i) {
      const T* xr = xp + i * d;
      // sum of squares in double: d can be thousands of terms
      const double ss = row::lane_sum<double>(std::size_t(d), [&](std::size_t j) { return double(xr[j]) * double(xr[j]); });
      const T r = static_cast<T>(1.0 / std::sqrt(ss / double(d) + eps));
      T* yr = yp + i * d;
      for (Eigen::Index j = 0; j < d; ++j) yr[j] = wp[j] * (xr[j] * r);
      if (rstd) (*rstd)[static_cast<std::size_t>(i)] = r;
    }
  }

  // Accumulates dw (when non-null) and writes or adds dx (when non-null).
  template <class T>
  static void rmsnorm_backward(const tensor<T>& w, const tensor<T>& x, const tensor<T>& rstd, const tensor<T>& dy,
                               tensor<T>* dw, tensor<T>* dx, bool accumulate_dx) {
    const Eigen::Index n = x.rows(), d = x.cols();
    if (dw) {  // dw[j] += sum_i dy[i, j] x[i, j] r_i, each column over the rows in order
      const T* xp = x.data();
      const T* dyp = dy.data();
      const T* rp = rstd.data();
      add_column_reduction(std::size_t(n), std::size_t(d), dw->data(), [&](std::size_t i, std::size_t j) {
        return dyp[i * d + j] * (xp[i * d + j] * rp[i]);
      });
    }
    if (dx) {
      const T* wp = w.data();
#pragma omp parallel for schedule(static) if (n * d > 32768)
      for (Eigen::Index i = 0; i < n; ++i) {
        const T r = rstd[static_cast<std::size_t>(i)];
        const T* xr = x.data() + i * d;
        const T* dyr = dy.data() + i * d;
        const double dot = row::lane_sum<double>(
            std::size_t(d), [&](std::size_t j) { return double(wp[j]) * double(dyr[j]) * double(xr[j] * r); });
        const T mean = static_cast<T>(dot / double(d));
        T* dxr = dx->data() + i * d;
        for (Eigen::Index j = 0; j < d; ++j) {
          const T g = r * (wp[j] * dyr[j] - (xr[j] * r) * mean);
          dxr[j] = accumulate_dx ? dxr[j] + g : g;
        }
      }
    }
  }
};

}  // namespace skillgraft::cpu
