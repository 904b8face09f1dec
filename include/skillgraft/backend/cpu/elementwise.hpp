#pragma once
// The CPU backend's element-wise and reduction operations on whole tensors, and the crossing
// to and from host memory (a copy here: CPU tensors already live there).
#include <cstring>

#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::cpu {

struct elementwise_ops {
  // y += x (same number of elements)
  template <class T>
  static void add_into(tensor<T>& y, const tensor<T>& x) {
    y.vec() += x.vec();
  }
  // y[r, j] += b[j]
  template <class T>
  static void add_bias(tensor<T>& y, const tensor<T>& b) {
    y.mat().rowwise() += b.vec().transpose();
  }
  // db[j] += sum_r dy[r, j]
  template <class T>
  static void add_column_sums(const tensor<T>& dy, tensor<T>& db) {
    db.vec().noalias() += dy.mat().colwise().sum().transpose();
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
