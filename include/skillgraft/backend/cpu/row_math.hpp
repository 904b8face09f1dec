#pragma once
// Vectorised row kernels whose results do not depend on where the row lies in memory.
//
// Eigen's vectorised expressions peel unaligned leading elements off to scalar code: over a row
// at an arbitrary address, which elements get the packet exp (or which partial sums a reduction
// forms) depends on the address, so the same row at another address gives other last bits. With
// a caching allocator the same tensor lands at different addresses from run to run, and
// training must stay bit-for-bit repeatable. Here every element goes through the same packet
// code (unaligned loads; the tail through one padded packet), and sums keep a fixed number of
// lanes added in a fixed order: the bits depend on the row's values and length only.
#include <Eigen/Core>

#include <algorithm>
#include <cstddef>

#include "skillgraft/backend/cpu/simd.hpp"

namespace skillgraft::cpu::row {

// sum over i < n of term(i), accumulated in Acc: 16 lanes (lane i % 16), then the lanes pairwise.
template <class Acc, class F>
Acc lane_sum(std::size_t n, F term) {
  constexpr std::size_t lanes = 16;
  Acc lane[lanes] = {};
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes)
#pragma omp simd
    for (std::size_t l = 0; l < lanes; ++l) lane[l] += term(i + l);
  for (std::size_t l = 0; i + l < n; ++l) lane[l] += term(i + l);
  for (std::size_t half = lanes / 2; half > 0; half /= 2)
    for (std::size_t l = 0; l < half; ++l) lane[l] += lane[l + half];
  return lane[0];
}

template <class T>
T max(const T* x, std::size_t n) {
  return *std::max_element(x, x + n);
}

// x[i] = exp(x[i] - shift) for i < n, every element through Eigen's packet exp.
template <class T>
void exp_shifted(T* x, std::size_t n, T shift) {
  using V = simd::vec<T>;
  constexpr std::size_t w = std::size_t(V::size);
  const V s(shift);
  std::size_t i = 0;
  for (; i + w <= n; i += w) exp_(V::load(x + i) - s).store(x + i);
  if (i < n) {
    T tail[w];
    std::fill(tail, tail + w, shift);
    std::copy(x + i, x + n, tail);
    exp_(V::load(tail) - s).store(tail);
    std::copy(tail, tail + (n - i), x + i);
  }
}

// x = softmax(x) over n elements; returns the sum of exponentials it divided by (in T).
template <class T>
T softmax(T* x, std::size_t n) {
  exp_shifted(x, n, max(x, n));
  const T sum = lane_sum<T>(n, [&](std::size_t i) { return x[i]; });
  const T inv = T(1) / sum;
  for (std::size_t i = 0; i < n; ++i) x[i] *= inv;
  return sum;
}

}  // namespace skillgraft::cpu::row
