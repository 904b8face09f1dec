#pragma once
// Rotary position embeddings on the CUDA backend, Hugging Face "rotate_half" layout.
//
//   forward   y_i = x_i cos - x_{i+h} sin,   y_{i+h} = x_{i+h} cos + x_i sin
//   backward  the transpose (rotation by -angle)
// The cos/sin table is the CPU one (nn::rope_table computes the angles), uploaded once.
#include <cstring>

#include "skillgraft/nn/cuda/linear.hpp"
#include "skillgraft/nn/rope.hpp"

namespace skillgraft::nn::cuda {

template <class T>
class rope_table {
 public:
  rope_table() = default;
  rope_table(int head_dim, int max_seq, double theta) : head_dim_(head_dim), max_seq_(max_seq) {
    const nn::rope_table<T> host(head_dim, max_seq, theta);  // validates head_dim
    const shape_t s{std::size_t(max_seq), std::size_t(head_dim / 2)};
    cpu::tensor<T> staging(s, memory_use::workspace);
    std::memcpy(staging.data(), host.cos_row(0), staging.bytes());
    cos_ = tensor<T>::from_host(staging, memory_use::constants);
    std::memcpy(staging.data(), host.sin_row(0), staging.bytes());
    sin_ = tensor<T>::from_host(staging, memory_use::constants);
  }
  int head_dim() const { return head_dim_; }
  int max_seq() const { return max_seq_; }
  const T* cos() const { return cos_.data(); }
  const T* sin() const { return sin_.data(); }
  void check_positions(int first, int seq) const {
    if (first < 0 || first + seq > max_seq_)
      throw std::invalid_argument("skillgraft: sequence positions " + std::to_string(first) + ".." +
                                  std::to_string(first + seq - 1) + " exceed the rotary table (max_seq " +
                                  std::to_string(max_seq_) + ")");
  }

 private:
  int head_dim_ = 0;
  int max_seq_ = 0;
  tensor<T> cos_;
  tensor<T> sin_;
};

namespace kernels {
template <class T>
struct rope_rotate {  // one (token, head, pair i) of t [batch, seq, heads, head_dim]
  T* t;
  const T* cos;
  const T* sin;
  index_t seq, heads, half, first_pos;
  T sign;  // +1 forward, -1 backward
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t i = e % half, token_head = e / half, token = token_head / heads, s = token % seq;
    T* x = t + token_head * 2 * half;
    const T c = cos[(first_pos + s) * half + i], sn = sign * sin[(first_pos + s) * half + i];
    const T a = x[i], b = x[i + half];
    x[i] = a * c - b * sn;
    x[i + half] = b * c + a * sn;
  }
};
}  // namespace kernels

// Rotates t [batch, seq, heads * head_dim] in place; inverse = true applies the transpose.
template <class T>
void rope_apply(const rope_table<T>& table, T* t, int batch, int seq, int heads, int first_pos, bool inverse) {
  table.check_positions(first_pos, seq);
  const index_t half = table.head_dim() / 2;
  skillgraft::cuda::for_each_index(index_t(batch) * seq * heads * half,
                                   kernels::rope_rotate<T>{t, table.cos(), table.sin(), seq, heads, half, first_pos,
                                                           inverse ? T(-1) : T(1)});
}

}  // namespace skillgraft::nn::cuda
