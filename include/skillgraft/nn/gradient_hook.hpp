#pragma once
// What a model's backward tells an observer: "this gradient is final". Data-parallel training
// (train/gradient_buckets.hpp) uses it to start summing a layer's gradients over the ranks
// while backward still works on the layers below.
//
// A hook H provides:
//   H::active                 false: backward is the plain backward, the calls compiled away
//   h.ready(tensor_t& dp)     dp holds its final value for this backward (nothing adds to it later)
// Models call ready() once per trainable tensor, in the order backward finishes them: the
// reverse of for_each_trainable (the head, the final norm, the layers from the top, the
// embeddings; then the projector and the vision encoder).
#include <string>
#include <type_traits>
#include <vector>

namespace skillgraft::nn {

// The default: backward tells no one.
struct no_gradient_hook {
  static constexpr bool active = false;
  template <class Tensor>
  void ready(Tensor&) {}
};

template <class H>
inline constexpr bool gradient_hook_active_v = std::remove_cvref_t<H>::active;

// Reports every trainable gradient of a part (a block, the projector, an encoder) as final, in
// the reverse of Part::for_each_trainable. The visit needs the weights as non-const only
// because for_each_trainable hands out (weight, gradient) pairs; nothing is written to them.
template <class Part, class Weights, class Grads, class Hook>
void gradients_ready(const Weights& w, Grads& g, Hook& hook) {
  if constexpr (gradient_hook_active_v<Hook>) {
    std::vector<typename Part::tensor_t*> grads;
    Part::for_each_trainable(const_cast<Weights&>(w), g,
                             [&](const std::string&, auto&, auto& dp) { grads.push_back(&dp); });
    for (auto it = grads.rbegin(); it != grads.rend(); ++it) hook.ready(**it);
  }
}

}  // namespace skillgraft::nn
