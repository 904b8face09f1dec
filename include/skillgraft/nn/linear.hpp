#pragma once
// Linear layer, torch.nn.Linear layout: weight [out, in], optional bias [out], optional
// low-rank adapter (LoRA, Hu et al.) A [r, in], B [out, r] with scale s = alpha / r.
//
//   forward   y  = x W^T + b + s (x A^T) B^T          (u = x A^T is kept when B trains)
//   backward  dx = dy W + s (dy B) A                  (only when something below trains)
//             dW += dy^T x,  db += 1^T dy             (only when W trains; adds up over micro-batches)
//             dB += s dy^T u,  dA += s (dy B)^T x     (only when the adapter trains)
#include <string_view>
#include <type_traits>

#include "skillgraft/backend/cpu/tensor.hpp"
#include "skillgraft/nn/optional_member.hpp"

namespace skillgraft::nn {

using cpu::tensor;
using cpu::shape_t;

// The two factors of a low-rank adapter (also the shape of their gradients).
template <class T>
struct lora_factors {
  tensor<T> A;  // lora_A.weight [r, in]
  tensor<T> B;  // lora_B.weight [out, r]
  std::size_t rank() const { return A.empty() ? 0 : A.dim(0); }
  std::size_t elements() const { return A.size() + B.size(); }
  lora_factors like(memory_use use) const {
    return {tensor<T>(A.shape(), use), tensor<T>(B.shape(), use)};
  }
};

template <class T>
struct linear_weights {
  tensor<T> weight;  // [out, in]
  tensor<T> bias;    // [out] or empty
  lora_factors<T> lora;  // empty unless an adapter is attached
  T lora_scale = T(0);   // alpha / r

  linear_weights() = default;
  linear_weights(std::size_t out, std::size_t in, bool with_bias, memory_use use)
      : weight({out, in}, use), bias(with_bias ? tensor<T>({out}, use) : tensor<T>()) {}
  std::size_t out_features() const { return weight.dim(0); }
  std::size_t in_features() const { return weight.dim(1); }
  bool has_bias() const { return !bias.empty(); }
  bool has_lora() const { return !lora.A.empty(); }
  std::size_t elements() const { return weight.size() + bias.size(); }  // base parameters only
  // A buffer of the same shapes for gradients or optimizer moments.
  linear_weights like(memory_use use) const { return {out_features(), in_features(), has_bias(), use}; }
};

// --- the math, shared by every layer that owns projections ---------------------------

// u (optional, [rows, r]) receives x A^T when the caller keeps it for dB.
template <class T>
void linear_forward(const linear_weights<T>& w, const tensor<T>& x, tensor<T>& y, tensor<T>* u = nullptr) {
  y.mat().noalias() = x.mat() * w.weight.mat().transpose();
  if (w.has_bias()) y.mat().rowwise() += w.bias.vec().transpose();
  if (w.has_lora()) {
    using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    mat xa = x.mat() * w.lora.A.mat().transpose();
    y.mat().noalias() += (w.lora_scale * xa) * w.lora.B.mat().transpose();
    if (u) u->mat() = xa;
  }
}

// dx (+)= dy W + s (dy B) A
template <class T>
void linear_backward_input(const linear_weights<T>& w, const tensor<T>& dy, tensor<T>& dx, bool accumulate) {
  if (accumulate)
    dx.mat().noalias() += dy.mat() * w.weight.mat();
  else
    dx.mat().noalias() = dy.mat() * w.weight.mat();
  if (w.has_lora()) {
    using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    mat dyb = dy.mat() * w.lora.B.mat();
    dx.mat().noalias() += (w.lora_scale * dyb) * w.lora.A.mat();
  }
}

// dB += s dy^T u,  dA += s (dy B)^T x
template <class T>
void lora_backward(const linear_weights<T>& w, const tensor<T>& x, const tensor<T>& u, const tensor<T>& dy,
                   lora_factors<T>& grad) {
  using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  grad.B.mat().noalias() += w.lora_scale * (dy.mat().transpose() * u.mat());
  mat dyb = dy.mat() * w.lora.B.mat();
  grad.A.mat().noalias() += w.lora_scale * (dyb.transpose() * x.mat());
}

// Throws unless the projection carries an adapter (a recipe naming lora<P> needs one on P).
template <class T>
void require_lora(const linear_weights<T>& w, std::string_view name) {
  if (!w.has_lora())
    throw std::invalid_argument("skillgraft: the recipe trains a LoRA adapter on " + std::string(name) +
                                ", but it has none (attach adapters first, see cl/lora.hpp)");
}

// dW += dy^T x,  db += column sums of dy
template <class T>
void linear_backward_weight(const tensor<T>& x, const tensor<T>& dy, linear_weights<T>& grad) {
  grad.weight.mat().noalias() += dy.mat().transpose() * x.mat();
  if (grad.has_bias()) grad.bias.vec().noalias() += dy.mat().colwise().sum().transpose();
}

template <class T>
void check_linear_input(const linear_weights<T>& w, const tensor<T>& x, std::string_view name) {
  if (x.cols() != static_cast<Eigen::Index>(w.in_features()))
    throw std::invalid_argument("skillgraft: input of " + std::string(name) + " has " + std::to_string(x.cols()) +
                                " features (shape " + x.shape().str() + "), expected " +
                                std::to_string(w.in_features()));
}

// The layer alone, as a policy-specialised module (used on its own and by the gradient checker).
struct no_members {};

template <class T, bool TrainWeight, bool NeedsInputGrad>
struct linear {
  using value_type = T;
  using weights_t = linear_weights<T>;
  static constexpr bool trains_weight = TrainWeight;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  struct saved_t : members::optional_x<TrainWeight, tensor<T>> {};
  struct grads_t : std::conditional_t<TrainWeight, linear_weights<T>, no_members> {};

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    if constexpr (TrainWeight) static_cast<linear_weights<T>&>(g) = w.like(memory_use::gradients);
    return g;
  }

  tensor<T> forward(const weights_t& w, const tensor<T>& x, saved_t& s) const {
    check_linear_input(w, x, "linear");
    shape_t ys = x.shape();
    ys.dims[static_cast<std::size_t>(ys.rank - 1)] = w.out_features();
    tensor<T> y(ys, memory_use::workspace);
    linear_forward(w, x, y);
    if constexpr (TrainWeight) s.x = x.clone(memory_use::saved_activations);
    return y;
  }

  tensor<T> backward(const weights_t& w, const saved_t& s, const tensor<T>& dy, grads_t& g) const {
    if constexpr (TrainWeight) linear_backward_weight(s.x, dy, static_cast<linear_weights<T>&>(g));
    if constexpr (NeedsInputGrad) {
      shape_t xs = dy.shape();
      xs.dims[static_cast<std::size_t>(xs.rank - 1)] = w.in_features();
      tensor<T> dx(xs, memory_use::workspace);
      linear_backward_input(w, dy, dx, false);
      return dx;
    } else {
      return {};
    }
  }

  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    if constexpr (TrainWeight) {
      f("weight", w.weight, g.weight);
      if (w.has_bias()) f("bias", w.bias, g.bias);
    }
  }
};

}  // namespace skillgraft::nn
