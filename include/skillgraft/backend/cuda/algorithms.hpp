#pragma once
// The few parallel patterns the layers are written in, as Thrust algorithms that run on
// the GPU or, in the host build, on the host:
//
//   for_each_index(n, f)                        f(i) for i in [0, n)
//   segmented_reduce(segments, len, f, out, op) out[s] = op-fold of f(s, j), j in [0, len)
//   transform_n(n, f, out)                      out[i] = f(i)
//
// Layers describe one element (or one element of a segment) with a small functor and keep
// the indexing math next to the formula; Thrust owns the launch, the tiling and the
// segmented reductions (reduce_by_key over computed keys: no index arrays are stored).
#include <cstdint>
#include <cmath>
#include <limits>

#include <thrust/for_each.h>
#include <thrust/functional.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/discard_iterator.h>
#include <thrust/iterator/transform_iterator.h>
#include <thrust/reduce.h>
#include <thrust/transform.h>

#include "skillgraft/backend/cuda/memory.hpp"

namespace skillgraft::cuda {

using index_t = std::int64_t;

template <class F>
void for_each_index(index_t n, F f) {
  if (n > 0) thrust::for_each_n(exec(), thrust::counting_iterator<index_t>(0), n, f);
}

template <class F, class Out>
void transform_n(index_t n, F f, Out* out) {
  if (n > 0) thrust::transform(exec(), thrust::counting_iterator<index_t>(0), thrust::counting_iterator<index_t>(n), out, f);
}

namespace detail {
struct segment_of {
  index_t len;
  SKILLGRAFT_HD index_t operator()(index_t i) const { return i / len; }
};
template <class F>
struct segment_element {
  F f;
  index_t len;
  SKILLGRAFT_HD auto operator()(index_t i) const { return f(i / len, i % len); }
};
}  // namespace detail

// out[s] = f(s, 0) op f(s, 1) op ... op f(s, len - 1) for s in [0, segments).
template <class F, class Out, class Op>
void segmented_reduce(index_t segments, index_t len, F f, Out* out, Op op) {
  if (segments <= 0) return;
  const index_t n = segments * len;
  auto keys = thrust::make_transform_iterator(thrust::counting_iterator<index_t>(0), detail::segment_of{len});
  auto values = thrust::make_transform_iterator(thrust::counting_iterator<index_t>(0), detail::segment_element<F>{f, len});
  thrust::reduce_by_key(exec(), keys, keys + n, values, thrust::make_discard_iterator(), out, thrust::equal_to<index_t>(),
                        op);
}
template <class F, class Out>
void segmented_sum(index_t segments, index_t len, F f, Out* out) {
  segmented_reduce(segments, len, f, out, thrust::plus<Out>());
}

// Sum over all of f(i), i in [0, n), accumulated in Acc.
template <class Acc, class F>
Acc sum_index(index_t n, F f) {
  if (n <= 0) return Acc(0);
  auto values = thrust::make_transform_iterator(thrust::counting_iterator<index_t>(0), f);
  return thrust::reduce(exec(), values, values + n, Acc(0), thrust::plus<Acc>());
}

// Element-wise building blocks used by several layers.
template <class T>
struct add_to {  // y[i] += x[i]
  T* y;
  const T* x;
  SKILLGRAFT_HD void operator()(index_t i) const { y[i] += x[i]; }
};
template <class T>
void add_into(T* y, const T* x, index_t n) {
  for_each_index(n, add_to<T>{y, x});
}

// Maximum, usable in device code (std::max is not).
template <class T>
struct maximum {
  SKILLGRAFT_HD T operator()(T a, T b) const { return a < b ? b : a; }
};

// exp, log, sqrt, erf for float and double on either side.
using scalar::erf_;
using scalar::is_finite;
using scalar::exp_;
using scalar::log_;
using scalar::sqrt_;

}  // namespace skillgraft::cuda
