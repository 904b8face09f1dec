#pragma once
// The loss rows of the fused masked cross-entropy on the CUDA backend (math in
// train/cross_entropy.hpp): row maxima and log-sum-exp as segmented reductions in double.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "skillgraft/backend/cuda/algorithms.hpp"
#include "skillgraft/backend/cuda/tensor.hpp"

namespace skillgraft::cuda {

namespace kernels {
template <class T>
struct logit {
  const T* z;
  index_t V;
  SKILLGRAFT_HD T operator()(index_t i, index_t j) const { return z[i * V + j]; }
};
template <class T>
struct exp_shifted {  // exp(z_ij - max_i), in double
  const T* z;
  const T* mx;
  index_t V;
  SKILLGRAFT_HD double operator()(index_t i, index_t j) const { return exp_(double(z[i * V + j] - mx[i])); }
};
template <class T>
struct log_sum_exp {  // lse_i = max_i + log(sum_i), written over sum_i
  double* sum;
  const T* mx;
  SKILLGRAFT_HD void operator()(index_t i) const { sum[i] = double(mx[i]) + log_(sum[i]); }
};
template <class T>
struct row_loss {  // lse_i - z_i[y_i]
  const double* lse;
  const T* z;
  const std::int64_t* y;
  index_t V;
  SKILLGRAFT_HD double operator()(index_t i) const { return lse[i] - double(z[i * V + y[i]]); }
};
template <class T>
struct softmax_minus_onehot {  // dz_ij = (exp(z_ij - lse_i) - [j == y_i]) / n, over z
  T* z;
  const double* lse;
  const std::int64_t* y;
  index_t V;
  double n;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t i = e / V, j = e % V;
    T g = T(exp_(double(z[e]) - lse[i]) / n);
    if (j == y[i]) g -= T(1.0 / n);
    z[e] = g;
  }
};
}  // namespace kernels

struct cross_entropy_ops {
  template <class T>
  static double softmax_cross_entropy_rows(tensor<T>& z, std::size_t m, const std::int64_t* y, double n) {
    const index_t mi = index_t(m), V = index_t(z.dim(1));
    const auto yd = upload_indices(std::vector<std::int64_t>(y, y + m));
    tensor<T> mx({m}, memory_use::workspace);
    tensor<double> lse({m}, memory_use::workspace);
    segmented_reduce(mi, V, kernels::logit<T>{z.data(), V}, mx.data(), maximum<T>());
    segmented_sum(mi, V, kernels::exp_shifted<T>{z.data(), mx.data(), V}, lse.data());
    for_each_index(mi, kernels::log_sum_exp<T>{lse.data(), mx.data()});
    const double total = sum_index<double>(mi, kernels::row_loss<T>{lse.data(), z.data(), yd.data(), V});
    for_each_index(mi * V, kernels::softmax_minus_onehot<T>{z.data(), lse.data(), yd.data(), V, n});
    return total;
  }
};

}  // namespace skillgraft::cuda
