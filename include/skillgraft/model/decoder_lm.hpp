#pragma once
// Decoder language model: token embeddings, the block stack, final RMSNorm, LM head.
//
//   forward   x = [prefix ; E[ids]],  h = rmsnorm(stack(x); w_norm)     (logits = h W_head^T)
//   backward  dh (from the loss, which also forms dW_head) -> rmsnorm' -> stack'
//             dE[id] += dx[position of id]   (only if embed_tokens trains)
//             d prefix = dx[:, :P]           (only if something upstream of the soft tokens trains)
//
// The head is applied by the loss (train/cross_entropy.hpp) in chunks of positions,
// so a training step never holds [tokens, vocab] logits, let alone their gradient twice.
// With tie_word_embeddings the head *is* embed_tokens: a recipe must then train both
// tags or neither (checked when the model is built).
#include <optional>
#include <string>

#include "skillgraft/model/token_batch.hpp"
#include "skillgraft/nn/backend_transfer.hpp"
#include "skillgraft/nn/decoder_stack.hpp"
#include "skillgraft/nn/output_rows.hpp"

namespace skillgraft::model {

using cpu::shape_t;
using cpu::tensor;

template <class T, class Backend = backend::cpu>
struct lm_weights {
  using tensor_t = typename Backend::template tensor<T>;
  decoder_config config;
  tensor_t embed_tokens;                  // model.embed_tokens.weight [vocab, hidden]
  nn::trunk_weights<T, Backend> trunk;    // model.layers.*
  tensor_t norm;                          // model.norm.weight [hidden]
  tensor_t lm_head;                       // lm_head.weight [vocab, hidden]; empty when tied

  lm_weights() = default;
  explicit lm_weights(const decoder_config& c, memory_use use = memory_use::weights)
      : config(c),
        embed_tokens({std::size_t(c.vocab_size), std::size_t(c.hidden)}, use),
        trunk(c, use),
        norm({std::size_t(c.hidden)}, use),
        lm_head(c.tie_word_embeddings ? tensor_t() : tensor_t({std::size_t(c.vocab_size), std::size_t(c.hidden)}, use)) {}
  const tensor_t& head() const { return config.tie_word_embeddings ? embed_tokens : lm_head; }
  tensor_t& head() { return config.tie_word_embeddings ? embed_tokens : lm_head; }
  static std::size_t elements_for(const decoder_config& c) {
    const std::size_t vd = std::size_t(c.vocab_size) * std::size_t(c.hidden);
    return vd * (c.tie_word_embeddings ? 1 : 2) + std::size_t(c.hidden) +
           std::size_t(c.n_layers) * nn::block_weights<T>::elements_for(c);
  }
};

// The language model's weights on another backend (upload), and their values back (download).
template <class To, class T>
lm_weights<T, To> to_backend(const lm_weights<T>& w, memory_use use = memory_use::weights) {
  lm_weights<T, To> out;
  out.config = w.config;
  out.embed_tokens = To::upload(w.embed_tokens, use);
  out.trunk = nn::to_backend<To>(w.trunk, use);
  out.norm = To::upload(w.norm, use);
  if (!w.config.tie_word_embeddings) out.lm_head = To::upload(w.lm_head, use);
  return out;
}
template <class T, class From>
void download(const lm_weights<T, From>& w, lm_weights<T>& host) {
  auto one = [](const auto& a, auto& b, const char* name) {
    expect_shape(b, a.shape(), std::string("host ") + name + " for a download");
    From::download(a, b);
  };
  one(w.embed_tokens, host.embed_tokens, "model.embed_tokens.weight");
  nn::download(w.trunk, host.trunk);
  one(w.norm, host.norm, "model.norm.weight");
  if (!w.config.tie_word_embeddings) one(w.lm_head, host.lm_head, "lm_head.weight");
}

namespace members {
SKILLGRAFT_OPTIONAL_MEMBER(embed_tokens);
SKILLGRAFT_OPTIONAL_MEMBER(norm);
SKILLGRAFT_OPTIONAL_MEMBER(lm_head);
}  // namespace members

template <class Tag, class Recipe>
struct recipe_tag_outside_model {
  static constexpr bool ok = decltype(hana::contains(
      hana::concat(language_model_tags, hana::make_tuple(hana::type_c<group::vision>, hana::type_c<group::projector>)),
      hana::type_c<Tag>))::value;
  static_assert(ok, "skillgraft: the recipe names a tag (first template argument) that this model does not have");
};

// Mlp: the blocks' MLP policy (nn::swiglu<> by default; nn::swiglu<act::xsilu>, nn::moe<...>).
template <class T, class Recipe, class Backend = backend::cpu, class Mlp = nn::default_mlp>
class decoder_lm {
 public:
  using value_type = T;
  using recipe_type = Recipe;
  using backend_type = Backend;
  using mlp_policy = Mlp;
  using mlp_options_t = typename Mlp::options;
  using weights_t = lm_weights<T, Backend>;
  using tensor_t = typename Backend::template tensor<T>;
  static constexpr bool train_embed = trains_v<group::embed, Recipe>;
  static constexpr bool train_norm = trains_v<group::final_norm, Recipe>;
  static constexpr bool train_head = trains_v<group::lm_head, Recipe>;
  // Soft tokens come from a vision encoder and projector: if those train, d prefix is needed.
  static constexpr bool upstream_trains = trains_v<group::vision, Recipe> || trains_v<group::projector, Recipe>;
  static constexpr bool needs_input_grad = train_embed || upstream_trains;
  using stack_t = nn::decoder_stack<T, Recipe, needs_input_grad, Backend, Mlp>;
  static constexpr bool any_below_head = stack_t::any_trainable || needs_input_grad || train_norm;
  using final_norm_t = nn::rmsnorm<T, train_norm, stack_t::any_trainable || needs_input_grad, Backend>;

