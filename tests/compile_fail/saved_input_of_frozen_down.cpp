// expect: has no member named .+m[^_a-z]
// With Down frozen, the MLP does not keep the input of Down (m = silu(g) * u).
#include "skillgraft/nn/decoder_block.hpp"
#include "skillgraft/policy/recipes.hpp"
namespace sg = skillgraft;
using Block = sg::nn::decoder_block<float, decltype(sg::recipe::mlp_gate_up), false>;
int main() {
  Block::saved_t s;
  (void)s.mlp.g;  // needed by dGate and dUp
#ifndef SKILLGRAFT_CONTROL
  (void)s.mlp.m;
#endif
}
