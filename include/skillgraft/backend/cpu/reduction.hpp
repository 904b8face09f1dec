#pragma once
// Reductions on the CPU whose result does not depend on the thread count, so that training
// stays bit-for-bit repeatable: the order of every sum is fixed by the data's shape alone.
#include <algorithm>
#include <cstddef>

#include "skillgraft/backend/cpu/row_math.hpp"

namespace skillgraft::cpu {

// A sum over i < n of f(i) in a fixed order whatever the thread count: fixed chunks summed
// in parallel, then the chunk sums in chunk order (so training stays bit-for-bit repeatable).
// Within a chunk 16 lanes add every 16th term (row::lane_sum), which the compiler vectorises:
// one running sum would wait on each addition's latency.
template <class T, class F>
T deterministic_sum(std::size_t n, F&& f) {
  constexpr std::size_t chunks = 64;
  T part[chunks] = {};
  const std::size_t per = (n + chunks - 1) / chunks;
#pragma omp parallel for schedule(static) if (n > 32768)
  for (std::size_t c = 0; c < chunks; ++c) {
    const std::size_t begin = std::min(n, c * per), end = std::min(n, (c + 1) * per);
    part[c] = row::lane_sum<T>(end - begin, [&](std::size_t i) { return f(begin + i); });
  }
  T s = T(0);
  for (std::size_t c = 0; c < chunks; ++c) s += part[c];
  return s;
}

// acc[j] += sum over r < rows of f(r, j), for each j < cols: threads split the columns, never
// the rows, so each column adds its rows in order 0, 1, ... as one thread would (the weight
// gradient of a norm, a bias's gradient).
template <class T, class F>
void add_column_reduction(std::size_t rows, std::size_t cols, T* acc, F&& f) {
  constexpr std::size_t block = 64;  // columns per task: whole cache lines of each row
  const std::size_t blocks = (cols + block - 1) / block;
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
  for (std::size_t cb = 0; cb < blocks; ++cb) {
    const std::size_t j0 = cb * block, j1 = std::min(cols, j0 + block);
    for (std::size_t r = 0; r < rows; ++r)
#pragma omp simd
      for (std::size_t j = j0; j < j1; ++j) acc[j] += f(r, j);
  }
}

}  // namespace skillgraft::cpu
