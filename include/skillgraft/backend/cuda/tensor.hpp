#pragma once
// The device tensor: a row-major, byte-accounted array of up to four dimensions in device
// memory (host memory in the host build), the GPU twin of cpu::tensor.
//
// Move-only like cpu::tensor, zero-initialised, and counted in device_ledger() under the
// purpose it is allocated for. Element access from the host is deliberately absent: data
// crosses between host and device only through upload (`from_host`, `copy_from`) and
// download (`to_host`, `copy_to`).
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

namespace skillgraft::cuda {

using cpu::shape_t;

template <class T>
class tensor {
 public:
  using value_type = T;

  tensor() = default;
  tensor(shape_t shape, memory_use use) : shape_(shape), use_(use) {
    if (size() == 0) return;
    try {
      data_ = static_cast<T*>(device_pool::instance().allocate(bytes(), "tensor"));
    } catch (const cuda_error& e) {
      throw cuda_error(std::string(e.what()) + " for a tensor of shape " + shape_.str() + " (" +
                       std::string(memory_use_names[std::size_t(use_)]) + ")");
    }
    device_ledger().add(use_, std::int64_t(bytes()));
    set_zero();
  }
  tensor(const tensor&) = delete;
  tensor& operator=(const tensor&) = delete;
  tensor(tensor&& o) noexcept : data_(std::exchange(o.data_, nullptr)), shape_(std::exchange(o.shape_, {})), use_(o.use_) {}
  tensor& operator=(tensor&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      shape_ = std::exchange(o.shape_, {});
      use_ = o.use_;
    }
    return *this;
  }
  ~tensor() { release(); }

  tensor clone(memory_use use) const {
    tensor t(shape_, use);
    copy_device(t.data_, data_, size());
    return t;
  }
  tensor clone() const { return clone(use_); }

  // Upload a host tensor (same shape) into new device memory.
  static tensor from_host(const cpu::tensor<T>& h, memory_use use) {
    tensor t(h.shape(), use);
    t.copy_from(h);
    return t;
  }
  void copy_from(const cpu::tensor<T>& h) {
    if (!(h.shape() == shape_))
      throw std::invalid_argument("skillgraft: cannot upload a host tensor of shape " + h.shape().str() +
                                  " into a device tensor of shape " + shape_.str());
    copy_bytes(data_, h.data(), bytes(), /*to_device=*/true);
  }
  cpu::tensor<T> to_host(memory_use use = memory_use::workspace) const {
    cpu::tensor<T> h(shape_, use);
    copy_to(h);
    return h;
  }
  void copy_to(cpu::tensor<T>& h) const {
    if (!(h.shape() == shape_))
      throw std::invalid_argument("skillgraft: cannot download a device tensor of shape " + shape_.str() +
                                  " into a host tensor of shape " + h.shape().str());
    copy_bytes(h.data(), data_, bytes(), /*to_device=*/false);
  }
  // Elements [first, first + n) into host memory (a few values for a message or a check).
  void copy_range_to(std::size_t first, std::size_t n, T* host) const {
    if (first + n > size())
      throw std::out_of_range("skillgraft: elements " + std::to_string(first) + ".." + std::to_string(first + n) +
                              " of a device tensor of " + std::to_string(size()));
    copy_bytes(host, data_ + first, n * sizeof(T), /*to_device=*/false);
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return shape_.elements(); }
  std::size_t bytes() const { return size() * sizeof(T); }
  const shape_t& shape() const { return shape_; }
  std::size_t dim(int i) const { return shape_[i]; }
  int rank() const { return shape_.rank; }
  bool empty() const { return size() == 0; }
  memory_use use() const { return use_; }
  // All leading dimensions folded into rows.
  std::size_t rows() const { return shape_.rank ? size() / shape_.last() : 0; }
  std::size_t cols() const { return shape_.last(); }

  void fill(T value) {
    if (size()) thrust::fill_n(exec(), data_, size(), value);
  }
  void set_zero() {
    if (!size()) return;
#if SKILLGRAFT_CUDA_DEVICE
    check(cudaMemsetAsync(data_, 0, bytes()), "cudaMemsetAsync", "tensor " + shape_.str());
#else
    std::memset(static_cast<void*>(data_), 0, bytes());
#endif
  }
  void reshape(shape_t s) {
    if (s.elements() != size())
      throw std::invalid_argument("skillgraft: cannot reshape " + shape_.str() + " to " + s.str());
    shape_ = s;
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
  void release() {
    if (data_) {
      device_ledger().add(use_, -std::int64_t(bytes()));
      device_pool::instance().deallocate(data_, bytes());
      data_ = nullptr;
    }
  }

  T* data_ = nullptr;
  shape_t shape_{};
  memory_use use_ = memory_use::workspace;
};

using cpu::expect_shape;

// Host indices (token ids, row maps) in device memory, for the kernels that read them.
inline tensor<std::int64_t> upload_indices(const std::vector<std::int64_t>& v) {
  cpu::tensor<std::int64_t> h({v.size()}, memory_use::workspace);
  std::copy(v.begin(), v.end(), h.data());
  return tensor<std::int64_t>::from_host(h, memory_use::workspace);
}

}  // namespace skillgraft::cuda
