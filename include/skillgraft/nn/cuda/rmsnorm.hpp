#pragma once
// RMSNorm on the CUDA backend (LLaMA / Qwen2): no mean subtraction, no bias.
//
//   forward   r_i = 1 / sqrt(mean_j x_ij^2 + eps),   y_ij = w_j x_ij r_i
//   backward  with xhat = x r:
//             dw_j += sum_i dy_ij xhat_ij
//             dx_ij = r_i (w_j dy_ij - xhat_ij * mean_k(w_k dy_ik xhat_ik))
// Row sums accumulate in double, as on the CPU (d can be thousands of terms).
#include "skillgraft/nn/cuda/linear.hpp"
#include "skillgraft/nn/optional_member.hpp"

namespace skillgraft::nn::cuda {

namespace kernels {
template <class T>
struct squares {  // x_ij^2, row i
  const T* x;
  index_t d;
  SKILLGRAFT_HD double operator()(index_t i, index_t j) const {
    const double v = double(x[i * d + j]);
    return v * v;
  }
};
template <class T>
struct rstd_of {  // r_i = 1 / sqrt(ss_i / d + eps)
  const double* ss;
  double d, eps;
  SKILLGRAFT_HD T operator()(index_t i) const { return T(1.0 / skillgraft::cuda::sqrt_(ss[i] / d + eps)); }
};
template <class T>
struct rms_scale {  // y_ij = w_j (x_ij r_i)
  T* y;
  const T* x;
  const T* w;
  const T* r;
  index_t d;
  SKILLGRAFT_HD void operator()(index_t i) const { y[i] = w[i % d] * (x[i] * r[i / d]); }
};
template <class T>
struct dy_xhat {  // element (j, i): dy_ij xhat_ij, reduced over rows i for dw_j
  const T* dy;
  const T* x;
  const T* r;
  index_t d;
  SKILLGRAFT_HD T operator()(index_t j, index_t i) const { return dy[i * d + j] * (x[i * d + j] * r[i]); }
};
template <class T>
struct w_dy_xhat {  // element (i, j): w_j dy_ij xhat_ij, reduced over j
  const T* w;
  const T* dy;
  const T* x;
  const T* r;
  index_t d;
  SKILLGRAFT_HD double operator()(index_t i, index_t j) const {
    return double(w[j]) * double(dy[i * d + j]) * double(x[i * d + j] * r[i]);
  }
};
template <class T>
struct rms_dx {  // dx_ij (+)= r_i (w_j dy_ij - xhat_ij mean_i)
  T* dx;
  const T* w;
  const T* dy;
  const T* x;
  const T* r;
  const double* dot;
  index_t d;
  bool accumulate;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t i = e / d, j = e % d;
    const T ri = r[i], mean = T(dot[i] / double(d));
    const T g = ri * (w[j] * dy[e] - (x[e] * ri) * mean);
    dx[e] = accumulate ? dx[e] + g : g;
  }
};
}  // namespace kernels

// y = rmsnorm(x; w); writes r (one per row) into rstd when non-null.
template <class T>
void rmsnorm_forward(const tensor<T>& w, const tensor<T>& x, double eps, tensor<T>& y, tensor<T>* rstd) {
  const index_t n = index_t(x.rows()), d = index_t(x.cols());
  tensor<double> ss({std::size_t(n)}, memory_use::workspace);
  skillgraft::cuda::segmented_sum(n, d, kernels::squares<T>{x.data(), d}, ss.data());
  tensor<T> r_local;
  if (!rstd) r_local = tensor<T>({std::size_t(n)}, memory_use::workspace);
  tensor<T>& r = rstd ? *rstd : r_local;
  skillgraft::cuda::transform_n(n, kernels::rstd_of<T>{ss.data(), double(d), eps}, r.data());
  skillgraft::cuda::for_each_index(n * d, kernels::rms_scale<T>{y.data(), x.data(), w.data(), r.data(), d});
}

// Accumulates dw (when non-null) and writes or adds dx (when non-null).
template <class T>
void rmsnorm_backward(const tensor<T>& w, const tensor<T>& x, const tensor<T>& rstd, const tensor<T>& dy, tensor<T>* dw,
                      tensor<T>* dx, bool accumulate_dx) {
  const index_t n = index_t(x.rows()), d = index_t(x.cols());
  if (dw) {
    tensor<T> sums({std::size_t(d)}, memory_use::workspace);
    skillgraft::cuda::segmented_sum(d, n, kernels::dy_xhat<T>{dy.data(), x.data(), rstd.data(), d}, sums.data());
    skillgraft::cuda::add_into(dw->data(), sums.data(), d);
  }
  if (dx) {
    tensor<double> dot({std::size_t(n)}, memory_use::workspace);
    skillgraft::cuda::segmented_sum(n, d, kernels::w_dy_xhat<T>{w.data(), dy.data(), x.data(), rstd.data(), d}, dot.data());
    skillgraft::cuda::for_each_index(
        n * d, kernels::rms_dx<T>{dx->data(), w.data(), dy.data(), x.data(), rstd.data(), dot.data(), d, accumulate_dx});
  }
}

template <class T>
void check_norm_input(const tensor<T>& w, const tensor<T>& x, std::string_view name) {
  if (x.cols() != w.size())
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

  tensor<T> forward(const weights_t& w, const tensor<T>& x, saved_t& s, std::string_view name = "rmsnorm") const {
    check_norm_input(w, x, name);
    tensor<T> y(x.shape(), memory_use::workspace);
    if constexpr (keeps_input) {
      s.rstd = tensor<T>({x.rows()}, memory_use::saved_activations);
      rmsnorm_forward(w, x, eps, y, &s.rstd);
      s.x = x.clone(memory_use::saved_activations);
    } else {
      rmsnorm_forward<T>(w, x, eps, y, nullptr);
    }
    return y;
  }

  // Adds into dw (when the weight trains); returns dx when NeedsInputGrad, else an empty tensor.
  static tensor<T> backward_into(const weights_t& w, const saved_t& s, const tensor<T>& dy, tensor<T>* dw) {
    tensor<T> dx;
    if constexpr (keeps_input) {
      if constexpr (NeedsInputGrad) dx = tensor<T>(dy.shape(), memory_use::workspace);
      rmsnorm_backward(w, s.x, s.rstd, dy, TrainWeight ? dw : nullptr, NeedsInputGrad ? &dx : nullptr, false);
    }
    return dx;
  }
};

}  // namespace skillgraft::nn::cuda
