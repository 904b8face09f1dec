#pragma once
// Linear layer, torch.nn.Linear layout: weight [out, in], optional bias [out], optional
// low-rank adapter (LoRA, Hu et al.) A [r, in], B [out, r] with scale s = alpha / r.
//
//   forward   y  = x W^T + b + s (x A^T) B^T          (u = x A^T is kept when B trains)
//   backward  dx = dy W + s (dy B) A                  (only when something below trains)
//             dW += dy^T x,  db += 1^T dy             (only when W trains; adds up over micro-batches)
//             dB += s dy^T u,  dA += s (dy B)^T x     (only when the adapter trains)
//
// Written once for every backend: the products are Backend::gemm calls on row-major tensors
// (all leading dimensions folded into rows), the bias terms Backend::add_bias / add_column_sums.
#include <string>
#include <string_view>
#include <type_traits>

#include "skillgraft/backend/cpu/backend.hpp"
#include "skillgraft/nn/optional_member.hpp"

namespace skillgraft::nn {

using cpu::shape_t;
template <class T>
using tensor = cpu::tensor<T>;  // the CPU tensor, for code that names no backend

// The shape of `s` with its last dimension replaced.
inline shape_t with_last(shape_t s, std::size_t last) {
  s.dims[std::size_t(s.rank - 1)] = last;
  return s;
}

// The two factors of a low-rank adapter (also the shape of their gradients).
template <class T, class Backend = backend::cpu>
struct lora_factors {
  using tensor_t = typename Backend::template tensor<T>;
  tensor_t A;  // lora_A.weight [r, in]
  tensor_t B;  // lora_B.weight [out, r]
  std::size_t rank() const { return A.empty() ? 0 : A.dim(0); }
  std::size_t elements() const { return A.size() + B.size(); }
  lora_factors like(memory_use use) const { return {tensor_t(A.shape(), use), tensor_t(B.shape(), use)}; }
};

template <class T, class Backend = backend::cpu>
struct linear_weights {
  using tensor_t = typename Backend::template tensor<T>;
  using backend_type = Backend;
  tensor_t weight;                 // [out, in]
  tensor_t bias;                   // [out] or empty
  lora_factors<T, Backend> lora;   // empty unless an adapter is attached
  T lora_scale = T(0);             // alpha / r

  linear_weights() = default;
  linear_weights(std::size_t out, std::size_t in, bool with_bias, memory_use use)
      : weight({out, in}, use), bias(with_bias ? tensor_t({out}, use) : tensor_t()) {}
  std::size_t out_features() const { return weight.dim(0); }
  std::size_t in_features() const { return weight.dim(1); }
  bool has_bias() const { return !bias.empty(); }
  bool has_lora() const { return !lora.A.empty(); }
  std::size_t elements() const { return weight.size() + bias.size(); }  // base parameters only
  // A buffer of the same shapes for gradients or optimizer moments.
  linear_weights like(memory_use use) const { return {out_features(), in_features(), has_bias(), use}; }

