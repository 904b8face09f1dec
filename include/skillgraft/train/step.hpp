#pragma once
// One optimisation step for any model of the library, over one or more micro-batches.
//
//   zero grads; for each micro-batch: forward, fused masked loss, backward (gradients add up,
//   each micro-batch's loss divided by the target count of the *whole* batch, so k micro-batches
//   give the gradient of one batch of their union); clip the global norm; set the scheduled
//   learning rate; optimizer step.
// A non-finite loss or gradient throws before any weight changes. Given the same seed,
// data and thread count, the step is bit-for-bit repeatable (no atomics, fixed reduction order).
//
// Data-parallel: a communicator (train/communicator.hpp) passed as the last argument makes the
// micro-batches one rank's share of a global batch. The target count is summed over the ranks
// before the first forward, so every rank divides by the global count; after the last backward
// the trainable gradients and the loss are summed over the ranks; the penalty, the checks,
// clipping and the optimizer then see the global gradient, identical on every rank. Without
// one (no_communicator) none of this is compiled. A communicator whose schedule is
// overlap_with_backward starts each bucket during the last micro-batch's backward, as soon as
// the bucket's gradients are final; the sums are the same.
#include <algorithm>
#include <cmath>
#include <concepts>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>

#include "skillgraft/nn/output_rows.hpp"
#include "skillgraft/train/clip.hpp"
#include "skillgraft/train/communicator.hpp"
#include "skillgraft/train/cross_entropy.hpp"

namespace skillgraft::train {

// One micro-batch: token ids, next-token targets, optional soft tokens before the ids.
//
//   micro_batch<float> mb{ids, targets};                 // targets: target t = token t + 1
//   micro_batch<float> mb{ids, hf_labels{labels}};       // Hugging Face labels: shifted here
//   micro_batch<float> mb{ids, targets, &image_tokens};  // a [batch, prefix, hidden] prefix
//
// Hugging Face labels cover the ids ([batch, seq]) or the whole sequence ([batch, prefix +
// seq]); either way they are laid along [prefix ; ids] (ignore_index on the prefix) and
// shifted left by one, as a Hugging Face multimodal model does with its merged sequence.
// train_step refuses targets that equal the ids position by position (unshifted labels
// passed as targets), so that mistake cannot train the wrong objective silently.
// Backend: where the prefix lives (ids and targets are host data on every backend).
template <class T, class Backend = backend::cpu>
struct micro_batch {
  using tensor_t = typename Backend::template tensor<T>;
  token_ids ids;                     // [batch, seq]
  token_ids targets;                 // [batch, prefix + seq]; ignore_index where no loss
  const tensor_t* prefix = nullptr;  // optional soft tokens [batch, prefix, hidden] (an image batch for multimodal_lm)

  micro_batch() = default;
  micro_batch(token_ids ids_, token_ids targets_, const tensor_t* prefix_ = nullptr)
      : ids(std::move(ids_)), targets(std::move(targets_)), prefix(prefix_) {}
  // Any xtensor expressions of rank 2; rank 1 fails to compile (or throws, for an xarray).
  template <class Ids, class Targets>
    requires(xt::is_xexpression<Ids>::value && xt::is_xexpression<Targets>::value)
  micro_batch(const Ids& ids_, const Targets& targets_, const tensor_t* prefix_ = nullptr)
      : ids(to_token_ids(ids_, "micro_batch ids")), targets(to_token_ids(targets_, "micro_batch targets")),
        prefix(prefix_) {}
  template <class Ids>
    requires xt::is_xexpression<Ids>::value
  micro_batch(const Ids& ids_, const hf_labels& labels, const tensor_t* prefix_ = nullptr)
      : ids(to_token_ids(ids_, "micro_batch ids")), prefix(prefix_) {
    const std::size_t B = ids.shape(0), S = ids.shape(1);
    const std::size_t P = prefix && !prefix->empty() ? prefix->dim(1) : 0;
    const auto& l = labels.values;
    if (l.shape(0) != B || (l.shape(1) != S && l.shape(1) != P + S))
      throw std::invalid_argument("skillgraft: Hugging Face labels have shape [" + std::to_string(l.shape(0)) + ", " +
                                  std::to_string(l.shape(1)) + "], expected [" + std::to_string(B) + ", " +
                                  std::to_string(S) + "] (the ids) or [" + std::to_string(B) + ", " +
                                  std::to_string(P + S) + "] (prefix and ids)");
    token_ids along = xt::full_like(token_ids::from_shape({B, P + S}), ignore_index);
    const std::size_t skip = P + S - l.shape(1);
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t s = 0; s < l.shape(1); ++s) along(b, skip + s) = l(b, s);
    targets = shift_labels(along);
  }
};

