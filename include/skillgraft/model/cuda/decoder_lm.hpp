#pragma once
// The decoder language model on the CUDA backend: decoder_lm<T, Recipe, backend::cuda>.
//
//   forward   x = [prefix ; E[ids]],  h = rmsnorm(stack(x); w_norm)     (logits = h W_head^T)
//   backward  dh (from the loss, which also forms dW_head) -> rmsnorm' -> stack'
//             dE[id] += dx[position of id]   (only if embed_tokens trains)
//             d prefix = dx[:, :P]           (only if something upstream of the soft tokens trains)
//
// Same recipe rules as the CPU model (model/decoder_lm.hpp); weights in device memory
// (`cuda::lm_weights`, uploaded from model::lm_weights). Token ids stay host data (xtensor)
// and are uploaded per batch. The embedding gradient is a deterministic scatter-add: the
// positions of each token id are added in (batch, position) order, as on the CPU, one
// device thread per (id, feature), so repeated ids never race.
#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/nn/cuda/decoder_stack.hpp"

namespace skillgraft::model {

namespace cuda {

template <class T>
using tensor = skillgraft::cuda::tensor<T>;
using skillgraft::cuda::index_t;

template <class T>
struct lm_weights {
  decoder_config config;
  tensor<T> embed_tokens;            // model.embed_tokens.weight [vocab, hidden]
  nn::cuda::trunk_weights<T> trunk;  // model.layers.*
  tensor<T> norm;                    // model.norm.weight [hidden]
  tensor<T> lm_head;                 // lm_head.weight [vocab, hidden]; empty when tied

  const tensor<T>& head() const { return config.tie_word_embeddings ? embed_tokens : lm_head; }
  tensor<T>& head() { return config.tie_word_embeddings ? embed_tokens : lm_head; }

  static lm_weights upload(const model::lm_weights<T>& h, memory_use use = memory_use::weights) {
    lm_weights d;
    d.config = h.config;
    d.embed_tokens = tensor<T>::from_host(h.embed_tokens, use);
    d.trunk = nn::cuda::trunk_weights<T>::upload(h.trunk, use);
    d.norm = tensor<T>::from_host(h.norm, use);
    if (!h.config.tie_word_embeddings) d.lm_head = tensor<T>::from_host(h.lm_head, use);
    return d;
  }
  void download(model::lm_weights<T>& h) const {
    embed_tokens.copy_to(h.embed_tokens);
    trunk.download(h.trunk);
    norm.copy_to(h.norm);
    if (!config.tie_word_embeddings) lm_head.copy_to(h.lm_head);
  }
};

namespace kernels {
template <class T>
struct embed_rows {  // x[b, t] = t < P ? prefix[b, t] : E[ids[b, t - P]]
  T* x;
  const T* E;
  const T* prefix;
  const std::int64_t* ids;
  index_t P, S, d;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t j = e % d, bt = e / d, t = bt % (P + S), b = bt / (P + S);
    x[e] = t < P ? prefix[(b * P + t) * d + j] : E[ids[b * S + t - P] * d + j];
  }
};
template <class T>
struct embed_grad {  // dE[id_u, j] += dx[pos, j] for the positions of id_u, in order
  T* dE;
  const T* dx;
  const std::int64_t* ids;      // distinct ids
  const std::int64_t* offsets;  // positions of ids[u]: pos[offsets[u] .. offsets[u + 1])
  const std::int64_t* pos;      // rows of dx
  index_t d;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t u = e / d, j = e % d;
    T acc = dE[ids[u] * d + j];
    for (std::int64_t k = offsets[u]; k < offsets[u + 1]; ++k) acc += dx[pos[k] * d + j];
    dE[ids[u] * d + j] = acc;
  }
};
template <class T>
struct copy_prefix {  // dprefix[b, t] = dx[b, t], t < P
  T* dprefix;
  const T* dx;
  index_t P, Tn, d;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t j = e % d, bt = e / d, t = bt % P, b = bt / P;
    dprefix[e] = dx[(b * Tn + t) * d + j];
  }
};
}  // namespace kernels

}  // namespace cuda

template <class T, class Recipe>
class decoder_lm<T, Recipe, backend::cuda> {
  using host_model = decoder_lm<T, Recipe, backend::cpu>;  // the same recipe rules

 public:
  using value_type = T;
  using recipe_type = Recipe;
  using backend_type = backend::cuda;
  using mlp_policy = nn::default_mlp;  // the dense SiLU MLP only, on this backend
  using mlp_options_t = typename mlp_policy::options;
  using weights_t = cuda::lm_weights<T>;
  static constexpr bool train_embed = host_model::train_embed;
  static constexpr bool train_norm = host_model::train_norm;
  static constexpr bool train_head = host_model::train_head;
  static constexpr bool upstream_trains = host_model::upstream_trains;
  static constexpr bool needs_input_grad = host_model::needs_input_grad;
  using stack_t = nn::decoder_stack<T, Recipe, needs_input_grad, backend::cuda>;
  static constexpr bool any_below_head = stack_t::any_trainable || needs_input_grad || train_norm;
  using final_norm_t = nn::cuda::rmsnorm<T, train_norm, stack_t::any_trainable || needs_input_grad>;

