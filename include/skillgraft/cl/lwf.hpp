#pragma once
// Learning without forgetting (Li & Hoiem): cross-entropy on the new task plus a
// distillation term pulling the student's next-token distribution towards the teacher's.
//
//   loss = CE + λ T² · mean_i KL( softmax(t_i / T) || softmax(s_i / T) )
//   d loss / d s_i = (softmax(s_i) - onehot(y_i)) / n_ce + λ T (softmax(s_i/T) - softmax(t_i/T)) / n_kd
//
// s = h W^T (student), t = h_t W_t^T (teacher), over the full vocabulary. Positions are
// taken `rows` at a time and the vocabulary `vocab` columns at a time: a first pass
// finds the three log-sum-exps online, a second forms KL and the gradient, so no
// [positions, vocab] softmax is ever held (with one vocabulary chunk the logits of the
// first pass are reused instead of recomputed).
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "skillgraft/backend/host_device.hpp"
#include "skillgraft/cl/teacher.hpp"
#include "skillgraft/train/cross_entropy.hpp"
#include "skillgraft/train/step.hpp"

namespace skillgraft::cl {

struct lwf_options {
  double lambda = 1.0;       // weight of the distillation term
  double temperature = 2.0;  // T
  bool all_positions = false;  // distil on every position, not only those with a target
  std::size_t rows = 128;
  std::size_t vocab = 0;     // vocabulary chunk; 0 = the whole vocabulary at once
};

template <class T, class Backend = backend::cpu>
struct lwf_result : train::loss_result<T, Backend> {
  double ce = 0;  // cross-entropy part
  double kl = 0;  // mean KL (before λ T²)
};

// Element functors of the loss (SKILLGRAFT_HD: the CUDA backend runs the same functors).
// The log-sum-exps fold one row per call over a vocabulary chunk; the KL, CE and gradient
// terms are one call per (row, column), so they spread over every core or GPU thread. Rows of
// a chunk are `cols` wide and packed; acc is [9, m]: the running (max, sum) of log p, of
// log p_s/T and of log p_t/T, then the three finished log-sum-exps.
namespace lwf_kernels {
struct start_rows {
  double* acc;
  std::int64_t m;
  double minus_inf;
  SKILLGRAFT_HD void operator()(std::int64_t i) const {
    for (int k = 0; k < 6; k += 2) acc[k * m + i] = minus_inf, acc[(k + 1) * m + i] = 0;
  }
};

// Online log-sum-exp: folds scale * z[i, :] of this chunk into (max_i, sum_i exp(x - max_i)).
template <class T>
struct fold_log_sum_exp {
  const T* z;
  std::int64_t cols;
  double scale;
  double* mx;
  double* sum;
  SKILLGRAFT_HD void operator()(std::int64_t i) const {
    const T* zi = z + i * cols;
    double cm = mx[i];
    for (std::int64_t j = 0; j < cols; ++j) cm = double(zi[j]) * scale > cm ? double(zi[j]) * scale : cm;
    double s = sum[i] == 0 ? 0 : sum[i] * scalar::exp_(mx[i] - cm);
    for (std::int64_t j = 0; j < cols; ++j) s += scalar::exp_(double(zi[j]) * scale - cm);
    mx[i] = cm;
    sum[i] = s;
  }
};

struct finish_rows {  // lse = max + log(sum), for the three distributions
  double* acc;
  std::int64_t m;
  SKILLGRAFT_HD void operator()(std::int64_t i) const {
    for (int k = 0; k < 3; ++k) acc[(6 + k) * m + i] = acc[2 * k * m + i] + scalar::log_(acc[(2 * k + 1) * m + i]);
  }
};

// The logits of element e = (row i, column j) of this chunk, with the row's log-sum-exps.
template <class T>
struct chunk_element {
  const T* z;   // student logits
  const T* zt;  // teacher logits
  std::int64_t cols, m;
  const double* acc;
  double inv_t;
  SKILLGRAFT_HD double l1(std::int64_t i) const { return acc[6 * m + i]; }
  SKILLGRAFT_HD double log_ps(std::int64_t e) const { return double(z[e]) * inv_t - acc[7 * m + e / cols]; }
  SKILLGRAFT_HD double log_pt(std::int64_t e) const { return double(zt[e]) * inv_t - acc[8 * m + e / cols]; }
};

// KL(p_t || p_s) term of element e: p_t (log p_t - log p_s).
template <class T>
struct kl_term : chunk_element<T> {
  SKILLGRAFT_HD double operator()(std::int64_t e) const {
    const double lt = this->log_pt(e);
    return scalar::exp_(lt) * (lt - this->log_ps(e));
  }
};

// CE term of row i when its target falls in this chunk (columns col0 ..): lse - z[y].
template <class T>
struct ce_term : chunk_element<T> {
  const std::int64_t* y;
  std::int64_t col0, ignore;
  SKILLGRAFT_HD double operator()(std::int64_t i) const {
    const std::int64_t j = y[i] - col0;
    if (y[i] == ignore || j < 0 || j >= this->cols) return 0;
    return this->l1(i) - double(this->z[i * this->cols + j]);
  }
};

// Turns the student's logits into
//   dz = λT (softmax(s/T) - softmax(t/T)) / n_kd  [+ (softmax(s) - onehot(y)) / n_ce with a target]
// (after the KL and CE terms have read them).
template <class T>
struct distil_grad {
  T* z;
  chunk_element<T> in;
  const std::int64_t* y;
  std::int64_t col0, ignore;
  double kd_scale, n_ce, n_kd;
  SKILLGRAFT_HD void operator()(std::int64_t e) const {
    const std::int64_t i = e / in.cols, j = e % in.cols;
    double g = kd_scale * (scalar::exp_(in.log_ps(e)) - scalar::exp_(in.log_pt(e))) / n_kd;
    if (y[i] != ignore) {
      g += scalar::exp_(double(z[e]) - in.l1(i)) / n_ce;
      if (col0 + j == y[i]) g -= 1.0 / n_ce;
    }
    z[e] = T(g);
  }
};
}  // namespace lwf_kernels

// h, h_teacher: [batch, positions, hidden]; head, head_teacher: [vocab, hidden] (tensors of one
// backend; targets on the host). `normaliser_ce` / `normaliser_kd` (0 = this batch's own counts)
// let micro-batches add up. `dhead` may be nullptr (no head gradient).
template <class T, template <class> class Tensor>
lwf_result<T, typename backend_of<Tensor<T>>::type> lwf_loss(const Tensor<T>& h, const Tensor<T>& head,
                                                             const Tensor<T>& h_teacher, const Tensor<T>& head_teacher,
                                                             const token_ids& targets,
                                                             std::type_identity_t<Tensor<T>>* dhead,
                                                             lwf_options opt = {}, std::size_t normaliser_ce = 0,
                                                             std::size_t normaliser_kd = 0) {
  using B = typename backend_of<Tensor<T>>::type;
  if (opt.rows == 0) throw std::invalid_argument("skillgraft: lwf_options.rows must be at least 1");
  if (!(h.shape() == h_teacher.shape()))
    throw std::invalid_argument("skillgraft: teacher hidden states have shape " + h_teacher.shape().str() +
                                ", the student's " + h.shape().str());
  if (!(head.shape() == head_teacher.shape()))
    throw std::invalid_argument("skillgraft: teacher head has shape " + head_teacher.shape().str() +
                                ", the student's " + head.shape().str());
  if (!(opt.temperature > 0) || opt.lambda < 0)
    throw std::invalid_argument("skillgraft: LwF needs temperature > 0 and lambda >= 0");
  if (h.rank() != 3 || targets.shape(0) != h.dim(0) || targets.shape(1) != h.dim(1))
    throw std::invalid_argument("skillgraft: targets do not match the hidden states " + h.shape().str());
  const std::size_t V = head.dim(0), d = head.dim(1), P = h.dim(1);
  if (h.dim(2) != d)
    throw std::invalid_argument("skillgraft: hidden states have width " + std::to_string(h.dim(2)) +
                                ", the LM head expects " + std::to_string(d));
  std::vector<std::int64_t> rows, ys;  // positions that distil, and their targets (host)
  std::size_t n_ce = 0;
  for (std::size_t b = 0; b < targets.shape(0); ++b)
    for (std::size_t s = 0; s < P; ++s) {
      const auto y = targets(b, s);
      if (y != ignore_index && (y < 0 || std::size_t(y) >= V))
        throw std::invalid_argument("skillgraft: target [" + std::to_string(b) + ", " + std::to_string(s) + "] is " +
                                    std::to_string(y) + ", outside the vocabulary [0, " + std::to_string(V) + ")");
      if (y != ignore_index || opt.all_positions) rows.push_back(std::int64_t(b * P + s)), ys.push_back(y);
      n_ce += (y != ignore_index);
    }
  const double nce = double(normaliser_ce ? normaliser_ce : n_ce);
  const double nkd = double(normaliser_kd ? normaliser_kd : rows.size());
  lwf_result<T, B> r;
  r.count = n_ce;
  r.dh = Tensor<T>(h.shape(), memory_use::workspace);
  if (rows.empty()) return r;

  const double inv_t = 1.0 / opt.temperature, kd_scale = opt.lambda * opt.temperature;  // λT² · (1/T)
  const std::size_t mc = std::min(opt.rows, rows.size());
  const std::size_t vc = opt.vocab ? std::min(opt.vocab, V) : V, nchunks = (V + vc - 1) / vc;
  Tensor<T> hs({mc, d}, memory_use::workspace), ht({mc, d}, memory_use::workspace), dhs({mc, d}, memory_use::workspace);
  Tensor<T> zs({mc, vc}, memory_use::workspace), zt({mc, vc}, memory_use::workspace);
  Tensor<double> acc({9, mc}, memory_use::workspace);
  cpu::tensor<std::int64_t> y_host({mc}, memory_use::workspace);
  const int di = int(d);
  double ce = 0, kl = 0;
  for (std::size_t r0 = 0; r0 < rows.size(); r0 += mc) {
    const std::size_t m = std::min(mc, rows.size() - r0);
    const auto mi = std::int64_t(m);
    const std::vector<std::int64_t> rc(rows.begin() + std::ptrdiff_t(r0), rows.begin() + std::ptrdiff_t(r0 + m));
    std::copy(ys.begin() + std::ptrdiff_t(r0), ys.begin() + std::ptrdiff_t(r0 + m), y_host.data());
    const auto y = B::upload(y_host, memory_use::workspace);
    B::gather_rows(h, d, rc, hs);
    B::gather_rows(h_teacher, d, rc, ht);
    double* a = acc.data();
    const auto M = std::int64_t(mc);  // acc's row stride
    B::for_each_index(mi, lwf_kernels::start_rows{a, M, -std::numeric_limits<double>::infinity()});
    auto logits = [&](std::size_t c) {
      const std::size_t c0 = c * vc, cw = std::min(vc, V - c0);
      B::gemm("LwF: z_s = h W^T", op::n, op::t, int(m), int(cw), di, T(1), hs.data(), di, head.data() + c0 * d, di, T(0),
              zs.data(), int(cw));
      B::gemm("LwF: z_t = h_t W_t^T", op::n, op::t, int(m), int(cw), di, T(1), ht.data(), di,
              head_teacher.data() + c0 * d, di, T(0), zt.data(), int(cw));
    };
    for (std::size_t c = 0; c < nchunks; ++c) {  // pass 1: log-sum-exps
      logits(c);
      const auto cw = std::int64_t(std::min(vc, V - c * vc));
      B::for_each_index(mi, lwf_kernels::fold_log_sum_exp<T>{zs.data(), cw, 1.0, a, a + M});
      B::for_each_index(mi, lwf_kernels::fold_log_sum_exp<T>{zs.data(), cw, inv_t, a + 2 * M, a + 3 * M});
      B::for_each_index(mi, lwf_kernels::fold_log_sum_exp<T>{zt.data(), cw, inv_t, a + 4 * M, a + 5 * M});
    }
    B::for_each_index(mi, lwf_kernels::finish_rows{a, M});
    for (std::size_t c = 0; c < nchunks; ++c) {  // pass 2: KL, CE and the gradient
      if (nchunks > 1) logits(c);  // one chunk: pass 1's logits are still there
      const std::size_t c0 = c * vc, cw = std::min(vc, V - c0);
      const lwf_kernels::chunk_element<T> el{zs.data(), zt.data(), std::int64_t(cw), M, a, inv_t};
      const auto n = std::int64_t(m * cw);
      kl += B::template sum_index<double>(n, lwf_kernels::kl_term<T>{el});
      ce += B::template sum_index<double>(mi, lwf_kernels::ce_term<T>{el, y.data(), std::int64_t(c0), ignore_index});
      B::for_each_index(n, lwf_kernels::distil_grad<T>{zs.data(), el, y.data(), std::int64_t(c0), ignore_index, kd_scale,
                                                       nce, nkd});
      B::gemm("LwF: dh = dz W", op::n, op::n, int(m), di, int(cw), T(1), zs.data(), int(cw), head.data() + c0 * d, di,
              T(c == 0 ? 0 : 1), dhs.data(), di);
      if (dhead)
        B::gemm("LwF: dW += dz^T h", op::t, op::n, int(cw), di, int(m), T(1), zs.data(), int(cw), hs.data(), di, T(1),
                dhead->data() + c0 * d, di);
    }
    B::scatter_rows(dhs, d, rc, r.dh);
  }
  r.ce = n_ce ? ce / nce : 0.0;
  r.kl = kl / nkd;
  r.loss = r.ce + opt.lambda * opt.temperature * opt.temperature * r.kl;
  if (!std::isfinite(r.loss))
    throw std::domain_error("skillgraft: the LwF loss is not finite; no weight was changed");
  return r;
}

// LwF as a train_step objective: the teacher runs on each micro-batch (on the model's backend).
template <class T, class Backend = backend::cpu>
struct lwf_objective {
  teacher<T, Backend>* teach = nullptr;
  lwf_options options{};

  template <class Model>
  train::loss_result<T, Backend> micro(const Model& model, typename Model::weights_t& w, typename Model::grads_t& g,
                                       const train::micro_batch<T, Backend>& mb,
                                       const typename Backend::template tensor<T>& h, const token_ids& targets,
                                       std::size_t normaliser) const {
    if (!teach) throw std::logic_error("skillgraft: lwf_objective has no teacher");
    auto ht = teach->hidden(w, mb.ids, mb.prefix);
    // With targets-only distillation both terms are averaged over the whole batch's targets,
    // so micro-batches add up to the batch; with all positions the KL is per micro-batch.
    auto r = lwf_loss(h, w.head(), ht, teach->head(w), targets, model.head_grad(g), options, normaliser,
                      options.all_positions ? 0 : normaliser);
    return std::move(static_cast<train::loss_result<T, Backend>&>(r));
  }
};

}  // namespace skillgraft::cl
