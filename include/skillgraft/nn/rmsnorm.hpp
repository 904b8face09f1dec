#pragma once
// RMSNorm (LLaMA / Qwen2): no mean subtraction, no bias.
//
//   forward   r_i = 1 / sqrt(mean_j x_ij^2 + eps),   y_ij = w_j x_ij r_i
//   backward  with xhat = x r:
//             dw_j += sum_i dy_ij xhat_ij
//             dx_ij = r_i (w_j dy_ij - xhat_ij * mean_k(w_k dy_ik xhat_ik))
#include <cmath>
#include <string_view>

#include "skillgraft/backend/cpu/tensor.hpp"
#include "skillgraft/nn/linear.hpp"
#include "skillgraft/nn/optional_member.hpp"

namespace skillgraft::nn {

// y = rmsnorm(x; w); writes r (one per row) when rstd is non-null.
template <class T>
void rmsnorm_forward(const tensor<T>& w, const tensor<T>& x, double eps, tensor<T>& y, tensor<T>* rstd) {
  const Eigen::Index n = x.rows(), d = x.cols();
  const T* xp = x.data();
  const T* wp = w.data();
  T* yp = y.data();
#pragma omp parallel for schedule(static) if (n * d > 32768)
  for (Eigen::Index i = 0; i < n; ++i) {
    const T* xr = xp + i * d;
    double ss = 0;  // sum of squares in double: d can be thousands of terms
    for (Eigen::Index j = 0; j < d; ++j) ss += double(xr[j]) * double(xr[j]);
    const T r = static_cast<T>(1.0 / std::sqrt(ss / double(d) + eps));
    T* yr = yp + i * d;
    for (Eigen::Index j = 0; j < d; ++j) yr[j] = wp[j] * (xr[j] * r);
    if (rstd) (*rstd)[static_cast<std::size_t>(i)] = r;
  }
}

// Accumulates dw (when non-null) and writes or adds dx (when non-null).
template <class T>
void rmsnorm_backward(const tensor<T>& w, const tensor<T>& x, const tensor<T>& rstd, const tensor<T>& dy,
                      tensor<T>* dw, tensor<T>* dx, bool accumulate_dx) {
  const Eigen::Index n = x.rows(), d = x.cols();
  if (dw) {
    // Column reduction: serial over rows keeps the sum deterministic for any thread count.
    T* dwp = dw->data();
    for (Eigen::Index i = 0; i < n; ++i) {
      const T r = rstd[static_cast<std::size_t>(i)];
      const T* xr = x.data() + i * d;
      const T* dyr = dy.data() + i * d;
      for (Eigen::Index j = 0; j < d; ++j) dwp[j] += dyr[j] * (xr[j] * r);
    }
  }
  if (dx) {
    const T* wp = w.data();
#pragma omp parallel for schedule(static) if (n * d > 32768)
    for (Eigen::Index i = 0; i < n; ++i) {
      const T r = rstd[static_cast<std::size_t>(i)];
      const T* xr = x.data() + i * d;
      const T* dyr = dy.data() + i * d;
      double dot = 0;
      for (Eigen::Index j = 0; j < d; ++j) dot += double(wp[j]) * double(dyr[j]) * double(xr[j] * r);
      const T mean = static_cast<T>(dot / double(d));
      T* dxr = dx->data() + i * d;
      for (Eigen::Index j = 0; j < d; ++j) {
        const T g = r * (wp[j] * dyr[j] - (xr[j] * r) * mean);
        dxr[j] = accumulate_dx ? dxr[j] + g : g;
      }
    }
  }
}

template <class T>
void check_norm_input(const tensor<T>& w, const tensor<T>& x, std::string_view name) {
  if (x.cols() != static_cast<Eigen::Index>(w.size()))
    throw std::invalid_argument("skillgraft: input of " + std::string(name) + " has " + std::to_string(x.cols()) +
                                " features (shape " + x.shape().str() + "), expected " + std::to_string(w.size()));
}

// The layer alone. Keeps x and r only when its weight trains or the input gradient is needed.
template <class T, bool TrainWeight, bool NeedsInputGrad>
struct rmsnorm {
  using value_type = T;
  using weights_t = tensor<T>;
  static constexpr bool trains_weight = TrainWeight;
  static constexpr bool needs_input_grad = NeedsInputGrad;
  static constexpr bool keeps_input = TrainWeight || NeedsInputGrad;

  struct saved_t : members::optional_x<keeps_input, tensor<T>>, members::optional_rstd<keeps_input, tensor<T>> {};
  struct grads_t : members::optional_weight<TrainWeight, tensor<T>> {};

  double eps = 1e-6;

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    if constexpr (TrainWeight) g.weight = tensor<T>(w.shape(), memory_use::gradients);
    return g;
  }

  tensor<T> forward(const weights_t& w, const tensor<T>& x, saved_t& s) const {
    check_norm_input(w, x, "rmsnorm");
    tensor<T> y(x.shape(), memory_use::workspace);
    if constexpr (keeps_input) {
      s.rstd = tensor<T>({static_cast<std::size_t>(x.rows())}, memory_use::saved_activations);
      rmsnorm_forward(w, x, eps, y, &s.rstd);
      s.x = x.clone(memory_use::saved_activations);
    } else {
      rmsnorm_forward<T>(w, x, eps, y, nullptr);
    }
    return y;
  }

  tensor<T> backward(const weights_t& w, const saved_t& s, const tensor<T>& dy, grads_t& g) const {
    tensor<T>* dw = nullptr;
    if constexpr (TrainWeight) dw = &g.weight;
    return backward_into(w, s, dy, dw);
  }

  // For owners that keep the weight gradient elsewhere (the decoder block).
  static tensor<T> backward_into(const weights_t& w, const saved_t& s, const tensor<T>& dy, tensor<T>* dw) {
    tensor<T> dx;
    if constexpr (keeps_input) {
      if constexpr (NeedsInputGrad) dx = tensor<T>(dy.shape(), memory_use::workspace);
      rmsnorm_backward(w, s.x, s.rstd, dy, TrainWeight ? dw : nullptr, NeedsInputGrad ? &dx : nullptr, false);
    }
    return dx;
  }

  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    if constexpr (TrainWeight) f("weight", w, g.weight);
  }
};

}  // namespace skillgraft::nn
