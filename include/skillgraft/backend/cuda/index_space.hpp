#pragma once
// Work over an index space [0, n) with an element functor on the CUDA backend (Thrust):
// the twin of backend/cpu/index_space.hpp, running the same SKILLGRAFT_HD functors.
#include <cstdint>

#include <thrust/find.h>
#include <thrust/iterator/counting_iterator.h>

#include "skillgraft/backend/cuda/algorithms.hpp"
#include "skillgraft/backend/cuda/tensor.hpp"

namespace skillgraft::cuda {

struct index_ops {
  template <class F>
  static void for_each_index(std::int64_t n, F f) {
    cuda::for_each_index(index_t(n), f);
  }
  template <class Acc, class F>
  static Acc sum_index(std::int64_t n, F f) {
    return cuda::sum_index<Acc>(index_t(n), f);
  }
  template <class F>
  static std::int64_t find_first_index(std::int64_t n, F pred) {
    if (n <= 0) return -1;
    const auto first = thrust::counting_iterator<index_t>(0), last = first + index_t(n);
    const auto at = thrust::find_if(exec(), first, last, pred);
    return at == last ? -1 : std::int64_t(at - first);
  }
  template <class T>
  static T value_at(const tensor<T>& t, std::size_t i) {
    cpu::tensor<T> one({1}, memory_use::workspace);
    t.copy_range_to(i, 1, one.data());
    return one[0];
  }
};

}  // namespace skillgraft::cuda
