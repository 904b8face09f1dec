// expect: this type is not a parameter tag
// Only skillgraft tags can be trainable.
#include "skillgraft/policy/recipes.hpp"
namespace sg = skillgraft;
struct my_tag {};
int main() {
  (void)sg::trainable<sg::proj::q>;
#ifndef SKILLGRAFT_CONTROL
  (void)sg::trainable<my_tag>;
#endif
}
