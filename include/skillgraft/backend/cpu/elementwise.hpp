#pragma once
// The CPU backend's element-wise and reduction operations on whole tensors, and the crossing
// to and from host memory (a copy here: CPU tensors already live there).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "skillgraft/backend/cpu/reduction.hpp"
#include "skillgraft/backend/cpu/tensor.hpp"
#include "skillgraft/backend/row_map.hpp"

namespace skillgraft::cpu {

struct elementwise_ops {
  // y += x (same number of elements)
  template <class T>
  static void add_into(tensor<T>& y, const tensor<T>& x) {
    const std::size_t n = y.size();
    const T* xp = x.data();
    T* yp = y.data();
#pragma omp parallel for simd schedule(static) if (n > 32768)
    for (std::size_t i = 0; i < n; ++i) yp[i] += xp[i];
  }
  // y[r, j] += b[j]
  template <class T>
  static void add_bias(tensor<T>& y, const tensor<T>& b) {
    const std::size_t rows = y.size() / b.size(), d = b.size();
    const T* bp = b.data();
    T* yp = y.data();
#pragma omp parallel for schedule(static) if (rows * d > 32768)
    for (std::size_t r = 0; r < rows; ++r)
#pragma omp simd
      for (std::size_t j = 0; j < d; ++j) yp[r * d + j] += bp[j];
  }
  // db[j] += sum_r dy[r, j]
  template <class T>
  static void add_column_sums(const tensor<T>& dy, tensor<T>& db) {
    const std::size_t d = db.size();
    const T* dyp = dy.data();
    add_column_reduction(dy.size() / d, d, db.data(), [&](std::size_t r, std::size_t j) { return dyp[r * d + j]; });
  }
  // out[i] = f(in[i]) for an element-wise functor f (SKILLGRAFT_HD, so every backend can run it).
  template <class T, class F>
  static void map(const tensor<T>& in, tensor<T>& out, F f) {
    const std::size_t n = in.size();
    const T* x = in.data();
    T* y = out.data();
#pragma omp parallel for schedule(static) if (n > 32768)
    for (std::size_t i = 0; i < n; ++i) y[i] = f(x[i]);
  }
  // y[i] *= f(x[i])
  template <class T, class F>
  static void multiply_by_map(tensor<T>& y, const tensor<T>& x, F f) {
    const std::size_t n = y.size();
    const T* xp = x.data();
    T* yp = y.data();
#pragma omp parallel for schedule(static) if (n > 32768)
    for (std::size_t i = 0; i < n; ++i) yp[i] *= f(xp[i]);
  }
  // Row r of out (rows of `row` elements) is row from[r] of in: patch cutting and the patch
  // merger are such permutations, their index maps computed on the host by the caller.
  template <class T>
  static void gather_rows(const tensor<T>& in, std::size_t row, const std::vector<std::int64_t>& from, tensor<T>& out) {
    row_map::check("gather_rows", from, row, in.size(), out.size(), false);
#pragma omp parallel for schedule(static) if (from.size() * row > 32768)
    for (std::size_t r = 0; r < from.size(); ++r)
      std::copy_n(in.data() + std::size_t(from[r]) * row, row, out.data() + r * row);
  }
  // Row to[r] of out is row r of in (the inverse of gather_rows; no target may repeat).
  template <class T>
  static void scatter_rows(const tensor<T>& in, std::size_t row, const std::vector<std::int64_t>& to, tensor<T>& out) {
    row_map::check("scatter_rows", to, row, out.size(), in.size(), true);
#pragma omp parallel for schedule(static) if (to.size() * row > 32768)
    for (std::size_t r = 0; r < to.size(); ++r)
      std::copy_n(in.data() + r * row, row, out.data() + std::size_t(to[r]) * row);
  }
  // A tensor of this backend holding the host tensor's values, and the way back.
  template <class T>
  static tensor<T> upload(const tensor<T>& host, memory_use use) {
    return host.clone(use);
  }
  template <class T>
  static void download(const tensor<T>& t, tensor<T>& host) {
    expect_shape(host, t.shape(), "host tensor for a download");
    if (t.size()) std::memcpy(static_cast<void*>(host.data()), t.data(), t.bytes());
  }
};

}  // namespace skillgraft::cpu
