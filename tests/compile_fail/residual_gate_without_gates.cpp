// expect: In instantiation of .+residual_gate_on_block_without_gates<skillgraft::group::residual_gate<skillgraft::branch::mlp>.*the recipe names a residual gate .first template argument. but the block's policy .third. has no gates
// A block built without the gate_skip policy has no residual gates: a recipe training one does not compile.
#include "skillgraft/nn/decoder_block.hpp"
#include "skillgraft/policy/recipes.hpp"
namespace sg = skillgraft;
using gate_r = std::remove_const_t<decltype(sg::trainable<sg::group::residual_gate<sg::branch::mlp>>)>;
int main() {
  (void)sizeof(sg::nn::decoder_block<float, gate_r, false, sg::backend::cpu, sg::nn::gate_skip<>>);
#ifndef SKILLGRAFT_CONTROL
  (void)sizeof(sg::nn::decoder_block<float, gate_r, false>);
#endif
}
