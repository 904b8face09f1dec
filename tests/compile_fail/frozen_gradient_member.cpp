// expect: trainable_set<skillgraft::tag_list<skillgraft::proj::q, skillgraft::proj::k, skillgraft::proj::v, skillgraft::proj::o> >.* has no member named .+gate_proj
// grads_t of an attention-only recipe has no member for the frozen Gate projection; the message spells the recipe as its tags.
#include "skillgraft/nn/decoder_block.hpp"
#include "skillgraft/policy/recipes.hpp"
namespace sg = skillgraft;
using Block = sg::nn::decoder_block<float, decltype(sg::recipe::sa_proj), false>;
int main() {
  Block::grads_t g;
  (void)g.q_proj;  // trainable: exists
#ifndef SKILLGRAFT_CONTROL
  (void)g.gate_proj;
#endif
}
