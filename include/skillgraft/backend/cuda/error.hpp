#pragma once
// CUDA runtime and cuBLAS failures become exceptions that name the call.
#include <stdexcept>
#include <string>
#include <string_view>

#include "skillgraft/backend/cuda/system.hpp"

namespace skillgraft::cuda {

// A failed CUDA runtime or cuBLAS call (device out of memory, no device, bad launch, ...).
struct cuda_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#if SKILLGRAFT_CUDA_DEVICE
inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
  }
}

// check(cudaMalloc(&p, n), "cudaMalloc", "q_proj.weight [512, 512]")
inline void check(cudaError_t e, std::string_view call, std::string_view what = {}) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a sticky-free error so the next call does not report it again
  throw cuda_error("skillgraft: " + std::string(call) + (what.empty() ? "" : " (" + std::string(what) + ")") +
                   " failed: " + cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")");
}
inline void check(cublasStatus_t s, std::string_view call, std::string_view what = {}) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  throw cuda_error("skillgraft: " + std::string(call) + (what.empty() ? "" : " (" + std::string(what) + ")") +
                   " failed: " + cublas_status_name(s));
}
#endif

}  // namespace skillgraft::cuda
