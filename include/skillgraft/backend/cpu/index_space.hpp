#pragma once
// Work over an index space [0, n) with an element functor, on the CPU: the form the optimizers,
// clipping and reductions of train/ are written in (each functor is SKILLGRAFT_HD, so the CUDA
// backend runs the same functor on the device).
#include <algorithm>
#include <cstdint>

#include "skillgraft/backend/cpu/reduction.hpp"
#include "skillgraft/backend/cpu/simd.hpp"
#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::cpu {

namespace detail {
// Whether pred holds anywhere in [b, b1), without a branch per element.
template <class F>
bool any_in(std::int64_t b, std::int64_t b1, const F& pred) {
  bool any = false;
  std::int64_t i = b;
  if constexpr (simd::packet_predicate<F>) {
    using V = simd::vec<typename F::value_type>;
    V flags(typename F::value_type(0));
    for (; i + V::size <= b1; i += V::size) flags = flags + pred.template lanes_fail<V>(i);
    any = any_flag(flags);
  }
#pragma omp simd reduction(| : any)
  for (std::int64_t j = i; j < b1; ++j) any |= pred(j);
  return any;
}
// The first i in [b, e) with pred(i), or -1: blocks tested without a branch per element
// (vectorisable), the one that hits searched element by element.
template <class F>
std::int64_t first_in(std::int64_t b, std::int64_t e, const F& pred) {
  constexpr std::int64_t block = 512;
  for (; b < e; b += block) {
    const std::int64_t b1 = std::min(e, b + block);
    if (any_in(b, b1, pred))
      for (std::int64_t i = b; i < b1; ++i)
        if (pred(i)) return i;
  }
  return -1;
}
}  // namespace detail

struct index_ops {
  // f(i) for every i in [0, n), in parallel; a packet at a time where f offers it (the last
  // n mod packet-size elements one by one, so an element's bits depend on its index only).
  template <class F>
  static void for_each_index(std::int64_t n, F f) {
    if constexpr (simd::packet_kernel<F>) {
      using V = simd::vec<typename F::value_type>;
      const std::int64_t packets = n / V::size;
#pragma omp parallel for schedule(static) if (n > 32768)
      for (std::int64_t k = 0; k < packets; ++k) f.template lanes<V>(k * V::size);
      for (std::int64_t i = packets * V::size; i < n; ++i) f(i);
    } else {
#pragma omp parallel for schedule(static) if (n > 32768)
      for (std::int64_t i = 0; i < n; ++i) f(i);
    }
  }
  // sum of f(i) in Acc, in a fixed order whatever the thread count.
  template <class Acc, class F>
  static Acc sum_index(std::int64_t n, F f) {
    return deterministic_sum<Acc>(std::size_t(n > 0 ? n : 0), [&](std::size_t i) { return Acc(f(std::int64_t(i))); });
  }
  // The first i in [0, n) with pred(i), or -1. Fixed chunks are searched in parallel (an
  // optimizer's checks read every gradient element each step); the first hit in chunk order wins.
  // Small tensors are searched the same way on one thread: the exact pred, with its square root and
  // division, only runs over a block the branch-free screen flagged (element by element it cost
  // three times the update on a 128-wide model, whose attention projections and norms are all
  // below the parallel threshold).
  template <class F>
  static std::int64_t find_first_index(std::int64_t n, F pred) {
    if (n < 32768) return detail::first_in(0, n, pred);
    constexpr std::int64_t chunks = 64;
    std::int64_t found[chunks];
    const std::int64_t per = (n + chunks - 1) / chunks;
#pragma omp parallel for schedule(static)
    for (std::int64_t c = 0; c < chunks; ++c) found[c] = detail::first_in(c * per, std::min(n, (c + 1) * per), pred);
    for (std::int64_t c = 0; c < chunks; ++c)
      if (found[c] >= 0) return found[c];
    return -1;
  }
  // One element, read on the host (error messages).
  template <class T>
  static T value_at(const tensor<T>& t, std::size_t i) {
    return t[i];
  }
};

}  // namespace skillgraft::cpu
