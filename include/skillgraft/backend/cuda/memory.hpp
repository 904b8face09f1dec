#pragma once
// Device memory for the CUDA backend: a byte ledger of its own, a caching pool, the
// cuBLAS handle, and the Thrust execution policy every algorithm of the backend runs with.
//
// Device bytes are counted in `device_ledger()`, not in the host `ledger()`, so that a
// program holding a CPU reference and a GPU model (the parity tests) sees each side's bytes
// apart, and `plan_memory` of a GPU model is checked against the device ledger alone.
//
// Allocation goes through `device_pool`: cudaMalloc and cudaFree synchronise the device,
// so freed blocks are kept, by size, for the next tensor of that size (a training step
// allocates the same shapes every time). All work runs in order on the default stream,
// which makes reusing a block freed by earlier, still running work safe.
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

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

class device_pool {
 public:
  static device_pool& instance() {
    static device_pool pool;
    return pool;
  }
  device_pool() = default;
  device_pool(const device_pool&) = delete;
  device_pool& operator=(const device_pool&) = delete;
  ~device_pool() {
    for (auto& [size, blocks] : free_)
      for (void* p : blocks) raw_free(p, size, /*throwing=*/false);
  }

  // Blocks are rounded up to 512 bytes (cudaMalloc aligns to 256).
  static std::size_t rounded(std::size_t bytes) { return (bytes + 511) / 512 * 512; }

  void* allocate(std::size_t bytes, const char* what) {
    const std::size_t n = rounded(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(n);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= n;
      return p;
    }
    void* p = nullptr;
    try {
      p = raw_allocate(n, what);
    } catch (const cuda_error&) {
      release_cached_locked();  // out of memory with blocks parked: give them back and retry once
      p = raw_allocate(n, what);
    }
    reserved_ += n;
    if (reserved_ > peak_reserved_) peak_reserved_ = reserved_;
    return p;
  }
  void deallocate(void* p, std::size_t bytes) {
    if (!p) return;
    const std::size_t n = rounded(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    free_[n].push_back(p);
    cached_ += n;
  }
  // Frees every parked block.
  void release_cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_cached_locked();
  }
  // Bytes obtained from the device (in use or parked), and their highest value.
  std::size_t reserved() const { return reserved_; }
  std::size_t cached() const { return cached_; }
  std::size_t peak_reserved() const { return peak_reserved_; }
  void reset_peak() { peak_reserved_ = reserved_; }

 private:
  static void* raw_allocate(std::size_t n, const char* what) {
#if SKILLGRAFT_CUDA_DEVICE
    void* p = nullptr;
    check(cudaMalloc(&p, n), "cudaMalloc", std::string(what) + ", " + std::to_string(n) + " bytes");
    return p;
#else
    (void)what;
    return ::operator new(n, std::align_val_t{64});
#endif
  }
  static void raw_free(void* p, std::size_t n, bool throwing) {
#if SKILLGRAFT_CUDA_DEVICE
    (void)n;
    const cudaError_t e = cudaFree(p);
    if (throwing) check(e, "cudaFree");
#else
    (void)n;
    (void)throwing;
    ::operator delete(p, std::align_val_t{64});
#endif
  }
  void release_cached_locked() {
    for (auto& [size, blocks] : free_) {
      for (void* p : blocks) {
        raw_free(p, size, true);
        reserved_ -= size;
      }
      blocks.clear();
    }
    cached_ = 0;
  }

  std::mutex mutex_;
  std::unordered_map<std::size_t, std::vector<void*>> free_;
  std::size_t reserved_ = 0, cached_ = 0, peak_reserved_ = 0;
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