namespace detail {
// Throws when every target equals the id at its own position and at least one of them
// cannot be a next-token target (it is the last position, or the next id differs): those
// are unshifted labels. Sequences of one repeated token are ambiguous and pass.
template <class T, class Backend>
void check_targets_are_shifted(const micro_batch<T, Backend>& mb, std::size_t index) {
  const std::size_t B = mb.ids.shape(0), S = mb.ids.shape(1);
  if (mb.targets.shape(0) != B || mb.targets.shape(1) < S) return;  // the loss reports the shape
  const std::size_t P = mb.targets.shape(1) - S;
  bool any = false, unshifted = false;
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t s = 0; s < S; ++s) {
      const auto y = mb.targets(b, P + s);
      if (y == ignore_index) continue;
      if (y != mb.ids(b, s)) return;
      any = true;
      unshifted = unshifted || s + 1 == S || mb.ids(b, s + 1) != y;
    }
  if (any && unshifted)
    throw std::invalid_argument(
        "skillgraft: micro-batch " + std::to_string(index) +
        ": every target equals the input token at its own position, which is how Hugging Face labels look; "
        "targets must be the next token (target t = token t + 1): pass micro_batch{ids, hf_labels{labels}} "
        "or shift_labels(labels)");
}
}  // namespace detail

struct step_options {
  double max_grad_norm = 1.0;  // <= 0: no clipping
  // Where the model and the objective allow it, the top block's MLP half and the final norm run
  // on the rows with a target only (nn/output_rows.hpp): the same gradients, fewer FLOPs.
  // false: every row, as a generic framework does.
  bool target_rows_only = true;
};

struct step_stats {
  double loss = 0;
  double grad_norm = 0;
  double lr = 0;
  std::size_t targets = 0;
};

// The default objective: next-token cross-entropy on the target positions.
// An objective provides micro(model, w, g, batch, h, normaliser) -> loss_result (it forms
// d loss / d h and adds the head's gradient; a form with the forward's saved state as a last
// argument gets it too), and optionally finish(model, w, g) -> double,
// called once after all micro-batches to add penalty terms (EWC) to loss and gradients.
struct masked_ce_objective {
  std::size_t chunk = 256;
  // Reads h at the rows with a target and nothing else: train_step may hand it those rows alone.
  static constexpr bool reads_target_rows_only = true;
  template <class Model, class Batch, class Hidden>
  auto micro(const Model& model, const typename Model::weights_t& w, typename Model::grads_t& g, const Batch&,
             const Hidden& h, const token_ids& targets, std::size_t normaliser) const {
    return masked_cross_entropy(model, w, g, h, targets, {.chunk = chunk, .want_dh = true, .normaliser = normaliser});
  }
};

// Where a model runs: Model::backend_type (every model of the library has one), else the CPU.
template <class Model>
struct model_backend {
  using type = backend::cpu;
};
template <class Model>
  requires requires { typename Model::backend_type; }
struct model_backend<Model> {
  using type = typename Model::backend_type;
};
template <class Model>
using micro_batch_for = micro_batch<typename Model::value_type, typename model_backend<Model>::type>;

// An objective that reads the hidden states only where a target is (its own flag says so).
template <class Objective>
concept reads_target_rows_only = requires { requires Objective::reads_target_rows_only; };
// A model whose forward can return the output rows alone (model::decoder_lm).
template <class Model>
concept returns_output_rows = requires(const Model& m, const typename Model::weights_t& w, const token_ids& ids,
                                       typename Model::saved_t& s, const typename Model::tensor_t* prefix,
                                       const nn::output_rows* rows) { m.forward(w, ids, s, prefix, rows); };

namespace detail {
// The rows of a micro-batch with a target and those targets as a [1, rows] batch: what a
// forward of the output rows alone returns h for. The checks and messages are the loss's
// (positions_with_target).
// Positions are the targets' columns ([prefix ; ids]; the prefix of a multimodal model is an
// image batch, whose token count only the model knows): the model checks them against its input.
template <class Model, class Batch>
std::pair<nn::output_rows, token_ids> target_rows(const Model& model, const Batch& mb) {
  const std::size_t B = mb.ids.shape(0), S = mb.targets.shape(1);
  const auto& t = mb.targets;
  if (t.shape(0) != B || S < mb.ids.shape(1))
    throw std::invalid_argument("skillgraft: targets have shape [" + std::to_string(t.shape(0)) + ", " +
                                std::to_string(S) + "], expected [" + std::to_string(B) +
                                ", prefix + " + std::to_string(mb.ids.shape(1)) + "] (one per position of [prefix ; ids])");
  const auto vocab = [&] {
    if constexpr (requires { model.lm(); }) return std::size_t(model.lm().config().vocab_size);
    else return std::size_t(model.config().vocab_size);
  }();
  auto [index, ys] = positions_with_target(t, vocab);
  token_ids compact = token_ids::from_shape({1, ys.size()});
  std::copy(ys.begin(), ys.end(), compact.begin());
  return {nn::output_rows{std::move(index), B, S}, std::move(compact)};
}
}  // namespace detail

