#pragma once
// Parameter tags: the vocabulary in which recipes say what trains.
//
// A tag is an empty type. Its `name` is the Hugging Face module name the tag
// stands for inside a decoder layer (or the model), so messages and files use
// the words users already know.
#include <string_view>

namespace skillgraft {

namespace proj {
// The seven projections of a LLaMA/Qwen2 decoder block.
struct q    { static constexpr std::string_view name = "q_proj"; };
struct k    { static constexpr std::string_view name = "k_proj"; };
struct v    { static constexpr std::string_view name = "v_proj"; };
struct o    { static constexpr std::string_view name = "o_proj"; };
struct gate { static constexpr std::string_view name = "gate_proj"; };
struct up   { static constexpr std::string_view name = "up_proj"; };
struct down { static constexpr std::string_view name = "down_proj"; };
}  // namespace proj

namespace group {
// Everything else a recipe can name.
struct attn_norm  { static constexpr std::string_view name = "input_layernorm"; };
struct mlp_norm   { static constexpr std::string_view name = "post_attention_layernorm"; };
struct embed      { static constexpr std::string_view name = "embed_tokens"; };
struct final_norm { static constexpr std::string_view name = "norm"; };
struct lm_head    { static constexpr std::string_view name = "lm_head"; };
struct vision     { static constexpr std::string_view name = "vision_tower"; };
struct projector  { static constexpr std::string_view name = "multi_modal_projector"; };
// The trainable range α of an expanded gating activation (xSiLU, xGELU, xATLU: the gate spans
// [-α, 1 + α]), one scalar per MLP: mlp.act_fn.alpha.
struct act_range  { static constexpr std::string_view name = "act_fn"; };
// The token router of a mixture-of-experts MLP: mlp.router.weight [experts, hidden].
struct router     { static constexpr std::string_view name = "router"; };
}  // namespace group

// The two branches of a decoder block, each adding its output to the residual stream.
namespace branch {
struct attention { static constexpr std::string_view name = "self_attn"; };
struct mlp       { static constexpr std::string_view name = "mlp"; };
}  // namespace branch

namespace group {
// A learned sigmoid-linear gate on one branch's output before it re-enters the residual
// stream (GateSkip; nn/residual_gate.hpp): self_attn_residual_gate.{weight,bias} and
// mlp_residual_gate.{weight,bias}. Only blocks built with the nn::gate_skip policy have them.
template <class Branch>
struct residual_gate;
template <>
struct residual_gate<branch::attention> {
  using branch = branch::attention;
  static constexpr std::string_view name = "self_attn_residual_gate";
};
template <>
struct residual_gate<branch::mlp> {
  using branch = branch::mlp;
  static constexpr std::string_view name = "mlp_residual_gate";
};
}  // namespace group

template <class Tag>
inline constexpr bool is_residual_gate_v = false;
template <class Branch>
inline constexpr bool is_residual_gate_v<group::residual_gate<Branch>> = true;

// A low-rank adapter (LoRA) on projection P: trains A [r, in] and B [out, r] beside a
// frozen (or not) W, so "which projections carry adapters" is a recipe choice too.
template <class P>
struct lora {
  using base = P;
  static constexpr std::string_view name = P::name;  // messages say lora<q_proj>
};

// A tensor of an earlier expert of a mixture-of-experts MLP (the original MLP included):
// P's tensor of an expert that only the newest expert may replace in training. It is not
// in `all_tags`, so no recipe can name it: earlier experts are frozen by construction.
template <class P>
struct past_expert {
  using base = P;
  static constexpr std::string_view name = P::name;
};

template <class Tag>
inline constexpr std::string_view tag_name = Tag::name;

}  // namespace skillgraft
