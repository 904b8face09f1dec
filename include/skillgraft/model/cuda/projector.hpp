#pragma once
// The multimodal projector on the CUDA backend: projector<T, Train, Dx, backend::cuda>.
//
//   forward   a = x W1^T + b1,  g = gelu(a),  y = g W2^T + b2
//             gelu(a) = a Phi(a),  Phi the standard normal CDF (the exact, erf form)
//   backward  dW2 += dy^T g,  db2 += 1^T dy                       (when the projector trains)
//             da = (dy W2) * gelu'(a),  gelu'(a) = Phi(a) + a phi(a)
//             dW1 += da^T x,  db1 += 1^T da                       (when the projector trains)
//             dx = da W1                                          (when the vision encoder trains)
//
// The plan is the CPU projector's (model/projector.hpp): the same flags decide what is kept.
#include <string>

#include "skillgraft/model/projector.hpp"
#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/nn/backend_transfer.hpp"

namespace skillgraft::model {

namespace cuda {

template <class T>
struct projector_weights {
  projector_config config;
  nn::linear_weights<T, backend::cuda> linear_1;  // multi_modal_projector.linear_1
  nn::linear_weights<T, backend::cuda> linear_2;  // multi_modal_projector.linear_2

  std::size_t elements() const { return linear_1.elements() + linear_2.elements(); }
  static projector_weights upload(const model::projector_weights<T>& h, memory_use use = memory_use::weights) {
    projector_weights d;
    d.config = h.config;
    d.linear_1 = nn::to_backend<backend::cuda>(h.linear_1, use);
    d.linear_2 = nn::to_backend<backend::cuda>(h.linear_2, use);
    return d;
  }
  void download(model::projector_weights<T>& h) const {
    nn::download(linear_1, h.linear_1, "multi_modal_projector.linear_1.");
    nn::download(linear_2, h.linear_2, "multi_modal_projector.linear_2.");
  }
};

template <class T>
struct projector_grads {
  nn::linear_weights<T, backend::cuda> linear_1, linear_2;
};

namespace kernels {
template <class T>
struct gelu_of {  // g[i] = a[i] Phi(a[i])
  T* g;
  const T* a;
  SKILLGRAFT_HD void operator()(skillgraft::cuda::index_t i) const {
    const T x = a[i];
    g[i] = T(0.5) * x * (T(1) + skillgraft::cuda::erf_(x * T(0.70710678118654752440)));
  }
};
template <class T>
struct times_gelu_grad {  // da[i] *= Phi(a[i]) + a[i] phi(a[i])
  T* da;
  const T* a;
  SKILLGRAFT_HD void operator()(skillgraft::cuda::index_t i) const {
    const T x = a[i];
    const T Phi = T(0.5) * (T(1) + skillgraft::cuda::erf_(x * T(0.70710678118654752440)));
    const T phi = T(0.39894228040143267794) * skillgraft::cuda::exp_(T(-0.5) * x * x);
    da[i] *= Phi + x * phi;
  }
};
}  // namespace kernels

}  // namespace cuda

template <class T, bool Train, bool NeedsInputGrad>
struct projector<T, Train, NeedsInputGrad, backend::cuda> {
  using host_projector = projector<T, Train, NeedsInputGrad, backend::cpu>;  // the same plan
  using value_type = T;
  using tensor_t = skillgraft::cuda::tensor<T>;
  using weights_t = cuda::projector_weights<T>;
  static constexpr bool trains = Train;
  static constexpr bool needs_input_grad = NeedsInputGrad;
  static constexpr bool active = host_projector::active;
  struct saved_t : nn::members::optional_x<Train, tensor_t>,
                   nn::members::optional_h<active, tensor_t>,
                   nn::members::optional_g<Train, tensor_t> {};
  using grads_t = std::conditional_t<Train, cuda::projector_grads<T>, nn::no_members>;

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
    tensor_t a(nn::with_last(x.shape(), w.linear_1.out_features()), kept(active));
    tensor_t g(a.shape(), kept(Train));
    tensor_t y(nn::with_last(x.shape(), w.linear_2.out_features()), memory_use::workspace);
    nn::linear_forward(w.linear_1, x, a, nullptr, "multi_modal_projector.linear_1");
    skillgraft::cuda::for_each_index(skillgraft::cuda::index_t(a.size()), cuda::kernels::gelu_of<T>{g.data(), a.data()});
    nn::linear_forward(w.linear_2, g, y, nullptr, "multi_modal_projector.linear_2");
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
      skillgraft::cuda::for_each_index(skillgraft::cuda::index_t(da.size()),
                                       cuda::kernels::times_gelu_grad<T>{da.data(), s.h.data()});
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
      nn::visit_linear("multi_modal_projector.linear_1", w.linear_1, g.linear_1, f);
      nn::visit_linear("multi_modal_projector.linear_2", w.linear_2, g.linear_2, f);
    } else {
      (void)w, (void)g, (void)f;
    }
  }
};

}  // namespace skillgraft::model
