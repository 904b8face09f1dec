#pragma once
// Weights of the CPU backend as weights of another backend (upload), and back (download):
// the same tensors, visited by their Hugging Face names (each weights type's for_each_tensor),
// so a shape mismatch on the way back names the tensor.
//
//   auto dev = nn::to_backend<backend::cuda>(host_trunk);   // trunk, block, MLP or projection
//   nn::download(dev, host_trunk);
#include <string>
#include <vector>

#include "skillgraft/nn/decoder_stack.hpp"

namespace skillgraft::nn {

template <class To, class T>
linear_weights<T, To> to_backend(const linear_weights<T>& w, memory_use use = memory_use::weights) {
  linear_weights<T, To> out;
  out.lora_scale = w.lora_scale;
  w.for_each_tensor(out, [&](const std::string&, const auto& a, auto& b) { b = To::upload(a, use); });
  return out;
}

template <class To, class T>
mlp_weights<T, To> to_backend(const mlp_weights<T>& w, memory_use use = memory_use::weights) {
  mlp_weights<T, To> out;
  mlp_projections::for_each([&](auto p) { p.weight(out) = to_backend<To>(p.weight(w), use); });
  if (!w.act_alpha.empty()) out.act_alpha = To::upload(w.act_alpha, use);
  if (!w.router.empty()) out.router = To::upload(w.router, use);
  for (const auto& e : w.experts) out.experts.push_back(to_backend<To>(e, use));
  return out;
}

template <class To, class T>
block_weights<T, To> to_backend(const block_weights<T>& w, memory_use use = memory_use::weights) {
  block_weights<T, To> out;
  out.attn_norm = To::upload(w.attn_norm, use);
  attention_projections::for_each([&](auto p) { p.in_block(out) = to_backend<To>(p.in_block(w), use); });
  out.mlp_norm = To::upload(w.mlp_norm, use);
  out.mlp = to_backend<To>(w.mlp, use);
  if (!w.attn_gate.weight.empty()) out.attn_gate = to_backend<To>(w.attn_gate, use);  // GateSkip gates
  if (!w.mlp_gate.weight.empty()) out.mlp_gate = to_backend<To>(w.mlp_gate, use);
  return out;
}

template <class To, class T>
trunk_weights<T, To> to_backend(const trunk_weights<T>& w, memory_use use = memory_use::weights) {
  trunk_weights<T, To> out;
  out.config = w.config;
  out.layers.reserve(w.layers.size());
  for (const auto& l : w.layers) out.layers.push_back(to_backend<To>(l, use));
  return out;
}

// Values of backend weights into host weights of the same structure and shapes.
template <template <class, class> class W, class T, class From>
void download(const W<T, From>& w, W<T, backend::cpu>& host, const std::string& prefix = "") {
  w.for_each_tensor(host, [&](const std::string& name, const auto& a, auto& b) {
    if (!(a.shape() == b.shape()))
      throw std::invalid_argument("skillgraft: cannot download " + prefix + name + " of shape " + a.shape().str() +
                                  " into host weights of shape " + b.shape().str());
    From::download(a, b);
  });
}
template <class T, class From>
void download(const trunk_weights<T, From>& w, trunk_weights<T>& host) {
  if (host.layers.size() != w.layers.size())
    throw std::invalid_argument("skillgraft: cannot download " + std::to_string(w.layers.size()) +
                                " layers into host weights with " + std::to_string(host.layers.size()));
  for (std::size_t i = 0; i < w.layers.size(); ++i)
    download(w.layers[i], host.layers[i], "model.layers." + std::to_string(i) + ".");
}

}  // namespace skillgraft::nn
