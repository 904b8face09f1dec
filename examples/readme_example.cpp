// The README's example, compiled and run by the test suite so that it stays true.
#include <skillgraft/nn/decoder_stack.hpp>
#include <skillgraft/nn/memory_report.hpp>
#include <skillgraft/train/adamw.hpp>

#include <cstdio>
namespace sg = skillgraft;

int main() {
  sg::decoder_config cfg = sg::decoder_config::reference();      // hidden 512, 8/4 heads, MLP 1536, 4 layers
  sg::nn::trunk_weights<float> w(cfg);                            // load or initialise these
  for (auto& l : w.layers) { l.attn_norm.fill(1.f); l.mlp_norm.fill(1.f); }

  constexpr auto recipe = sg::recipe::mlp_gate_up;                // {gate, up}: Down stays frozen
  sg::nn::decoder_stack<float, decltype(recipe)> trunk(cfg, recipe);
  auto grads = trunk.make_grads(w);                               // buffers for gate_proj, up_proj only
  sg::train::adamw<float> opt(trunk, w, grads, {.lr = 1e-4});     // moments for those tensors only

  sg::cpu::tensor<float> x({4, 256, 512}, sg::memory_use::workspace);   // [batch, seq, hidden]
  decltype(trunk)::saved_t saved;                                 // keeps no input of Down
  auto y = trunk.forward(w, x, saved);
  trunk.backward(w, saved, /*dL/dy=*/y, grads);                   // no dW for q,k,v,o,down
  opt.step(trunk, w, grads);                                      // frozen tensors untouched, bit for bit

  auto plan = sg::plan_memory(trunk, {4, 256});                   // bytes, before allocating anything
  // grads.layer(0).down_proj;                                    // does not compile: Down is frozen

  std::printf("gradients %zu B, AdamW %zu B, saved activations %zu B\n", plan.gradients, plan.optimizer_state,
              plan.saved_activations);
  return plan.gradients == std::size_t(4 * 2 * 1536 * 512 * 4) ? 0 : 1;
}
