#pragma once
// The CPU tensor: an aligned, row-major, byte-accounted array of up to four dimensions.
//
// Tensors are move-only: a copy of an activation or a weight is a decision the
// memory budget should see (`clone()`), never an accident of pass-by-value.
#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#include "skillgraft/backend/memory.hpp"

namespace skillgraft::cpu {

// Dimensions, outermost first. Rank 0 means "no tensor" (an absent optional buffer).
struct shape_t {
  std::array<std::size_t, 4> dims{};
  int rank = 0;

  shape_t() = default;
  shape_t(std::initializer_list<std::size_t> d) : rank(static_cast<int>(d.size())) {
    if (d.size() > 4) throw std::invalid_argument("skillgraft: tensors have at most 4 dimensions");
    std::copy(d.begin(), d.end(), dims.begin());
  }
  std::size_t operator[](int i) const { return dims[static_cast<std::size_t>(i)]; }
  std::size_t elements() const {
    if (rank == 0) return 0;
    std::size_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[static_cast<std::size_t>(i)];
    return n;
  }
  std::size_t last() const { return rank ? dims[static_cast<std::size_t>(rank - 1)] : 0; }
  bool operator==(const shape_t& o) const {
    if (rank != o.rank) return false;
    for (int i = 0; i < rank; ++i)
      if (dims[static_cast<std::size_t>(i)] != o.dims[static_cast<std::size_t>(i)]) return false;
    return true;
  }
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(dims[static_cast<std::size_t>(i)]);
    return s + "]";
  }
};

template <class T>
class tensor {
 public:
  using value_type = T;
  using matrix_map = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, Eigen::Aligned64>;
  using const_matrix_map =
      Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, Eigen::Aligned64>;
  using vector_map = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>, Eigen::Aligned64>;
  using const_vector_map = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>, Eigen::Aligned64>;
  static constexpr std::size_t alignment = 64;

  tensor() = default;
  // Zero-initialised: a fresh gradient or moment buffer must start at zero, and
  // activations that are overwritten pay one memset, which is cheap next to a GEMM.
  tensor(shape_t shape, memory_use use) : shape_(shape), use_(use) {
    const std::size_t n = shape_.elements();
    if (n == 0) return;
    data_ = static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t{alignment}));
    std::memset(static_cast<void*>(data_), 0, n * sizeof(T));
    ledger().add(use_, static_cast<std::int64_t>(bytes()));
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
    if (size()) std::memcpy(static_cast<void*>(t.data_), data_, bytes());
    return t;
  }
  tensor clone() const { return clone(use_); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return shape_.elements(); }
  std::size_t bytes() const { return size() * sizeof(T); }
  const shape_t& shape() const { return shape_; }
  std::size_t dim(int i) const { return shape_[i]; }
  int rank() const { return shape_.rank; }
  bool empty() const { return size() == 0; }
  memory_use use() const { return use_; }
  T& operator[](std::size_t i) { return data_[i]; }
  const T& operator[](std::size_t i) const { return data_[i]; }

  // Row-major matrix view: all leading dimensions folded into rows.
  matrix_map mat() { return {data_, rows(), cols()}; }
  const_matrix_map mat() const { return {data_, rows(), cols()}; }
  vector_map vec() { return {data_, static_cast<Eigen::Index>(size())}; }
  const_vector_map vec() const { return {data_, static_cast<Eigen::Index>(size())}; }
  Eigen::Index rows() const { return shape_.rank ? static_cast<Eigen::Index>(size() / shape_.last()) : 0; }
  Eigen::Index cols() const { return static_cast<Eigen::Index>(shape_.last()); }

  void fill(T value) { std::fill_n(data_, size(), value); }
  void set_zero() {
    if (size()) std::memset(static_cast<void*>(data_), 0, bytes());
  }
  // Same elements, new dimensions (e.g. [B*S, d] <-> [B, S, d]).
  void reshape(shape_t s) {
    if (s.elements() != size())
      throw std::invalid_argument("skillgraft: cannot reshape " + shape_.str() + " to " + s.str());
    shape_ = s;
  }

 private:
  void release() {
    if (data_) {
      ledger().add(use_, -static_cast<std::int64_t>(bytes()));
      ::operator delete[](data_, std::align_val_t{alignment});
      data_ = nullptr;
    }
  }
  T* data_ = nullptr;
  shape_t shape_{};
  memory_use use_ = memory_use::workspace;
};

// Clear messages for bad input: name the tensor, the shape expected and the shape found
// (any backend's tensor).
template <class Tensor>
void expect_shape(const Tensor& t, const shape_t& expected, std::string_view what) {
  if (!(t.shape() == expected))
    throw std::invalid_argument("skillgraft: " + std::string(what) + " has shape " + t.shape().str() +
                                ", expected " + expected.str());
}

}  // namespace skillgraft::cpu