// A communicator whose buckets go while backward runs, for a model whose backward takes the
// gradient hook (nn/gradient_hook.hpp); other models' buckets go after backward.
template <class C, class Model>
concept overlaps_backward =
    C::distributed && requires { typename C::bucket_schedule; } &&
    std::same_as<typename C::bucket_schedule, overlap_with_backward> &&
    requires(C& c, const Model& m, typename Model::weights_t& w, typename Model::grads_t& g,
             const typename Model::saved_t& s, const typename Model::tensor_t& dh) {
      m.backward(w, s, dh, g, c.start_reduction(m, w, g).hook());
    };

// One step on any backend: the model, its weights and gradients, the optimizer's state and the
// micro-batches' prefixes are tensors of the model's backend. `comm`: the ranks this step is
// shared with (see above); the overload without it is one process.
template <class Model, class Optimizer, class Schedule, class Objective = masked_ce_objective,
          communicator Communicator = no_communicator>
step_stats train_step(const Model& model, typename Model::weights_t& w, typename Model::grads_t& g, Optimizer& opt,
                      const Schedule& schedule, std::span<const micro_batch_for<Model>> batches, step_options o,
                      const Objective& objective, Communicator& comm) {
  if (batches.empty()) throw std::invalid_argument("skillgraft: train_step needs at least one micro-batch");
  step_stats st;
  for (std::size_t k = 0; k < batches.size(); ++k) {
    detail::check_targets_are_shifted(batches[k], k);
    for (auto y : batches[k].targets) st.targets += (y != ignore_index);
  }
  if constexpr (Communicator::distributed) {
    static_assert(distributed_communicator<Communicator>,
                  "skillgraft: a distributed communicator needs sum(std::uint64_t) and sum(double)");
    st.targets = std::size_t(comm.sum(std::uint64_t(st.targets)));
  }
  if (st.targets == 0) throw std::invalid_argument("skillgraft: the batch has no target tokens (all ignore_index)");
  zero_grads(model, w, g);
  constexpr bool can_select_rows = reads_target_rows_only<Objective> && returns_output_rows<Model>;
  for (const auto& mb : batches) {
    typename Model::saved_t saved;
    // With the output rows alone, h and the targets the objective sees are [1, rows, ...].
    std::pair<nn::output_rows, token_ids> selected;
    const bool select = can_select_rows && o.target_rows_only;
    if constexpr (can_select_rows)
      if (select) selected = detail::target_rows(model, mb);
    const token_ids& targets = select ? selected.second : mb.targets;
    auto h = [&] {
      if constexpr (can_select_rows) return model.forward(w, mb.ids, saved, mb.prefix, select ? &selected.first : nullptr);
      else return model.forward(w, mb.ids, saved, mb.prefix);
    }();
    // An objective that reads the forward's saved state (the gate penalty of
    // train/gate_sparsity.hpp seeds its gradient there) receives it last.
    auto r = [&] {
      if constexpr (requires { objective.micro(model, w, g, mb, h, targets, st.targets, saved); })
        return objective.micro(model, w, g, mb, h, targets, st.targets, saved);
      else
        return objective.micro(model, w, g, mb, h, targets, st.targets);
    }();
    st.loss += r.loss;
    if constexpr (overlaps_backward<Communicator, Model>) {
      // The last micro-batch's backward finishes each gradient for good: its buckets go then.
      if (&mb == &batches.back()) {
        auto reduction = comm.start_reduction(model, w, g);
        model.backward(w, saved, r.dh, g, reduction.hook());
        comm.finish_reduction(reduction);
        continue;
      }
    }
    model.backward(w, saved, r.dh, g);
  }
  if constexpr (Communicator::distributed) {
    if constexpr (!overlaps_backward<Communicator, Model>) comm.reduce_gradients(model, w, g);
    st.loss = comm.sum(st.loss);
  }
  // After the sums: a penalty (EWC) depends on the weights alone, which every rank holds alike,
  // so it is added once to the global gradient, not once per rank.
  if constexpr (requires { objective.finish(model, w, g); }) st.loss += objective.finish(model, w, g);
  if (!std::isfinite(st.loss))
    throw std::domain_error("skillgraft: the loss is not finite (" + std::to_string(st.loss) + "); no weight was changed");
  const clip_decision clip = decide_clipping(model, w, g, o.max_grad_norm);
  st.grad_norm = clip.norm();
  st.lr = schedule(opt.steps());
  opt.set_lr(st.lr);
  // An optimizer that takes clipping's decision scales the gradients in its own pass (AdamW).
  if constexpr (requires { opt.step(model, w, g, clip); }) {
    opt.step(model, w, g, clip);
  } else {
    scale_grads(model, w, g, clip.scale());
    opt.step(model, w, g);
  }
  return st;
}

template <class Model, class Optimizer, class Schedule, class Objective = masked_ce_objective>
step_stats train_step(const Model& model, typename Model::weights_t& w, typename Model::grads_t& g, Optimizer& opt,
                      const Schedule& schedule, std::span<const micro_batch_for<Model>> batches, step_options o = {},
                      const Objective& objective = {}) {
  no_communicator one_process;
  return train_step(model, w, g, opt, schedule, batches, o, objective, one_process);
}

}  // namespace skillgraft::train
