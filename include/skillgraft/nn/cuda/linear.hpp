#pragma once
// Linear layer on the CUDA backend, torch.nn.Linear layout: weight [out, in], optional bias [out].
//
//   forward   y  = x W^T + b                (one GEMM; bias broadcast over rows)
//   backward  dx = dy W                     (only when something below trains)
//             dW += dy^T x,  db += 1^T dy   (only when W trains; adds up over micro-batches)
//
// Low-rank adapters (lora<P> tags) are CPU-only for now: uploading a projection that carries
// one throws, and a recipe naming one does not compile for backend::cuda.
#include <string>
#include <string_view>

#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/nn/linear.hpp"

namespace skillgraft::nn::cuda {

template <class T>
using tensor = skillgraft::cuda::tensor<T>;
using cpu::shape_t;
using skillgraft::cuda::index_t;
using skillgraft::cuda::op;

template <class T>
struct linear_weights {
  tensor<T> weight;  // [out, in]
  tensor<T> bias;    // [out] or empty

  linear_weights() = default;
  linear_weights(std::size_t out, std::size_t in, bool with_bias, memory_use use)
      : weight({out, in}, use), bias(with_bias ? tensor<T>({out}, use) : tensor<T>()) {}
  std::size_t out_features() const { return weight.dim(0); }
  std::size_t in_features() const { return weight.dim(1); }
  bool has_bias() const { return !bias.empty(); }
  std::size_t elements() const { return weight.size() + bias.size(); }
  linear_weights like(memory_use use) const { return {out_features(), in_features(), has_bias(), use}; }

  static linear_weights upload(const nn::linear_weights<T>& h, memory_use use, std::string_view name) {
    if (h.has_lora())
      throw std::invalid_argument("skillgraft: " + std::string(name) +
                                  " carries a LoRA adapter; adapters are not implemented on the CUDA backend yet");
    linear_weights d;
    d.weight = tensor<T>::from_host(h.weight, use);
    if (h.has_bias()) d.bias = tensor<T>::from_host(h.bias, use);
    return d;
  }
  void download(nn::linear_weights<T>& h) const {
    weight.copy_to(h.weight);
    if (has_bias()) bias.copy_to(h.bias);
  }
};

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
}  // namespace kernels

// db[j] += sum_r dy[r, j]
template <class T>
void add_column_sums(const tensor<T>& dy, tensor<T>& db) {
  const index_t rows = index_t(dy.rows()), cols = index_t(dy.cols());
  tensor<T> sums({std::size_t(cols)}, memory_use::workspace);
  skillgraft::cuda::segmented_sum(cols, rows, kernels::column<T>{dy.data(), cols}, sums.data());
  skillgraft::cuda::add_into(db.data(), sums.data(), cols);
}

// y = x W^T + b
template <class T>
void linear_forward(const linear_weights<T>& w, const tensor<T>& x, tensor<T>& y, std::string_view what) {
  const int n = int(x.rows()), out = int(w.out_features()), in = int(w.in_features());
  skillgraft::cuda::gemm(what, op::n, op::t, n, out, in, T(1), x.data(), in, w.weight.data(), in, T(0), y.data(), out);
  if (w.has_bias()) skillgraft::cuda::for_each_index(index_t(n) * out, kernels::add_bias<T>{y.data(), w.bias.data(), out});
}

// dx (+)= dy W
template <class T>
void linear_backward_input(const linear_weights<T>& w, const tensor<T>& dy, tensor<T>& dx, bool accumulate,
                           std::string_view what) {
  const int n = int(dy.rows()), out = int(w.out_features()), in = int(w.in_features());
  skillgraft::cuda::gemm(what, op::n, op::n, n, in, out, T(1), dy.data(), out, w.weight.data(), in,
                         accumulate ? T(1) : T(0), dx.data(), in);
}

// dW += dy^T x,  db += column sums of dy
template <class T>
void linear_backward_weight(const tensor<T>& x, const tensor<T>& dy, linear_weights<T>& grad, std::string_view what) {
  const int n = int(dy.rows()), out = int(grad.out_features()), in = int(grad.in_features());
  skillgraft::cuda::gemm(what, op::t, op::n, out, in, n, T(1), dy.data(), out, x.data(), in, T(1), grad.weight.data(), in);
  if (grad.has_bias()) add_column_sums(dy, grad.bias);
}

template <class T>
void check_linear_input(const linear_weights<T>& w, const tensor<T>& x, std::string_view name) {
  if (x.cols() != w.in_features())
    throw std::invalid_argument("skillgraft: input of " + std::string(name) + " has " + std::to_string(x.cols()) +
                                " features (shape " + x.shape().str() + "), expected " + std::to_string(w.in_features()));
}

// f(name.weight, W, dW) and, with a bias, f(name.bias, b, db).
template <class T, class F>
void visit_linear(const char* name, linear_weights<T>& p, linear_weights<T>& dp, F& f) {
  f(std::string(name) + ".weight", p.weight, dp.weight);
  if (p.has_bias()) f(std::string(name) + ".bias", p.bias, dp.bias);
}

// The shape of `x` with its last dimension replaced.
inline shape_t with_last(shape_t s, std::size_t last) {
  s.dims[std::size_t(s.rank - 1)] = last;
  return s;
}

}  // namespace skillgraft::nn::cuda