  // Every tensor with its name relative to the projection ("weight", "lora_A.weight"), paired
  // with the same tensor of `other` (weights of another backend, or their gradients).
  template <class Other, class F>
  void for_each_tensor(Other& other, F&& f) const {
    f("weight", weight, other.weight);
    if (has_bias()) f("bias", bias, other.bias);
    if (has_lora()) {
      f("lora_A.weight", lora.A, other.lora.A);
      f("lora_B.weight", lora.B, other.lora.B);
    }
  }
};

// --- the math, shared by every layer that owns projections ---------------------------

// y = x W^T (+ b) (+ s (x A^T) B^T); u (optional, [rows, r]) receives x A^T when the caller
// keeps it for dB. `what` names the projection in GEMM errors.
template <class T, class B>
void linear_forward(const linear_weights<T, B>& w, const typename B::template tensor<T>& x,
                    typename B::template tensor<T>& y, typename B::template tensor<T>* u = nullptr,
                    std::string_view what = "linear: y = x W^T") {
  const int n = int(x.rows()), out = int(w.out_features()), in = int(w.in_features());
  B::gemm(what, op::n, op::t, n, out, in, T(1), x.data(), in, w.weight.data(), in, T(0), y.data(), out);
  if (w.has_bias()) B::add_bias(y, w.bias);
  if (w.has_lora()) {
    const int r = int(w.lora.rank());
    typename B::template tensor<T> local;
    if (!u) local = typename B::template tensor<T>(with_last(x.shape(), std::size_t(r)), memory_use::workspace);
    auto& xa = u ? *u : local;
    B::gemm(what, op::n, op::t, n, r, in, T(1), x.data(), in, w.lora.A.data(), in, T(0), xa.data(), r);
    B::gemm(what, op::n, op::t, n, out, r, w.lora_scale, xa.data(), r, w.lora.B.data(), r, T(1), y.data(), out);
  }
}

// The same without keeping x A^T, naming the product for GEMM errors.
template <class T, class B>
void linear_forward(const linear_weights<T, B>& w, const typename B::template tensor<T>& x,
                    typename B::template tensor<T>& y, std::string_view what) {
  linear_forward(w, x, y, static_cast<typename B::template tensor<T>*>(nullptr), what);
}

// dx (+)= dy W + s (dy B) A
template <class T, class B>
void linear_backward_input(const linear_weights<T, B>& w, const typename B::template tensor<T>& dy,
                           typename B::template tensor<T>& dx, bool accumulate,
                           std::string_view what = "linear: dx = dy W") {
  const int n = int(dy.rows()), out = int(w.out_features()), in = int(w.in_features());
  B::gemm(what, op::n, op::n, n, in, out, T(1), dy.data(), out, w.weight.data(), in, accumulate ? T(1) : T(0),
          dx.data(), in);
  if (w.has_lora()) {
    const int r = int(w.lora.rank());
    typename B::template tensor<T> dyb(with_last(dy.shape(), std::size_t(r)), memory_use::workspace);
    B::gemm(what, op::n, op::n, n, r, out, T(1), dy.data(), out, w.lora.B.data(), r, T(0), dyb.data(), r);
    B::gemm(what, op::n, op::n, n, in, r, w.lora_scale, dyb.data(), r, w.lora.A.data(), in, T(1), dx.data(), in);
  }
}

// dB += s dy^T u,  dA += s (dy B)^T x
template <class T, class B>
void lora_backward(const linear_weights<T, B>& w, const typename B::template tensor<T>& x,
                   const typename B::template tensor<T>& u, const typename B::template tensor<T>& dy,
                   lora_factors<T, B>& grad, std::string_view what = "lora: dA, dB") {
  const int n = int(dy.rows()), out = int(w.out_features()), in = int(w.in_features()), r = int(w.lora.rank());
  B::gemm(what, op::t, op::n, out, r, n, w.lora_scale, dy.data(), out, u.data(), r, T(1), grad.B.data(), r);
  typename B::template tensor<T> dyb(with_last(dy.shape(), std::size_t(r)), memory_use::workspace);
  B::gemm(what, op::n, op::n, n, r, out, T(1), dy.data(), out, w.lora.B.data(), r, T(0), dyb.data(), r);
  B::gemm(what, op::t, op::n, r, in, n, w.lora_scale, dyb.data(), r, x.data(), in, T(1), grad.A.data(), in);
}

// Throws unless the projection carries an adapter (a recipe naming lora<P> needs one on P).
template <class T, class B>
void require_lora(const linear_weights<T, B>& w, std::string_view name) {
  if (!w.has_lora())
    throw std::invalid_argument("skillgraft: the recipe trains a LoRA adapter on " + std::string(name) +
                                ", but it has none (attach adapters first, see cl/lora.hpp)");
}

// dW += dy^T x,  db += column sums of dy
template <class T, class B>
void linear_backward_weight(const typename B::template tensor<T>& x, const typename B::template tensor<T>& dy,
                            linear_weights<T, B>& grad, std::string_view what = "linear: dW += dy^T x") {
  const int n = int(dy.rows()), out = int(grad.out_features()), in = int(grad.in_features());
  B::gemm(what, op::t, op::n, out, in, n, T(1), dy.data(), out, x.data(), in, T(1), grad.weight.data(), in);
  if (grad.has_bias()) B::add_column_sums(dy, grad.bias);
}

template <class T, class B, class Tensor>
void check_linear_input(const linear_weights<T, B>& w, const Tensor& x, std::string_view name) {
  if (std::size_t(x.cols()) != w.in_features())
    throw std::invalid_argument("skillgraft: input of " + std::string(name) + " has " + std::to_string(x.cols()) +
                                " features (shape " + x.shape().str() + "), expected " +
                                std::to_string(w.in_features()));
}

// f(name.weight, W, dW) and, with a bias, f(name.bias, b, db): a projection's trainable base tensors.
template <class T, class B, class F>
void visit_linear(const std::string& name, linear_weights<T, B>& p, linear_weights<T, B>& dp, F& f) {
  f(name + ".weight", p.weight, dp.weight);
  if (p.has_bias()) f(name + ".bias", p.bias, dp.bias);
}
// f(name.lora_A.weight, A, dA), f(name.lora_B.weight, B, dB): an adapter's factors.
template <class T, class B, class F>
void visit_lora(const std::string& name, linear_weights<T, B>& p, lora_factors<T, B>& dp, F& f) {
  f(name + ".lora_A.weight", p.lora.A, dp.A);
  f(name + ".lora_B.weight", p.lora.B, dp.B);
}

// The layer alone, as a policy-specialised module (used on its own and by the gradient checker).
struct no_members {};

template <class T, bool TrainWeight, bool NeedsInputGrad, class Backend = backend::cpu>
struct linear {
  using value_type = T;
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = linear_weights<T, Backend>;
  static constexpr bool trains_weight = TrainWeight;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  struct saved_t : members::optional_x<TrainWeight, tensor_t> {};
  struct grads_t : std::conditional_t<TrainWeight, weights_t, no_members> {};

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    if constexpr (TrainWeight) static_cast<weights_t&>(g) = w.like(memory_use::gradients);
    return g;
  }

  tensor_t forward(const weights_t& w, const tensor_t& x, saved_t& s) const {
    check_linear_input(w, x, "linear");
    tensor_t y(with_last(x.shape(), w.out_features()), memory_use::workspace);
    linear_forward(w, x, y);
    if constexpr (TrainWeight) s.x = x.clone(memory_use::saved_activations);
    return y;
  }

  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dy, grads_t& g) const {
    if constexpr (TrainWeight) linear_backward_weight(s.x, dy, static_cast<weights_t&>(g));
    if constexpr (NeedsInputGrad) {
      tensor_t dx(with_last(dy.shape(), w.in_features()), memory_use::workspace);
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
