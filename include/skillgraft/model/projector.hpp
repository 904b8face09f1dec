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
#include "skillgraft/nn/backend_transfer.hpp"
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

template <class T, class Backend = backend::cpu>
struct projector_weights {
  projector_config config;
  nn::linear_weights<T, Backend> linear_1;  // multi_modal_projector.linear_1.{weight [inter, in], bias}
  nn::linear_weights<T, Backend> linear_2;  // multi_modal_projector.linear_2.{weight [out, inter], bias}

  projector_weights() = default;
  explicit projector_weights(const projector_config& c, memory_use use = memory_use::weights)
      : config(c),
        linear_1(std::size_t(c.intermediate), std::size_t(c.in), true, use),
        linear_2(std::size_t(c.out), std::size_t(c.intermediate), true, use) {}
  std::size_t elements() const { return linear_1.elements() + linear_2.elements(); }
  // Every tensor with its checkpoint name, paired with the same tensor of `other`.
  template <class Other, class F>
  void for_each_tensor(Other& other, F&& f) const {
    linear_1.for_each_tensor(other.linear_1, [&](const std::string& n, auto& a, auto& b) {
      f("multi_modal_projector.linear_1." + n, a, b);
    });
    linear_2.for_each_tensor(other.linear_2, [&](const std::string& n, auto& a, auto& b) {
      f("multi_modal_projector.linear_2." + n, a, b);
    });
  }
};

template <class To, class T>
projector_weights<T, To> to_backend(const projector_weights<T>& w, memory_use use = memory_use::weights) {
  projector_weights<T, To> out;
  out.config = w.config;
  out.linear_1 = nn::to_backend<To>(w.linear_1, use);
  out.linear_2 = nn::to_backend<To>(w.linear_2, use);
  return out;
}

template <class W, class F>
void for_each_projector_parameter(W& w, F&& f) {
  f(std::string("multi_modal_projector.linear_1.weight"), w.linear_1.weight);
  f(std::string("multi_modal_projector.linear_1.bias"), w.linear_1.bias);
  f(std::string("multi_modal_projector.linear_2.weight"), w.linear_2.weight);
  f(std::string("multi_modal_projector.linear_2.bias"), w.linear_2.bias);
}

template <class T>
SKILLGRAFT_HD inline T gelu(T a) {
  return T(0.5) * a * (T(1) + scalar::erf_(a * T(std::numbers::sqrt2 / 2)));
}
template <class T>
SKILLGRAFT_HD inline T gelu_grad(T a) {
  const T Phi = T(0.5) * (T(1) + scalar::erf_(a * T(std::numbers::sqrt2 / 2)));
  const T phi = T(std::numbers::inv_sqrtpi / std::numbers::sqrt2) * scalar::exp_(T(-0.5) * a * a);
  return Phi + a * phi;
}
// The same as element-wise functors for Backend::map (callable on every backend).
struct gelu_fn {
  template <class T>
  SKILLGRAFT_HD T operator()(T a) const { return gelu(a); }
};
struct gelu_grad_fn {
  template <class T>
  SKILLGRAFT_HD T operator()(T a) const { return gelu_grad(a); }
};

template <class T, class Backend = backend::cpu>
struct projector_grads {
  nn::linear_weights<T, Backend> linear_1, linear_2;
};

template <class T, bool Train, bool NeedsInputGrad, class Backend = backend::cpu>
struct projector {
  using value_type = T;
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = projector_weights<T, Backend>;
  static constexpr bool trains = Train;
  static constexpr bool needs_input_grad = NeedsInputGrad;
  static constexpr bool active = Train || NeedsInputGrad;  // any backward at all
  // x for dW1; a for gelu'; g for dW2.
  struct saved_t : nn::members::optional_x<Train, tensor_t>,
                   nn::members::optional_h<active, tensor_t>,  // a, the pre-activation
                   nn::members::optional_g<Train, tensor_t> {};
  using grads_t = std::conditional_t<Train, projector_grads<T, Backend>, nn::no_members>;

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
  tensor_t forward(const weights_t& w, const tensor_t& x, saved_t& s) const {
    nn::check_linear_input(w.linear_1, x, "multi_modal_projector.linear_1");
    auto kept = [](bool keep) { return keep ? memory_use::saved_activations : memory_use::workspace; };
    const shape_t as = nn::with_last(x.shape(), w.linear_1.out_features());
    tensor_t a(as, kept(active)), g(as, kept(Train)), y(nn::with_last(x.shape(), w.linear_2.out_features()),
                                                       memory_use::workspace);
    nn::linear_forward(w.linear_1, x, a, "multi_modal_projector.linear_1");
    Backend::map(a, g, gelu_fn{});
    nn::linear_forward(w.linear_2, g, y, "multi_modal_projector.linear_2");
    if constexpr (Train) s.x = x.clone(memory_use::saved_activations);
    if constexpr (active) s.h = std::move(a);
    if constexpr (Train) s.g = std::move(g);
    return y;
  }

  // Returns dx when NeedsInputGrad, else an empty tensor.
  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dy, grads_t& gr) const {
    if constexpr (!active) {
      (void)w, (void)s, (void)dy, (void)gr;
      return {};
    } else {
      if constexpr (Train) nn::linear_backward_weight(s.g, dy, gr.linear_2, "multi_modal_projector.linear_2: dW");
      tensor_t da(s.h.shape(), memory_use::workspace);
      nn::linear_backward_input(w.linear_2, dy, da, false, "multi_modal_projector.linear_2: dx");
      Backend::multiply_by_map(da, s.h, gelu_grad_fn{});
      if constexpr (Train) nn::linear_backward_weight(s.x, da, gr.linear_1, "multi_modal_projector.linear_1: dW");
      if constexpr (NeedsInputGrad) {
        tensor_t dx(nn::with_last(dy.shape(), w.linear_1.in_features()), memory_use::workspace);
        nn::linear_backward_input(w.linear_1, da, dx, false, "multi_modal_projector.linear_1: dx");
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
