#pragma once
// The device tensor: the shared storage (backend/tensor_storage.hpp: shape, purpose, move-only
// ownership) over device memory (host memory in the host build), zero-initialised unless
// constructed `uninitialized` (backend/tensor_storage.hpp), and counted
// in device_ledger() under the purpose it is allocated for. Element access from the host is
// deliberately absent: data crosses between host and device only through upload (`from_host`,
// `copy_from`) and download (`to_host`, `copy_to`).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <thrust/fill.h>

#include "skillgraft/backend/cpu/tensor.hpp"
#include "skillgraft/backend/cuda/memory.hpp"
#include "skillgraft/backend/tensor_storage.hpp"

namespace skillgraft::cuda {

using skillgraft::shape_t;
using skillgraft::uninitialized;
using skillgraft::uninitialized_t;

// Device memory from the caching pool (a failed allocation names the tensor's shape and
// purpose), zeroed on the stream, counted in device_ledger().
struct device_memory {
  template <class T>
  static T* allocate(const shape_t& shape, std::size_t bytes, memory_use use, bool zeroed) {
    T* p;
    try {
      p = static_cast<T*>(device_pool::instance().allocate(bytes, "tensor"));
    } catch (const cuda_error& e) {
      throw cuda_error(std::string(e.what()) + " for a tensor of shape " + shape.str() + " (" +
                       std::string(memory_use_names[std::size_t(use)]) + ")");
    }
    device_ledger().add(use, std::int64_t(bytes));
    if (zeroed)
      zero(p, bytes, shape);
#if defined(SKILLGRAFT_POISON_UNINITIALIZED)
    else
      fill_bytes(p, 0xff, bytes, shape);
#endif
    return p;
  }
  static void zero(void* p, std::size_t bytes, const shape_t& shape) { fill_bytes(p, 0, bytes, shape); }
  static void fill_bytes(void* p, int byte, std::size_t bytes, const shape_t& shape) {
#if SKILLGRAFT_CUDA_DEVICE
    check(cudaMemsetAsync(p, byte, bytes), "cudaMemsetAsync", "tensor " + shape.str());
#else
    (void)shape;
    std::memset(p, byte, bytes);
#endif
  }
  template <class T>
  static void release(T* p, std::size_t bytes, memory_use use) {
    device_ledger().add(use, -std::int64_t(bytes));
    device_pool::instance().deallocate(p, bytes);
  }
};

template <class T>
class tensor : public tensor_storage<T, device_memory> {
  using storage = tensor_storage<T, device_memory>;

 public:
  tensor() = default;
  tensor(shape_t shape, memory_use use) : storage(shape, use) {}
  tensor(shape_t shape, memory_use use, uninitialized_t u) : storage(shape, use, u) {}

  tensor clone(memory_use use) const {
    tensor t(this->shape(), use, uninitialized);
    copy_device(t.data(), this->data(), this->size());
    return t;
  }
  tensor clone() const { return clone(this->use()); }

  // Upload a host tensor (same shape) into new device memory.
  static tensor from_host(const cpu::tensor<T>& h, memory_use use) {
    tensor t(h.shape(), use, uninitialized);
    t.copy_from(h);
    return t;
  }
  void copy_from(const cpu::tensor<T>& h) {
    if (!(h.shape() == this->shape()))
      throw std::invalid_argument("skillgraft: cannot upload a host tensor of shape " + h.shape().str() +
                                  " into a device tensor of shape " + this->shape().str());
    copy_bytes(this->data(), h.data(), this->bytes(), /*to_device=*/true);
  }
  cpu::tensor<T> to_host(memory_use use = memory_use::workspace) const {
    cpu::tensor<T> h(this->shape(), use, uninitialized);
    copy_to(h);
    return h;
  }
  void copy_to(cpu::tensor<T>& h) const {
    if (!(h.shape() == this->shape()))
      throw std::invalid_argument("skillgraft: cannot download a device tensor of shape " + this->shape().str() +
                                  " into a host tensor of shape " + h.shape().str());
    copy_bytes(h.data(), this->data(), this->bytes(), /*to_device=*/false);
  }
  // Elements [first, first + n) into host memory (a few values for a message or a check).
  void copy_range_to(std::size_t first, std::size_t n, T* host) const {
    if (first + n > this->size())
      throw std::out_of_range("skillgraft: elements " + std::to_string(first) + ".." + std::to_string(first + n) +
                              " of a device tensor of " + std::to_string(this->size()));
    copy_bytes(host, this->data() + first, n * sizeof(T), /*to_device=*/false);
  }

  // All leading dimensions folded into rows.
  std::size_t rows() const { return this->rank() ? this->size() / this->shape().last() : 0; }
  std::size_t cols() const { return this->shape().last(); }

  void fill(T value) {
    if (this->size()) thrust::fill_n(exec(), this->data(), this->size(), value);
  }
  void set_zero() {
    if (this->size()) device_memory::zero(this->data(), this->bytes(), this->shape());
  }

 private:
  static void copy_device(T* dst, const T* src, std::size_t n) {
    if (!n) return;
#if SKILLGRAFT_CUDA_DEVICE
    check(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToDevice), "cudaMemcpyAsync (device to device)");
#else
    std::memcpy(static_cast<void*>(dst), src, n * sizeof(T));
#endif
  }
  static void copy_bytes(void* dst, const void* src, std::size_t n, bool to_device) {
    if (!n) return;
#if SKILLGRAFT_CUDA_DEVICE
    check(cudaMemcpy(dst, src, n, to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost),
          to_device ? "cudaMemcpy (host to device)" : "cudaMemcpy (device to host)");
#else
    (void)to_device;
    std::memcpy(dst, src, n);
#endif
  }
};

using skillgraft::expect_shape;

// Host indices (token ids, row maps) in device memory, for the kernels that read them.
inline tensor<std::int64_t> upload_indices(const std::vector<std::int64_t>& v) {
  cpu::tensor<std::int64_t> h({v.size()}, memory_use::workspace);
  std::copy(v.begin(), v.end(), h.data());
  return tensor<std::int64_t>::from_host(h, memory_use::workspace);
}

}  // namespace skillgraft::cuda