  struct grads_t : members::optional_embed_tokens<train_embed, cuda::tensor<T>>,
                   members::optional_norm<train_norm, cuda::tensor<T>>,
                   members::optional_lm_head<train_head, cuda::tensor<T>> {
    typename stack_t::grads_t layers;
  };
  struct saved_t {
    typename stack_t::saved_t trunk;
    typename final_norm_t::saved_t norm;
    token_ids ids;  // for the embedding gradient (host)
    int prefix = 0;
    seq_shape shape{};
    bool valid = false;
  };

  decoder_lm(const decoder_config& c, layer_range range = {}, const mlp_options_t& = {}) : config_(c), stack_(c, range) {
    static_assert(check_recipe());
    if (c.tie_word_embeddings && train_embed != train_head)
      throw std::invalid_argument(
          "skillgraft: the model ties lm_head to embed_tokens, so a recipe must train both or neither "
          "(this one trains only " + std::string(train_embed ? "embed_tokens" : "lm_head") + ")");
  }
  template <class S>
  decoder_lm(const decoder_config& c, trainable_set<S> r, const mlp_options_t& mlp = {}) : decoder_lm(c, r.layers, mlp) {}

  const decoder_config& config() const { return config_; }
  const mlp_options_t& mlp_options() const { return mlp_options_; }
  const stack_t& stack() const { return stack_; }

  grads_t make_grads(const weights_t& w) const {
    check_weights(w);
    grads_t g;
    g.layers = stack_.make_grads(w.trunk);
    if constexpr (train_embed) g.embed_tokens = cuda::tensor<T>(w.embed_tokens.shape(), memory_use::gradients);
    if constexpr (train_norm) g.norm = cuda::tensor<T>(w.norm.shape(), memory_use::gradients);
    if constexpr (train_head)
      if (!config_.tie_word_embeddings) g.lm_head = cuda::tensor<T>(w.lm_head.shape(), memory_use::gradients);
    return g;
  }

  // Where the loss adds dW_head: lm_head's gradient, embed_tokens' when tied, or nowhere.
  cuda::tensor<T>* head_grad(grads_t& g) const {
    if constexpr (train_head && train_embed) {
      if (config_.tie_word_embeddings) return &g.embed_tokens;
    }
    if constexpr (train_head) return &g.lm_head;
    return nullptr;
  }

  // Embeds [prefix ; ids] -> [batch, prefix + seq, hidden] in device memory.
  cuda::tensor<T> embed(const weights_t& w, const token_ids& ids, const cuda::tensor<T>* prefix) const {
    check_token_ids(ids, config_.vocab_size, "token id");
    const std::size_t B = ids.shape(0), S = ids.shape(1), d = std::size_t(config_.hidden);
    std::size_t P = 0;
    if (prefix && !prefix->empty()) {
      if (prefix->rank() != 3 || prefix->dim(0) != B || prefix->dim(2) != d)
        throw std::invalid_argument("skillgraft: prefix embeddings have shape " + prefix->shape().str() + ", expected [" +
                                    std::to_string(B) + ", prefix, " + std::to_string(d) + "]");
      P = prefix->dim(1);
    }
    cuda::tensor<T> x({B, P + S, d}, memory_use::workspace);
    const auto dev_ids = upload_ids(ids);
    skillgraft::cuda::for_each_index(cuda::index_t(x.size()),
                                     cuda::kernels::embed_rows<T>{x.data(), w.embed_tokens.data(), P ? prefix->data() : nullptr,
                                                                  dev_ids.data(), cuda::index_t(P), cuda::index_t(S), cuda::index_t(d)});
    return x;
  }

  // Final hidden states h (after the final norm), [batch, prefix + seq, hidden].
  cuda::tensor<T> forward(const weights_t& w, const token_ids& ids, saved_t& s,
                          const cuda::tensor<T>* prefix = nullptr) const {
    check_weights(w);
    s = saved_t{};
    auto x = embed(w, ids, prefix);
    s.prefix = int(x.dim(1) - ids.shape(1));
    s.shape = {int(x.dim(0)), int(x.dim(1))};
    auto hs = stack_.forward(w.trunk, x, s.trunk);
    auto h = final_norm().forward(w.norm, hs, s.norm, "model.norm");
    if constexpr (train_embed) s.ids = ids;
    s.valid = true;
    return h;
  }

  // logits = h W_head^T, [batch, positions, vocab] (evaluation; training uses the chunked loss).
  cuda::tensor<T> logits(const weights_t& w, const cuda::tensor<T>& h) const {
    cuda::tensor<T> z(nn::cuda::with_last(h.shape(), std::size_t(config_.vocab_size)), memory_use::workspace);
    skillgraft::cuda::gemm("lm_head: z = h W^T", skillgraft::cuda::op::n, skillgraft::cuda::op::t, int(h.rows()),
                           config_.vocab_size, config_.hidden, T(1), h.data(), config_.hidden, w.head().data(),
                           config_.hidden, T(0), z.data(), config_.vocab_size);
    return z;
  }

