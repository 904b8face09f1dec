#pragma once
// The loss rows of the fused masked cross-entropy on the CPU (math in train/cross_entropy.hpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "skillgraft/backend/cpu/row_math.hpp"
#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::cpu {

struct cross_entropy_ops {
  // z [m, V] holds logits; row i's target is y[i] (host ids). Turns z into
  // dz = (softmax(z) - onehot(y)) / n in place and returns sum_i (logsumexp(z_i) - z_i[y_i]),
  // the sum of exponentials in double.
  template <class T>
  static double softmax_cross_entropy_rows(tensor<T>& z, std::size_t m, const std::int64_t* y, double n) {
    const std::size_t V = z.dim(1);
    // Rows in parallel; their losses are added afterwards in row order, as before, so the
    // total does not depend on the thread count.
    std::vector<double> loss(m);
#pragma omp parallel for schedule(static) if (m * V > 32768)
    for (std::size_t i = 0; i < m; ++i) {
      // One vectorised exp per logit, kept in z; the sum in double (row_math.hpp: the same bits
      // at any address).
      T* zi = z.data() + i * V;
      const T mx = row::max(zi, V);
      const double target = double(zi[y[i]] - mx);
      row::exp_shifted(zi, V, mx);
      const double sum = row::lane_sum<double>(V, [&](std::size_t j) { return double(zi[j]); });
      loss[i] = std::log(sum) - target;  // logsumexp(z_i) - z_i[y_i]
      const T scale = T(1.0 / (sum * n));
      for (std::size_t j = 0; j < V; ++j) zi[j] *= scale;
      zi[y[i]] -= T(1.0 / n);
    }
    double total = 0;
    for (std::size_t i = 0; i < m; ++i) total += loss[i];
    return total;
  }
};

}  // namespace skillgraft::cpu
