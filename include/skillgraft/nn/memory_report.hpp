#pragma once
// What a (config, recipe, batch, sequence) costs in bytes, before anything is allocated.
//
// Computed from the same compile-time plan the layers use, but by formula, so that
// the tests can hold it against the ledger of what the code really allocates.
#include <cstddef>
#include <string>

#include "skillgraft/nn/decoder_stack.hpp"

namespace skillgraft {

struct memory_report {
  std::size_t weights = 0;            // every parameter (an MLP policy's alpha, router and experts too)
  std::size_t gradients = 0;          // trainable parameters only
  std::size_t optimizer_state = 0;    // AdamW: two moments per trainable element
  std::size_t saved_activations = 0;  // kept by forward for backward
  std::size_t constants = 0;          // rotary tables
  std::size_t total() const { return weights + gradients + optimizer_state + saved_activations + constants; }
};

// One block of type Block (a decoder_block instantiation), with its MLP policy's options
// (the number of experts of a mixture).
template <class Block>
memory_report plan_memory(const decoder_config& c, seq_shape sh, const typename Block::mlp_options_t& o = {}) {
  using T = typename Block::value_type;
  memory_report r;
  r.weights = Block::weight_elements(c, o) * sizeof(T);
  r.gradients = Block::trainable_elements(c, o) * sizeof(T);
  r.optimizer_state = 2 * r.gradients;
  r.saved_activations = Block::saved_elements(c, sh, o) * sizeof(T);
  return r;
}

// A whole trunk under its recipe, layer range and MLP policy.
template <class T, class Recipe, bool NeedsInputGrad, class Backend, class Mlp>
memory_report plan_memory(const nn::decoder_stack<T, Recipe, NeedsInputGrad, Backend, Mlp>& stack, seq_shape sh) {
  const auto& c = stack.config();
  memory_report r;
  r.weights = stack.weight_elements() * sizeof(T);
  r.gradients = stack.trainable_elements() * sizeof(T);
  r.optimizer_state = 2 * r.gradients;
  r.saved_activations = stack.saved_elements(sh) * sizeof(T);
  r.constants = 2 * std::size_t(c.max_seq) * std::size_t(c.head_dim / 2) * sizeof(T);
  return r;
}

}  // namespace skillgraft