  // dh: gradient of the loss with respect to forward's output. Returns d prefix when
  // something upstream of the soft tokens trains, else an empty tensor.
  cuda::tensor<T> backward(const weights_t& w, const saved_t& s, const cuda::tensor<T>& dh, grads_t& g) const {
    if (!s.valid) throw std::logic_error("skillgraft: decoder_lm::backward called without a forward");
    if (!(dh.shape() == cpu::shape_t{std::size_t(s.shape.batch), std::size_t(s.shape.seq), std::size_t(config_.hidden)}))
      throw std::invalid_argument("skillgraft: gradient of the hidden states has shape " + dh.shape().str() +
                                  ", expected [" + std::to_string(s.shape.batch) + ", " + std::to_string(s.shape.seq) +
                                  ", " + std::to_string(config_.hidden) + "]");
    if constexpr (!any_below_head) {
      return {};
    } else {
      cuda::tensor<T>* dnorm = nullptr;
      if constexpr (train_norm) dnorm = &g.norm;
      auto dhs = final_norm_t::backward_into(w.norm, s.norm, dh, dnorm);
      if constexpr (!(stack_t::any_trainable || needs_input_grad)) {
        return {};
      } else {
        auto dx = stack_.backward(w.trunk, s.trunk, dhs, g.layers);
        if constexpr (!needs_input_grad) {
          return {};
        } else {
          const std::size_t B = dx.dim(0), P = std::size_t(s.prefix), Tn = dx.dim(1), d = dx.dim(2);
          if constexpr (train_embed) add_embedding_gradient(s.ids, dx, P, g.embed_tokens);
          cuda::tensor<T> dprefix;
          if (upstream_trains && P) {
            dprefix = cuda::tensor<T>({B, P, d}, memory_use::workspace);
            skillgraft::cuda::for_each_index(cuda::index_t(dprefix.size()),
                                             cuda::kernels::copy_prefix<T>{dprefix.data(), dx.data(), cuda::index_t(P),
                                                                           cuda::index_t(Tn), cuda::index_t(d)});
          }
          return dprefix;
        }
      }
    }
  }

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
    skillgraft::cuda::expect_shape(w.embed_tokens, {V, d}, "model.embed_tokens.weight");
    skillgraft::cuda::expect_shape(w.norm, {d}, "model.norm.weight");
    if (!config_.tie_word_embeddings) skillgraft::cuda::expect_shape(w.lm_head, {V, d}, "lm_head.weight");
  }

 private:
  static constexpr bool check_recipe() {
    hana::for_each(Recipe::set, [](auto t) { (void)recipe_tag_outside_model<typename decltype(t)::type, Recipe>::ok; });
    return true;
  }
  final_norm_t final_norm() const { return {config_.rms_norm_eps}; }

  static cuda::tensor<std::int64_t> upload_ids(const token_ids& ids) {
    cpu::tensor<std::int64_t> h({ids.size()}, memory_use::workspace);
    std::copy(ids.begin(), ids.end(), h.data());
    return cuda::tensor<std::int64_t>::from_host(h, memory_use::workspace);
  }

  // dE[id] += dx[b, P + t] for every token, in (b, t) order per id.
  static void add_embedding_gradient(const token_ids& ids, const cuda::tensor<T>& dx, std::size_t P, cuda::tensor<T>& dE) {
    const std::size_t B = ids.shape(0), S = ids.shape(1), Tn = dx.dim(1), d = dx.dim(2), n = B * S;
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), std::size_t(0));
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return ids.flat(a) < ids.flat(b); });
    std::vector<std::int64_t> distinct, offsets, pos;
    for (std::size_t k = 0; k < n; ++k) {
      const std::size_t flat = order[k];
      if (distinct.empty() || distinct.back() != ids.flat(flat)) {
        distinct.push_back(ids.flat(flat));
        offsets.push_back(std::int64_t(k));
      }
      pos.push_back(std::int64_t((flat / S) * Tn + P + flat % S));
    }
    offsets.push_back(std::int64_t(n));
    auto up = [](const std::vector<std::int64_t>& v) {
      cpu::tensor<std::int64_t> h({v.size()}, memory_use::workspace);
      std::copy(v.begin(), v.end(), h.data());
      return cuda::tensor<std::int64_t>::from_host(h, memory_use::workspace);
    };
    const auto d_ids = up(distinct), d_offsets = up(offsets), d_pos = up(pos);
    skillgraft::cuda::for_each_index(cuda::index_t(distinct.size() * d),
                                     cuda::kernels::embed_grad<T>{dE.data(), dx.data(), d_ids.data(), d_offsets.data(),
                                                                  d_pos.data(), cuda::index_t(d)});
  }

  decoder_config config_;
  stack_t stack_;
  [[no_unique_address]] mlp_options_t mlp_options_{};
};

}  // namespace skillgraft::model
