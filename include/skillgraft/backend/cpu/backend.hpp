#pragma once
// The CPU backend: an operations policy (see backend/operations.hpp for what every backend
// provides). Eigen for GEMMs (threaded by OpenMP when enabled), OpenMP loops for the fused
// element-wise kernels. Each group of operations is one header in backend/cpu/.
#include "skillgraft/backend/backend_of.hpp"
#include "skillgraft/backend/cpu/attention.hpp"
#include "skillgraft/backend/cpu/cached_attention.hpp"
#include "skillgraft/backend/cpu/cross_entropy.hpp"
#include "skillgraft/backend/cpu/elementwise.hpp"
#include "skillgraft/backend/cpu/embedding.hpp"
#include "skillgraft/backend/cpu/gated.hpp"
#include "skillgraft/backend/cpu/gemm.hpp"
#include "skillgraft/backend/cpu/index_space.hpp"
#include "skillgraft/backend/cpu/rmsnorm.hpp"
#include "skillgraft/backend/cpu/rope.hpp"
#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::backend {

struct cpu : skillgraft::cpu::gemm_ops,
             skillgraft::cpu::elementwise_ops,
             skillgraft::cpu::embedding_ops,
             skillgraft::cpu::rmsnorm_ops,
             skillgraft::cpu::rope_ops,
             skillgraft::cpu::gated_ops,
             skillgraft::cpu::attention_ops,
             skillgraft::cpu::cached_attention_ops,
             skillgraft::cpu::cross_entropy_ops,
             skillgraft::cpu::index_ops {
  template <class T>
  using tensor = skillgraft::cpu::tensor<T>;
  static constexpr const char* name = "cpu";
};

}  // namespace skillgraft::backend

namespace skillgraft {
template <class T>
struct backend_of<cpu::tensor<T>> {
  using type = backend::cpu;
};
}  // namespace skillgraft
