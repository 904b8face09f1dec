#pragma once
// Which machine the CUDA backend's Thrust code runs on.
//
// The same headers build two ways:
//   - for an NVIDIA GPU: a .cu file compiled by nvcc (Thrust's default device system, CUDA);
//     GEMMs go to cuBLAS;
//   - for the host: a plain C++ file compiled with
//     -DTHRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP (or _OMP with -fopenmp), where "device"
//     memory is host memory and GEMMs go to Eigen. Tests use this build to check the
//     backend's logic against the CPU backend on machines without a GPU.
// Everything else (element-wise functors, reductions, plans, byte accounting) is the same code.
#include <thrust/execution_policy.h>

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
#if !defined(__CUDACC__)
#error "skillgraft: the CUDA backend must be compiled by nvcc (a .cu file); to test its logic on the host, define THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP (or _OMP)"
#endif
#define SKILLGRAFT_CUDA_DEVICE 1
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <thrust/system/cuda/execution_policy.h>
#elif THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_OMP
#define SKILLGRAFT_CUDA_DEVICE 0
#include <thrust/system/omp/execution_policy.h>
#elif THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CPP
#define SKILLGRAFT_CUDA_DEVICE 0
#include <thrust/system/cpp/execution_policy.h>
#else
#error "skillgraft: the CUDA backend supports Thrust's CUDA, CPP and OMP device systems"
#endif

// Functors run on the device (nvcc) or on the host (host build): SKILLGRAFT_HD.
#include "skillgraft/backend/host_device.hpp"

namespace skillgraft::cuda {

// "cuda" on a GPU build, "cpp"/"omp" when the backend's Thrust code runs on the host.
inline constexpr const char* device_system_name =
#if SKILLGRAFT_CUDA_DEVICE
    "cuda";
#elif THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_OMP
    "omp";
#else
    "cpp";
#endif

}  // namespace skillgraft::cuda
