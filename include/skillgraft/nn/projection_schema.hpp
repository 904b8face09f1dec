#pragma once
// The schema of a decoder block's projections, written once: for each of the seven, its recipe
// tag (whose name is the Hugging Face module name, policy/tags.hpp), the branch it sits in,
// where it lives in the weights, the gradients and the adapter gradients, and its shape under a
// config. Names ("model.layers.3.self_attn.q_proj.weight"), gradient buffers, the trainable
// visitation, grad<Tag>, the weight checks, checkpoint shapes, LoRA targets and the transfers
// between backends are derived from it instead of spelling the LLaMA/Qwen2 names per header.
//
//   attention_projections   q, k, v, o of self_attn (nn/attention.hpp)
//   mlp_projections         gate, up, down of mlp (nn/swiglu.hpp; each expert of nn/moe_mlp.hpp)
//   block_projections       all seven, in Hugging Face order
#include <cstddef>
#include <string>
#include <type_traits>

#include "skillgraft/nn/block_schema.hpp"
#include "skillgraft/nn/config.hpp"
#include "skillgraft/nn/linear.hpp"
#include "skillgraft/policy/tags.hpp"
#include "skillgraft/policy/trainable.hpp"

namespace skillgraft::nn {

// A list of projection entries: for_each(f) calls f(Entry{}) in order (nn/block_schema.hpp).
template <class... Entries>
struct projection_list : tensor_list<Entries...> {
  template <class Tag>
  static constexpr bool has = (std::is_same_v<Tag, typename Entries::tag> || ...);
};

template <class... A, class... B>
projection_list<A..., B...> concat(projection_list<A...>, projection_list<B...>);

// Entry of one projection: TAG, BRANCH (branch::attention or branch::mlp) and the member names
// of the sub-layer's weights (MEMBER, also the gradients' member) and of the adapter gradients
// (ADAPTER); OUT, IN and BIAS are expressions of a decoder_config `c`.
#define SKILLGRAFT_PROJECTION(TAG, BRANCH, MEMBER, ADAPTER, OUT, IN, BIAS)      \
  struct MEMBER {                                                                \
    using tag = TAG;                                                             \
    using branch = BRANCH;                                                       \
    static std::string name() { return std::string(TAG::name); }                 \
    static std::string path() { return std::string(BRANCH::name) + "." + name(); } \
    SKILLGRAFT_SCHEMA_MEMBERS(MEMBER, MEMBER)                                    \
    template <class Block>                                                       \
    static auto& in_block(Block& b) {                                            \
      if constexpr (std::is_same_v<BRANCH, b::attention>) return b.self_attn.MEMBER; \
      else return b.mlp.MEMBER;                                                  \
    }                                                                            \
    template <class G>                                                           \
    static auto& adapter_grad(G& g) {                                            \
      return g.ADAPTER;                                                          \
    }                                                                            \
    static std::size_t out(const decoder_config& c) { return std::size_t(OUT); } \
    static std::size_t in(const decoder_config& c) { return std::size_t(IN); }   \
    static bool bias(const decoder_config& c) { return (BIAS); }                 \
  }

namespace schema {
namespace p = ::skillgraft::proj;
namespace b = ::skillgraft::branch;
SKILLGRAFT_PROJECTION(p::q, b::attention, q_proj, q_lora, c.q_dim(), c.hidden, c.attention_bias);
SKILLGRAFT_PROJECTION(p::k, b::attention, k_proj, k_lora, c.kv_dim(), c.hidden, c.attention_bias);
SKILLGRAFT_PROJECTION(p::v, b::attention, v_proj, v_lora, c.kv_dim(), c.hidden, c.attention_bias);
SKILLGRAFT_PROJECTION(p::o, b::attention, o_proj, o_lora, c.hidden, c.q_dim(), ((void)c, false));
SKILLGRAFT_PROJECTION(p::gate, b::mlp, gate_proj, gate_lora, c.intermediate, c.hidden, ((void)c, false));
SKILLGRAFT_PROJECTION(p::up, b::mlp, up_proj, up_lora, c.intermediate, c.hidden, ((void)c, false));
SKILLGRAFT_PROJECTION(p::down, b::mlp, down_proj, down_lora, c.hidden, c.intermediate, ((void)c, false));
}  // namespace schema
#undef SKILLGRAFT_PROJECTION

using attention_projections = projection_list<schema::q_proj, schema::k_proj, schema::v_proj, schema::o_proj>;
using mlp_projections = projection_list<schema::gate_proj, schema::up_proj, schema::down_proj>;
using block_projections = decltype(concat(attention_projections{}, mlp_projections{}));

// The entry of projection Tag (one of the seven).
template <class Tag, class... Entries>
struct projection_entry;
template <class Tag, class E, class... Rest>
struct projection_entry<Tag, E, Rest...>
    : std::conditional_t<std::is_same_v<Tag, typename E::tag>, std::type_identity<E>, projection_entry<Tag, Rest...>> {};
template <class Tag, class List>
struct projection_in;
template <class Tag, class... E>
struct projection_in<Tag, projection_list<E...>> : projection_entry<Tag, E...> {};
template <class Tag>
using projection_of = typename projection_in<Tag, block_projections>::type;

// Projection P of a sub-layer under Recipe: the gradient buffers it needs (its weight and
// bias; its adapter's factors), and its trainable (name, weight, gradient) triples, base weight
// first, then the adapter, as for_each_parameter orders them.
template <class Recipe, class P, class W, class G>
void make_projection_grads(P, const W& w, G& g) {
  using tag = typename P::tag;
  if constexpr (trains_v<tag, Recipe>) P::grad(g) = P::weight(w).like(memory_use::gradients);
  if constexpr (trains_v<lora<tag>, Recipe>) {
    require_lora(P::weight(w), P::name());
    P::adapter_grad(g) = P::weight(w).lora.like(memory_use::gradients);
  }
}
template <class Recipe, class P, class W, class G, class F>
void visit_projection(P, W& w, G& g, F& f) {
  using tag = typename P::tag;
  if constexpr (trains_v<tag, Recipe>) visit_linear(P::name(), P::weight(w), P::grad(g), f);
  if constexpr (trains_v<lora<tag>, Recipe>) visit_lora(P::name(), P::weight(w), P::adapter_grad(g), f);
}

// Elements of the projections of List (weights and biases) under a config.
template <class List>
std::size_t projection_elements(List, const decoder_config& c) {
  std::size_t n = 0;
  List::for_each([&](auto e) { n += e.out(c) * e.in(c) + (e.bias(c) ? e.out(c) : 0); });
  return n;
}
// Trainable elements of the projections of List under Recipe: a trained weight with its bias,
// an adapter's A [r, in] and B [out, r].
template <class Recipe, class List>
std::size_t trainable_projection_elements(List, const decoder_config& c) {
  std::size_t n = 0;
  List::for_each([&](auto e) {
    using tag = typename decltype(e)::tag;
    const std::size_t out = e.out(c), in = e.in(c);
    if constexpr (trains_v<tag, Recipe>) n += out * in + (e.bias(c) ? out : 0);
    if constexpr (trains_v<lora<tag>, Recipe>) n += std::size_t(c.lora_rank) * (in + out);
  });
  return n;
}

}  // namespace skillgraft::nn
