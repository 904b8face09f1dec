#pragma once
// Masked next-token cross-entropy fused with the LM head and its softmax.
//
//   for each position i with a target y_i (target != ignore_index), n of them:
//     z_i = h_i W^T,  loss = (1/n) sum_i [ logsumexp(z_i) - z_i[y_i] ]
//     dz_i = (softmax(z_i) - onehot(y_i)) / n
//     dh_i = dz_i W,   dW += dz_i^T h_i
//
// Positions without a target (prompts, soft tokens, padding) never reach the head.
// The others are processed `chunk` rows at a time, so the logits and their gradient
// share one [chunk, vocab] buffer: the full [tokens, vocab] matrix is never held.
//
// With a model, the head and its gradient come from the model, so a recipe that trains
// the head (or a tied embedding) always gets its gradient:
//
//   typename Model::saved_t saved;
//   auto h = model.forward(w, ids, saved);                        // hidden states, not logits
//   auto r = masked_cross_entropy(model, w, g, h, targets);       // adds d loss / d head into g
//   model.backward(w, saved, r.dh, g);
//   double eval = masked_cross_entropy(model, w, h, targets).loss; // no gradient at all
//
// The lower-level form takes the head and where its gradient goes explicitly:
// masked_cross_entropy(h, w.head(), targets, model.head_grad(g)), or `no_head_grad` to say
// there is none. A bare `nullptr` does not compile: it would leave a trained head's
// gradient at zero without a word.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "skillgraft/backend/cpu/backend.hpp"
#include "skillgraft/model/token_batch.hpp"

