#pragma once
// Rotary position embeddings, Hugging Face "rotate_half" layout: the pair rotated
// together is (t_i, t_{i+half}), not adjacent elements.
//
//   inv_freq_i = theta^(-2i/head_dim),  angle = p * inv_freq_i
//   forward   y_i = x_i cos - x_{i+h} sin,   y_{i+h} = x_{i+h} cos + x_i sin
//   backward  the transpose (rotation by -angle):
//             dx_i = dy_i cos + dy_{i+h} sin, dx_{i+h} = dy_{i+h} cos - dy_i sin
// The table is computed on the host and uploaded once; Backend::rope_apply rotates.
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "skillgraft/nn/linear.hpp"

namespace skillgraft::nn {

template <class T, class Backend = backend::cpu>
class rope_table {
 public:
  using tensor_t = typename Backend::template tensor<T>;
  rope_table() = default;
  rope_table(int head_dim, int max_seq, double theta) : head_dim_(head_dim), max_seq_(max_seq) {
    if (head_dim <= 0 || head_dim % 2) throw std::invalid_argument("skillgraft: rotary head_dim must be even");
    const int half = head_dim / 2;
    const shape_t s{std::size_t(max_seq), std::size_t(half)};
    constexpr bool on_host = std::is_same_v<tensor_t, cpu::tensor<T>>;  // no staging copy on the CPU
    constexpr memory_use staging = on_host ? memory_use::constants : memory_use::workspace;
    cpu::tensor<T> c(s, staging), sn(s, staging);
    for (int p = 0; p < max_seq; ++p)
      for (int i = 0; i < half; ++i) {
        // Angles in double, as transformers computes inv_freq in float32 but positions
        // times frequencies lose precision fastest at long range.
        const double inv_freq = 1.0 / std::pow(theta, double(2 * i) / double(head_dim));
        const double a = double(p) * inv_freq;
        c[std::size_t(p * half + i)] = static_cast<T>(std::cos(a));
        sn[std::size_t(p * half + i)] = static_cast<T>(std::sin(a));
      }
    if constexpr (on_host) {
      cos_ = std::move(c);
      sin_ = std::move(sn);
    } else {
      cos_ = Backend::upload(c, memory_use::constants);
      sin_ = Backend::upload(sn, memory_use::constants);
    }
  }
  int head_dim() const { return head_dim_; }
  int max_seq() const { return max_seq_; }
  // [max_seq, head_dim / 2] in the backend's memory.
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
  tensor_t cos_;
  tensor_t sin_;
};

// Rotates, in place, t laid out [batch, seq, heads, head_dim]; token s has position first_pos + s.
// Inverse = false applies the rotation (forward), true its transpose (backward).
template <class T, class Backend>
void rope_apply(const rope_table<T, Backend>& table, T* t, int batch, int seq, int heads, int first_pos, bool inverse) {
  table.check_positions(first_pos, seq);
  Backend::rope_apply(table.cos(), table.sin(), t, batch, seq, heads, table.head_dim(), first_pos, inverse);
}

// The rotation alone, as a module over [batch, seq, heads * head_dim] (no parameters).
template <class T, class Backend = backend::cpu>
struct rope {
  using value_type = T;
  using tensor_t = typename Backend::template tensor<T>;
  struct weights_t {};
  struct saved_t {};
  struct grads_t {};
  static constexpr bool needs_input_grad = true;

  const rope_table<T, Backend>* table = nullptr;
  int first_pos = 0;

  grads_t make_grads(const weights_t&) const { return {}; }
  tensor_t forward(const weights_t&, const tensor_t& x, saved_t&) const {
    tensor_t y = x.clone(memory_use::workspace);
    rotate(y, false);
    return y;
  }
  tensor_t backward(const weights_t&, const saved_t&, const tensor_t& dy, grads_t&) const {
    tensor_t dx = dy.clone(memory_use::workspace);
    rotate(dx, true);
    return dx;
  }
  template <class F>
  static void for_each_trainable(weights_t&, grads_t&, F&&) {}

 private:
  void rotate(tensor_t& t, bool inverse) const {
    if (t.rank() != 3 || t.dim(2) % static_cast<std::size_t>(table->head_dim()) != 0)
      throw std::invalid_argument("skillgraft: rope input has shape " + t.shape().str() +
                                  ", expected [batch, seq, heads * " + std::to_string(table->head_dim()) + "]");
    rope_apply(*table, t.data(), int(t.dim(0)), int(t.dim(1)), int(t.dim(2)) / table->head_dim(), first_pos, inverse);
  }
};

}  // namespace skillgraft::nn
