#pragma once
// What every backend's tensor shares: dimensions, the purpose its bytes are counted under, and
// sole ownership of one allocation, zeroed unless the caller says it writes every element first.
// Where the bytes live is the backend's `Memory` policy:
//
//   static T* allocate<T>(const shape_t&, std::size_t bytes, memory_use, bool zeroed)   counted
//   static void release<T>(T*, std::size_t bytes, memory_use)                          uncounted, freed
//
// Tensors are move-only: a copy of an activation or a weight is a decision the memory budget
// should see (`clone()` of the backend's tensor), never an accident of pass-by-value. A new
// backend's tensor is this storage, its Memory, and the element access its device allows
// (backend/cpu/tensor.hpp: Eigen maps and operator[]; backend/cuda/tensor.hpp: uploads and
// downloads only).
#include <algorithm>
#include <array>
#include <cstddef>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "skillgraft/backend/memory.hpp"

namespace skillgraft {

// Constructor tag: the caller writes every element before any is read (a GEMM output with
// beta = 0, a copy), so the bytes are not zeroed. A step allocates a few hundred MiB of such
// outputs, and the GEMM library writes (or, for beta = 0, clears) them again anyway.
// Test builds define SKILLGRAFT_POISON_UNINITIALIZED: the bytes are then set to all ones
// (a NaN in every floating-point type), so a kernel that reads an element it did not write
// turns the result into NaN instead of silently reading a recycled block's old values.
struct uninitialized_t {
  explicit uninitialized_t() = default;
};
inline constexpr uninitialized_t uninitialized{};

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

template <class T, class Memory>
class tensor_storage {
 public:
  using value_type = T;

  tensor_storage() = default;
  tensor_storage(shape_t shape, memory_use use) : shape_(shape), use_(use) {
    if (size()) data_ = Memory::template allocate<T>(shape_, bytes(), use_, true);
  }
  tensor_storage(shape_t shape, memory_use use, uninitialized_t) : shape_(shape), use_(use) {
    if (size()) data_ = Memory::template allocate<T>(shape_, bytes(), use_, false);
  }
  tensor_storage(const tensor_storage&) = delete;
  tensor_storage& operator=(const tensor_storage&) = delete;
  tensor_storage(tensor_storage&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), shape_(std::exchange(o.shape_, {})), use_(o.use_) {}
  tensor_storage& operator=(tensor_storage&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      shape_ = std::exchange(o.shape_, {});
      use_ = o.use_;
    }
    return *this;
  }
  ~tensor_storage() { release(); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return shape_.elements(); }
  std::size_t bytes() const { return size() * sizeof(T); }
  const shape_t& shape() const { return shape_; }
  std::size_t dim(int i) const { return shape_[i]; }
  int rank() const { return shape_.rank; }
  bool empty() const { return size() == 0; }
  memory_use use() const { return use_; }

  // Same elements, new dimensions (e.g. [B*S, d] <-> [B, S, d]).
  void reshape(shape_t s) {
    if (s.elements() != size())
      throw std::invalid_argument("skillgraft: cannot reshape " + shape_.str() + " to " + s.str());
    shape_ = s;
  }

 private:
  void release() {
    if (data_) Memory::release(std::exchange(data_, nullptr), bytes(), use_);
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

}  // namespace skillgraft