  struct grads_t : members::optional_embed_tokens<train_embed, tensor_t>,
                   members::optional_norm<train_norm, tensor_t>,
                   members::optional_lm_head<train_head, tensor_t> {
    typename stack_t::grads_t layers;
  };
  struct saved_t {
    typename stack_t::saved_t trunk;
    typename final_norm_t::saved_t norm;
    token_ids ids;        // for the embedding gradient
    int prefix = 0;       // soft tokens before the ids
    seq_shape shape{};
    std::optional<std::size_t> output_rows;  // forward returned these many rows (nn/output_rows.hpp)
    bool valid = false;
  };

  decoder_lm(const decoder_config& c, layer_range range = {}, const mlp_options_t& mlp = {})
      : config_(c), stack_(c, range, mlp) {
    static_assert(check_recipe());
    if (c.tie_word_embeddings && train_embed != train_head)
      throw std::invalid_argument(
          "skillgraft: the model ties lm_head to embed_tokens, so a recipe must train both or neither "
          "(this one trains only " + std::string(train_embed ? "embed_tokens" : "lm_head") + ")");
  }
  template <class S>
  decoder_lm(const decoder_config& c, trainable_set<S> r, const mlp_options_t& mlp = {})
      : decoder_lm(c, r.layers, mlp) {}

  const decoder_config& config() const { return config_; }
  const mlp_options_t& mlp_options() const { return stack_.mlp_options(); }
  void set_mlp_options(const mlp_options_t& o) { stack_.set_mlp_options(o); }
  // f(layer, gate_record&) for every residual gate of a forward (gate_skip models; none else).
  template <class F>
  void for_each_gate_record(saved_t& s, F&& f) const {
    stack_.for_each_gate_record(s.trunk, f);
  }
  const stack_t& stack() const { return stack_; }

