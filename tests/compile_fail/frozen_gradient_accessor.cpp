// expect: In instantiation of .+struct skillgraft::nn::gradient_of_frozen_tensor<skillgraft::proj::down, skillgraft::trainable_set<skillgraft::tag_list<skillgraft::proj::gate, skillgraft::proj::up> > >.*gradient requested for a tag .first template argument. that the recipe .second. does not train
// grad<Tag> on a frozen tag stops with a static_assert; the line above it names the tag and the recipe (as its tags).
#include "skillgraft/nn/decoder_block.hpp"
#include "skillgraft/policy/recipes.hpp"
namespace sg = skillgraft;
using Block = sg::nn::decoder_block<float, decltype(sg::recipe::mlp_gate_up), false>;
int main() {
  Block::grads_t g;
  (void)sg::nn::grad<sg::proj::up, Block>(g);
#ifndef SKILLGRAFT_CONTROL
  (void)sg::nn::grad<sg::proj::down, Block>(g);
#endif
}
