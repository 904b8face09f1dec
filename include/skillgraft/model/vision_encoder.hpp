#pragma once
// A small vision transformer (ViT) built from the library's own blocks: the image is cut
// into patches, each patch is embedded linearly and given a learned position, and a few
// bidirectional, rotary-free decoder blocks mix them. The whole encoder is one recipe
// tag, `group::vision`: it trains entirely or not at all.
//
//   forward   p = patches(image)              [batch, P, patch * patch * channels]
//             x = p We^T + be + E_pos          [batch, P, hidden]
//             y = merge(rmsnorm(blocks(x); w_post))   [batch, P / m^2, m^2 * hidden]
//   backward  (only when the vision group trains)
//             dx = blocks'(rmsnorm'(unmerge(dy)));  dE_pos += sum_batch dx
//             dWe += dx^T p,  dbe += 1^T dx   (no gradient for the image itself)
//
// merge (m = vision_config::merge, Qwen2-VL's patch merger) concatenates the features of each
// m x m block of neighbouring patches into one output token, so small patches can see fine
// detail while the language model still gets few image tokens; m = 1 leaves them as they are.
//
// When the encoder is frozen it keeps nothing for backward and runs no backward: the
// soft tokens it makes are inputs of the projector, not functions of any trainable tensor.
#include <cmath>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "skillgraft/nn/backend_transfer.hpp"
#include "skillgraft/nn/decoder_block.hpp"
#include "skillgraft/policy/recipes.hpp"

namespace skillgraft::model {

using cpu::shape_t;
using cpu::tensor;

struct vision_config {
  int image_size = 32;  // square images, image_size x image_size pixels
  int patch_size = 8;   // square patches; image_size must be a multiple
  int channels = 3;     // RGB
  int merge = 1;        // m x m neighbouring patches become one output token (grid must be a multiple)
  // The blocks: hidden size, heads, MLP width and depth. causal and rotary are forced off.
  decoder_config blocks = [] {
    decoder_config c;
    c.hidden = 64;
    c.n_heads = 4;
    c.n_kv_heads = 4;
    c.head_dim = 16;
    c.intermediate = 128;
    c.n_layers = 2;
    c.max_seq = 16;
    c.causal = false;
    c.rotary = false;
    return c;
  }();

  int grid() const { return image_size / patch_size; }
  int patches() const { return grid() * grid(); }
  int patch_dim() const { return patch_size * patch_size * channels; }
  int hidden() const { return blocks.hidden; }
  // What the encoder hands on: tokens() tokens of out_features() features each.
  int tokens() const { return patches() / (merge * merge); }
  int out_features() const { return hidden() * merge * merge; }

  void validate() const {
    auto fail = [](const std::string& m) { throw std::invalid_argument("skillgraft: vision_config: " + m); };
    if (image_size <= 0 || patch_size <= 0 || channels <= 0) fail("sizes must be positive");
    if (image_size % patch_size != 0)
      fail("image_size (" + std::to_string(image_size) + ") is not a multiple of patch_size (" +
           std::to_string(patch_size) + ")");
    if (merge <= 0 || grid() % merge != 0)
      fail("merge (" + std::to_string(merge) + ") must be positive and divide the patch grid (" +
           std::to_string(grid()) + ")");
    if (blocks.causal || blocks.rotary) fail("vision blocks must be bidirectional and rotary-free (causal = rotary = false)");
    blocks.validate();
  }
};

template <class T, class Backend = backend::cpu>
struct vision_weights {
  using tensor_t = typename Backend::template tensor<T>;
  vision_config config;
  nn::linear_weights<T, Backend> patch_embed;         // vision_tower.patch_embed.{weight [hidden, patch_dim], bias}
  tensor_t position_embedding;                        // vision_tower.position_embedding [patches, hidden]
  std::vector<nn::block_weights<T, Backend>> layers;  // vision_tower.layers.<i>.*
  tensor_t post_norm;                                 // vision_tower.post_layernorm.weight [hidden]