  grads_t make_grads(const weights_t& w) const {
    check_weights(w);
    grads_t g;
    g.layers = stack_.make_grads(w.trunk);
    if constexpr (train_embed) g.embed_tokens = tensor_t(w.embed_tokens.shape(), memory_use::gradients);
    if constexpr (train_norm) g.norm = tensor_t(w.norm.shape(), memory_use::gradients);
    if constexpr (train_head)
      if (!config_.tie_word_embeddings) g.lm_head = tensor_t(w.lm_head.shape(), memory_use::gradients);
    return g;
  }

  // Where the loss adds dW_head: lm_head's gradient, embed_tokens' when tied, or nowhere.
  tensor_t* head_grad(grads_t& g) const {
    if constexpr (train_head && train_embed) {
      if (config_.tie_word_embeddings) return &g.embed_tokens;
    }
    if constexpr (train_head) return &g.lm_head;  // (untied: the constructor rejected tied + head only)
    return nullptr;
  }

  // Embeds [prefix ; ids] -> [batch, prefix + seq, hidden].
  tensor_t embed(const weights_t& w, const token_ids& ids, const tensor_t* prefix) const {
    check_token_ids(ids, config_.vocab_size, "token id");
    const std::size_t B = ids.shape(0), S = ids.shape(1), d = std::size_t(config_.hidden);
    std::size_t P = 0;
    if (prefix && !prefix->empty()) {
      if (prefix->rank() != 3 || prefix->dim(0) != B || prefix->dim(2) != d)
        throw std::invalid_argument("skillgraft: prefix embeddings have shape " + prefix->shape().str() +
                                    ", expected [" + std::to_string(B) + ", prefix, " + std::to_string(d) + "]");
      P = prefix->dim(1);
    }
    tensor_t x({B, P + S, d}, memory_use::workspace, uninitialized);  // every row copied in
    Backend::embed_rows(w.embed_tokens, ids.data(), B, S, P ? prefix : nullptr, x);
    return x;
  }

  // Final hidden states h (after the final norm), [batch, prefix + seq, hidden]; with `rows`
  // (rows of the flattened [batch * (prefix + seq)], e.g. those with a target), only those,
  // [1, rows, hidden], and the top block's MLP half runs on them alone (nn/output_rows.hpp).
  tensor_t forward(const weights_t& w, const token_ids& ids, saved_t& s, const tensor_t* prefix = nullptr,
                   const nn::output_rows* rows = nullptr) const {
    check_weights(w);
    s = saved_t{};
    auto x = embed(w, ids, prefix);
    s.prefix = int(x.dim(1) - ids.shape(1));
    s.shape = {int(x.dim(0)), int(x.dim(1))};
    if (rows) s.output_rows = rows->count();
    auto hs = stack_.forward(w.trunk, x, s.trunk, 0, rows);
    auto h = final_norm().forward(w.norm, hs, s.norm, "model.norm");
    if constexpr (train_embed) s.ids = ids;
    s.valid = true;
    return h;
  }

  // logits = h W_head^T, [batch, positions, vocab] (evaluation; training uses the chunked loss).
  tensor_t logits(const weights_t& w, const tensor_t& h) const {
    const int V = config_.vocab_size, d = config_.hidden;
    tensor_t z(nn::with_last(h.shape(), std::size_t(V)), memory_use::workspace, uninitialized);
    Backend::gemm("lm_head: z = h W^T", op::n, op::t, int(h.rows()), V, d, T(1), h.data(), d, w.head().data(), d, T(0),
                  z.data(), V);
    return z;
  }

