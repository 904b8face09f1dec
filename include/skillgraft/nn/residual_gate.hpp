#pragma once
// GateSkip residual gates ("What Layers When: Learning to Skip Compute in LLMs with Residual
// Gates", Laitenberger, Kopiczko, Snoek, Asano, 2025): a learned sigmoid-linear gate on each
// branch's output (attention, MLP) before it re-enters the residual stream.
//
//   forward   z = h Wg^T + bg               h: the branch's input (the RMS-normed hidden state)
//             g = sigmoid(z)                [N, d] (vector gate, one per feature) or [N, 1] (scalar)
//             y = x + g * o                 o = branch(h), x the residual stream; a scalar gate
//                                           scales the token's whole row
//   backward  do = dy * g                   (what the branch's own backward receives)
//             dg = dy * o (vector) or sum_j dy_j o_j (scalar), + c1 + 2 c2 g (the sparsity
//                  penalty c1 sum g + c2 sum g^2 of train/gate_sparsity.hpp, seeded per step)
//             dz = dg * g (1 - g)
//             dWg += dz^T h,  dbg += sum over rows of dz,  dh += dz Wg
//             dx = dy                       (the residual path; the block adds it)
//
// The gate reads the branch's *input* (as the paper's code does), so a token's importance (the
// mean of g over features) is known before the branch runs: that is what lets inference skip
// the branch for the tokens a layer's budget drops (model/gate_skip.hpp). Unlike the paper's
// code, h is not detached: the gradient through z reaches h, so every gradient here is the
// derivative of the function computed (finite differences check it).
//
// With g = 1 exactly (a fully open gate) y = x + 1 * o = x + o, the ungated block bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "skillgraft/backend/backend_of.hpp"
#include "skillgraft/backend/host_device.hpp"
#include "skillgraft/nn/activation.hpp"
#include "skillgraft/nn/config.hpp"
#include "skillgraft/nn/linear.hpp"
#include "skillgraft/nn/optional_member.hpp"

