#pragma once
// Gate activations of the gated MLP, as compile-time policies.
//
// A self-gated activation is phi(z) = z * gamma(z) with a gate gamma in [0, 1]. The
// expanded forms of Huang (2024, "Expanded Gating Ranges Improve Activation Functions")
// widen the gate's range to [-alpha, 1 + alpha] with one trainable scalar alpha per MLP:
//
//   phi(z; a)     = z ((1 + 2a) gamma(z) - a)
//   dphi/dz       = (1 + 2a) (gamma(z) + z gamma'(z)) - a
//   dphi/da       = z (2 gamma(z) - 1)
//
//   silu    gamma = sigmoid                      (no alpha: the LLaMA/Qwen2 MLP, unchanged)
//   xsilu   gamma = sigmoid,  gamma' = s (1 - s)
//   xgelu   gamma = Phi (the exact normal CDF, erf form, not the tanh approximation),
//           gamma' = exp(-z^2 / 2) / sqrt(2 pi)
//   xatlu   gamma = arctan(z) / pi + 1/2 (the paper's own arctan-gated unit; a heavier tail
//           than sigmoid, so the gate opens more slowly), gamma' = 1 / (pi (1 + z^2))
//
// alpha = 0 gives SiLU (GELU, ATLU) gating exactly: z ((1 + 0) gamma - 0) rounds to z gamma, so
// an xsilu MLP with alpha = 0 computes the silu MLP bit for bit in forward.
#include <string_view>

#include "skillgraft/backend/host_device.hpp"

namespace skillgraft::nn {

// T is float or double, or a CPU packet of them (backend/cpu/simd.hpp) for gates that say
// packet_math: the same expression serves a packet loop.
template <class T>
SKILLGRAFT_HD inline T sigmoid(T z) {
  using scalar::exp_;
  return T(1) / (T(1) + exp_(-z));
}

namespace act {

// phi, dphi/dz and dphi/dalpha of an expanded gate, from the policy's gate and its derivative
// (every backend's kernels call these: they are SKILLGRAFT_HD).
template <class Gate>
struct expanded {
  static constexpr bool has_range = true;
  template <class T>
  SKILLGRAFT_HD static T phi(T z, T alpha) {
    return z * ((T(1) + T(2) * alpha) * Gate::gate(z) - alpha);
  }
  template <class T>
  SKILLGRAFT_HD static T dphi_dz(T z, T alpha) {
    return (T(1) + T(2) * alpha) * (Gate::gate(z) + z * Gate::gate_grad(z)) - alpha;
  }
  template <class T>
  SKILLGRAFT_HD static T dphi_dalpha(T z) {
    return z * (T(2) * Gate::gate(z) - T(1));
  }
};

// SiLU (swish): the default; has no range parameter. Backends compute its product and
// backward with SiLU's own expressions (the only gate without a range).
struct silu {
  static constexpr std::string_view name = "silu";
  static constexpr bool has_range = false;
  static constexpr bool packet_math = true;
  template <class T>
  SKILLGRAFT_HD static T gate(T z) { return sigmoid(z); }
  template <class T>
  SKILLGRAFT_HD static T gate_grad(T z) {
    const T s = sigmoid(z);
    return s * (T(1) - s);
  }
  template <class T>
  SKILLGRAFT_HD static T phi(T z, T) { return z * sigmoid(z); }
  template <class T>
  SKILLGRAFT_HD static T dphi_dz(T z, T) {
    const T s = sigmoid(z);
    return s * (T(1) + z * (T(1) - s));
  }
  template <class T>
  SKILLGRAFT_HD static T dphi_dalpha(T) { return T(0); }
};

// Expanded SiLU: SiLU's gate sigmoid(z) stretched to [-alpha, 1 + alpha].
struct sigmoid_gate {
  static constexpr bool packet_math = true;
  template <class T>
  SKILLGRAFT_HD static T gate(T z) { return silu::gate(z); }
  template <class T>
  SKILLGRAFT_HD static T gate_grad(T z) { return silu::gate_grad(z); }
};
struct xsilu : sigmoid_gate, expanded<sigmoid_gate> {
  static constexpr std::string_view name = "xsilu";
  using expanded<sigmoid_gate>::has_range;
};

// Expanded GELU (erf form): gate Phi(z) = erfc(-z / sqrt 2) / 2 stretched to [-alpha, 1 + alpha].
struct normal_cdf_gate {
  template <class T>
  SKILLGRAFT_HD static T gate(T z) { return T(0.5) * scalar::erfc_(-z * T(0.70710678118654752440)); }
  template <class T>
  SKILLGRAFT_HD static T gate_grad(T z) { return T(0.39894228040143267794) * scalar::exp_(T(-0.5) * z * z); }
};
struct xgelu : normal_cdf_gate, expanded<normal_cdf_gate> {
  static constexpr std::string_view name = "xgelu";
  using expanded<normal_cdf_gate>::has_range;
};

// Expanded ATLU: the arctan gate arctan(z) / pi + 1/2, a CDF (of the Cauchy distribution)
// like sigmoid and Phi, stretched to [-alpha, 1 + alpha]. At alpha = 0 it is the plain ATLU
// z (arctan(z) / pi + 1/2).
struct arctan_gate {
  template <class T>
  SKILLGRAFT_HD static T gate(T z) { return scalar::atan_(z) * T(0.31830988618379067154) + T(0.5); }
  template <class T>
  SKILLGRAFT_HD static T gate_grad(T z) { return T(0.31830988618379067154) / (T(1) + z * z); }
};
struct xatlu : arctan_gate, expanded<arctan_gate> {
  static constexpr std::string_view name = "xatlu";
  using expanded<arctan_gate>::has_range;
};

}  // namespace act

// phi(z; alpha) and its two partial derivatives for any gate policy.
template <class Act, class T>
inline T gated(T z, T alpha) {
  return Act::phi(z, alpha);
}
template <class Act, class T>
inline void gated_grad(T z, T alpha, T& dz, T& dalpha) {
  dz = Act::dphi_dz(z, alpha);
  dalpha = Act::dphi_dalpha(z);
}

}  // namespace skillgraft::nn
