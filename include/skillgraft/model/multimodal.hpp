#pragma once
// A LLaVA-style multimodal model: vision encoder -> projector -> soft tokens that prefix
// the decoder LM's token embeddings.
//
//   forward   v = vision(image),  s = projector(v),  h = lm([s ; E[ids]])
//   backward  lm' gives d s only when the projector or the vision encoder trains;
//             projector' gives d v only when the vision encoder trains.
//
// One recipe covers all three parts: `group::vision` and `group::projector` choose the
// upstream halves, every other tag the language model (recipe::vision_projector trains
// the first two only, recipe::full everything). A frozen upstream keeps nothing and runs
// no backward, exactly like a frozen decoder block.
//
// The model has the interface of decoder_lm, so train::train_step drives it unchanged:
// forward(w, ids, saved, images) takes the image batch [batch, size, size, channels]
// where decoder_lm takes soft tokens (a micro-batch's `prefix` is the image batch), or
// nullptr for text-only rows. weights_t::head() is the LM head, head_grad(g) its gradient.
//
// Mlp is the language model's MLP policy, as for decoder_lm (a mixture of experts grows
// task by task on the LM); the vision encoder keeps its dense MLP whatever the policy.
//
// Backend picks where the three parts run: backend::cpu or backend::cuda (include
// backend/cuda/backend.hpp too; weights in device memory, multimodal_weights<T, backend::cuda>
// from model::to_backend, images and soft tokens device tensors). Every part is the same code.
#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/model/parameters.hpp"
#include "skillgraft/model/projector.hpp"
#include "skillgraft/model/vision_encoder.hpp"

namespace skillgraft::model {

struct multimodal_config {
  vision_config vision;
  projector_config projector;
  decoder_config text;

  void validate() const {
    vision.validate();
    text.validate();
    if (projector.in != vision.out_features())
      throw std::invalid_argument("skillgraft: multimodal_config: the projector takes " + std::to_string(projector.in) +
                                  " features, the vision encoder gives " + std::to_string(vision.out_features()));
    if (projector.out != text.hidden)
      throw std::invalid_argument("skillgraft: multimodal_config: the projector gives " + std::to_string(projector.out) +
                                  " features, the language model's hidden size is " + std::to_string(text.hidden));
    if (projector.intermediate <= 0) throw std::invalid_argument("skillgraft: multimodal_config: projector width must be positive");
    if (vision.tokens() >= text.max_seq)
      throw std::invalid_argument("skillgraft: multimodal_config: " + std::to_string(vision.tokens()) +
                                  " image tokens leave no room in the LM's " + std::to_string(text.max_seq) + " positions");
  }
};

template <class T, class Backend = backend::cpu>
struct multimodal_weights {
  using tensor_t = typename Backend::template tensor<T>;
  multimodal_config config;
  vision_weights<T, Backend> vision;
  projector_weights<T, Backend> projector;
  lm_weights<T, Backend> lm;

