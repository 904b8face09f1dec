#pragma once
// GateSkip's training objective: masked cross-entropy plus a sparsity penalty on the residual
// gates' values (nn/residual_gate.hpp), so that train_step fine-tunes the gates of a
// pretrained gate_skip model (recipe::residual_gates, alone or with projections).
//
//   loss    = CE + lambda * (1 / M) * sum over the M gates of mean(psi(g))
//   psi(g)  = g^2 (l2, the paper's default) or |g| = g (l1; g > 0 always)
//   d / dg  = lambda / (M n) * psi'(g)        n: the gate's element count (tokens x width)
//
// The penalty pulls gate values down where the loss does not need them open, so a token's
// importance (the mean of its gate) ranks what a layer can skip at inference.
//
// With several micro-batches each adds its own penalty weighted by its share of the batch's
// target tokens (targets_k / normaliser), so one micro-batch gives the formula above exactly
// and k equal ones its average. The gradient enters through the saved gate records: after
// forward, micro() writes d penalty / d sum(psi(g)) into each record's seed, and the block's
// backward adds seed_l1 + 2 seed_l2 g to dg.
#include <algorithm>
#include <cstddef>
#include <stdexcept>

#include "skillgraft/nn/residual_gate.hpp"
#include "skillgraft/train/cross_entropy.hpp"

namespace skillgraft::train {

enum class gate_penalty { l1, l2 };

struct gate_sparsity_options {
  double lambda = 0.01;                   // weight of the penalty (the paper's code: 0.01)
  gate_penalty kind = gate_penalty::l2;
  std::size_t chunk = 256;                // positions per cross-entropy chunk
};

// What the penalty of one forward is: lambda * (1 / M) * sum of the gates' mean psi(g).
struct gate_penalty_value {
  double penalty = 0;
  double mean_gate = 0;  // mean of g over every gate element (for reports)
  std::size_t gates = 0;
};

// Reads the gate records of a forward (saved), returns the penalty with weight `scale` (the
// micro-batch's share) and, when seed is true, writes its gradient seeds into the records.
template <class Model>
gate_penalty_value gate_penalty_of(const Model& model, typename Model::saved_t& saved, const gate_sparsity_options& o,
                                   double scale = 1.0, bool seed = true) {
  if (!(o.lambda >= 0)) throw std::invalid_argument("skillgraft: gate sparsity lambda must be >= 0");
  std::size_t M = 0, elements = 0;
  double sum_g = 0;
  model.for_each_gate_record(saved, [&](int, const nn::gate_record& r) {
    ++M;
    elements += r.count;
    sum_g += r.sum;
  });
  gate_penalty_value v;
  v.gates = M;
  if (M == 0) return v;
  v.mean_gate = elements ? sum_g / double(elements) : 0.0;
  model.for_each_gate_record(saved, [&](int, nn::gate_record& r) {
    if (r.count == 0) return;
    const double coef = scale * o.lambda / (double(M) * double(r.count));
    const double psi = o.kind == gate_penalty::l2 ? r.sum_sq : r.sum;
    v.penalty += coef * psi;
    if (seed) {
      r.seed_l1 = o.kind == gate_penalty::l1 ? coef : 0.0;
      r.seed_l2 = o.kind == gate_penalty::l2 ? coef : 0.0;
    }
  });
  return v;
}

// The training-time budget of GateSkip: the fraction of tokens dropped per layer and branch,
// ramped linearly from `start` to `end` over `steps` optimizer steps (the paper's code: 0.5 %
// to 10 % over 5000), then held. Set it on the model before each step:
//   auto o = lm.mlp_options(); o.train_skip = schedule(opt.steps()); lm.set_mlp_options(o);
struct skip_schedule {
  double start = 0.005;
  double end = 0.1;
  long steps = 5000;
  double operator()(long step) const {
    if (steps <= 0 || step >= steps) return end;
    return start + (end - start) * double(std::max(0L, step)) / double(steps);
  }
};

// The objective for train_step: masked cross-entropy on the targets, plus the gate penalty.
struct gate_sparsity_objective {
  gate_sparsity_options options{};

  template <class Model, class Batch, class Hidden>
  auto micro(const Model& model, const typename Model::weights_t& w, typename Model::grads_t& g, const Batch&,
             const Hidden& h, const token_ids& targets, std::size_t normaliser, typename Model::saved_t& saved) const {
    auto r = masked_cross_entropy(model, w, g, h, targets,
                                  {.chunk = options.chunk, .want_dh = true, .normaliser = normaliser});
    const double share = normaliser ? double(r.count) / double(normaliser) : 1.0;
    r.loss += gate_penalty_of(model, saved, options, share).penalty;
    return r;
  }
};

}  // namespace skillgraft::train
