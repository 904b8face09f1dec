#pragma once
// The loss rows of the fused masked cross-entropy on the CPU (math in train/cross_entropy.hpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::cpu {

struct cross_entropy_ops {
  // z [m, V] holds logits; row i's target is y[i] (host ids). Turns z into
  // dz = (softmax(z) - onehot(y)) / n in place and returns sum_i (logsumexp(z_i) - z_i[y_i]),
  // log-sum-exp in double.
  template <class T>
  static double softmax_cross_entropy_rows(tensor<T>& z, std::size_t m, const std::int64_t* y, double n) {
    const std::size_t V = z.dim(1);
    // Rows in parallel; their losses are added afterwards in row order, as before, so the
    // total does not depend on the thread count.
    std::vector<double> loss(m);
#pragma omp parallel for schedule(static) if (m * V > 32768)
    for (std::size_t i = 0; i < m; ++i) {
      T* zi = z.data() + i * V;
      T mx = zi[0];
      for (std::size_t j = 1; j < V; ++j) mx = std::max(mx, zi[j]);
      double sum = 0;
      for (std::size_t j = 0; j < V; ++j) sum += std::exp(double(zi[j] - mx));
      const double lse = double(mx) + std::log(sum);
      loss[i] = lse - double(zi[y[i]]);
      for (std::size_t j = 0; j < V; ++j) zi[j] = T(std::exp(double(zi[j]) - lse) / n);
      zi[y[i]] -= T(1.0 / n);
    }
    double total = 0;
    for (std::size_t i = 0; i < m; ++i) total += loss[i];
    return total;
  }
};

}  // namespace skillgraft::cpu
