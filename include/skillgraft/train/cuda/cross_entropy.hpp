#pragma once
// Masked next-token cross-entropy fused with the LM head, on the CUDA backend.
//
//   for each position i with a target y_i (target != ignore_index), n of them:
//     z_i = h_i W^T,  loss = (1/n) sum_i [ logsumexp(z_i) - z_i[y_i] ]
//     dz_i = (softmax(z_i) - onehot(y_i)) / n
//     dh_i = dz_i W,   dW += dz_i^T h_i
//
// As on the CPU (train/cross_entropy.hpp): positions without a target never reach the head,
// and `chunk` rows are processed at a time, the logits and their gradient sharing one
// [chunk, vocab] device buffer. log-sum-exp and the loss accumulate in double.
// Targets are host data (xtensor); the rows that have one are found on the host and uploaded.
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <string>
#include <vector>

#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/train/cross_entropy.hpp"

namespace skillgraft::train::cuda {

template <class T>
using tensor = skillgraft::cuda::tensor<T>;
using skillgraft::cuda::index_t;
using skillgraft::cuda::op;

template <class T>
struct loss_result {
  double loss = 0;        // mean over counted positions
  std::size_t count = 0;  // positions with a target
  tensor<T> dh;           // d loss / d h, same shape as h (empty unless requested)
};

namespace kernels {
template <class T>
struct gather_rows {  // dst[i, j] = src[rows[i], j]
  T* dst;
  const T* src;
  const std::int64_t* rows;
  index_t d;
  SKILLGRAFT_HD void operator()(index_t e) const { dst[e] = src[rows[e / d] * d + e % d]; }
};
template <class T>
struct scatter_rows {  // dst[rows[i], j] = src[i, j]
  T* dst;
  const T* src;
  const std::int64_t* rows;
  index_t d;
  SKILLGRAFT_HD void operator()(index_t e) const { dst[rows[e / d] * d + e % d] = src[e]; }
};
template <class T>
struct logit {
  const T* z;
  index_t V;
  SKILLGRAFT_HD T operator()(index_t i, index_t j) const { return z[i * V + j]; }
};
template <class T>
struct exp_shifted {  // exp(z_ij - max_i), in double
  const T* z;
  const T* mx;
  index_t V;
  SKILLGRAFT_HD double operator()(index_t i, index_t j) const {
    return skillgraft::cuda::exp_(double(z[i * V + j] - mx[i]));
  }
};
template <class T>
struct log_sum_exp {  // lse_i = max_i + log(sum_i), written over sum_i
  double* sum;
  const T* mx;
  SKILLGRAFT_HD void operator()(index_t i) const { sum[i] = double(mx[i]) + skillgraft::cuda::log_(sum[i]); }
};
template <class T>
struct row_loss {  // lse_i - z_i[y_i]
  const double* lse;
  const T* z;
  const std::int64_t* y;
  index_t V;
  SKILLGRAFT_HD double operator()(index_t i) const { return lse[i] - double(z[i * V + y[i]]); }
};
template <class T>
struct softmax_minus_onehot {  // dz_ij = (exp(z_ij - lse_i) - [j == y_i]) / n, over z
  T* z;
  const double* lse;
  const std::int64_t* y;
  index_t V;
  double n;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t i = e / V, j = e % V;
    T g = T(skillgraft::cuda::exp_(double(z[e]) - lse[i]) / n);
    if (j == y[i]) g -= T(1.0 / n);
    z[e] = g;
  }
};
}  // namespace kernels

