#pragma once
// The named recipes of "How to Teach Large Multimodal Models New Skills".
#include "skillgraft/policy/trainable.hpp"

namespace skillgraft::recipe {
// Self-attention projections: learns nearly as much as the whole LLM, forgets little.
inline constexpr auto sa_proj = trainable<proj::q, proj::k, proj::v, proj::o>;
// The whole MLP.
inline constexpr auto mlp = trainable<proj::gate, proj::up, proj::down>;
// MLP Gate and Up with Down frozen: the paper's best learning/forgetting trade-off.
inline constexpr auto mlp_gate_up = trainable<proj::gate, proj::up>;
// MLP Down only.
inline constexpr auto mlp_down = trainable<proj::down>;
// Every language-model parameter.
inline constexpr auto llm =
    trainable<proj::q, proj::k, proj::v, proj::o, proj::gate, proj::up, proj::down, group::attn_norm,
              group::mlp_norm, group::embed, group::final_norm, group::lm_head>;
// Multimodal models: the vision encoder and the projector, the language model frozen.
inline constexpr auto vision_projector = trainable<group::vision, group::projector>;
// Everything a multimodal model has: vision encoder, projector and the whole language model.
inline constexpr auto full = llm | vision_projector;
// GateSkip: the residual gates of both branches (blocks built with nn::gate_skip only).
inline constexpr auto residual_gates =
    trainable<group::residual_gate<branch::attention>, group::residual_gate<branch::mlp>>;
// Nothing: evaluation, probing, a teacher.
inline constexpr auto frozen = trainable<>;
}  // namespace skillgraft::recipe

