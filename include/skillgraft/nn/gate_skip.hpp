#pragma once
// The GateSkip block policy: a decoder block whose attention and MLP outputs pass through
// residual gates (nn/residual_gate.hpp) before they join the residual stream.
//
//   nn::gate_skip<>                                   vector gates, the dense SiLU MLP
//   nn::gate_skip<nn::swiglu<nn::act::xsilu>>         vector gates around an xSiLU MLP
//   nn::gate_skip<nn::default_mlp, gate_shape::scalar>  one gate value per token
//
// It takes the place of the MLP policy in decoder_block, decoder_stack and decoder_lm and
// keeps everything of the MLP policy it wraps (its layer, gradients, options and accepted
// tags); what it adds is two gates per block, self_attn_residual_gate and mlp_residual_gate
// (tags group::residual_gate<branch::attention> and <branch::mlp>), which a recipe trains like
// any projection. A block built without this policy refuses those tags at compile time.
#include <type_traits>

#include "skillgraft/nn/residual_gate.hpp"
#include "skillgraft/nn/swiglu.hpp"

namespace skillgraft::nn {

// Runtime settings of a gate_skip block: the inner MLP policy's, and the fraction of tokens whose
// branch output training drops per layer and branch (the paper's training-time budget; 0: none).
template <class InnerOptions>
struct gate_skip_options : InnerOptions {
  double train_skip = 0.0;
  bool operator==(const gate_skip_options&) const = default;
};

template <class Inner = default_mlp, gate_shape Shape = gate_shape::vector>
struct gate_skip : Inner {
  using inner_policy = Inner;
  using options = gate_skip_options<typename Inner::options>;
  static constexpr bool residual_gates = true;
  static constexpr gate_shape shape = Shape;
  // Parameters beyond Gate, Up and Down: the inner policy's, and two gates (weight and bias).
  static std::size_t extra_weight_elements(const decoder_config& c, const typename Inner::options& o) {
    const std::size_t d = std::size_t(c.hidden), w = gate_width(Shape, d);
    return Inner::extra_weight_elements(c, o) + 2 * (w * d + w);
  }
};

// The training-time drop fraction of a policy's options (0 for policies without gates).
template <class Options>
double train_skip_of(const Options& o) {
  if constexpr (requires { o.train_skip; }) return o.train_skip;
  else return 0.0;
}

// Does a block policy put residual gates on its branches?
template <class Policy>
inline constexpr bool has_residual_gates_v = false;
template <class Policy>
  requires requires { Policy::residual_gates; }
inline constexpr bool has_residual_gates_v<Policy> = Policy::residual_gates;

template <class Policy>
inline constexpr gate_shape gate_shape_of = gate_shape::vector;
template <class Policy>
  requires has_residual_gates_v<Policy>
inline constexpr gate_shape gate_shape_of<Policy> = Policy::shape;

}  // namespace skillgraft::nn