namespace skillgraft::nn {

// One gate per hidden feature (the paper's best variant) or one per token.
enum class gate_shape { vector, scalar };

inline std::size_t gate_width(gate_shape s, std::size_t hidden) { return s == gate_shape::vector ? hidden : 1; }

namespace members {
SKILLGRAFT_OPTIONAL_MEMBER(self_attn_residual_gate);
SKILLGRAFT_OPTIONAL_MEMBER(mlp_residual_gate);
SKILLGRAFT_OPTIONAL_MEMBER(branch_out);
SKILLGRAFT_OPTIONAL_MEMBER(gate_value);
SKILLGRAFT_OPTIONAL_MEMBER(keep);
}  // namespace members

// Training-time dropping (the paper's budget during fine-tuning): with a fraction f of the N
// tokens dropped, the floor(f N) tokens of lowest importance (mean gate; ties: the lower index
// drops first) contribute nothing to the residual stream, y = x + keep * g * o with keep a
// constant 0/1 per token, and get no gradient through the branch (do = dy * g * keep).
inline std::size_t gate_drop_count(double fraction, std::size_t tokens) {
  if (!(fraction >= 0 && fraction <= 1))
    throw std::invalid_argument("skillgraft: gate_skip train_skip must be in [0, 1], got " + std::to_string(fraction));
  return std::min(tokens, std::size_t(std::floor(fraction * double(tokens))));
}

// What one forward saw of a gate's values g (all N x width of them), and the seeds of the
// sparsity penalty's gradient: an objective sets them after forward (train/gate_sparsity.hpp)
// and backward adds d penalty / d g = seed_l1 + 2 seed_l2 g to dg.
struct gate_record {
  double sum = 0;      // sum of g
  double sum_sq = 0;   // sum of g^2
  std::size_t count = 0;
  double seed_l1 = 0;
  double seed_l2 = 0;
};

// What a gate does in backward, from the recipe (Train: its tag trains), whether the branch's
// input gradient is wanted (NeedDh) and whether the branch itself runs backward (BranchActive).
template <bool Gated, bool Train, bool NeedDh, bool BranchActive>
struct residual_gate_plan {
  static constexpr bool gated = Gated;
  static constexpr bool train = Gated && Train;
  static constexpr bool need_dz = train || (Gated && NeedDh);        // dz feeds dWg, dbg or dh
  static constexpr bool active = need_dz || (Gated && BranchActive);  // do = dy * g at least
  static constexpr bool save_h = train;                               // dWg = dz^T h
  static constexpr bool save_o = need_dz;                             // dg = dy * o
  static constexpr bool save_g = active;                              // do, dz
};

template <class Tensor, class Plan>
struct residual_gate_saved : members::optional_h<Plan::save_h, Tensor>,
                             members::optional_branch_out<Plan::save_o, Tensor>,
                             members::optional_gate_value<Plan::save_g, Tensor>,
                             members::optional_keep<Plan::active, Tensor> {  // [N] when training drops tokens
  gate_record record;
};

namespace kernels {
// The element functors of the gate, written once for every backend (SKILLGRAFT_HD).
struct sigmoid_of {
  template <class T>
  SKILLGRAFT_HD T operator()(T z) const { return sigmoid(z); }
};
struct one_of {
  template <class T>
  SKILLGRAFT_HD T operator()(T) const { return T(1); }
};
template <class T>
struct gated_residual {  // y = x + g * o; g indexed per element (vector) or per row (scalar)
  T* y;
  const T* x;
  const T* o;
  const T* g;
  std::int64_t per_gate;  // elements sharing one gate value: 1 or the hidden size
  SKILLGRAFT_HD void operator()(std::int64_t i) const { y[i] = x[i] + g[i / per_gate] * o[i]; }
};
template <class T>
struct gated_residual_backward {  // do = dy * g (when wanted), p = dy * o (when wanted)
  T* d_out;
  T* p;
  const T* dy;
  const T* o;
  const T* g;
  std::int64_t per_gate;
  SKILLGRAFT_HD void operator()(std::int64_t i) const {
    if (d_out) d_out[i] = dy[i] * g[i / per_gate];
    if (p) p[i] = dy[i] * o[i];
  }
};
template <class T>
struct gate_logit_grad {  // dz = (dg + c1 + 2 c2 g) g (1 - g), in place over dg
  T* dg;
  const T* g;
  T c1, c2;
  SKILLGRAFT_HD void operator()(std::int64_t i) const {
    const T v = g[i];
    dg[i] = (dg[i] + c1 + T(2) * c2 * v) * v * (T(1) - v);
  }
};
template <class T>
struct scale_rows {  // y[i] *= m[row of i]
  T* y;
  const T* m;
  std::int64_t per_row;
  SKILLGRAFT_HD void operator()(std::int64_t i) const { y[i] *= m[i / per_row]; }
};
template <class T>
struct value_of {
  const T* g;
  SKILLGRAFT_HD double operator()(std::int64_t i) const { return double(g[i]); }
};
template <class T>
struct square_of {
  const T* g;
  SKILLGRAFT_HD double operator()(std::int64_t i) const { return double(g[i]) * double(g[i]); }
};
}  // namespace kernels

// g = sigmoid(h Wg^T + bg): the gate's values for the rows of h ([.., width]); `use` says what
// the buffer is for (kept for backward, or workspace).
template <class T, class B>
typename B::template tensor<T> gate_values(const linear_weights<T, B>& w, const typename B::template tensor<T>& h,
                                           memory_use use = memory_use::workspace,
                                           const char* name = "residual gate") {
  typename B::template tensor<T> g(with_last(h.shape(), w.out_features()), use);
  linear_forward(w, h, g, name);  // z = h Wg^T + bg
  B::map(g, g, kernels::sigmoid_of{});
  return g;
}

// y = x + g * o, g per element (vector gate) or per row (scalar gate).
template <class Tensor>
Tensor gated_residual(const Tensor& x, const Tensor& o, const Tensor& g) {
  using T = typename Tensor::value_type;
  using B = typename backend_of<Tensor>::type;
  Tensor y(x.shape(), memory_use::workspace);
  B::for_each_index(std::int64_t(y.size()), kernels::gated_residual<T>{y.data(), x.data(), o.data(), g.data(),
                                                                       std::int64_t(x.cols() / g.cols())});
  return y;
}

// One branch's gate: forward and the two halves of backward, on any backend.
template <class T, class Plan, class Backend>
struct residual_gate {
  using tensor_t = typename Backend::template tensor<T>;
  using saved_t = residual_gate_saved<tensor_t, Plan>;