  // dh: gradient of the loss with respect to forward's output. Returns d prefix when
  // something upstream of the soft tokens trains, else an empty tensor. `hook` hears of each
  // trainable gradient once it is final (nn/gradient_hook.hpp): the head's at once (the loss
  // formed it), the final norm's, the layers' from the top, the embeddings' last.
  template <class... Hook>
  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dh, grads_t& g, const Hook&... hook) const {
    if (!s.valid) throw std::logic_error("skillgraft: decoder_lm::backward called without a forward");
    const shape_t expected = s.output_rows ? shape_t{1, *s.output_rows, std::size_t(config_.hidden)}
                                           : shape_t{std::size_t(s.shape.batch), std::size_t(s.shape.seq),
                                                     std::size_t(config_.hidden)};
    if (!(dh.shape() == expected))
      throw std::invalid_argument("skillgraft: gradient of the hidden states has shape " + dh.shape().str() +
                                  ", expected " + expected.str() +
                                  (s.output_rows ? " (forward returned the output rows only)" : ""));
    if constexpr (train_head)
      if (!config_.tie_word_embeddings) nn::gradient_ready(g.lm_head, hook...);
    if constexpr (!any_below_head) {
      return {};
    } else {
      tensor_t* dnorm = nullptr;
      if constexpr (train_norm) dnorm = &g.norm;
      auto dhs = final_norm_t::backward_into(w.norm, s.norm, dh, dnorm);
      if constexpr (train_norm) nn::gradient_ready(g.norm, hook...);
      if constexpr (!(stack_t::any_trainable || needs_input_grad)) {
        return {};
      } else {
        auto dx = stack_.backward(w.trunk, s.trunk, dhs, g.layers, 0, hook...);
        if constexpr (!needs_input_grad) {
          return {};
        } else {
          const std::size_t B = dx.dim(0), P = std::size_t(s.prefix), d = dx.dim(2);
          if constexpr (train_embed) {  // dE[id] += dx[position of id], repeated ids in a fixed order
            Backend::embedding_backward(s.ids.data(), s.ids.shape(0), s.ids.shape(1), dx, g.embed_tokens);
            nn::gradient_ready(g.embed_tokens, hook...);
          }
          tensor_t dprefix;
          if (upstream_trains && P) {
            dprefix = tensor_t({B, P, d}, memory_use::workspace);
            Backend::leading_positions(dx, dprefix);
          }
          return dprefix;
        }
      }
    }
  }

  // (name, weight, gradient) of every trainable tensor, Hugging Face names. With tied
  // embeddings the shared tensor is visited once, as model.embed_tokens.weight.
  template <class F>
  void for_each_trainable(weights_t& w, grads_t& g, F&& f) const {
    if constexpr (train_embed) f(std::string("model.embed_tokens.weight"), w.embed_tokens, g.embed_tokens);
    stack_.for_each_trainable(w.trunk, g.layers, f);
    if constexpr (train_norm) f(std::string("model.norm.weight"), w.norm, g.norm);
    if constexpr (train_head)
      if (!config_.tie_word_embeddings) f(std::string("lm_head.weight"), w.lm_head, g.lm_head);
  }

  std::size_t trainable_elements() const {
    const std::size_t vd = std::size_t(config_.vocab_size) * std::size_t(config_.hidden);
    std::size_t n = stack_.trainable_elements();
    if (train_embed) n += vd;
    if (train_norm) n += std::size_t(config_.hidden);
    if (train_head && !config_.tie_word_embeddings) n += vd;
    return n;
  }

  void check_weights(const weights_t& w) const {
    const std::size_t V = std::size_t(config_.vocab_size), d = std::size_t(config_.hidden);
    cpu::expect_shape(w.embed_tokens, {V, d}, "model.embed_tokens.weight");
    cpu::expect_shape(w.norm, {d}, "model.norm.weight");
    if (!config_.tie_word_embeddings) cpu::expect_shape(w.lm_head, {V, d}, "lm_head.weight");
  }

 private:
  static constexpr bool check_recipe() {
    hana::for_each(Recipe::set, [](auto t) { (void)recipe_tag_outside_model<typename decltype(t)::type, Recipe>::ok; });
    return true;
  }
  final_norm_t final_norm() const { return {config_.rms_norm_eps}; }

  decoder_config config_;
  stack_t stack_;
};

}  // namespace skillgraft::model
