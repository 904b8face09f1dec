#pragma once
// The CUDA backend's element-wise and reduction operations on whole tensors, and the crossing
// between host and device memory.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "skillgraft/backend/cuda/algorithms.hpp"
#include "skillgraft/backend/cuda/tensor.hpp"
#include "skillgraft/backend/row_map.hpp"

namespace skillgraft::cuda {

namespace kernels {
template <class T>
struct add_bias {  // y[r, j] += b[j]
  T* y;
  const T* b;
  index_t out;
  SKILLGRAFT_HD void operator()(index_t i) const { y[i] += b[i % out]; }
};
template <class T>
struct column {  // element (c, r) of the column-major walk over x [rows, cols]
  const T* x;
  index_t cols;
  SKILLGRAFT_HD T operator()(index_t c, index_t r) const { return x[r * cols + c]; }
};
template <class T, class F>
struct map {  // y[i] = f(x[i])
  T* y;
  const T* x;
  F f;
  SKILLGRAFT_HD void operator()(index_t i) const { y[i] = f(x[i]); }
};
template <class T, class F>
struct multiply_by_map {  // y[i] *= f(x[i])
  T* y;
  const T* x;
  F f;
  SKILLGRAFT_HD void operator()(index_t i) const { y[i] *= f(x[i]); }
};
template <class T>
struct gather_rows {  // out[r, j] = in[from[r], j]
  T* out;
  const T* in;
  const std::int64_t* from;
  index_t row;
  SKILLGRAFT_HD void operator()(index_t e) const { out[e] = in[from[e / row] * row + e % row]; }
};
template <class T>
struct scatter_rows {  // out[to[r], j] = in[r, j]
  T* out;
  const T* in;
  const std::int64_t* to;
  index_t row;
  SKILLGRAFT_HD void operator()(index_t e) const { out[to[e / row] * row + e % row] = in[e]; }
};
}  // namespace kernels

struct elementwise_ops {
  // y += x (same number of elements)
  template <class T>
  static void add_into(tensor<T>& y, const tensor<T>& x) {
    cuda::add_into(y.data(), x.data(), index_t(x.size()));
  }
  // y[r, j] += b[j]
  template <class T>
  static void add_bias(tensor<T>& y, const tensor<T>& b) {
    for_each_index(index_t(y.size()), kernels::add_bias<T>{y.data(), b.data(), index_t(b.size())});
  }
  // db[j] += sum_r dy[r, j]
  template <class T>
  static void add_column_sums(const tensor<T>& dy, tensor<T>& db) {
    const index_t rows = index_t(dy.rows()), cols = index_t(dy.cols());
    tensor<T> sums({std::size_t(cols)}, memory_use::workspace);
    segmented_sum(cols, rows, kernels::column<T>{dy.data(), cols}, sums.data());
    cuda::add_into(db.data(), sums.data(), cols);
  }
  template <class T, class F>
  static void map(const tensor<T>& in, tensor<T>& out, F f) {
    for_each_index(index_t(in.size()), kernels::map<T, F>{out.data(), in.data(), f});
  }
  template <class T, class F>
  static void multiply_by_map(tensor<T>& y, const tensor<T>& x, F f) {
    for_each_index(index_t(y.size()), kernels::multiply_by_map<T, F>{y.data(), x.data(), f});
  }
  // Row r of out is row from[r] of in (the map is uploaded; one thread per element).
  template <class T>
  static void gather_rows(const tensor<T>& in, std::size_t row, const std::vector<std::int64_t>& from, tensor<T>& out) {
    row_map::check("gather_rows", from, row, in.size(), out.size(), false);
    const auto d_from = upload_indices(from);
    for_each_index(index_t(from.size() * row), kernels::gather_rows<T>{out.data(), in.data(), d_from.data(), index_t(row)});
  }
  template <class T>
  static void scatter_rows(const tensor<T>& in, std::size_t row, const std::vector<std::int64_t>& to, tensor<T>& out) {
    row_map::check("scatter_rows", to, row, out.size(), in.size(), true);
    const auto d_to = upload_indices(to);
    for_each_index(index_t(to.size() * row), kernels::scatter_rows<T>{out.data(), in.data(), d_to.data(), index_t(row)});
  }
  template <class T>
  static tensor<T> upload(const cpu::tensor<T>& host, memory_use use) {
    return tensor<T>::from_host(host, use);
  }
  template <class T>
  static void download(const tensor<T>& t, cpu::tensor<T>& host) {
    t.copy_to(host);
  }
};

}  // namespace skillgraft::cuda