  // keep [N]: 0 for the `drop` tokens of lowest mean gate, 1 for the others (ranked on the host).
  static tensor_t drop_mask(const tensor_t& g, std::size_t drop, memory_use use) {
    cpu::tensor<T> host(g.shape(), memory_use::workspace);
    Backend::download(g, host);
    const std::size_t N = g.rows(), width = g.cols();
    std::vector<std::pair<double, std::size_t>> importance(N);
    for (std::size_t r = 0; r < N; ++r) {
      double sum = 0;
      for (std::size_t j = 0; j < width; ++j) sum += double(host.data()[r * width + j]);
      importance[r] = {sum / double(width), r};
    }
    std::partial_sort(importance.begin(), importance.begin() + std::ptrdiff_t(drop), importance.end());
    cpu::tensor<T> keep({N}, memory_use::workspace);
    for (std::size_t r = 0; r < N; ++r) keep[r] = T(1);
    for (std::size_t i = 0; i < drop; ++i) keep[importance[i].second] = T(0);
    return Backend::template upload<T>(keep, use);
  }

  // y = x + sigmoid(h Wg^T + bg) * o; with train_skip > 0 the lowest-importance tokens' o is
  // dropped. `name` is the gate's tensor name for messages.
  static tensor_t forward(const linear_weights<T, Backend>& w, const tensor_t& h, tensor_t&& o, const tensor_t& x,
                          saved_t& s, const char* name, double train_skip = 0.0) {
    if (w.weight.empty())
      throw std::invalid_argument(std::string("skillgraft: ") + name +
                                  ".weight is missing: a gate_skip block needs its residual gates (nn::add_residual_gates)");
    check_linear_input(w, h, name);
    tensor_t g = gate_values(w, h, Plan::save_g ? memory_use::saved_activations : memory_use::workspace, name);
    const auto n = std::int64_t(g.size());
    s.record = gate_record{Backend::template sum_index<double>(n, kernels::value_of<T>{g.data()}),
                           Backend::template sum_index<double>(n, kernels::square_of<T>{g.data()}), g.size()};
    if (const std::size_t drop = gate_drop_count(train_skip, g.rows()); drop > 0) {
      tensor_t keep = drop_mask(g, drop, Plan::active ? memory_use::saved_activations : memory_use::workspace);
      Backend::for_each_index(std::int64_t(o.size()), kernels::scale_rows<T>{o.data(), keep.data(), std::int64_t(o.cols())});
      if constexpr (Plan::active) s.keep = std::move(keep);
    }
    tensor_t y = gated_residual(x, o, g);
    if constexpr (Plan::save_h) s.h = h.clone(memory_use::saved_activations);
    if constexpr (Plan::save_o) s.branch_out = o.clone(memory_use::saved_activations);
    if constexpr (Plan::save_g) s.gate_value = std::move(g);
    return y;
  }

  struct backward_t {
    tensor_t d_out;  // do = dy * g, for the branch's backward (empty unless it runs)
    tensor_t dz;     // d loss / d z (empty unless the gate's weights or h need it)
  };

