// expect: the recipe names a tag .first template argument. that a decoder block does not have
// A decoder block cannot train the vision tower.
#include "skillgraft/nn/decoder_block.hpp"
#include "skillgraft/policy/recipes.hpp"
namespace sg = skillgraft;
int main() {
  (void)sizeof(sg::nn::decoder_block<float, decltype(sg::recipe::llm), false>);
#ifndef SKILLGRAFT_CONTROL
  (void)sizeof(sg::nn::decoder_block<float, decltype(sg::trainable<sg::group::vision>), false>);
#endif
}
