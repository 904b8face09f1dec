#pragma once
// The memory plan of a stack against what the code allocates (the ledger), for stacks of any
// block policy: weights, gradients, AdamW state and saved activations, through one
// forward and backward.
#include <catch2/catch.hpp>

#include "skillgraft/nn/memory_report.hpp"
#include "skillgraft/train/adamw.hpp"
#include "support/random.hpp"

namespace skillgraft::test {

// make_weights() -> trunk weights (counted from here), make_stack() -> the stack to plan.
template <class MakeWeights, class MakeStack>
void check_plan_against_ledger(MakeWeights&& make_weights, MakeStack&& make_stack, seq_shape sh) {
  struct probe {
    std::int64_t start;
    memory_use use;
    explicit probe(memory_use u) : start(ledger().live(u)), use(u) {}
    std::int64_t delta() const { return ledger().live(use) - start; }
  } weights(memory_use::weights), constants(memory_use::constants), grads(memory_use::gradients),
      opt(memory_use::optimizer_state), saved(memory_use::saved_activations);
  auto w = make_weights();
  const auto stack = make_stack();
  const auto plan = plan_memory(stack, sh);
  CHECK(weights.delta() == std::int64_t(plan.weights));
  CHECK(w.elements() * sizeof(float) == plan.weights);
  CHECK(constants.delta() == std::int64_t(plan.constants));

  auto g = stack.make_grads(w);
  CHECK(grads.delta() == std::int64_t(plan.gradients));
  train::adamw<float> adam(stack, w, g);
  CHECK(opt.delta() == std::int64_t(plan.optimizer_state));
  CHECK(adam.state_bytes() == plan.optimizer_state);
  CHECK(plan.optimizer_state == 2 * stack.trainable_elements() * sizeof(float));

  const int hidden = stack.config().hidden;
  auto x = random_tensor<float>({std::size_t(sh.batch), std::size_t(sh.seq), std::size_t(hidden)}, 6);
  {
    typename std::remove_cvref_t<decltype(stack)>::saved_t s;
    auto y = stack.forward(w, x, s);
    CHECK(saved.delta() == std::int64_t(plan.saved_activations));
    stack.backward(w, s, y, g);
    // backward allocates no gradient buffers and keeps nothing new
    CHECK(grads.delta() == std::int64_t(plan.gradients));
    CHECK(saved.delta() == std::int64_t(plan.saved_activations));
  }
  CHECK(saved.delta() == 0);
}

}  // namespace skillgraft::test
