#pragma once
// The multimodal projector (LLaVA's): a two-layer MLP from the vision encoder's width
// to the language model's, one recipe tag, `group::projector`.
//
//   forward   a = x W1^T + b1,  g = gelu(a),  y = g W2^T + b2
//             gelu(a) = a Phi(a),  Phi the standard normal CDF (the exact, erf form)
//   backward  dW2 += dy^T g,  db2 += 1^T dy                       (when the projector trains)
//             da = (dy W2) * gelu'(a),  gelu'(a) = Phi(a) + a phi(a)
//             dW1 += da^T x,  db1 += 1^T da                       (when the projector trains)
//             dx = da W1                                          (when the vision encoder trains)
//
// Frozen and with nothing trainable upstream, it keeps nothing and runs no backward.
#include <cmath>
#include <numbers>
#include <string>

#include "skillgraft/backend/cpu/backend.hpp"
#include "skillgraft/nn/linear.hpp"
#include "skillgraft/nn/optional_member.hpp"

namespace skillgraft::model {

using cpu::shape_t;
using cpu::tensor;

struct projector_config {
  int in = 64;            // the vision encoder's hidden size
  int intermediate = 128; // width of the hidden layer
  int out = 128;          // the language model's hidden size
};

template <class T>
struct projector_weights {
  projector_config config;
  nn::linear_weights<T> linear_1;  // multi_modal_projector.linear_1.{weight [inter, in], bias}
  nn::linear_weights<T> linear_2;  // multi_modal_projector.linear_2.{weight [out, inter], bias}

  projector_weights() = default;
  explicit projector_weights(const projector_config& c, memory_use use = memory_use::weights)
      : config(c),
        linear_1(std::size_t(c.intermediate), std::size_t(c.in), true, use),
        linear_2(std::size_t(c.out), std::size_t(c.intermediate), true, use) {}
  std::size_t elements() const { return linear_1.elements() + linear_2.elements(); }
};

template <class W, class F>
void for_each_projector_parameter(W& w, F&& f) {
  f(std::string("multi_modal_projector.linear_1.weight"), w.linear_1.weight);
  f(std::string("multi_modal_projector.linear_1.bias"), w.linear_1.bias);
  f(std::string("multi_modal_projector.linear_2.weight"), w.linear_2.weight);
  f(std::string("multi_modal_projector.linear_2.bias"), w.linear_2.bias);
}

template <class T>
inline T gelu(T a) {
  return T(0.5) * a * (T(1) + std::erf(a * T(std::numbers::sqrt2 / 2)));
}
template <class T>
inline T gelu_grad(T a) {
  const T Phi = T(0.5) * (T(1) + std::erf(a * T(std::numbers::sqrt2 / 2)));
  const T phi = T(std::numbers::inv_sqrtpi / std::numbers::sqrt2) * std::exp(T(-0.5) * a * a);
  return Phi + a * phi;
}

template <class T>
struct projector_grads {
  nn::linear_weights<T> linear_1, linear_2;
};

// Backend: backend::cpu here; model/cuda/projector.hpp specialises backend::cuda.
template <class T, bool Train, bool NeedsInputGrad, class Backend = backend::cpu>
struct projector {
  using value_type = T;
  using weights_t = projector_weights<T>;
  static constexpr bool trains = Train;
  static constexpr bool needs_input_grad = NeedsInputGrad;
  static constexpr bool active = Train || NeedsInputGrad;  // any backward at all
  // x for dW1; a for gelu'; g for dW2.
  struct saved_t : nn::members::optional_x<Train, tensor<T>>,
                   nn::members::optional_h<active, tensor<T>>,  // a, the pre-activation
                   nn::members::optional_g<Train, tensor<T>> {};
  using grads_t = std::conditional_t<Train, projector_grads<T>, nn::no_members>;

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    if constexpr (Train) {
      g.linear_1 = w.linear_1.like(memory_use::gradients);
      g.linear_2 = w.linear_2.like(memory_use::gradients);
    } else {
      (void)w;
    }
    return g;
  }

  // x [..., in] -> [..., out]
  tensor<T> forward(const weights_t& w, const tensor<T>& x, saved_t& s) const {
    nn::check_linear_input(w.linear_1, x, "multi_modal_projector.linear_1");
    auto kept = [](bool keep) { return keep ? memory_use::saved_activations : memory_use::workspace; };
    shape_t as = x.shape(), ys = x.shape();
    as.dims[std::size_t(as.rank - 1)] = w.linear_1.out_features();
    ys.dims[std::size_t(ys.rank - 1)] = w.linear_2.out_features();
    tensor<T> a(as, kept(active)), g(as, kept(Train)), y(ys, memory_use::workspace);
    nn::linear_forward(w.linear_1, x, a);
    for (std::size_t i = 0; i < a.size(); ++i) g[i] = gelu(a[i]);
    nn::linear_forward(w.linear_2, g, y);
    if constexpr (Train) s.x = x.clone(memory_use::saved_activations);
    if constexpr (active) s.h = std::move(a);
    if constexpr (Train) s.g = std::move(g);
    return y;
  }

  // Returns dx when NeedsInputGrad, else an empty tensor.
  tensor<T> backward(const weights_t& w, const saved_t& s, const tensor<T>& dy, grads_t& gr) const {
    if constexpr (!active) {
      (void)w, (void)s, (void)dy, (void)gr;
      return {};
    } else {
      if constexpr (Train) nn::linear_backward_weight(s.g, dy, gr.linear_2);
      tensor<T> da(s.h.shape(), memory_use::workspace);
      nn::linear_backward_input(w.linear_2, dy, da, false);
      for (std::size_t i = 0; i < da.size(); ++i) da[i] *= gelu_grad(s.h[i]);
      if constexpr (Train) nn::linear_backward_weight(s.x, da, gr.linear_1);
      if constexpr (NeedsInputGrad) {
        shape_t xs = dy.shape();
        xs.dims[std::size_t(xs.rank - 1)] = w.linear_1.in_features();
        tensor<T> dx(xs, memory_use::workspace);
        nn::linear_backward_input(w.linear_1, da, dx, false);
        return dx;
      } else {
        return {};
      }
    }
  }

  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    if constexpr (Train) {
      f(std::string("multi_modal_projector.linear_1.weight"), w.linear_1.weight, g.linear_1.weight);
      f(std::string("multi_modal_projector.linear_1.bias"), w.linear_1.bias, g.linear_1.bias);
      f(std::string("multi_modal_projector.linear_2.weight"), w.linear_2.weight, g.linear_2.weight);
      f(std::string("multi_modal_projector.linear_2.bias"), w.linear_2.bias, g.linear_2.bias);
    } else {
      (void)w, (void)g, (void)f;
    }
  }
};

}  // namespace skillgraft::model
