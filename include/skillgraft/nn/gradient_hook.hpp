#pragma once
// What a model's backward tells an observer: "this gradient is final". Data-parallel training
// (train/gradient_buckets.hpp) uses it to start summing a layer's gradients over the ranks
// while backward still works on the layers below.
//
// A model's backward takes zero or one hook as a trailing parameter pack: without one, the
// instantiation has exactly the parameters backward had before hooks existed, and the calls
// below expand to nothing, so a backward without a hook compiles to the code it always did.
// A hook h provides:
//   h.ready(tensor_t& dp)     dp holds its final value for this backward (nothing adds to it later)
// Models call ready() once per trainable tensor, in the order backward finishes them: the
// reverse of for_each_trainable (the head, the final norm, the layers from the top, the
// embeddings; then the projector and the vision encoder).
#include <string>
#include <vector>

namespace skillgraft::nn {

// dp is final: tell the hooks, if any.
template <class Tensor, class... Hook>
void gradient_ready(Tensor& dp, const Hook&... hook) {
  (hook.ready(dp), ...);
}

// Reports every trainable gradient of a part (a block, the projector, an encoder) as final, in
// the reverse of Part::for_each_trainable. The visit needs the weights as non-const only
// because for_each_trainable hands out (weight, gradient) pairs; nothing is written to them.
template <class Part, class Weights, class Grads, class... Hook>
void gradients_ready(const Weights& w, Grads& g, const Hook&... hook) {
  if constexpr (sizeof...(Hook) > 0) {
    std::vector<typename Part::tensor_t*> grads;
    Part::for_each_trainable(const_cast<Weights&>(w), g,
                             [&](const std::string&, auto&, auto& dp) { grads.push_back(&dp); });
    for (auto it = grads.rbegin(); it != grads.rend(); ++it) gradient_ready(**it, hook...);
  }
}

// The hook of an object that lives elsewhere (a step's bucket_reducer): a pointer to it.
template <class Target>
struct gradient_hook_ref {
  Target* target;
  template <class Tensor>
  void ready(Tensor& dp) const {
    target->ready(dp);
  }
};

}  // namespace skillgraft::nn