// h: [batch, positions, hidden] (device); head: [vocab, hidden] (device); targets: [batch, positions] (host).
template <class T>
loss_result<T> masked_cross_entropy(const tensor<T>& h, const tensor<T>& head, const token_ids& targets,
                                    std::type_identity_t<tensor<T>>* dhead,
                                    cross_entropy_options opt = {}) {
  namespace sc = skillgraft::cuda;
  if (h.rank() != 3 || targets.shape(0) != h.dim(0) || targets.shape(1) != h.dim(1))
    throw std::invalid_argument("skillgraft: targets have shape [" + std::to_string(targets.shape(0)) + ", " +
                                std::to_string(targets.shape(1)) + "], expected [" + std::to_string(h.dim(0)) + ", " +
                                std::to_string(h.dim(1)) + "] (one per position of the hidden states " + h.shape().str() +
                                ")");
  const std::size_t V = head.dim(0), d = head.dim(1);
  if (h.dim(2) != d)
    throw std::invalid_argument("skillgraft: hidden states have width " + std::to_string(h.dim(2)) +
                                ", the LM head expects " + std::to_string(d));
  cpu::tensor<std::int64_t> rows_h({targets.size()}, memory_use::workspace), ys_h({targets.size()}, memory_use::workspace);
  std::size_t count = 0;
  for (std::size_t b = 0; b < targets.shape(0); ++b)
    for (std::size_t s = 0; s < targets.shape(1); ++s) {
      const auto y = targets(b, s);
      if (y == ignore_index) continue;
      if (y < 0 || std::size_t(y) >= V)
        throw std::invalid_argument("skillgraft: target [" + std::to_string(b) + ", " + std::to_string(s) + "] is " +
                                    std::to_string(y) + ", outside the vocabulary [0, " + std::to_string(V) + ")");
      rows_h[count] = std::int64_t(b * targets.shape(1) + s);
      ys_h[count] = y;
      ++count;
    }
  loss_result<T> r;
  r.count = count;
  if (opt.want_dh) r.dh = tensor<T>(h.shape(), memory_use::workspace);
  if (count == 0) return r;
  tensor<std::int64_t> rows = tensor<std::int64_t>::from_host(rows_h, memory_use::workspace);
  tensor<std::int64_t> ys = tensor<std::int64_t>::from_host(ys_h, memory_use::workspace);

  const double n = double(opt.normaliser ? opt.normaliser : count);
  const std::size_t chunk = std::min(std::max<std::size_t>(1, opt.chunk), count);
  tensor<T> hc({chunk, d}, memory_use::workspace), z({chunk, V}, memory_use::workspace), mx({chunk}, memory_use::workspace);
  tensor<double> lse({chunk}, memory_use::workspace);
  tensor<T> dhc;
  if (opt.want_dh) dhc = tensor<T>({chunk, d}, memory_use::workspace);
  double total = 0;
  for (std::size_t c0 = 0; c0 < count; c0 += chunk) {
    const index_t m = index_t(std::min(chunk, count - c0)), vi = index_t(V), di = index_t(d);
    const std::int64_t* rc = rows.data() + c0;
    const std::int64_t* yc = ys.data() + c0;
    sc::for_each_index(m * di, kernels::gather_rows<T>{hc.data(), h.data(), rc, di});
    sc::gemm_ops::gemm("lm_head: z = h W^T", op::n, op::t, int(m), int(V), int(d), T(1), hc.data(), int(d), head.data(), int(d), T(0),
             z.data(), int(V));
    sc::segmented_reduce(m, vi, kernels::logit<T>{z.data(), vi}, mx.data(), sc::maximum<T>());
    sc::segmented_sum(m, vi, kernels::exp_shifted<T>{z.data(), mx.data(), vi}, lse.data());
    sc::for_each_index(m, kernels::log_sum_exp<T>{lse.data(), mx.data()});
    total += sc::sum_index<double>(m, kernels::row_loss<T>{lse.data(), z.data(), yc, vi});
    sc::for_each_index(m * vi, kernels::softmax_minus_onehot<T>{z.data(), lse.data(), yc, vi, n});
    if (dhead)
      sc::gemm_ops::gemm("lm_head: dW += dz^T h", op::t, op::n, int(V), int(d), int(m), T(1), z.data(), int(V), hc.data(), int(d), T(1),
               dhead->data(), int(d));
    if (opt.want_dh) {
      sc::gemm_ops::gemm("lm_head: dh = dz W", op::n, op::n, int(m), int(d), int(V), T(1), z.data(), int(V), head.data(), int(d), T(0),
               dhc.data(), int(d));
      sc::for_each_index(m * di, kernels::scatter_rows<T>{r.dh.data(), dhc.data(), rc, di});
    }
  }
  r.loss = total / n;
  if (!std::isfinite(r.loss))
    throw std::domain_error("skillgraft: the loss is not finite (" + std::to_string(r.loss) + "); no weight was changed");
  return r;
}

}  // namespace skillgraft::train::cuda
