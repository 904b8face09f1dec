#pragma once
// Device memory for the CUDA backend: a byte ledger of its own, a caching pool, the
// cuBLAS handle, and the Thrust execution policy every algorithm of the backend runs with.
//
// Device bytes are counted in `device_ledger()`, not in the host `ledger()`, so that a
// program holding a CPU reference and a GPU model (the parity tests) sees each side's bytes
// apart, and `plan_memory` of a GPU model is checked against the device ledger alone.
//
// Allocation goes through `device_pool` (backend/block_pool.hpp): cudaMalloc and cudaFree
// synchronise the device, so freed blocks are kept, by size, for the next tensor of that size.
#include <cstddef>
#include <cstdint>
#include <exception>
#include <new>
#include <string>

#include "skillgraft/backend/block_pool.hpp"
#include "skillgraft/backend/cuda/error.hpp"
#include "skillgraft/backend/memory.hpp"

namespace skillgraft::cuda {

inline memory_ledger& device_ledger() {
  static memory_ledger ledger;
  return ledger;
}

// True when a CUDA device can be used (always true for the host build).
inline bool device_available() {
#if SKILLGRAFT_CUDA_DEVICE
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e == cudaSuccess && n > 0;
#else
  return true;
#endif
}

// Waits for all device work (a no-op for the host build).
inline void synchronize() {
#if SKILLGRAFT_CUDA_DEVICE
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
#endif
}

// Where device blocks come from (host memory in the host build).
struct device_raw {
  static void* allocate(std::size_t n, const char* what) {
#if SKILLGRAFT_CUDA_DEVICE
    void* p = nullptr;
    check(cudaMalloc(&p, n), "cudaMalloc", std::string(what) + ", " + std::to_string(n) + " bytes");
    return p;
#else
    (void)what;
    return ::operator new(n, std::align_val_t{64});
#endif
  }
  static void free(void* p, std::size_t) noexcept {
#if SKILLGRAFT_CUDA_DEVICE
    (void)cudaFree(p);  // nothing to do about a failure here (also runs at exit)
#else
    ::operator delete(p, std::align_val_t{64});
#endif
  }
  static bool out_of_memory(const std::exception& e) {
    return dynamic_cast<const cuda_error*>(&e) != nullptr || dynamic_cast<const std::bad_alloc*>(&e) != nullptr;
  }
};

// The process's pool of device blocks, rounded up to 512 bytes (cudaMalloc aligns to 256).
// All work runs in order on the default stream, which makes reusing a block freed by earlier,
// still running work safe.
struct device_pool {
  static block_pool<device_raw>& instance() {
    static block_pool<device_raw> pool(512);
    return pool;
  }
};

// Scratch memory Thrust algorithms ask for (reduce_by_key, sort): from the pool, counted as workspace.
struct temporary_allocator {
  using value_type = char;
  char* allocate(std::ptrdiff_t n) {
    char* p = static_cast<char*>(device_pool::instance().allocate(std::size_t(n), "Thrust temporary storage"));
    device_ledger().add(memory_use::workspace, std::int64_t(n));
    return p;
  }
  void deallocate(char* p, std::size_t n) {
    device_pool::instance().deallocate(p, n);
    device_ledger().add(memory_use::workspace, -std::int64_t(n));
  }
};

// The execution policy of every Thrust call in the backend. On the GPU: the default stream,
// no synchronisation after each algorithm (results reach the host through copies, which wait).
inline auto exec() {
#if SKILLGRAFT_CUDA_DEVICE
  return thrust::cuda::par_nosync(temporary_allocator{});
#elif THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_OMP
  return thrust::omp::par(temporary_allocator{});
#else
  return thrust::cpp::par(temporary_allocator{});
#endif
}

#if SKILLGRAFT_CUDA_DEVICE
// One cuBLAS handle for the process (created on first use, on the current device).
// FP32 GEMMs are exact FP32 by default; `set_tf32(true)` lets cuBLAS use TF32 tensor cores.
class blas {
 public:
  static cublasHandle_t handle() { return instance().h_; }
  static void set_tf32(bool on) {
    check(cublasSetMathMode(handle(), on ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
  }

 private:
  static blas& instance() {
    static blas b;
    return b;
  }
  blas() { check(cublasCreate(&h_), "cublasCreate"); }
  ~blas() { cublasDestroy(h_); }
  cublasHandle_t h_{};
};
#endif

}  // namespace skillgraft::cuda
