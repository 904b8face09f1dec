#pragma once
// Host memory for CPU tensors: 64-byte aligned (Eigen's aligned maps, AVX-512 loads), zeroed,
// counted in the byte ledger, and recycled through a caching pool (backend/block_pool.hpp).
//
// Blocks of `pooled_from` bytes and more go through the pool: glibc serves those with mmap or
// from the top of its heap and gives them back to the kernel when freed, so without the pool
// each training step faults its activations in again page by page. Smaller blocks stay with
// malloc, whose free lists already reuse them without a system call.
//
// A fresh gradient or moment buffer must start at zero (on every core for large blocks); an
// output its producer overwrites is allocated `uninitialized` (tensor_storage.hpp) and skips it.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>

#include "skillgraft/backend/block_pool.hpp"
#include "skillgraft/backend/memory.hpp"
#include "skillgraft/backend/tensor_storage.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace skillgraft::cpu {

struct host_raw {
  static constexpr std::size_t alignment = 64;
  static void* allocate(std::size_t bytes, const char*) { return ::operator new(bytes, std::align_val_t{alignment}); }
  static void free(void* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{alignment}); }
  static bool out_of_memory(const std::exception& e) { return dynamic_cast<const std::bad_alloc*>(&e) != nullptr; }
};

// The process's pool of host blocks (`host_pool().release_cached()` gives the parked ones
// back; `set_cache_limit` bounds them).
inline block_pool<host_raw>& host_pool() {
  static block_pool<host_raw> pool(4096);  // whole pages
  return pool;
}

// Sets bytes at p to `byte`, on every core when there are enough of them and no parallel region
// already runs.
inline void fill_bytes(void* p, int byte, std::size_t bytes) {
#if defined(_OPENMP)
  constexpr std::size_t chunk = std::size_t(256) << 10;
  if (bytes >= 4 * chunk && !omp_in_parallel()) {
    const std::int64_t chunks = std::int64_t((bytes + chunk - 1) / chunk);
    auto* b = static_cast<unsigned char*>(p);
#pragma omp parallel for schedule(static)
    for (std::int64_t c = 0; c < chunks; ++c) {
      const std::size_t begin = std::size_t(c) * chunk;
      std::memset(b + begin, byte, std::min(chunk, bytes - begin));
    }
    return;
  }
#endif
  std::memset(p, byte, bytes);
}
inline void zero_bytes(void* p, std::size_t bytes) { fill_bytes(p, 0, bytes); }

struct host_memory {
  static constexpr std::size_t alignment = host_raw::alignment;
  static constexpr std::size_t pooled_from = std::size_t(64) << 10;

  template <class T>
  static T* allocate(const shape_t&, std::size_t bytes, memory_use use, bool zeroed) {
    void* p = bytes >= pooled_from ? host_pool().allocate(bytes, "host tensor") : host_raw::allocate(bytes, nullptr);
    if (zeroed)
      zero_bytes(p, bytes);
#if defined(SKILLGRAFT_POISON_UNINITIALIZED)
    else
      fill_bytes(p, 0xff, bytes);
#endif
    ledger().add(use, static_cast<std::int64_t>(bytes));
    return static_cast<T*>(p);
  }
  template <class T>
  static void release(T* p, std::size_t bytes, memory_use use) {
    ledger().add(use, -static_cast<std::int64_t>(bytes));
    if (bytes >= pooled_from)
      host_pool().deallocate(p, bytes);
    else
      host_raw::free(p, bytes);
  }
};

}  // namespace skillgraft::cpu
