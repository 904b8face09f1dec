#pragma once
// The vision encoder on the CUDA backend: vision_encoder<T, Train, backend::cuda>.
//
//   forward   p = patches(image)              [batch, P, patch * patch * channels]
//             x = p We^T + be + E_pos          [batch, P, hidden]
//             y = merge(rmsnorm(blocks(x); w_post))   [batch, P / m^2, m^2 * hidden]
//   backward  (only when the vision group trains)
//             dx = blocks'(rmsnorm'(unmerge(dy)));  dE_pos += sum_batch dx
//             dWe += dx^T p,  dbe += 1^T dx   (no gradient for the image itself)
//
// The same encoder as model/vision_encoder.hpp, on device tensors: the blocks are the CUDA
// decoder blocks (bidirectional, rotary-free: no rotary table), patch cutting and the patch
// merger are index permutations, one device thread per element. Images arrive as a device
// tensor [batch, size, size, channels].
#include <string>
#include <type_traits>
#include <vector>

#include "skillgraft/model/vision_encoder.hpp"
#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/nn/backend_transfer.hpp"

namespace skillgraft::model {

namespace cuda {

template <class T>
struct vision_weights {
  vision_config config;
  nn::linear_weights<T, backend::cuda> patch_embed;              // vision_tower.patch_embed
  skillgraft::cuda::tensor<T> position_embedding;       // vision_tower.position_embedding [patches, hidden]
  std::vector<nn::block_weights<T, backend::cuda>> layers;       // vision_tower.layers.<i>.*
  skillgraft::cuda::tensor<T> post_norm;                // vision_tower.post_layernorm.weight [hidden]

  std::size_t elements() const {
    std::size_t n = patch_embed.elements() + position_embedding.size() + post_norm.size();
    for (const auto& l : layers) n += l.elements();
    return n;
  }
  static vision_weights upload(const model::vision_weights<T>& h, memory_use use = memory_use::weights) {
    vision_weights d;
    d.config = h.config;
    d.patch_embed = nn::to_backend<backend::cuda>(h.patch_embed, use);
    d.position_embedding = skillgraft::cuda::tensor<T>::from_host(h.position_embedding, use);
    for (std::size_t i = 0; i < h.layers.size(); ++i)
      d.layers.push_back(nn::to_backend<backend::cuda>(h.layers[i], use));
    d.post_norm = skillgraft::cuda::tensor<T>::from_host(h.post_norm, use);
    return d;
  }
  void download(model::vision_weights<T>& h) const {
    nn::download(patch_embed, h.patch_embed, "vision_tower.patch_embed.");
    position_embedding.copy_to(h.position_embedding);
    for (std::size_t i = 0; i < layers.size(); ++i)
      nn::download(layers[i], h.layers[i], "vision_tower.layers." + std::to_string(i) + ".");
    post_norm.copy_to(h.post_norm);
  }
};

namespace kernels {
using skillgraft::cuda::index_t;

template <class T>
struct patchify {  // out[b, p, k] = pixel k of patch p (row-major in the patch, channels innermost)
  T* out;
  const T* images;
  index_t S, C, ps, G, P, pd;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t k = e % pd, p = (e / pd) % P, b = e / (pd * P);
    const index_t gy = p / G, gx = p % G, dy = k / (ps * C), r = k % (ps * C);
    out[e] = images[((b * S + gy * ps + dy) * S + gx * ps) * C + r];
  }
};
template <class T>
struct add_rows {  // x[b, i] += pos[i], i over one image's P * d values
  T* x;
  const T* pos;
  index_t Pd;
  SKILLGRAFT_HD void operator()(index_t e) const { x[e] += pos[e % Pd]; }
};
template <class T>
struct over_batch {  // element (i, b) of the batch sum: d[b, i]
  const T* d;
  index_t Pd;
  SKILLGRAFT_HD T operator()(index_t i, index_t b) const { return d[b * Pd + i]; }
};
// The patch merger as a permutation. e walks the patch-order tensor [batch, G*G, d]; its
// place in the merged tensor [batch, (G/m)^2, m*m*d] is token (gy/m, gx/m), slot (gy%m, gx%m).
template <class T>
struct merge {
  T* out;
  const T* in;
  index_t G, m, d;
  bool inverse;  // false: patch order -> merged; true: merged -> patch order
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t k = e % d, patch = e / d, b = patch / (G * G), gy = (patch % (G * G)) / G, gx = patch % G;
    const index_t Gm = G / m, token = b * Gm * Gm + (gy / m) * Gm + gx / m, slot = (gy % m) * m + gx % m;
    const index_t merged = (token * m * m + slot) * d + k;
    if (inverse) out[e] = in[merged];
    else out[merged] = in[e];
  }
};
}  // namespace kernels

