#pragma once
// The CUDA backend: the operations policy of backend/operations.hpp on an NVIDIA GPU. Thrust
// owns device memory and the element-wise and reduction work, cuBLAS the GEMMs. Each group of
// operations is one header in backend/cuda/, the twin of the same header in backend/cpu/.
//
// Include from a .cu file compiled by nvcc, or from a C++ file compiled with
// -DTHRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP (or _OMP) to run the same code on the host.
#include "skillgraft/backend/backend_of.hpp"
#include "skillgraft/backend/cuda/algorithms.hpp"
#include "skillgraft/backend/cuda/attention.hpp"
#include "skillgraft/backend/cuda/cached_attention.hpp"
#include "skillgraft/backend/cuda/cross_entropy.hpp"
#include "skillgraft/backend/cuda/elementwise.hpp"
#include "skillgraft/backend/cuda/embedding.hpp"
#include "skillgraft/backend/cuda/gated.hpp"
#include "skillgraft/backend/cuda/gemm.hpp"
#include "skillgraft/backend/cuda/index_space.hpp"
#include "skillgraft/backend/cuda/rmsnorm.hpp"
#include "skillgraft/backend/cuda/rope.hpp"
#include "skillgraft/backend/cuda/tensor.hpp"

namespace skillgraft::backend {

struct cuda : skillgraft::cuda::gemm_ops,
              skillgraft::cuda::elementwise_ops,
              skillgraft::cuda::embedding_ops,
              skillgraft::cuda::rmsnorm_ops,
              skillgraft::cuda::rope_ops,
              skillgraft::cuda::gated_ops,
              skillgraft::cuda::attention_ops,
              skillgraft::cuda::cached_attention_ops,
              skillgraft::cuda::cross_entropy_ops,
              skillgraft::cuda::index_ops {
  template <class T>
  using tensor = skillgraft::cuda::tensor<T>;
  static constexpr const char* name = "cuda";
};

}  // namespace skillgraft::backend

namespace skillgraft {
template <class T>
struct backend_of<cuda::tensor<T>> {
  using type = backend::cuda;
};
}  // namespace skillgraft