  vision_weights() = default;
  explicit vision_weights(const vision_config& c, memory_use use = memory_use::weights)
      : config((c.validate(), c)),
        patch_embed(std::size_t(c.hidden()), std::size_t(c.patch_dim()), true, use),
        position_embedding({std::size_t(c.patches()), std::size_t(c.hidden())}, use),
        post_norm({std::size_t(c.hidden())}, use) {
    layers.reserve(std::size_t(c.blocks.n_layers));
    for (int i = 0; i < c.blocks.n_layers; ++i) layers.emplace_back(c.blocks, use);
  }
  std::size_t elements() const {
    std::size_t n = patch_embed.elements() + position_embedding.size() + post_norm.size();
    for (const auto& l : layers) n += l.elements();
    return n;
  }
  // Every tensor with its checkpoint name, paired with the same tensor of `other`.
  template <class Other, class F>
  void for_each_tensor(Other& other, F&& f) const {
    patch_embed.for_each_tensor(other.patch_embed, [&](const std::string& n, auto& a, auto& b) {
      f("vision_tower.patch_embed." + n, a, b);
    });
    f(std::string("vision_tower.position_embedding"), position_embedding, other.position_embedding);
    for (std::size_t i = 0; i < layers.size() && i < other.layers.size(); ++i)
      layers[i].for_each_tensor(other.layers[i], [&](const std::string& n, auto& a, auto& b) {
        f("vision_tower.layers." + std::to_string(i) + "." + n, a, b);
      });
    f(std::string("vision_tower.post_layernorm.weight"), post_norm, other.post_norm);
  }
};

template <class To, class T>
vision_weights<T, To> to_backend(const vision_weights<T>& w, memory_use use = memory_use::weights) {
  vision_weights<T, To> out;
  out.config = w.config;
  out.patch_embed = nn::to_backend<To>(w.patch_embed, use);
  out.position_embedding = To::upload(w.position_embedding, use);
  for (const auto& l : w.layers) out.layers.push_back(nn::to_backend<To>(l, use));
  out.post_norm = To::upload(w.post_norm, use);
  return out;
}

// f(name, tensor&) for every tensor of the encoder, in checkpoint order.
template <class W, class F>
void for_each_vision_parameter(W& w, F&& f) {
  f(std::string("vision_tower.patch_embed.weight"), w.patch_embed.weight);
  f(std::string("vision_tower.patch_embed.bias"), w.patch_embed.bias);
  f(std::string("vision_tower.position_embedding"), w.position_embedding);
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    auto& l = w.layers[i];
    const std::string p = "vision_tower.layers." + std::to_string(i) + ".";
    auto projections = [&](auto list) {
      list.for_each([&](auto e) { f(p + e.path() + ".weight", e.in_block(l).weight); });
    };
    auto norm = [&](auto e) { f(p + e.path(), e.weight(l)); };
    norm(nn::schema::input_layernorm{});
    projections(nn::attention_projections{});
    norm(nn::schema::post_attention_layernorm{});
    projections(nn::mlp_projections{});
  }
  f(std::string("vision_tower.post_layernorm.weight"), w.post_norm);
}

