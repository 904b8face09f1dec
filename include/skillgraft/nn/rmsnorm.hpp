#pragma once
// RMSNorm (LLaMA / Qwen2): no mean subtraction, no bias.
//
//   forward   r_i = 1 / sqrt(mean_j x_ij^2 + eps),   y_ij = w_j x_ij r_i
//   backward  with xhat = x r:
//             dw_j += sum_i dy_ij xhat_ij
//             dx_ij = r_i (w_j dy_ij - xhat_ij * mean_k(w_k dy_ik xhat_ik))
// Backend::rmsnorm_forward / rmsnorm_backward compute it (sums of squares in double).
#include <string_view>

#include "skillgraft/nn/linear.hpp"
#include "skillgraft/nn/optional_member.hpp"

namespace skillgraft::nn {

template <class Tensor>
void check_norm_input(const Tensor& w, const Tensor& x, std::string_view name) {
  if (std::size_t(x.cols()) != w.size())
    throw std::invalid_argument("skillgraft: input of " + std::string(name) + " has " + std::to_string(x.cols()) +
                                " features (shape " + x.shape().str() + "), expected " + std::to_string(w.size()));
}

// The layer alone. Keeps x and r only when its weight trains or the input gradient is needed.
template <class T, bool TrainWeight, bool NeedsInputGrad, class Backend = backend::cpu>
struct rmsnorm {
  using value_type = T;
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = tensor_t;
  static constexpr bool trains_weight = TrainWeight;
  static constexpr bool needs_input_grad = NeedsInputGrad;
  static constexpr bool keeps_input = TrainWeight || NeedsInputGrad;

  struct saved_t : members::optional_x<keeps_input, tensor_t>, members::optional_rstd<keeps_input, tensor_t> {};
  struct grads_t : members::optional_weight<TrainWeight, tensor_t> {};

  double eps = 1e-6;

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    if constexpr (TrainWeight) g.weight = tensor_t(w.shape(), memory_use::gradients);
    return g;
  }

  tensor_t forward(const weights_t& w, const tensor_t& x, saved_t& s, std::string_view name = "rmsnorm") const {
    check_norm_input(w, x, name);
    tensor_t y(x.shape(), memory_use::workspace, uninitialized);  // every row written, as rstd's
    if constexpr (keeps_input) {
      s.rstd = tensor_t({std::size_t(x.rows())}, memory_use::saved_activations, uninitialized);
      Backend::rmsnorm_forward(w, x, eps, y, &s.rstd);
      s.x = x.clone(memory_use::saved_activations);
    } else {
      Backend::rmsnorm_forward(w, x, eps, y, static_cast<tensor_t*>(nullptr));
    }
    return y;
  }

  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dy, grads_t& g) const {
    tensor_t* dw = nullptr;
    if constexpr (TrainWeight) dw = &g.weight;
    return backward_into(w, s, dy, dw);
  }

  // For owners that keep the weight gradient elsewhere (the decoder block). Adds into dw
  // (when the weight trains); returns dx when NeedsInputGrad, else an empty tensor.
  static tensor_t backward_into(const weights_t& w, const saved_t& s, const tensor_t& dy, tensor_t* dw) {
    tensor_t dx;
    if constexpr (keeps_input) {
      if constexpr (NeedsInputGrad) dx = tensor_t(dy.shape(), memory_use::workspace, uninitialized);  // written, not added
      Backend::rmsnorm_backward(w, s.x, s.rstd, dy, TrainWeight ? dw : nullptr, NeedsInputGrad ? &dx : nullptr, false);
    }
    return dx;
  }

  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    if constexpr (TrainWeight) f("weight", w, g.weight);
  }
};

}  // namespace skillgraft::nn
