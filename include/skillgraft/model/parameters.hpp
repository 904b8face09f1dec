#pragma once
// Every tensor of a decoder LM under its Hugging Face name, in checkpoint order, with
// its recipe tag and layer, so callers can ask at compile time whether it trains.
//
// GateSkip blocks (nn/gate_skip.hpp) add self_attn_residual_gate.{weight,bias} after o_proj and
// mlp_residual_gate.{weight,bias} after the MLP (tags group::residual_gate<branch::...>).
// MLP policies add: mlp.act_fn.alpha (xsilu / xgelu range, tag group::act_range); for a
// mixture of experts mlp.router.weight (group::router) and mlp.experts.{e}.{gate,up,down}_proj.weight
// and mlp.experts.{e}.act_fn.alpha, where expert 0 is the original MLP and only the newest
// expert carries the trainable tags (earlier ones: past_expert<P>, never trained).
//
// The names come from the block's schema (nn/projection_schema.hpp, nn/block_schema.hpp);
// loaders, savers, continual-learning state and tests iterate this list instead of spelling
// names out.
#include <string>

#include "skillgraft/model/decoder_lm.hpp"

namespace skillgraft::model {

// f(name, tensor&, hana::type_c<Tag>, layer) for every parameter (layer = -1 outside the
// stack). The tied head is not visited separately: Hugging Face checkpoints of tied
// models omit lm_head.weight too.
template <class W, class F>
void for_each_parameter(W& w, F&& f) {
  f(std::string("model.embed_tokens.weight"), w.embed_tokens, hana::type_c<group::embed>, -1);
  for (std::size_t i = 0; i < w.trunk.layers.size(); ++i) {
    auto& l = w.trunk.layers[i];
    const int li = int(i);
    const std::string p = "model.layers." + std::to_string(i) + ".";
    auto lin = [&](const std::string& n, auto& lw, auto tag) {
      f(p + n + ".weight", lw.weight, tag, li);
      if (lw.has_bias()) f(p + n + ".bias", lw.bias, tag, li);
      if (lw.has_lora()) {  // PEFT's names, relative to the model
        using P = typename decltype(tag)::type;
        f(p + n + ".lora_A.weight", lw.lora.A, hana::type_c<lora<P>>, li);
        f(p + n + ".lora_B.weight", lw.lora.B, hana::type_c<lora<P>>, li);
      }
    };
    auto norm = [&](auto e) { f(p + e.path(), e.weight(l), hana::type_c<typename decltype(e)::tag>, li); };
    auto gate = [&](auto e) {  // GateSkip (nn/gate_skip.hpp): not Hugging Face names
      if (!e.weight(l).weight.empty()) lin(e.path(), e.weight(l), hana::type_c<typename decltype(e)::tag>);
    };
    norm(nn::schema::input_layernorm{});
    nn::attention_projections::for_each(
        [&](auto e) { lin(e.path(), e.in_block(l), hana::type_c<typename decltype(e)::tag>); });
    gate(nn::schema::self_attn_residual_gate{});
    norm(nn::schema::post_attention_layernorm{});
    using alpha = nn::schema::act_fn_alpha;
    if (!l.mlp.is_mixture()) {
      nn::mlp_projections::for_each(
          [&](auto e) { lin(e.path(), e.in_block(l), hana::type_c<typename decltype(e)::tag>); });
      if (!l.mlp.act_alpha.empty()) f(p + alpha::path(), alpha::weight(l.mlp), hana::type_c<alpha::tag>, li);
    } else {
      // A mixture (nn/moe_mlp.hpp): the router, then the experts; only the newest one can
      // train, the earlier ones carry past_expert<P> tags, which no recipe names.
      using router = nn::schema::router;
      f(p + router::path(), router::weight(l.mlp), hana::type_c<router::tag>, li);
      const std::size_t E = l.mlp.expert_count();
      for (std::size_t e = 0; e < E; ++e) {
        auto& x = l.mlp.expert(e);
        const std::string q = "mlp." + nn::schema::expert_prefix(e);
        const bool newest = e + 1 == E;
        nn::mlp_projections::for_each([&](auto m) {
          using P = typename decltype(m)::tag;
          if (newest) lin(q + m.name(), m.weight(x), hana::type_c<P>);
          else lin(q + m.name(), m.weight(x), hana::type_c<past_expert<P>>);
        });
        if (!x.act_alpha.empty()) {
          if (newest) f(p + q + alpha::name(), alpha::weight(x), hana::type_c<alpha::tag>, li);
          else f(p + q + alpha::name(), alpha::weight(x), hana::type_c<past_expert<alpha::tag>>, li);
        }
      }
    }
    gate(nn::schema::mlp_residual_gate{});
  }
  f(std::string("model.norm.weight"), w.norm, hana::type_c<group::final_norm>, -1);
  if (!w.config.tie_word_embeddings) f(std::string("lm_head.weight"), w.lm_head, hana::type_c<group::lm_head>, -1);
}

// f(name, tensor&) for the tensors `model`'s recipe trains (its layer range included),
// in the same order as model.for_each_trainable, without needing gradient buffers.
template <class Model, class W, class F>
void for_each_trainable_weight(const Model& model, W& w, F&& f) {
  for_each_parameter(w, [&](const std::string& name, auto& t, auto tag, int layer) {
    using Tag = typename decltype(tag)::type;
    if constexpr (trains_v<Tag, typename Model::recipe_type>)
      if (layer < 0 || model.stack().layer_trains(layer)) f(name, t);
  });
}

}  // namespace skillgraft::model