// Cuts images [batch, size, size, channels] (row-major pixels, channels last) into
// [batch, patches, patch * patch * channels]: patches in row-major grid order, each
// patch's pixels row-major with channels innermost. A permutation of rows of patch * channels
// pixels (Backend::gather_rows), its map computed here.
template <class Tensor>
Tensor patchify(const Tensor& images, const vision_config& c, memory_use use = memory_use::workspace) {
  using backend_t = typename backend_of<Tensor>::type;
  const std::size_t S = std::size_t(c.image_size), C = std::size_t(c.channels);
  if (images.rank() != 4 || images.dim(1) != S || images.dim(2) != S || images.dim(3) != C)
    throw std::invalid_argument("skillgraft: images have shape " + images.shape().str() + ", expected [batch, " +
                                std::to_string(S) + ", " + std::to_string(S) + ", " + std::to_string(C) + "]");
  const std::size_t B = images.dim(0), ps = std::size_t(c.patch_size), G = std::size_t(c.grid()),
                    P = std::size_t(c.patches()), pd = std::size_t(c.patch_dim());
  std::vector<std::int64_t> from;  // out row (b, patch, pixel row dy) <- image row segment (b, gy ps + dy, gx)
  from.reserve(B * P * ps);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t gy = 0; gy < G; ++gy)
      for (std::size_t gx = 0; gx < G; ++gx)
        for (std::size_t dy = 0; dy < ps; ++dy) from.push_back(std::int64_t((b * S + gy * ps + dy) * G + gx));
  Tensor out({B, P, pd}, use);
  backend_t::gather_rows(images, ps * C, from, out);
  return out;
}

// The patch merger: [batch, G*G, d] -> [batch, (G/m)^2, m*m*d]. Output token (Y, X) of the
// merged grid is, in order, patches (m Y + i, m X + j) for i, j = 0..m-1 row-major: the same
// order as Qwen2-VL's merger. unmerge_patches is its inverse (and its backward, a permutation).
template <class Tensor>
Tensor merge_patches(const Tensor& y, const vision_config& c, bool inverse = false,
                     memory_use use = memory_use::workspace) {
  using backend_t = typename backend_of<Tensor>::type;
  const std::size_t m = std::size_t(c.merge), G = std::size_t(c.grid()), Gm = G / m, d = std::size_t(c.hidden()),
                    B = y.dim(0);
  const shape_t expected = inverse ? shape_t{B, Gm * Gm, m * m * d} : shape_t{B, G * G, d};
  if (!(y.shape() == expected))
    throw std::invalid_argument("skillgraft: patch merger: input of shape " + y.shape().str() + ", expected " +
                                expected.str());
  std::vector<std::int64_t> from(B * G * G);  // rows of d features
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t gy = 0; gy < G; ++gy)
      for (std::size_t gx = 0; gx < G; ++gx) {
        const std::size_t single = b * G * G + gy * G + gx;
        const std::size_t token = b * Gm * Gm + (gy / m) * Gm + gx / m, slot = (gy % m) * m + gx % m;
        const std::size_t merged = token * m * m + slot;
        if (inverse) from[single] = std::int64_t(merged);
        else from[merged] = std::int64_t(single);
      }
  Tensor out(inverse ? shape_t{B, G * G, d} : shape_t{B, Gm * Gm, m * m * d}, use);
  backend_t::gather_rows(y, d, from, out);
  return out;
}
template <class Tensor>
Tensor unmerge_patches(const Tensor& dy, const vision_config& c, memory_use use = memory_use::workspace) {
  return merge_patches(dy, c, true, use);
}

// The recipe of the encoder's blocks: every block tensor when the vision group trains.
inline constexpr auto vision_block_recipe = trainable<proj::q, proj::k, proj::v, proj::o, proj::gate, proj::up,
                                                      proj::down, group::attn_norm, group::mlp_norm>;

template <class T, class Backend = backend::cpu>
struct vision_grads {
  nn::linear_weights<T, Backend> patch_embed;
  typename Backend::template tensor<T> position_embedding;
  std::vector<typename nn::decoder_block<T, std::remove_cv_t<decltype(vision_block_recipe)>, true, Backend>::grads_t>
      layers;
  typename Backend::template tensor<T> post_norm;
};
struct no_grads {};

