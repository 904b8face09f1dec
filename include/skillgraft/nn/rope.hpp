#pragma once
// Rotary position embeddings, Hugging Face "rotate_half" layout: the pair rotated
// together is (t_i, t_{i+half}), not adjacent elements.
//
//   inv_freq_i = theta^(-2i/head_dim),  angle = p * inv_freq_i
//   forward   y_i = x_i cos - x_{i+h} sin,   y_{i+h} = x_{i+h} cos + x_i sin
//   backward  the transpose (rotation by -angle):
//             dx_i = dy_i cos + dy_{i+h} sin, dx_{i+h} = dy_{i+h} cos - dy_i sin
#include <cmath>
#include <string>

#include "skillgraft/backend/cpu/tensor.hpp"
#include "skillgraft/nn/linear.hpp"

namespace skillgraft::nn {

template <class T>
class rope_table {
 public:
  rope_table() = default;
  rope_table(int head_dim, int max_seq, double theta)
      : head_dim_(head_dim),
        max_seq_(max_seq),
        cos_({static_cast<std::size_t>(max_seq), static_cast<std::size_t>(head_dim / 2)}, memory_use::constants),
        sin_({static_cast<std::size_t>(max_seq), static_cast<std::size_t>(head_dim / 2)}, memory_use::constants) {
    if (head_dim <= 0 || head_dim % 2) throw std::invalid_argument("skillgraft: rotary head_dim must be even");
    const int half = head_dim / 2;
    for (int p = 0; p < max_seq; ++p)
      for (int i = 0; i < half; ++i) {
        // Angles in double, as transformers computes inv_freq in float32 but positions
        // times frequencies lose precision fastest at long range.
        const double inv_freq = 1.0 / std::pow(theta, double(2 * i) / double(head_dim));
        const double a = double(p) * inv_freq;
        cos_[static_cast<std::size_t>(p * half + i)] = static_cast<T>(std::cos(a));
        sin_[static_cast<std::size_t>(p * half + i)] = static_cast<T>(std::sin(a));
      }
  }
  int head_dim() const { return head_dim_; }
  int max_seq() const { return max_seq_; }
  const T* cos_row(int p) const { return cos_.data() + static_cast<std::size_t>(p) * (head_dim_ / 2); }
  const T* sin_row(int p) const { return sin_.data() + static_cast<std::size_t>(p) * (head_dim_ / 2); }

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

// Rotates, in place, t laid out [batch, seq, heads, head_dim]; token s has position first_pos + s.
// Inverse = false applies the rotation (forward), true its transpose (backward).
template <class T>
void rope_apply(const rope_table<T>& table, T* t, int batch, int seq, int heads, int first_pos, bool inverse) {
  table.check_positions(first_pos, seq);
  const int hd = table.head_dim(), half = hd / 2;
  const T sign = inverse ? T(-1) : T(1);
#pragma omp parallel for collapse(2) schedule(static) if (batch * seq * heads * hd > 32768)
  for (int b = 0; b < batch; ++b)
    for (int s = 0; s < seq; ++s) {
      const T* c = table.cos_row(first_pos + s);
      const T* sn = table.sin_row(first_pos + s);
      for (int h = 0; h < heads; ++h) {
        T* x = t + ((static_cast<std::size_t>(b) * seq + s) * heads + h) * hd;
        for (int i = 0; i < half; ++i) {
          const T a = x[i], bb = x[i + half], si = sign * sn[i];
          x[i] = a * c[i] - bb * si;
          x[i + half] = bb * c[i] + a * si;
        }
      }
    }
}

// The rotation alone, as a module over [batch, seq, heads * head_dim] (no parameters).
template <class T>
struct rope {
  using value_type = T;
  struct weights_t {};
  struct saved_t {};
  struct grads_t {};
  static constexpr bool needs_input_grad = true;

  const rope_table<T>* table = nullptr;
  int first_pos = 0;

  grads_t make_grads(const weights_t&) const { return {}; }
  tensor<T> forward(const weights_t&, const tensor<T>& x, saved_t&) const {
    tensor<T> y = x.clone(memory_use::workspace);
    rotate(y, false);
    return y;
  }
  tensor<T> backward(const weights_t&, const saved_t&, const tensor<T>& dy, grads_t&) const {
    tensor<T> dx = dy.clone(memory_use::workspace);
    rotate(dx, true);
    return dx;
  }
  template <class F>
  static void for_each_trainable(weights_t&, grads_t&, F&&) {}

 private:
  void rotate(tensor<T>& t, bool inverse) const {
    if (t.rank() != 3 || t.dim(2) % static_cast<std::size_t>(table->head_dim()) != 0)
      throw std::invalid_argument("skillgraft: rope input has shape " + t.shape().str() +
                                  ", expected [batch, seq, heads * " + std::to_string(table->head_dim()) + "]");
    rope_apply(*table, t.data(), int(t.dim(0)), int(t.dim(1)), int(t.dim(2)) / table->head_dim(), first_pos, inverse);
  }
};

}  // namespace skillgraft::nn
