#pragma once
// Growing a mixture of experts on the MLP, one expert per task (the layer: nn/moe_mlp.hpp).
//
// add_expert copies an expert (by default the newest; the original MLP when the model is
// still dense) into a new last expert, which is the one a recipe's gate/up/down tags train,
// and widens the router by one row:
//
//   dense -> 2 experts   router = 0 [2, hidden]: every token gives both experts the same
//                        logit. With top-2 (renormalised) each weighs exactly 1/2, and since the
//                        copy computes what the original does, out = f/2 + f/2 = f: the model
//                        starts at the base model, bit for bit (the halves are exact). With
//                        top-1 renormalised the tie goes to the lower index (the original),
//                        again exactly the base model; top-1 softmax (Switch) starts at f/2.
//   E -> E + 1 experts   new row = the copied expert's row, so the copy starts with its
//                        source's logit on every token (ties go to the lower index, the source).
//                        Exact when every expert is chosen (top-k = E + 1) only if E = 1; in
//                        general the model starts near, not at, the previous one.
//
// Every layer grows together (the policy has one expert count, moe_options::experts). Build
// the next task's model with the new count; the earlier experts then have no gradient,
// optimizer state or saved activation beyond what the router and input gradients need.
#include <stdexcept>
#include <string>

#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/nn/moe_mlp.hpp"

namespace skillgraft::cl {

struct expert_options {
  int source = -1;  // expert to copy; -1: the newest (the original MLP when there is no mixture yet)
};

// The number of experts of every layer (1 for a dense MLP); throws if the layers disagree.
template <class T>
int expert_count(const nn::trunk_weights<T>& w) {
  int E = -1;
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    const int e = int(w.layers[i].mlp.expert_count());
    if (E >= 0 && e != E)
      throw std::invalid_argument("skillgraft: model.layers." + std::to_string(i) + ".mlp has " + std::to_string(e) +
                                  " experts, layer 0 has " + std::to_string(E));
    E = e;
  }
  return E < 0 ? 0 : E;
}

// Adds one expert to every layer's MLP (a copy of expert `o.source`) and one router row;
// returns the new number of experts, for nn::moe_options::experts.
template <class T>
int add_expert(nn::trunk_weights<T>& w, expert_options o = {}) {
  const int E = expert_count(w);
  const int src = o.source < 0 ? E - 1 : o.source;
  if (src >= E)
    throw std::invalid_argument("skillgraft: cannot copy expert " + std::to_string(src) + " of " + std::to_string(E));
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    auto& m = w.layers[i].mlp;
    for (const auto* l : {&m.gate_proj, &m.up_proj, &m.down_proj})
      if (l->has_lora())
        throw std::invalid_argument("skillgraft: model.layers." + std::to_string(i) +
                                    ".mlp has a LoRA adapter; merge or detach it before adding experts");
  }
  for (auto& l : w.layers) {
    auto& m = l.mlp;
    const std::size_t d = m.gate_proj.in_features();
    cpu::tensor<T> router({std::size_t(E) + 1, d}, memory_use::weights);  // zero: a dense MLP's two rows
    if (m.is_mixture()) {
      std::copy_n(m.router.data(), m.router.size(), router.data());
      std::copy_n(m.router.data() + std::size_t(src) * d, d, router.data() + std::size_t(E) * d);
    }
    m.experts.push_back(m.expert(std::size_t(src)).clone_expert(memory_use::weights));
    m.router = std::move(router);
  }
  return E + 1;
}

template <class T>
int add_expert(model::lm_weights<T>& w, expert_options o = {}) {
  return add_expert(w.trunk, o);
}

}  // namespace skillgraft::cl