namespace skillgraft::train {

template <class T, class Backend = backend::cpu>
struct loss_result {
  double loss = 0;                        // mean over counted positions
  std::size_t count = 0;                  // positions with a target
  typename Backend::template tensor<T> dh; // d loss / d h, same shape as h (empty unless requested)
};

struct cross_entropy_options {
  std::size_t chunk = 256;  // rows of logits held at once
  bool want_dh = true;
  // Divide by this many positions instead of this batch's own count (gradient
  // accumulation over micro-batches divides by the count of the whole batch).
  std::size_t normaliser = 0;
};

template <class Tensor>
using loss_result_of = loss_result<typename Tensor::value_type, typename backend_of<Tensor>::type>;

// The positions of [batch, positions] targets that have one, as rows of the flattened batch
// (b * positions + s), and their targets; a target outside [0, vocab) throws, naming its place.
struct target_positions {
  std::vector<std::int64_t> rows, ys;
};
inline target_positions positions_with_target(const token_ids& targets, std::size_t vocab) {
  target_positions p;
  for (std::size_t b = 0; b < targets.shape(0); ++b)
    for (std::size_t s = 0; s < targets.shape(1); ++s) {
      const auto y = targets(b, s);
      if (y == ignore_index) continue;
      if (y < 0 || std::size_t(y) >= vocab)
        throw std::invalid_argument("skillgraft: target [" + std::to_string(b) + ", " + std::to_string(s) + "] is " +
                                    std::to_string(y) + ", outside the vocabulary [0, " + std::to_string(vocab) + ")");
      p.rows.push_back(std::int64_t(b * targets.shape(1) + s));
      p.ys.push_back(y);
    }
  return p;
}

// h: [batch, positions, hidden]; head: [vocab, hidden] (tensors of one backend); targets:
// [batch, positions] (host). The rows with a target are found on the host; each chunk is
// gathered (Backend::gather_rows), multiplied by the head, turned into its gradient in place
// (Backend::softmax_cross_entropy_rows) and multiplied back.
template <class T, template <class> class Tensor>
loss_result_of<Tensor<T>> masked_cross_entropy(const Tensor<T>& h, const Tensor<T>& head, const token_ids& targets,
                                               Tensor<T>* dhead, cross_entropy_options opt = {}) {
  using B = typename backend_of<Tensor<T>>::type;
  if (h.rank() != 3 || targets.shape(0) != h.dim(0) || targets.shape(1) != h.dim(1))
    throw std::invalid_argument("skillgraft: targets have shape [" + std::to_string(targets.shape(0)) + ", " +
                                std::to_string(targets.shape(1)) + "], expected [" + std::to_string(h.dim(0)) + ", " +
                                std::to_string(h.dim(1)) + "] (one per position of the hidden states " +
                                h.shape().str() + ")");
  const std::size_t V = head.dim(0), d = head.dim(1);
  if (h.dim(2) != d)
    throw std::invalid_argument("skillgraft: hidden states have width " + std::to_string(h.dim(2)) +
                                ", the LM head expects " + std::to_string(d));
  const auto [rows, ys] = positions_with_target(targets, V);
  loss_result_of<Tensor<T>> r;
  r.count = rows.size();
  if (opt.want_dh) r.dh = Tensor<T>(h.shape(), memory_use::workspace);
  if (rows.empty()) return r;
  const double n = double(opt.normaliser ? opt.normaliser : rows.size());
  const std::size_t chunk = std::min(std::max<std::size_t>(1, opt.chunk), rows.size());
  // A chunk's first m rows are written (gathered, or GEMM outputs with beta = 0) before they
  // are read, and no later row is read; dh starts at zero, its rows without a target stay so.
  Tensor<T> hc({chunk, d}, memory_use::workspace, uninitialized), z({chunk, V}, memory_use::workspace, uninitialized),
      dhc;
  if (opt.want_dh) dhc = Tensor<T>({chunk, d}, memory_use::workspace, uninitialized);
  const int Vi = int(V), di = int(d);
  double total = 0;
  for (std::size_t c0 = 0; c0 < rows.size(); c0 += chunk) {
    const std::size_t m = std::min(chunk, rows.size() - c0);
    const std::vector<std::int64_t> rc(rows.begin() + std::ptrdiff_t(c0), rows.begin() + std::ptrdiff_t(c0 + m));
    B::gather_rows(h, d, rc, hc);
    B::gemm("lm_head: z = h W^T", op::n, op::t, int(m), Vi, di, T(1), hc.data(), di, head.data(), di, T(0), z.data(), Vi);
    total += B::softmax_cross_entropy_rows(z, m, ys.data() + c0, n);  // z becomes dz
    if (dhead)
      B::gemm("lm_head: dW += dz^T h", op::t, op::n, Vi, di, int(m), T(1), z.data(), Vi, hc.data(), di, T(1),
              dhead->data(), di);
    if (opt.want_dh) {
      B::gemm("lm_head: dh = dz W", op::n, op::n, int(m), di, Vi, T(1), z.data(), Vi, head.data(), di, T(0), dhc.data(),
              di);
      B::scatter_rows(dhc, d, rc, r.dh);
    }
  }
  r.loss = total / n;
  if (!std::isfinite(r.loss))
    throw std::domain_error("skillgraft: the loss is not finite (" + std::to_string(r.loss) + "); no weight was changed");
  return r;
}

// "No gradient for the head", said explicitly: evaluation, or a head the recipe freezes.
struct no_head_grad_t {
  explicit constexpr no_head_grad_t() = default;
};
inline constexpr no_head_grad_t no_head_grad{};

template <class T, template <class> class Tensor>
loss_result_of<Tensor<T>> masked_cross_entropy(const Tensor<T>& h, const Tensor<T>& head, const token_ids& targets,
                                               no_head_grad_t, cross_entropy_options opt = {}) {
  return masked_cross_entropy(h, head, targets, static_cast<Tensor<T>*>(nullptr), opt);
}

template <class T>
inline constexpr bool head_gradient_given_as_nullptr = false;

template <class T, template <class> class Tensor>
loss_result_of<Tensor<T>> masked_cross_entropy(const Tensor<T>&, const Tensor<T>&, const token_ids&, std::nullptr_t,
                                               cross_entropy_options = {}) {
  static_assert(head_gradient_given_as_nullptr<T>,
                "skillgraft: masked_cross_entropy(h, head, targets, nullptr): pass model.head_grad(g) (or call "
                "masked_cross_entropy(model, w, g, h, targets)), or no_head_grad to say the head gets no gradient");
  return {};
}

// The loss of a model's hidden states; the head's gradient goes where the model's recipe
// says (lm_head, the tied embedding, or nowhere when the head is frozen).
template <class Model>
loss_result<typename Model::value_type, typename Model::backend_type> masked_cross_entropy(
    const Model& model, const typename Model::weights_t& w, typename Model::grads_t& g,
    const typename Model::backend_type::template tensor<typename Model::value_type>& h, const token_ids& targets,
    cross_entropy_options opt = {}) {
  return masked_cross_entropy(h, w.head(), targets, model.head_grad(g), opt);
}

// The loss only (evaluation): no gradient of anything.
template <class Model>
loss_result<typename Model::value_type, typename Model::backend_type> masked_cross_entropy(
    const Model&, const typename Model::weights_t& w,
    const typename Model::backend_type::template tensor<typename Model::value_type>& h, const token_ids& targets,
    cross_entropy_options opt = {}) {
  opt.want_dh = false;
  return masked_cross_entropy(h, w.head(), targets, no_head_grad, opt);
}

}  // namespace skillgraft::train