  multimodal_weights() = default;
  explicit multimodal_weights(const multimodal_config& c, memory_use use = memory_use::weights)
      : config((c.validate(), c)), vision(c.vision, use), projector(c.projector, use), lm(c.text, use) {}
  const tensor_t& head() const { return lm.head(); }
  tensor_t& head() { return lm.head(); }
  std::size_t elements() const {
    std::size_t n = vision.elements() + projector.elements() + lm.embed_tokens.size() + lm.trunk.elements() +
                    lm.norm.size() + lm.lm_head.size();
    return n;
  }
};

// The model's weights on another backend (upload: the vision tower, projector and language
// model, whole), and their values back into host weights of the same config (download).
template <class To, class T>
multimodal_weights<T, To> to_backend(const multimodal_weights<T>& w, memory_use use = memory_use::weights) {
  w.config.validate();
  multimodal_weights<T, To> out;
  out.config = w.config;
  out.vision = to_backend<To>(w.vision, use);
  out.projector = to_backend<To>(w.projector, use);
  out.lm = to_backend<To>(w.lm, use);
  return out;
}
template <class T, class From>
void download(const multimodal_weights<T, From>& w, multimodal_weights<T>& host) {
  nn::download(w.vision, host.vision);
  nn::download(w.projector, host.projector);
  model::download(w.lm, host.lm);
}

// f(name, tensor&) for every tensor of the model, in checkpoint order: vision tower,
// projector, then the language model under "language_model." (LLaVA's names).
template <class W, class F>
void for_each_multimodal_parameter(W& w, F&& f) {
  for_each_vision_parameter(w.vision, f);
  for_each_projector_parameter(w.projector, f);
  for_each_parameter(w.lm, [&](const std::string& name, auto& t, auto, int) { f("language_model." + name, t); });
}

// A fresh model, deterministic for a seed. Inside the blocks and for the token embeddings
// and head: N(0, stddev^2), the blocks' output projections (o_proj, down_proj) scaled by
// 1/sqrt(2 layers) as in GPT-2. The patch embedding and the projector, which carry the image
// from pixels to the LM, get N(0, 1/fan_in) (LeCun) instead: with stddev-sized weights the
// soft tokens barely depend on the image, and a language model trained from scratch learns
// to ignore them before the vision path can learn anything. Biases 0, norm weights 1.
template <class T>
void init_weights(multimodal_weights<T>& w, std::uint64_t seed, double stddev = 0.02) {
  std::mt19937_64 rng(seed);
  auto normal = [&](tensor<T>& t, double sd) {
    std::normal_distribution<double> nd(0.0, sd);
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = T(nd(rng));
  };
  auto blocks = [&](std::vector<nn::block_weights<T>>& layers) {
    const double out_sd = stddev / std::sqrt(2.0 * double(std::max<std::size_t>(1, layers.size())));
    for (auto& l : layers) {
      l.attn_norm.fill(T(1));
      l.mlp_norm.fill(T(1));
      for (auto* p : {&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj, &l.mlp.gate_proj, &l.mlp.up_proj}) {
        normal(p->weight, stddev);
        p->bias.set_zero();
      }
      normal(l.self_attn.o_proj.weight, out_sd);
      normal(l.mlp.down_proj.weight, out_sd);
    }
  };
  auto lecun = [&](nn::linear_weights<T>& l) {
    normal(l.weight, 1.0 / std::sqrt(double(l.in_features())));
    l.bias.set_zero();
  };
  lecun(w.vision.patch_embed);
  normal(w.vision.position_embedding, stddev);
  blocks(w.vision.layers);
  w.vision.post_norm.fill(T(1));
  lecun(w.projector.linear_1);
  lecun(w.projector.linear_2);
  normal(w.lm.embed_tokens, stddev);
  blocks(w.lm.trunk.layers);
  w.lm.norm.fill(T(1));
  if (!w.config.text.tie_word_embeddings) normal(w.lm.lm_head, stddev);
}

template <class T, class Recipe, class Backend = backend::cpu, class Mlp = nn::default_mlp>
class multimodal_lm {
 public:
  using value_type = T;
  using recipe_type = Recipe;
  using backend_type = Backend;
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = multimodal_weights<T, Backend>;
  static constexpr bool train_vision = trains_v<group::vision, Recipe>;
  static constexpr bool train_projector = trains_v<group::projector, Recipe>;
  using vision_t = vision_encoder<T, train_vision, Backend>;
  using projector_t = projector<T, train_projector, train_vision, Backend>;
  using lm_t = decoder_lm<T, Recipe, Backend, Mlp>;
  using mlp_policy = Mlp;
  using mlp_options_t = typename lm_t::mlp_options_t;
  static_assert(lm_t::upstream_trains == projector_t::active);

  struct grads_t {
    typename vision_t::grads_t vision;
    typename projector_t::grads_t projector;
    typename lm_t::grads_t lm;
  };
  struct saved_t {
    typename vision_t::saved_t vision;
    typename projector_t::saved_t projector;
    typename lm_t::saved_t lm;
    bool image = false;
  };

  multimodal_lm(const multimodal_config& c, layer_range range = {}, const mlp_options_t& mlp = {})
      : config_((c.validate(), c)), vision_(c.vision), lm_(c.text, range, mlp) {}
  template <class S>
  multimodal_lm(const multimodal_config& c, trainable_set<S> r, const mlp_options_t& mlp = {})
      : multimodal_lm(c, r.layers, mlp) {}

