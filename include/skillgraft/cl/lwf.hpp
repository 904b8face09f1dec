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
#include <vector>

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

template <class T>
struct lwf_result : train::loss_result<T> {
  double ce = 0;  // cross-entropy part
  double kl = 0;  // mean KL (before λ T²)
};

namespace detail {
// Online log-sum-exp: folds a chunk of values into (max, sum of exp(x - max)).
struct lse_acc {
  double mx = -std::numeric_limits<double>::infinity(), sum = 0;
  template <class Row>
  void add(const Row& z, double scale) {
    double cm = -std::numeric_limits<double>::infinity();
    for (Eigen::Index j = 0; j < z.size(); ++j) cm = std::max(cm, double(z(j)) * scale);
    if (cm > mx) {
      sum *= std::exp(mx - cm);
      mx = cm;
    }
    for (Eigen::Index j = 0; j < z.size(); ++j) sum += std::exp(double(z(j)) * scale - mx);
  }
  double value() const { return mx + std::log(sum); }
};
}  // namespace detail

// h, h_teacher: [batch, positions, hidden]; head, head_teacher: [vocab, hidden].
// `normaliser_ce` / `normaliser_kd` (0 = this batch's own counts) let micro-batches add up.
template <class T>
lwf_result<T> lwf_loss(const tensor<T>& h, const tensor<T>& head, const tensor<T>& h_teacher,
                       const tensor<T>& head_teacher, const token_ids& targets, tensor<T>* dhead, lwf_options opt = {},
                       std::size_t normaliser_ce = 0, std::size_t normaliser_kd = 0) {
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
  struct row {
    std::size_t index;
    std::int64_t y;  // ignore_index: distillation only
  };
  std::vector<row> rows;
  std::size_t n_ce = 0;
  for (std::size_t b = 0; b < targets.shape(0); ++b)
    for (std::size_t s = 0; s < P; ++s) {
      const auto y = targets(b, s);
      if (y != ignore_index && (y < 0 || std::size_t(y) >= V))
        throw std::invalid_argument("skillgraft: target [" + std::to_string(b) + ", " + std::to_string(s) + "] is " +
                                    std::to_string(y) + ", outside the vocabulary [0, " + std::to_string(V) + ")");
      if (y != ignore_index || opt.all_positions) rows.push_back({b * P + s, y});
      n_ce += (y != ignore_index);
    }
  const std::size_t n_kd_own = rows.size();
  const double nce = double(normaliser_ce ? normaliser_ce : n_ce), nkd = double(normaliser_kd ? normaliser_kd : n_kd_own);
  lwf_result<T> r;
  r.count = n_ce;
  r.dh = tensor<T>(h.shape(), memory_use::workspace);
  if (rows.empty()) return r;

  const double invT = 1.0 / opt.temperature, kd_scale = opt.lambda * opt.temperature;  // λT² · (1/T)
  const std::size_t vc = opt.vocab ? std::min(opt.vocab, V) : V, nchunks = (V + vc - 1) / vc;
  using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  mat hs, ht, zs, zt, dz, dhs;
  double ce = 0, kl = 0;
  for (std::size_t r0 = 0; r0 < rows.size(); r0 += opt.rows) {
    const std::size_t m = std::min(opt.rows, rows.size() - r0);
    hs.resize(Eigen::Index(m), Eigen::Index(d));
    ht.resize(Eigen::Index(m), Eigen::Index(d));
    for (std::size_t i = 0; i < m; ++i) {
      hs.row(Eigen::Index(i)) = h.mat().row(Eigen::Index(rows[r0 + i].index));
      ht.row(Eigen::Index(i)) = h_teacher.mat().row(Eigen::Index(rows[r0 + i].index));
    }
    std::vector<detail::lse_acc> s1(m), sT(m), tT(m);
    auto logits = [&](std::size_t c) {
      const auto c0 = Eigen::Index(c * vc), cw = Eigen::Index(std::min(vc, V - c * vc));
      zs.noalias() = hs * head.mat().middleRows(c0, cw).transpose();
      zt.noalias() = ht * head_teacher.mat().middleRows(c0, cw).transpose();
    };
    for (std::size_t c = 0; c < nchunks; ++c) {  // pass 1: log-sum-exps
      logits(c);
      for (std::size_t i = 0; i < m; ++i) {
        s1[i].add(zs.row(Eigen::Index(i)), 1.0);
        sT[i].add(zs.row(Eigen::Index(i)), invT);
        tT[i].add(zt.row(Eigen::Index(i)), invT);
      }
    }
    dhs.setZero(Eigen::Index(m), Eigen::Index(d));
    for (std::size_t c = 0; c < nchunks; ++c) {  // pass 2: KL and gradient
      if (nchunks > 1) logits(c);
      const auto c0 = Eigen::Index(c * vc), cw = Eigen::Index(std::min(vc, V - c * vc));
      dz.resize(Eigen::Index(m), cw);
      for (std::size_t i = 0; i < m; ++i) {
        const double l1 = s1[i].value(), lsT = sT[i].value(), ltT = tT[i].value();
        const auto y = rows[r0 + i].y;
        for (Eigen::Index j = 0; j < cw; ++j) {
          const double a = double(zs(Eigen::Index(i), j)), t = double(zt(Eigen::Index(i), j));
          const double log_ps = a * invT - lsT, log_pt = t * invT - ltT, pt = std::exp(log_pt);
          kl += pt * (log_pt - log_ps);
          double g = kd_scale * (std::exp(log_ps) - pt) / nkd;
          if (y != ignore_index) {
            g += std::exp(a - l1) / nce;
            if (c0 + j == Eigen::Index(y)) {
              g -= 1.0 / nce;
              ce += l1 - a;
            }
          }
          dz(Eigen::Index(i), j) = T(g);
        }
      }
      dhs.noalias() += dz * head.mat().middleRows(c0, cw);
      if (dhead) dhead->mat().middleRows(c0, cw).noalias() += dz.transpose() * hs;
    }
    for (std::size_t i = 0; i < m; ++i) r.dh.mat().row(Eigen::Index(rows[r0 + i].index)) = dhs.row(Eigen::Index(i));
  }
  r.ce = n_ce ? ce / nce : 0.0;
  r.kl = kl / nkd;
  r.loss = r.ce + opt.lambda * opt.temperature * opt.temperature * r.kl;
  if (!std::isfinite(r.loss))
    throw std::domain_error("skillgraft: the LwF loss is not finite; no weight was changed");
  return r;
}

// LwF as a train_step objective: the teacher runs on each micro-batch.
template <class T>
struct lwf_objective {
  teacher<T>* teach = nullptr;
  lwf_options options{};

  template <class Model>
  train::loss_result<T> micro(const Model& model, typename Model::weights_t& w, typename Model::grads_t& g,
                              const train::micro_batch<T>& mb, const tensor<T>& h, const token_ids& targets,
                              std::size_t normaliser) const {
    if (!teach) throw std::logic_error("skillgraft: lwf_objective has no teacher");
    auto ht = teach->hidden(w, mb.ids, mb.prefix);
    // With targets-only distillation both terms are averaged over the whole batch's targets,
    // so micro-batches add up to the batch; with all positions the KL is per micro-batch.
    auto r = lwf_loss(h, w.head(), ht, teach->head(w), targets, model.head_grad(g), options, normaliser,
                      options.all_positions ? 0 : normaliser);
    return std::move(static_cast<train::loss_result<T>&>(r));
  }
};

}  // namespace skillgraft::cl