template <class T>
struct vision_grads {
  nn::linear_weights<T, backend::cuda> patch_embed;
  skillgraft::cuda::tensor<T> position_embedding;
  std::vector<nn::block_grads<T, std::remove_cv_t<decltype(vision_block_recipe)>, nn::default_mlp, backend::cuda>> layers;
  skillgraft::cuda::tensor<T> post_norm;
};

}  // namespace cuda

template <class T, bool Train>
class vision_encoder<T, Train, backend::cuda> {
  using host_encoder = vision_encoder<T, Train, backend::cpu>;  // the same plan

 public:
  using value_type = T;
  using tensor_t = skillgraft::cuda::tensor<T>;
  using weights_t = cuda::vision_weights<T>;
  static constexpr bool trains = Train;
  static constexpr bool needs_input_grad = false;  // images are data, never trained
  using block_recipe_t = typename host_encoder::block_recipe_t;
  using block_t = nn::decoder_block<T, block_recipe_t, Train, backend::cuda>;
  using norm_t = nn::rmsnorm<T, Train, Train, backend::cuda>;
  using grads_t = std::conditional_t<Train, cuda::vision_grads<T>, no_grads>;
  struct saved_t : nn::members::optional_x<Train, tensor_t> {  // the patches, for dWe
    std::vector<typename block_t::saved_t> blocks;
    typename norm_t::saved_t norm;
  };

  explicit vision_encoder(const vision_config& c) : config_((c.validate(), c)) {}
  const vision_config& config() const { return config_; }

  grads_t make_grads(const weights_t& w) const {
    check_weights(w);
    grads_t g;
    if constexpr (Train) {
      g.patch_embed = w.patch_embed.like(memory_use::gradients);
      g.position_embedding = tensor_t(w.position_embedding.shape(), memory_use::gradients);
      for (const auto& l : w.layers) g.layers.push_back(block().make_grads(l));
      g.post_norm = tensor_t(w.post_norm.shape(), memory_use::gradients);
    }
    return g;
  }

  // images [batch, size, size, channels] -> [batch, tokens, out_features]
  tensor_t forward(const weights_t& w, const tensor_t& images, saved_t& s) const {
    using skillgraft::cuda::index_t;
    check_weights(w);
    s = saved_t{};
    const std::size_t S = std::size_t(config_.image_size), C = std::size_t(config_.channels);
    if (images.rank() != 4 || images.dim(1) != S || images.dim(2) != S || images.dim(3) != C)
      throw std::invalid_argument("skillgraft: images have shape " + images.shape().str() + ", expected [batch, " +
                                  std::to_string(S) + ", " + std::to_string(S) + ", " + std::to_string(C) + "]");
    const std::size_t B = images.dim(0), P = std::size_t(config_.patches()), pd = std::size_t(config_.patch_dim()),
                      d = std::size_t(config_.hidden());
    tensor_t p({B, P, pd}, Train ? memory_use::saved_activations : memory_use::workspace);
    skillgraft::cuda::for_each_index(
        index_t(p.size()), cuda::kernels::patchify<T>{p.data(), images.data(), index_t(S), index_t(C),
                                                      index_t(config_.patch_size), index_t(config_.grid()), index_t(P),
                                                      index_t(pd)});
    tensor_t x({B, P, d}, memory_use::workspace);
    nn::linear_forward(w.patch_embed, p, x, nullptr, "vision_tower.patch_embed");
    skillgraft::cuda::for_each_index(index_t(x.size()),
                                     cuda::kernels::add_rows<T>{x.data(), w.position_embedding.data(), index_t(P * d)});
    for (std::size_t l = 0; l < w.layers.size(); ++l) x = block().forward(w.layers[l], x, s.blocks.emplace_back());
    auto y = norm().forward(w.post_norm, x, s.norm, "vision_tower.post_layernorm");
    if constexpr (Train) s.x = std::move(p);
    if (config_.merge > 1) return permute(y, false);
    return y;
  }

