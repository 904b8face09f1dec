#pragma once
// The CUDA backend tag: Thrust owns device memory and the element-wise and reduction work,
// cuBLAS the GEMMs. Implementation lives in namespace skillgraft::cuda; the layers for it in
// skillgraft::nn::cuda (nn/cuda/), selected by `decoder_block<T, Recipe, Dx, backend::cuda>`.
//
// Include from a .cu file compiled by nvcc, or from a C++ file compiled with
// -DTHRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP (or _OMP) to run the same code on the host.
#include "skillgraft/backend/cuda/algorithms.hpp"
#include "skillgraft/backend/cuda/gemm.hpp"
#include "skillgraft/backend/cuda/tensor.hpp"

namespace skillgraft::backend {

struct cuda {
  template <class T>
  using tensor = skillgraft::cuda::tensor<T>;
  static constexpr const char* name = "cuda";
};

}  // namespace skillgraft::backend
