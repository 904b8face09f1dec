#pragma once
// The CPU tensor: an aligned, row-major, byte-accounted array of up to four dimensions
// (backend/tensor_storage.hpp: shape, purpose, ownership) with element access and Eigen views.
#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "skillgraft/backend/cpu/host_memory.hpp"
#include "skillgraft/backend/memory.hpp"
#include "skillgraft/backend/tensor_storage.hpp"

namespace skillgraft::cpu {

using skillgraft::expect_shape;
using skillgraft::shape_t;
using skillgraft::uninitialized;
using skillgraft::uninitialized_t;

template <class T>
class tensor : public tensor_storage<T, host_memory> {
  using storage = tensor_storage<T, host_memory>;

 public:
  using matrix_map = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, Eigen::Aligned64>;
  using const_matrix_map =
      Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, Eigen::Aligned64>;
  using vector_map = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>, Eigen::Aligned64>;
  using const_vector_map = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>, Eigen::Aligned64>;
  static constexpr std::size_t alignment = host_memory::alignment;

  tensor() = default;
  tensor(shape_t shape, memory_use use) : storage(shape, use) {}
  tensor(shape_t shape, memory_use use, uninitialized_t u) : storage(shape, use, u) {}

  tensor clone(memory_use use) const {
    tensor t(this->shape(), use, uninitialized);
    if (this->size()) std::memcpy(static_cast<void*>(t.data()), this->data(), this->bytes());
    return t;
  }
  tensor clone() const { return clone(this->use()); }

  T& operator[](std::size_t i) { return this->data()[i]; }
  const T& operator[](std::size_t i) const { return this->data()[i]; }

  // Row-major matrix view: all leading dimensions folded into rows.
  matrix_map mat() { return {this->data(), rows(), cols()}; }
  const_matrix_map mat() const { return {this->data(), rows(), cols()}; }
  vector_map vec() { return {this->data(), static_cast<Eigen::Index>(this->size())}; }
  const_vector_map vec() const { return {this->data(), static_cast<Eigen::Index>(this->size())}; }
  Eigen::Index rows() const {
    return this->rank() ? static_cast<Eigen::Index>(this->size() / this->shape().last()) : 0;
  }
  Eigen::Index cols() const { return static_cast<Eigen::Index>(this->shape().last()); }

  void fill(T value) { std::fill_n(this->data(), this->size(), value); }
  void set_zero() {
    if (this->size()) zero_bytes(this->data(), this->bytes());
  }
};

}  // namespace skillgraft::cpu