  const multimodal_config& config() const { return config_; }
  const mlp_options_t& mlp_options() const { return lm_.mlp_options(); }
  void set_mlp_options(const mlp_options_t& o) { lm_.set_mlp_options(o); }
  // f(layer, gate_record&) for every residual gate of a forward (gate_skip language models), so
  // that train::gate_sparsity_objective fine-tunes the gates of a multimodal model.
  template <class F>
  void for_each_gate_record(saved_t& s, F&& f) const {
    lm_.for_each_gate_record(s.lm, f);
  }
  const lm_t& lm() const { return lm_; }
  const vision_t& vision() const { return vision_; }
  const typename lm_t::stack_t& stack() const { return lm_.stack(); }
  int image_tokens() const { return config_.vision.tokens(); }

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    g.vision = vision_.make_grads(w.vision);
    g.projector = projector_t{}.make_grads(w.projector);
    g.lm = lm_.make_grads(w.lm);
    return g;
  }
  tensor_t* head_grad(grads_t& g) const { return lm_.head_grad(g.lm); }

  // Soft tokens of an image batch, [batch, patches, text hidden] (nothing kept for backward).
  tensor_t soft_tokens(const weights_t& w, const tensor_t& images) const {
    using frozen_vision = vision_encoder<T, false, Backend>;
    using frozen_projector = projector<T, false, false, Backend>;
    typename frozen_vision::saved_t vs;
    typename frozen_projector::saved_t ps;
    auto v = frozen_vision(config_.vision).forward(w.vision, images, vs);
    return frozen_projector{}.forward(w.projector, v, ps);
  }

  // Final hidden states [batch, patches + seq, hidden] (patches = 0 without images); with
  // `rows`, those rows alone, [1, rows, hidden] (decoder_lm::forward, nn/output_rows.hpp).
  tensor_t forward(const weights_t& w, const token_ids& ids, saved_t& s, const tensor_t* images = nullptr,
                   const nn::output_rows* rows = nullptr) const {
    s = saved_t{};
    s.image = images && !images->empty();
    if (!s.image) return lm_.forward(w.lm, ids, s.lm, nullptr, rows);
    if (images->dim(0) != ids.shape(0))
      throw std::invalid_argument("skillgraft: " + std::to_string(images->dim(0)) + " images for a batch of " +
                                  std::to_string(ids.shape(0)) + " token rows");
    auto v = vision_.forward(w.vision, *images, s.vision);
    auto soft = projector_t{}.forward(w.projector, v, s.projector);
    return lm_.forward(w.lm, ids, s.lm, &soft, rows);
  }

  // Adds every trainable tensor's gradient into g; the image gets none. `hook` hears of each
  // gradient once it is final (nn/gradient_hook.hpp): the language model's, the projector's,
  // the vision encoder's.
  template <class... Hook>
  void backward(const weights_t& w, const saved_t& s, const tensor_t& dh, grads_t& g, const Hook&... hook) const {
    auto dsoft = lm_.backward(w.lm, s.lm, dh, g.lm, hook...);
    if constexpr (projector_t::active) {
      if (!s.image) return;
      auto dv = projector_t{}.backward(w.projector, s.projector, dsoft, g.projector);
      nn::gradients_ready<projector_t>(w.projector, g.projector, hook...);
      if constexpr (train_vision) {
        vision_.backward(w.vision, s.vision, dv, g.vision);
        nn::gradients_ready<vision_t>(w.vision, g.vision, hook...);
      }
    }
  }

  // (name, weight, gradient) of every trainable tensor, checkpoint names.
  template <class F>
  void for_each_trainable(weights_t& w, grads_t& g, F&& f) const {
    vision_t::for_each_trainable(w.vision, g.vision, f);
    projector_t::for_each_trainable(w.projector, g.projector, f);
    lm_.for_each_trainable(w.lm, g.lm, [&](const std::string& n, tensor_t& p, tensor_t& dp) {
      f("language_model." + n, p, dp);
    });
  }

  std::size_t trainable_elements(const weights_t& w) const {
    std::size_t n = lm_.trainable_elements();
    if (train_vision) n += w.vision.elements();
    if (train_projector) n += w.projector.elements();
    return n;
  }

 private:
  multimodal_config config_;
  vision_t vision_;
  lm_t lm_;
};

}  // namespace skillgraft::model