  // Adds the encoder's weight gradients into g (when it trains); returns an empty tensor.
  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dy, grads_t& g) const {
    if constexpr (Train) {
      using skillgraft::cuda::index_t;
      const std::size_t batch = dy.rank() > 0 ? dy.dim(0) : 0;
      skillgraft::cuda::expect_shape(dy, {batch, std::size_t(config_.tokens()), std::size_t(config_.out_features())},
                                     "the vision encoder's output gradient");
      tensor_t unmerged;  // only with a merger: the gradient back in patch order
      const tensor_t& dn = config_.merge > 1 ? (unmerged = permute(dy, true)) : dy;
      auto d = norm_t::backward_into(w.post_norm, s.norm, dn, &g.post_norm);
      for (std::size_t l = w.layers.size(); l-- > 0;) d = block().backward(w.layers[l], s.blocks[l], d, g.layers[l]);
      const index_t B = index_t(d.dim(0)), Pd = index_t(d.dim(1) * d.dim(2));
      tensor_t sums({std::size_t(Pd)}, memory_use::workspace);
      skillgraft::cuda::segmented_sum(Pd, B, cuda::kernels::over_batch<T>{d.data(), Pd}, sums.data());
      skillgraft::cuda::add_into(g.position_embedding.data(), sums.data(), Pd);
      nn::linear_backward_weight(s.x, d, g.patch_embed, "vision_tower.patch_embed: dW");
    } else {
      (void)w, (void)s, (void)dy, (void)g;
    }
    return {};
  }

  // (name, weight, gradient) of every trainable tensor: all of them or none.
  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    if constexpr (Train) {
      nn::visit_linear("vision_tower.patch_embed", w.patch_embed, g.patch_embed, f);
      f(std::string("vision_tower.position_embedding"), w.position_embedding, g.position_embedding);
      for (std::size_t i = 0; i < w.layers.size(); ++i)
        block_t::for_each_trainable(w.layers[i], g.layers[i], [&](const std::string& n, tensor_t& p, tensor_t& dp) {
          f("vision_tower.layers." + std::to_string(i) + "." + n, p, dp);
        });
      f(std::string("vision_tower.post_layernorm.weight"), w.post_norm, g.post_norm);
    } else {
      (void)w, (void)g, (void)f;
    }
  }

  void check_weights(const weights_t& w) const {
    const auto d = std::size_t(config_.hidden());
    skillgraft::cuda::expect_shape(w.patch_embed.weight, {d, std::size_t(config_.patch_dim())}, "vision_tower.patch_embed.weight");
    skillgraft::cuda::expect_shape(w.patch_embed.bias, {d}, "vision_tower.patch_embed.bias");
    skillgraft::cuda::expect_shape(w.position_embedding, {std::size_t(config_.patches()), d}, "vision_tower.position_embedding");
    skillgraft::cuda::expect_shape(w.post_norm, {d}, "vision_tower.post_layernorm.weight");
    if (int(w.layers.size()) != config_.blocks.n_layers)
      throw std::invalid_argument("skillgraft: the vision tower has " + std::to_string(w.layers.size()) +
                                  " layers, the config says " + std::to_string(config_.blocks.n_layers));
    for (std::size_t i = 0; i < w.layers.size(); ++i)
      nn::check_block_weights(w.layers[i], config_.blocks, "vision_tower.layers." + std::to_string(i) + ".");
  }

 private:
  block_t block() const {
    block_t b;  // no rotary table: the vision blocks are rotary-free (vision_config::validate)
    b.config = config_.blocks;
    return b;
  }
  norm_t norm() const { return {config_.blocks.rms_norm_eps}; }

  // The patch merger (inverse = false) or its inverse, the backward's permutation.
  tensor_t permute(const tensor_t& in, bool inverse) const {
    using skillgraft::cuda::index_t;
    const std::size_t m = std::size_t(config_.merge), G = std::size_t(config_.grid()), d = std::size_t(config_.hidden()),
                      B = in.dim(0), Gm = G / m;
    tensor_t out(inverse ? cpu::shape_t{B, G * G, d} : cpu::shape_t{B, Gm * Gm, m * m * d}, memory_use::workspace);
    skillgraft::cuda::for_each_index(index_t(in.size()), cuda::kernels::merge<T>{out.data(), in.data(), index_t(G),
                                                                                index_t(m), index_t(d), inverse});
    return out;
  }

  vision_config config_;
};

}  // namespace skillgraft::model