template <class T, bool Train, class Backend = backend::cpu>
class vision_encoder {
 public:
  using value_type = T;
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = vision_weights<T, Backend>;
  static constexpr bool trains = Train;
  static constexpr bool needs_input_grad = false;  // images are data, never trained
  using block_recipe_t = std::conditional_t<Train, std::remove_cv_t<decltype(vision_block_recipe)>,
                                            std::remove_cv_t<decltype(recipe::frozen)>>;
  // With the encoder training, every block passes its input gradient down to the patch embedding.
  using block_t = nn::decoder_block<T, block_recipe_t, Train, Backend>;
  using norm_t = nn::rmsnorm<T, Train, Train, Backend>;
  using grads_t = std::conditional_t<Train, vision_grads<T, Backend>, no_grads>;
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
    check_weights(w);
    s = saved_t{};
    auto p = patchify(images, config_, Train ? memory_use::saved_activations : memory_use::workspace);
    const std::size_t B = p.dim(0), P = p.dim(1), d = std::size_t(config_.hidden());
    tensor_t x({B, P, d}, memory_use::workspace);
    nn::linear_forward(w.patch_embed, p, x, "vision_tower.patch_embed");
    x.reshape({B, P * d});  // x[b] += E_pos: the table is a bias over the batch's rows
    Backend::add_bias(x, w.position_embedding);
    x.reshape({B, P, d});
    for (std::size_t l = 0; l < w.layers.size(); ++l) x = block().forward(w.layers[l], x, s.blocks.emplace_back());
    auto y = norm().forward(w.post_norm, x, s.norm, "vision_tower.post_layernorm");
    if constexpr (Train) s.x = std::move(p);
    if (config_.merge > 1) return merge_patches(y, config_);
    return y;
  }

  // Adds the encoder's weight gradients into g (when it trains); returns an empty tensor.
  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dy, grads_t& g) const {
    if constexpr (Train) {
      const std::size_t batch = dy.rank() > 0 ? dy.dim(0) : 0;
      cpu::expect_shape(dy, {batch, std::size_t(config_.tokens()), std::size_t(config_.out_features())},
                        "the vision encoder's output gradient");
      tensor_t unmerged;  // only with a merger: the gradient back in patch order
      const tensor_t& dn = config_.merge > 1 ? (unmerged = unmerge_patches(dy, config_)) : dy;
      auto d = norm_t::backward_into(w.post_norm, s.norm, dn, &g.post_norm);
      for (std::size_t l = w.layers.size(); l-- > 0;) d = block().backward(w.layers[l], s.blocks[l], d, g.layers[l]);
      const shape_t ds = d.shape();
      d.reshape({ds[0], ds[1] * ds[2]});  // dE_pos += sum over the batch: the bias gradient of the rows
      Backend::add_column_sums(d, g.position_embedding);
      d.reshape(ds);
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
      f(std::string("vision_tower.patch_embed.weight"), w.patch_embed.weight, g.patch_embed.weight);
      f(std::string("vision_tower.patch_embed.bias"), w.patch_embed.bias, g.patch_embed.bias);
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
    cpu::expect_shape(w.patch_embed.weight, {d, std::size_t(config_.patch_dim())}, "vision_tower.patch_embed.weight");
    cpu::expect_shape(w.patch_embed.bias, {d}, "vision_tower.patch_embed.bias");
    cpu::expect_shape(w.position_embedding, {std::size_t(config_.patches()), d}, "vision_tower.position_embedding");
    cpu::expect_shape(w.post_norm, {d}, "vision_tower.post_layernorm.weight");
    if (int(w.layers.size()) != config_.blocks.n_layers)
      throw std::invalid_argument("skillgraft: the vision tower has " + std::to_string(w.layers.size()) +
                                  " layers, the config says " + std::to_string(config_.blocks.n_layers));
    for (std::size_t i = 0; i < w.layers.size(); ++i)
      nn::check_block_weights(w.layers[i], config_.blocks, "vision_tower.layers." + std::to_string(i) + ".");
  }

 private:
  block_t block() const {
    block_t b;
    b.config = config_.blocks;
    return b;
  }
  norm_t norm() const { return {config_.blocks.rms_norm_eps}; }

  vision_config config_;
};

}  // namespace skillgraft::model
