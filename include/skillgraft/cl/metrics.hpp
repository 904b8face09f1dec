#pragma once
// Learning and forgetting from an accuracy matrix (see accuracy_matrix.hpp).
//
// Notation: T stages; t_k = column of the target trained at stage k (k = 1..T);
// H = the held-out columns; R(i, j) = accuracy on j after stage i, R(0, j) = base model.
// All values are fractions; a difference of 0.05 is 5 percentage points.
//
// Existing code disagrees on denominators (T or T-1) and on whether row 0 counts, so
// every variant below has its own name and its formula written out. Where a mean runs
// over nothing -- T - 1 = 0 for a single stage, or a run without held-out tasks -- the
// result is quiet NaN rather than an exception: a one-stage run is a legitimate
// experiment whose learning and held-out forgetting are well defined, and NaN keeps the
// summary printable while making the undefined entries impossible to mistake for 0.
//
// Sign conventions: learning and forgetting are positive when the model got better
// (learning) or worse (forgetting); BWT and FWT are positive for positive transfer.
#include <xtensor/xtensor.hpp>

#include <algorithm>
#include <cstddef>
#include <limits>

#include "skillgraft/cl/accuracy_matrix.hpp"

namespace skillgraft::cl {

namespace detail {
inline double undefined() { return std::numeric_limits<double>::quiet_NaN(); }
inline double mean_of(double sum, std::size_t n) { return n == 0 ? undefined() : sum / double(n); }
}  // namespace detail

// --- Zhu et al. 2025, "How to Teach Large Multimodal Models New Skills" -------------
// The paper reports "learning" as the gain on target tasks over the base model and
// "forgetting" as the drop on held-out benchmarks. When the target gain is read --
// right after its own stage, or after the whole sequence -- changes the number once
// later stages interfere, so both readings are provided. (The paper's released code,
// jessemelpolio/LMM_CL, evaluates after every stage but ships no aggregation script that
// would settle which one its tables use.)

// (1/T) Σ_{k=1..T} [ R(k, t_k) - R(0, t_k) ]: gain on each target right after it was trained.
inline double learning_after_own_stage(const accuracy_matrix& R) {
  double sum = 0;
  for (std::size_t k = 1; k <= R.stages(); ++k) sum += R(k, R.target(k)) - R(0, R.target(k));
  return detail::mean_of(sum, R.stages());
}

// (1/T) Σ_{k=1..T} [ R(T, t_k) - R(0, t_k) ]: gain on each target after the last stage.
inline double learning_final(const accuracy_matrix& R) {
  const std::size_t T = R.stages();
  double sum = 0;
  for (std::size_t k = 1; k <= T; ++k) sum += R(T, R.target(k)) - R(0, R.target(k));
  return detail::mean_of(sum, T);
}

// drop(i, n) = R(0, h_n) - R(i, h_n) for every stage i = 0..T and held-out task h_n
// (columns in the order of heldout_columns()). Shape [T+1, |H|]; row 0 is zero.
inline xt::xtensor<double, 2> heldout_drop(const accuracy_matrix& R) {
  const auto& H = R.heldout_columns();
  xt::xtensor<double, 2> drop = xt::xtensor<double, 2>::from_shape({R.stages() + 1, H.size()});
  for (std::size_t i = 0; i <= R.stages(); ++i)
    for (std::size_t n = 0; n < H.size(); ++n) drop(i, n) = R(0, H[n]) - R(i, H[n]);
  return drop;
}

// curve(i) = (1/|H|) Σ_{h∈H} [ R(0, h) - R(i, h) ] for i = 0..T: held-out forgetting after
// each stage, which shows the paper's partial recovery at later stages. NaN when H is empty.
inline xt::xtensor<double, 1> heldout_forgetting_curve(const accuracy_matrix& R) {
  const auto drop = heldout_drop(R);
  xt::xtensor<double, 1> curve = xt::xtensor<double, 1>::from_shape({R.stages() + 1});
  for (std::size_t i = 0; i <= R.stages(); ++i) {
    double sum = 0;
    for (std::size_t n = 0; n < drop.shape()[1]; ++n) sum += drop(i, n);
    curve(i) = detail::mean_of(sum, drop.shape()[1]);
  }
  return curve;
}

// (1/|H|) Σ_{h∈H} [ R(0, h) - R(T, h) ]: the paper's held-out forgetting, after the last stage.
inline double heldout_forgetting(const accuracy_matrix& R) { return heldout_forgetting_curve(R)(R.stages()); }

// --- Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning" ----
// GEM's matrix has no row 0; its b̄_i is the accuracy of a randomly initialised model.
// Here the tasks are skills added to a pretrained model, so b_k = R(0, t_k), the base
// model, plays that role. Only target tasks enter these metrics.

// ACC = (1/T) Σ_{k=1..T} R(T, t_k)   (GEM, "average accuracy").
inline double average_accuracy(const accuracy_matrix& R) {
  const std::size_t T = R.stages();
  double sum = 0;
  for (std::size_t k = 1; k <= T; ++k) sum += R(T, R.target(k));
  return detail::mean_of(sum, T);
}

// BWT = 1/(T-1) Σ_{k=1..T-1} [ R(T, t_k) - R(k, t_k) ]   (GEM). NaN when T = 1.
inline double bwt_gem(const accuracy_matrix& R) {
  const std::size_t T = R.stages();
  double sum = 0;
  for (std::size_t k = 1; k < T; ++k) sum += R(T, R.target(k)) - R(k, R.target(k));
  return detail::mean_of(sum, T - 1);
}

// (1/T) Σ_{k=1..T} [ R(T, t_k) - R(k, t_k) ]: the same sum over all T targets, as code that
// averages over every trained task does. The k = T term is zero, so this equals
// (T-1)/T · bwt_gem, and it is 0 (not NaN) when T = 1.
inline double bwt_mean_over_T(const accuracy_matrix& R) {
  const std::size_t T = R.stages();
  double sum = 0;
  for (std::size_t k = 1; k <= T; ++k) sum += R(T, R.target(k)) - R(k, R.target(k));
  return detail::mean_of(sum, T);
}

// FWT = 1/(T-1) Σ_{k=2..T} [ R(k-1, t_k) - b_k ], b_k = R(0, t_k)   (GEM, with the
// base model as b). The accuracy on a target just before its own stage, relative to the
// base model: how much the earlier targets helped (or hurt) it. NaN when T = 1.
inline double fwt_gem(const accuracy_matrix& R) {
  const std::size_t T = R.stages();
  double sum = 0;
  for (std::size_t k = 2; k <= T; ++k) sum += R(k - 1, R.target(k)) - R(0, R.target(k));
  return detail::mean_of(sum, T - 1);
}

// --- Forgetting of target tasks, in its two published forms ---------------------------

// Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning", forgetting measure
// f_j^k taken at the last stage k = T:
//   f_k = max_{l ∈ [k, T-1]} R(l, t_k) - R(T, t_k),   F = 1/(T-1) Σ_{k=1..T-1} f_k.
// The paper's max runs over every earlier stage l = 1..T-1; here it starts at the target's
// own stage k, since before stage k the model had not learnt t_k (and row 0, the base
// model, never counts). NaN when T = 1.
inline double forgetting_max_minus_last(const accuracy_matrix& R) {
  const std::size_t T = R.stages();
  double sum = 0;
  for (std::size_t k = 1; k < T; ++k) {
    double best = R(k, R.target(k));
    for (std::size_t l = k + 1; l < T; ++l) best = std::max(best, R(l, R.target(k)));
    sum += best - R(T, R.target(k));
  }
  return detail::mean_of(sum, T - 1);
}

// First-after-training minus last, 1/(T-1) Σ_{k=1..T-1} [ R(k, t_k) - R(T, t_k) ]: Avalanche's
// experience forgetting (first value recorded after training on an experience minus the
// last), averaged over the targets trained before the last stage. Equals -bwt_gem.
// NaN when T = 1.
inline double forgetting_first_minus_last(const accuracy_matrix& R) {
  const std::size_t T = R.stages();
  double sum = 0;
  for (std::size_t k = 1; k < T; ++k) sum += R(k, R.target(k)) - R(T, R.target(k));
  return detail::mean_of(sum, T - 1);
}

// --- Everything at once -----------------------------------------------------------------

struct metric_summary {
  std::size_t stages = 0, targets = 0, heldout = 0;  // T, number of targets (= T), |H|
  double learning_after_own_stage = 0;
  double learning_final = 0;
  double heldout_forgetting = 0;
  double average_accuracy = 0;
  double bwt_gem = 0;
  double bwt_mean_over_T = 0;
  double fwt_gem = 0;
  double forgetting_max_minus_last = 0;
  double forgetting_first_minus_last = 0;
  xt::xtensor<double, 1> heldout_forgetting_curve;  // [T+1], entry i after stage i
};

// The scalar metrics in report order, by name, so that CSV and text output list the same
// metrics under the same names as the functions above.
struct summary_field {
  const char* name;
  double metric_summary::*value;
  const char* formula;
  bool difference = true;  // false for an accuracy itself (ACC)
};
inline constexpr summary_field summary_fields[] = {
    {"learning_after_own_stage", &metric_summary::learning_after_own_stage, "mean_k R(k,t_k) - R(0,t_k)"},
    {"learning_final", &metric_summary::learning_final, "mean_k R(T,t_k) - R(0,t_k)"},
    {"heldout_forgetting", &metric_summary::heldout_forgetting, "mean_h R(0,h) - R(T,h)"},
    {"average_accuracy", &metric_summary::average_accuracy, "mean_k R(T,t_k)", false},
    {"bwt_gem", &metric_summary::bwt_gem, "sum_{k<T} [R(T,t_k) - R(k,t_k)] / (T-1)"},
    {"bwt_mean_over_T", &metric_summary::bwt_mean_over_T, "sum_{k<=T} [R(T,t_k) - R(k,t_k)] / T"},
    {"fwt_gem", &metric_summary::fwt_gem, "sum_{k>=2} [R(k-1,t_k) - R(0,t_k)] / (T-1)"},
    {"forgetting_max_minus_last", &metric_summary::forgetting_max_minus_last,
     "sum_{k<T} [max_{k<=l<T} R(l,t_k) - R(T,t_k)] / (T-1)"},
    {"forgetting_first_minus_last", &metric_summary::forgetting_first_minus_last,
     "sum_{k<T} [R(k,t_k) - R(T,t_k)] / (T-1)"},
};

inline metric_summary summarize(const accuracy_matrix& R) {
  metric_summary s;
  s.stages = R.stages();
  s.targets = R.target_columns().size();
  s.heldout = R.heldout_columns().size();
  s.learning_after_own_stage = learning_after_own_stage(R);
  s.learning_final = learning_final(R);
  s.heldout_forgetting_curve = heldout_forgetting_curve(R);
  s.heldout_forgetting = s.heldout_forgetting_curve(R.stages());
  s.average_accuracy = average_accuracy(R);
  s.bwt_gem = bwt_gem(R);
  s.bwt_mean_over_T = bwt_mean_over_T(R);
  s.fwt_gem = fwt_gem(R);
  s.forgetting_max_minus_last = forgetting_max_minus_last(R);
  s.forgetting_first_minus_last = forgetting_first_minus_last(R);
  return s;
}

}  // namespace skillgraft::cl
