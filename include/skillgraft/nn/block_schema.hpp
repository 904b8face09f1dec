#pragma once
// The schema of a decoder block's tensors besides the seven projections (nn/projection_schema.hpp):
// the two RMSNorm weights, the two GateSkip residual gates, and the MLP policies' own tensors
// (the expanded-gating range and a mixture's router). For each: its recipe tag (whose `name`
// is the module name, policy/tags.hpp), its name relative to the layer or to the MLP, and the
// members that hold it in the weights and in the gradients. Block weights, gradients, weight
// checks, the model's parameter list, checkpoint shapes and the vision tower's names read the
// names and members from here.
//
//   block_norms       input_layernorm.weight, post_attention_layernorm.weight
//   residual_gates    self_attn_residual_gate.{weight,bias}, mlp_residual_gate.{weight,bias}
//                     (GateSkip, not Hugging Face names: docs/gateskip.md)
//   mlp_act_range     act_fn.alpha of an MLP or an expert (xSiLU, xGELU, xATLU)
//   mlp_router        router.weight of a mixture of experts; its experts under experts.{e}.
#include <cstddef>
#include <string>

#include "skillgraft/policy/tags.hpp"

namespace skillgraft::nn {

// f(Entry{}) for every entry, in order.
template <class... Entries>
struct tensor_list {
  template <class F>
  static constexpr void for_each(F&& f) {
    (f(Entries{}), ...);
  }
};

// Where a schema entry lives: weight(w) is its member of the weights, grad(g) of the gradients
// (also used by nn/projection_schema.hpp).
#define SKILLGRAFT_SCHEMA_MEMBERS(WEIGHT, GRAD) \
  template <class W>                            \
  static auto& weight(W& w) {                   \
    return w.WEIGHT;                            \
  }                                             \
  template <class G>                            \
  static auto& grad(G& g) {                     \
    return g.GRAD;                              \
  }

// Entry of one tensor: TAG, the suffix that makes the tag's module name a tensor name (a
// linear module has none: its .weight and .bias follow), and the members holding it in the
// weights (WEIGHT) and in the gradients (GRAD). PARENT is "" for the layer's own tensors and
// "mlp." for the MLP's.
#define SKILLGRAFT_BLOCK_TENSOR(ENTRY, TAG, SUFFIX, PARENT, WEIGHT, GRAD)   \
  struct ENTRY {                                                           \
    using tag = TAG;                                                       \
    static std::string name() { return std::string(TAG::name) + SUFFIX; } \
    static std::string path() { return PARENT + name(); }                  \
    SKILLGRAFT_SCHEMA_MEMBERS(WEIGHT, GRAD)                                \
  }

namespace schema {
namespace g = ::skillgraft::group;
namespace b = ::skillgraft::branch;
SKILLGRAFT_BLOCK_TENSOR(input_layernorm, g::attn_norm, ".weight", "", attn_norm, attn_norm);
SKILLGRAFT_BLOCK_TENSOR(post_attention_layernorm, g::mlp_norm, ".weight", "", mlp_norm, mlp_norm);
SKILLGRAFT_BLOCK_TENSOR(self_attn_residual_gate, g::residual_gate<b::attention>, "", "", attn_gate,
                        self_attn_residual_gate);
SKILLGRAFT_BLOCK_TENSOR(mlp_residual_gate, g::residual_gate<b::mlp>, "", "", mlp_gate, mlp_residual_gate);
SKILLGRAFT_BLOCK_TENSOR(act_fn_alpha, g::act_range, ".alpha", "mlp.", act_alpha, act_alpha);
SKILLGRAFT_BLOCK_TENSOR(router, g::router, ".weight", "mlp.", router, router);

// Expert e of a mixture, relative to the MLP: "experts.{e}." (expert 0 is the original MLP).
inline std::string expert_prefix(std::size_t e) { return "experts." + std::to_string(e) + "."; }
}  // namespace schema
#undef SKILLGRAFT_BLOCK_TENSOR

using block_norms = tensor_list<schema::input_layernorm, schema::post_attention_layernorm>;
using residual_gates = tensor_list<schema::self_attn_residual_gate, schema::mlp_residual_gate>;

}  // namespace skillgraft::nn
