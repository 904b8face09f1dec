#pragma once
// The rows of a forward that anyone reads: the positions with a target, when the loss reads
// nothing else.
//
// A position's output feeds nothing but its own logits after the top block's attention: the
// blocks below are needed at every position (attention reads their keys and values), the top
// block's MLP half (norm, MLP, residual) and the final norm only where a loss reads the result.
// Given the rows, the top block's attention reads every row's keys and values but forms
// queries and outputs for those rows alone, and its MLP half runs on them only:
//
//   h = rmsnorm(x)                          every row   [batch, positions, hidden]
//   k, v = h Wk^T, h Wv^T                   every row
//   q = h[rows] Wq^T, spread (zero elsewhere); a = softmax(q k^T) v
//   x2r = x[rows] + a[rows] Wo^T                          [1, rows, hidden]
//   y  = x2r + mlp(rmsnorm(x2r))            those rows only
//
// Backward spreads d a[rows] into a zero gradient of every row before the attention core's
// backward; a row left out then gets dq = 0 exactly (its dP row is zero), and adds nothing to
// dk or dv. The gradients are those of the whole forward (the rows left out get a zero
// gradient from the loss anyway); the top block's Q, O and MLP GEMMs shrink by
// rows / (batch * positions), which for answer-only supervision (half the positions, say) is
// the largest saving a step has after the recipe's own. llama.cpp does the same for
// inference (its `inp_out_ids`).
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "skillgraft/backend/memory.hpp"
#include "skillgraft/backend/tensor_storage.hpp"

namespace skillgraft::nn {

struct output_rows {
  std::vector<std::int64_t> index;  // rows of the flattened [batch * positions], increasing
  std::size_t batch = 0, positions = 0;

  std::size_t count() const { return index.size(); }
  std::size_t all() const { return batch * positions; }

  // Throws unless the index is increasing, inside [0, batch * positions), and the shape is x's.
  template <class Tensor>
  void check_against(const Tensor& x, const char* what) const {
    if (x.rank() != 3 || x.dim(0) != batch || x.dim(1) != positions)
      throw std::invalid_argument(std::string("skillgraft: ") + what + " has shape " + x.shape().str() +
                                  ", the output rows were chosen for [" + std::to_string(batch) + ", " +
                                  std::to_string(positions) + ", hidden]");
    for (std::size_t r = 0; r < index.size(); ++r)
      if (index[r] < 0 || std::size_t(index[r]) >= all() || (r && index[r] <= index[r - 1]))
        throw std::invalid_argument("skillgraft: output row " + std::to_string(r) + " is " + std::to_string(index[r]) +
                                    ": rows must increase and lie in [0, " + std::to_string(all()) + ")");
  }
};

// x [batch, positions, features] -> its rows [1, rows, features], counted under `use`.
template <class Backend, class Tensor>
Tensor select_rows(const Tensor& x, const output_rows& rows, memory_use use = memory_use::workspace) {
  rows.check_against(x, "the input of the output-row selection");
  const std::size_t d = x.dim(2);
  Tensor out({1, rows.count(), d}, use, uninitialized);  // every row gathered
  Backend::gather_rows(x, d, rows.index, out);
  return out;
}

// dr [1, rows, hidden] -> [batch, positions, hidden], zero outside the rows.
template <class Backend, class Tensor>
Tensor spread_rows(const Tensor& dr, const output_rows& rows) {
  if (dr.rank() != 3 || dr.dim(0) != 1 || dr.dim(1) != rows.count())
    throw std::invalid_argument("skillgraft: gradient of the output rows has shape " + dr.shape().str() +
                                ", expected [1, " + std::to_string(rows.count()) + ", hidden]");
  const std::size_t d = dr.dim(2);
  Tensor out({rows.batch, rows.positions, d}, memory_use::workspace);  // zero: fresh tensors are
  Backend::scatter_rows(dr, d, rows.index, out);
  return out;
}

}  // namespace skillgraft::nn