  // The part before the branch's backward: do for the branch, dz for the gate's own weights.
  template <bool BranchActive>
  static backward_t backward_gate(const saved_t& s, const tensor_t& dy) {
    backward_t r;
    if constexpr (!Plan::active) {
      return r;
    } else {
      const tensor_t& g = s.gate_value;
      const std::size_t width = g.cols(), d = dy.cols();
      const std::int64_t per_gate = std::int64_t(d / width);
      if constexpr (BranchActive) r.d_out = tensor_t(dy.shape(), memory_use::workspace);
      tensor_t p;  // dy * o: dg itself for a vector gate, summed over each row for a scalar one
      if constexpr (Plan::need_dz) p = tensor_t(dy.shape(), memory_use::workspace);
      const T* o = nullptr;
      if constexpr (Plan::save_o) o = s.branch_out.data();
      Backend::for_each_index(std::int64_t(dy.size()),
                              kernels::gated_residual_backward<T>{BranchActive ? r.d_out.data() : nullptr,
                                                                  Plan::need_dz ? p.data() : nullptr, dy.data(), o,
                                                                  g.data(), per_gate});
      if (BranchActive && !s.keep.empty())  // dropped tokens: no gradient through the branch
        Backend::for_each_index(std::int64_t(dy.size()),
                                kernels::scale_rows<T>{r.d_out.data(), s.keep.data(), std::int64_t(d)});
      if constexpr (Plan::need_dz) {
        if (width == d) {
          r.dz = std::move(p);
        } else {  // dg [N, 1] = p [N, d] 1 [d]
          tensor_t ones({d}, memory_use::workspace);
          Backend::map(ones, ones, kernels::one_of{});
          r.dz = tensor_t(g.shape(), memory_use::workspace);
          Backend::gemm("residual gate: dg = sum_j dy_j o_j", op::n, op::n, int(dy.rows()), 1, int(d), T(1), p.data(),
                        int(d), ones.data(), 1, T(0), r.dz.data(), 1);
        }
        Backend::for_each_index(std::int64_t(g.size()),
                                kernels::gate_logit_grad<T>{r.dz.data(), g.data(), T(s.record.seed_l1), T(s.record.seed_l2)});
      }
      return r;
    }
  }

  // The part after it: dWg += dz^T h, dbg += row sums of dz (grad non-null when the gate
  // trains), dh += dz Wg (dh non-null when the branch's input gradient is wanted).
  static void backward_params(const linear_weights<T, Backend>& w, const saved_t& s, const tensor_t& dz,
                              linear_weights<T, Backend>* grad, tensor_t* dh) {
    if constexpr (Plan::need_dz) {
      if constexpr (Plan::train) linear_backward_weight(s.h, dz, *grad, "residual gate: dWg += dz^T h");
      if (dh) linear_backward_input(w, dz, *dh, true, "residual gate: dh += dz Wg");
    } else {
      (void)w, (void)s, (void)dz, (void)grad, (void)dh;
    }
  }
};

// --- creating and checking the gates ---------------------------------------------------------

// How new gates start. The paper's scheme: bias 5 (sigmoid(5) = 0.9933, nearly open) and
// weights N(0, 0.01^2), so a pretrained model starts close to, not exactly at, itself; a larger
// bias starts closer (sigmoid(17) rounds to 1 in float: the model is unchanged bit for bit, but
// the gate's gradient g (1 - g) is then 0 too, so it would not train).
struct residual_gate_init {
  double bias = 5.0;
  double weight_std = 0.01;
  std::uint64_t seed = 0;
};

// Throws, naming the tensor, unless a gate has the shape the block's policy implies; a block
// without gates must not carry any.
template <class T, class B>
void check_residual_gate(const linear_weights<T, B>& w, bool expected, gate_shape shape, std::size_t hidden,
                         const std::string& name) {
  if (!expected) {
    if (!w.weight.empty())
      throw std::invalid_argument("skillgraft: " + name +
                                  ".weight present, but the block's policy has no residual gates (use nn::gate_skip<...>)");
    return;
  }
  if (w.weight.empty())
    throw std::invalid_argument("skillgraft: " + name +
                                ".weight is missing: a gate_skip block needs its residual gates (nn::add_residual_gates)");
  const std::size_t width = gate_width(shape, hidden);
  cpu::expect_shape(w.weight, {width, hidden}, name + ".weight");
  cpu::expect_shape(w.bias, {width}, name + ".bias");
}

}  // namespace skillgraft::nn
