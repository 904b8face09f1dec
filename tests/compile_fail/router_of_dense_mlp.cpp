// expect: the recipe names a tag .first template argument. that the block's MLP policy .third. does not have
// A dense MLP has no router: a recipe that trains group::router needs a mixture-of-experts policy.
#include "skillgraft/nn/decoder_block.hpp"
#include "skillgraft/nn/moe_mlp.hpp"
#include "skillgraft/policy/recipes.hpp"
namespace sg = skillgraft;
using router_r = std::remove_const_t<decltype(sg::trainable<sg::group::router>)>;
int main() {
  (void)sizeof(sg::nn::decoder_block<float, router_r, false, sg::backend::cpu, sg::nn::moe<>>);
#ifndef SKILLGRAFT_CONTROL
  (void)sizeof(sg::nn::decoder_block<float, router_r, false>);
#endif
}
