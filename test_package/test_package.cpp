// Train only the MLP Gate and Up projections of a small decoder: one forward and backward.
#include <skillgraft/nn/decoder_stack.hpp>
#include <skillgraft/nn/memory_report.hpp>
#include <skillgraft/policy/dispatch.hpp>
#include <iostream>
namespace sg = skillgraft;

int main() {
  sg::decoder_config c;  // defaults: hidden 512, 8 heads, 4 KV heads, MLP 1536, 4 layers
  c.hidden = 64; c.n_heads = 4; c.n_kv_heads = 2; c.head_dim = 16; c.intermediate = 128; c.n_layers = 2; c.max_seq = 32;
  sg::nn::trunk_weights<float> w(c);  // zero-initialised here; load real weights in practice
  for (auto& l : w.layers) { l.attn_norm.fill(1.f); l.mlp_norm.fill(1.f); }

  sg::nn::decoder_stack<float, decltype(sg::recipe::mlp_gate_up)> stack(c, sg::recipe::mlp_gate_up);
  sg::cpu::tensor<float> x({2, 8, 64}, sg::memory_use::workspace);  // [batch, seq, hidden]
  x.fill(0.5f);
  decltype(stack)::saved_t saved;  // only what the Gate/Up gradients need
  auto y = stack.forward(w, x, saved);
  auto grads = stack.make_grads(w);  // buffers for gate_proj and up_proj only
  stack.backward(w, saved, /*dL/dy=*/y, grads);

  std::cout << "gradient bytes " << sg::plan_memory(stack, {2, 8}).gradients << "\n";
  sg::with_recipe("sa_proj", [](auto) { std::cout << "recipe sa_proj dispatched\n"; });
  return grads.layer(0).gate_proj.weight.size() == 128u * 64u ? 0 : 1;
}
