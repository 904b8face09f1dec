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
//
// alpha = 0 gives SiLU (GELU) gating exactly: z ((1 + 0) gamma - 0) rounds to z gamma, so
// an xsilu MLP with alpha = 0 computes the silu MLP bit for bit in forward.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string_view>

namespace skillgraft::nn {

template <class T>
inline T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

namespace act {

// SiLU (swish): the default; has no range parameter.
struct silu {
  static constexpr std::string_view name = "silu";
  static constexpr bool has_range = false;
  template <class T>
  static T gate(T z) { return sigmoid(z); }
  template <class T>
  static T gate_grad(T z) {
    const T s = sigmoid(z);
    return s * (T(1) - s);
  }
};

// Expanded SiLU: SiLU's gate sigmoid(z) stretched to [-alpha, 1 + alpha].
struct xsilu : silu {
  static constexpr std::string_view name = "xsilu";
  static constexpr bool has_range = true;
};

// Expanded GELU (erf form): gate Phi(z) = erfc(-z / sqrt 2) / 2 stretched to [-alpha, 1 + alpha].
struct xgelu {
  static constexpr std::string_view name = "xgelu";
  static constexpr bool has_range = true;
  template <class T>
  static T gate(T z) { return T(0.5) * std::erfc(-z * T(0.70710678118654752440)); }
  template <class T>
  static T gate_grad(T z) { return T(0.39894228040143267794) * std::exp(T(-0.5) * z * z); }
};

}  // namespace act

// phi(z; alpha) and its two partial derivatives for any gate policy.
template <class Act, class T>
inline T gated(T z, T alpha) {
  return z * ((T(1) + T(2) * alpha) * Act::gate(z) - alpha);
}
template <class Act, class T>
inline void gated_grad(T z, T alpha, T& dz, T& dalpha) {
  const T gam = Act::gate(z);
  dz = (T(1) + T(2) * alpha) * (gam + z * Act::gate_grad(z)) - alpha;
  dalpha = z * (T(2) * gam - T(1));
}

// A sum over i < n of f(i) in a fixed order whatever the thread count: fixed chunks summed
// in parallel, then the chunk sums in chunk order (so training stays bit-for-bit repeatable).
template <class T, class F>
T deterministic_sum(std::size_t n, F&& f) {
  constexpr std::size_t chunks = 64;
  T part[chunks] = {};
  const std::size_t per = (n + chunks - 1) / chunks;
#pragma omp parallel for schedule(static) if (n > 32768)
  for (std::size_t c = 0; c < chunks; ++c) {
    T s = T(0);
    const std::size_t end = std::min(n, (c + 1) * per);
    for (std::size_t i = c * per; i < end; ++i) s += f(i);
    part[c] = s;
  }
  T s = T(0);
  for (std::size_t c = 0; c < chunks; ++c) s += part[c];
  return s;
}

}  // namespace skillgraft::nn
