#pragma once
// The rows of a forward that anyone reads: the positions with a target, when the loss reads
// nothing else.
//
// A position's output feeds nothing but its own logits after the top block's attention: the
// blocks below are needed at every position (attention reads their keys and values), the top
// block's MLP half (norm, MLP, residual) and the final norm only where a loss reads the result.
// Given the rows, the top block selects them right after its attention's residual add,
//
//   x2 = x + attention(rmsnorm(x))          every row   [batch, positions, hidden]
//   x2r = x2[rows]                                        [1, rows, hidden]
//   y  = x2r + mlp(rmsnorm(x2r))            those rows only
//
// and backward spreads dx2r back into a zero gradient of every row before attention's
// backward. The gradients are those of the whole forward (the rows left out get a zero
// gradient from the loss anyway); the top MLP's GEMMs shrink by rows / (batch * positions),
// which for answer-only supervision (half the positions, say) is the largest saving a step
// has after the recipe's own. llama.cpp does the same for inference (its `inp_out_ids`).
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "skillgraft/backend/memory.hpp"

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

// x [batch, positions, hidden] -> its rows [1, rows, hidden].
template <class Backend, class Tensor>
Tensor select_rows(const Tensor& x, const output_rows& rows) {
  rows.check_against(x, "the input of the output-row selection");
  const std::size_t d = x.dim(2);
  Tensor out({1, rows.count(), d}, memory_use::workspace);
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
