// expect: a renormalised top-1 weight is always 1, so the router would get no gradient
// A top-1 mixture that renormalises its weight gives every token weight 1: training its router
// is refused at compile time (the Switch form, nn::moe<Act, 1>, trains it).
#include "skillgraft/nn/decoder_block.hpp"
#include "skillgraft/nn/moe_mlp.hpp"
#include "skillgraft/policy/recipes.hpp"
namespace sg = skillgraft;
using router_r = std::remove_const_t<decltype(sg::trainable<sg::group::router, sg::proj::gate>)>;
template <class Mlp>
using mixture = sg::nn::moe_mlp<float, router_r, false, Mlp>;
int main() {
  (void)sizeof(mixture<sg::nn::moe<sg::nn::act::silu, 1>>);
#ifndef SKILLGRAFT_CONTROL
  (void)sizeof(mixture<sg::nn::moe<sg::nn::act::silu, 1, true>>);
#endif
}
