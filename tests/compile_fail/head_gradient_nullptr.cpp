// expect: masked_cross_entropy.h, head, targets, nullptr.: pass model.head_grad.g.
// A bare nullptr for the head's gradient would leave a trained head's gradient at zero: it does not compile.
#include "skillgraft/train/cross_entropy.hpp"
namespace sg = skillgraft;
int main() {
  sg::cpu::tensor<float> h({1, 2, 4}, sg::memory_use::workspace), head({5, 4}, sg::memory_use::weights);
  const sg::token_ids targets = {{1, 2}};
  (void)sg::train::masked_cross_entropy(h, head, targets, sg::train::no_head_grad);
#ifndef SKILLGRAFT_CONTROL
  (void)sg::train::masked_cross_entropy(h, head, targets, nullptr);
#endif
}
