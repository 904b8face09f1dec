#pragma once
// Grouped-query self-attention (LLaMA / Qwen2), causal with rotary embeddings in a decoder.
// With config.causal = false every position sees every other (no mask), and with
// config.rotary = false q and k are not rotated: the vision encoder's (ViT) attention.
//
//   forward   q = h Wq^T (+bq), k = h Wk^T (+bk), v = h Wv^T (+bv); q, k rotated
//             per head: P = softmax(q k^T / sqrt(hd) + causal mask), a = P v
//             (query head j reads kv head j / (n_heads / n_kv_heads))
//             out = a Wo^T
//   backward  dWo += dout^T a;  da = dout Wo
//             dP = da v^T;  dv += P^T da;  dS = P * (dP - rowsum(dP * P))
//             dq = dS k / sqrt(hd);  dk += dS^T q / sqrt(hd);  un-rotate dq, dk
//             dWq += dq^T h (likewise k, v);  dh = dq Wq + dk Wk + dv Wv
//
// Under a recipe only the needed branches exist: with only V trainable, q and k
// are not kept and dq, dk are never formed; with nothing trainable and no input
// gradient wanted, forward keeps nothing at all. The projections are nn/linear.hpp's
// (adapters included); the core (P and a, and their backward) is Backend::attention_forward /
// attention_backward.
//
// With output rows (nn/output_rows.hpp: the top block of a step whose loss reads some rows),
// q and the output are formed for those rows alone: q = h[rows] Wq^T spread into zeros,
// out = a[rows] Wo^T ([1, rows, hidden]); k, v and the core still see every row. Backward
// spreads da over the rows, and dWq, dA_q and dh's Q term read dq[rows] only (dq is exactly
// zero elsewhere).
#include <cmath>
#include <string>

#include "skillgraft/nn/config.hpp"
#include "skillgraft/nn/linear.hpp"
#include "skillgraft/nn/optional_member.hpp"
#include "skillgraft/nn/output_rows.hpp"
#include "skillgraft/nn/projection_schema.hpp"
#include "skillgraft/nn/rope.hpp"
#include "skillgraft/policy/trainable.hpp"

namespace skillgraft::nn {

template <class T, class Backend = backend::cpu>
struct attention_weights {
  linear_weights<T, Backend> q_proj, k_proj, v_proj, o_proj;

  attention_weights() = default;
  attention_weights(const decoder_config& c, memory_use use) {
    attention_projections::for_each(
        [&](auto p) { decltype(p)::weight(*this) = linear_weights<T, Backend>(p.out(c), p.in(c), p.bias(c), use); });
  }
  std::size_t elements() const {
    return q_proj.elements() + k_proj.elements() + v_proj.elements() + o_proj.elements();
  }
  // Every tensor with its Hugging Face name relative to the attention ("q_proj.weight"),
  // in the schema's order (nn/projection_schema.hpp).
  template <class Other, class F>
  void for_each_tensor(Other& other, F&& f) const {
    attention_projections::for_each([&](auto p) {
      using P = decltype(p);
      P::weight(*this).for_each_tensor(P::weight(other),
                                       [&](const std::string& n, auto& a, auto& b) { f(P::name() + "." + n, a, b); });
    });
  }
};

// Which parts of attention's backward run, from a recipe and whether dh is wanted.
template <class Recipe, bool NeedsInputGrad>
struct attention_plan {
  static constexpr bool train_q = trains_v<proj::q, Recipe>;
  static constexpr bool train_k = trains_v<proj::k, Recipe>;
  static constexpr bool train_v = trains_v<proj::v, Recipe>;
  static constexpr bool train_o = trains_v<proj::o, Recipe>;
  static constexpr bool adapt_q = trains_v<lora<proj::q>, Recipe>;
  static constexpr bool adapt_k = trains_v<lora<proj::k>, Recipe>;
  static constexpr bool adapt_v = trains_v<lora<proj::v>, Recipe>;
  static constexpr bool adapt_o = trains_v<lora<proj::o>, Recipe>;
  static constexpr bool need_dq = train_q || adapt_q || NeedsInputGrad;
  static constexpr bool need_dk = train_k || adapt_k || NeedsInputGrad;
  static constexpr bool need_dv = train_v || adapt_v || NeedsInputGrad;
  static constexpr bool need_da = need_dq || need_dk || need_dv;  // gradient of the input of Wo
  static constexpr bool active = need_da || train_o || adapt_o;    // any backward at all
  // What forward keeps, and why.
  static constexpr bool save_h = train_q || train_k || train_v || adapt_q || adapt_k || adapt_v;  // dW = dy^T h, dA
  static constexpr bool save_q = need_dk;                        // dk = dS^T q
  static constexpr bool save_k = need_dq;                        // dq = dS k
  static constexpr bool save_v = need_dq || need_dk;             // dP = da v^T
  static constexpr bool save_probs = need_da;                    // dv = P^T da, dS from P
  static constexpr bool save_a = train_o || adapt_o;             // dWo = dout^T a, dA_o
};

// Gradients of the trainable projections only; the same type whether or not dh is wanted.
template <class T, class Recipe, class Backend = backend::cpu>
struct attention_grads
    : members::optional_q_proj<trains_v<proj::q, Recipe>, linear_weights<T, Backend>>,
      members::optional_k_proj<trains_v<proj::k, Recipe>, linear_weights<T, Backend>>,
      members::optional_v_proj<trains_v<proj::v, Recipe>, linear_weights<T, Backend>>,
      members::optional_o_proj<trains_v<proj::o, Recipe>, linear_weights<T, Backend>>,
      members::optional_q_lora<trains_v<lora<proj::q>, Recipe>, lora_factors<T, Backend>>,
      members::optional_k_lora<trains_v<lora<proj::k>, Recipe>, lora_factors<T, Backend>>,
      members::optional_v_lora<trains_v<lora<proj::v>, Recipe>, lora_factors<T, Backend>>,
      members::optional_o_lora<trains_v<lora<proj::o>, Recipe>, lora_factors<T, Backend>> {};

template <class T, class Recipe, bool NeedsInputGrad, class Backend = backend::cpu>
struct self_attention {
  using value_type = T;
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = attention_weights<T, Backend>;
  using plan = attention_plan<Recipe, NeedsInputGrad>;
  static constexpr bool needs_input_grad = NeedsInputGrad;

  struct saved_t : members::optional_h<plan::save_h, tensor_t>,
                   members::optional_q<plan::save_q, tensor_t>,
                   members::optional_k<plan::save_k, tensor_t>,
                   members::optional_v<plan::save_v, tensor_t>,
                   members::optional_probs<plan::save_probs, tensor_t>,
                   members::optional_attn<plan::save_a, tensor_t>,
                   members::optional_u_q<plan::adapt_q, tensor_t>,
                   members::optional_u_k<plan::adapt_k, tensor_t>,
                   members::optional_u_v<plan::adapt_v, tensor_t>,
                   members::optional_u_o<plan::adapt_o, tensor_t> {};
  using grads_t = attention_grads<T, Recipe, Backend>;

  decoder_config config;
  const rope_table<T, Backend>* table = nullptr;
  int first_pos = 0;

  grads_t make_grads(const weights_t& w) const {
    grads_t g;
    attention_projections::for_each([&](auto p) { make_projection_grads<Recipe>(p, w, g); });
    return g;
  }

  // rows: when given, the output is those rows alone, [1, rows, hidden] (see the top).
  tensor_t forward(const weights_t& w, const tensor_t& h, saved_t& s, const output_rows* rows = nullptr) const {
    const auto& c = config;
    if (h.rank() != 3 || h.dim(2) != std::size_t(c.hidden))
      throw std::invalid_argument("skillgraft: attention input has shape " + h.shape().str() +
                                  ", expected [batch, seq, " + std::to_string(c.hidden) + "]");
    const int B = int(h.dim(0)), S = int(h.dim(1)), H = c.n_heads, KV = c.n_kv_heads;
    if (c.rotary) table->check_positions(first_pos, S);
    if (rows) rows->check_against(h, "the attention input");
    auto kept = [](bool keep) { return keep ? memory_use::saved_activations : memory_use::workspace; };
    const auto tokens = [&](int features) { return shape_t{std::size_t(B), std::size_t(S), std::size_t(features)}; };
    const auto out_rows = [&](int features) {  // the shape of what Q and O form: every row, or the rows
      return rows ? shape_t{1, rows->count(), std::size_t(features)} : tokens(features);
    };

    // Every output below is written whole by its GEMM (beta = 0) or the attention core before
    // it is read; dk and dv in backward are sums over query blocks and start at zero, and so
    // does a q formed for some rows only.
    tensor_t q = rows ? tensor_t(tokens(c.q_dim()), kept(plan::save_q))
                      : tensor_t(tokens(c.q_dim()), kept(plan::save_q), uninitialized);
    tensor_t k(tokens(c.kv_dim()), kept(plan::save_k), uninitialized);
    tensor_t v(tokens(c.kv_dim()), kept(plan::save_v), uninitialized);
    auto adapter_input = [&](bool adapt, const linear_weights<T, Backend>& p, const char* name, shape_t shape) {
      if (!adapt) return tensor_t();
      require_lora(p, name);
      return tensor_t(with_last(shape, p.lora.rank()), memory_use::saved_activations, uninitialized);
    };
    tensor_t uq = adapter_input(plan::adapt_q, w.q_proj, "q_proj", out_rows(1)),
             uk = adapter_input(plan::adapt_k, w.k_proj, "k_proj", tokens(1)),
             uv = adapter_input(plan::adapt_v, w.v_proj, "v_proj", tokens(1)),
             uo = adapter_input(plan::adapt_o, w.o_proj, "o_proj", out_rows(1));
    if (rows) {
      tensor_t qr(out_rows(c.q_dim()), memory_use::workspace, uninitialized);
      linear_forward(w.q_proj, select_rows<Backend>(h, *rows), qr, plan::adapt_q ? &uq : nullptr,
                     "q_proj: q[rows] = h[rows] Wq^T");
      Backend::scatter_rows(qr, std::size_t(c.q_dim()), rows->index, q);
    } else {
      linear_forward(w.q_proj, h, q, plan::adapt_q ? &uq : nullptr, "q_proj: q = h Wq^T");
    }
    linear_forward(w.k_proj, h, k, plan::adapt_k ? &uk : nullptr, "k_proj: k = h Wk^T");
    linear_forward(w.v_proj, h, v, plan::adapt_v ? &uv : nullptr, "v_proj: v = h Wv^T");
    if (c.rotary) {
      rope_apply(*table, q.data(), B, S, H, first_pos, false);
      rope_apply(*table, k.data(), B, S, KV, first_pos, false);
    }

    tensor_t a(tokens(c.q_dim()), kept(plan::save_a), uninitialized);
    tensor_t probs;
    if constexpr (plan::save_probs)
      probs = tensor_t({std::size_t(B), std::size_t(H), std::size_t(S), std::size_t(S)}, memory_use::saved_activations,
                       uninitialized);
    Backend::attention_forward(dims(B, S), scale(), q, k, v, a, plan::save_probs ? &probs : nullptr);
    if (rows) a = select_rows<Backend>(a, *rows, kept(plan::save_a));  // what O reads, and dWo with it
    tensor_t out(out_rows(c.hidden), memory_use::workspace, uninitialized);
    linear_forward(w.o_proj, a, out, plan::adapt_o ? &uo : nullptr, "o_proj: out = a Wo^T");

    if constexpr (plan::adapt_q) s.u_q = std::move(uq);
    if constexpr (plan::adapt_k) s.u_k = std::move(uk);
    if constexpr (plan::adapt_v) s.u_v = std::move(uv);
    if constexpr (plan::adapt_o) s.u_o = std::move(uo);
    if constexpr (plan::save_h) s.h = h.clone(memory_use::saved_activations);
    if constexpr (plan::save_q) s.q = std::move(q);
    if constexpr (plan::save_k) s.k = std::move(k);
    if constexpr (plan::save_v) s.v = std::move(v);
    if constexpr (plan::save_probs) s.probs = std::move(probs);
    if constexpr (plan::save_a) s.attn = std::move(a);
    return out;
  }

  // Returns dh when NeedsInputGrad, else an empty tensor. rows: those given to forward (dout is
  // then [1, rows, hidden]); dh has every row.
  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dout, grads_t& g,
                    const output_rows* rows = nullptr) const {
    const auto& c = config;
    const int B = rows ? int(rows->batch) : int(dout.dim(0)), S = rows ? int(rows->positions) : int(dout.dim(1)),
              H = c.n_heads, KV = c.n_kv_heads;
    if (rows && (dout.rank() != 3 || dout.dim(0) != 1 || dout.dim(1) != rows->count()))
      throw std::invalid_argument("skillgraft: attention output gradient has shape " + dout.shape().str() +
                                  ", expected [1, " + std::to_string(rows->count()) + ", hidden] (the output rows)");
    if constexpr (plan::train_o) linear_backward_weight(s.attn, dout, g.o_proj, "o_proj: dWo += dout^T a");
    if constexpr (plan::adapt_o) lora_backward(w.o_proj, s.attn, s.u_o, dout, g.o_lora);
    if constexpr (!plan::need_da) {
      return {};
    } else {
      const auto tokens = [&](int features) { return shape_t{std::size_t(B), std::size_t(S), std::size_t(features)}; };
      tensor_t da(with_last(dout.shape(), std::size_t(c.q_dim())), memory_use::workspace, uninitialized);
      linear_backward_input(w.o_proj, dout, da, false, "o_proj: da = dout Wo");
      if (rows) da = spread_rows<Backend>(da, *rows);
      tensor_t dq, dk, dv;
      if constexpr (plan::need_dq) dq = tensor_t(tokens(c.q_dim()), memory_use::workspace, uninitialized);
      if constexpr (plan::need_dk) dk = tensor_t(tokens(c.kv_dim()), memory_use::workspace);
      if constexpr (plan::need_dv) dv = tensor_t(tokens(c.kv_dim()), memory_use::workspace);
      const tensor_t* q = nullptr;
      const tensor_t* k = nullptr;
      const tensor_t* v = nullptr;
      if constexpr (plan::save_q) q = &s.q;
      if constexpr (plan::save_k) k = &s.k;
      if constexpr (plan::save_v) v = &s.v;
      Backend::attention_backward(dims(B, S), scale(), s.probs, q, k, v, da, plan::need_dq ? &dq : nullptr,
                                  plan::need_dk ? &dk : nullptr, plan::need_dv ? &dv : nullptr);
      if constexpr (plan::need_dq)
        if (c.rotary) rope_apply(*table, dq.data(), B, S, H, first_pos, true);
      if constexpr (plan::need_dk)
        if (c.rotary) rope_apply(*table, dk.data(), B, S, KV, first_pos, true);
      // With rows, Q's products read dq[rows] (zero elsewhere) and h[rows].
      if constexpr (plan::need_dq)
        if (rows) dq = select_rows<Backend>(dq, *rows);
      if constexpr (plan::train_q || plan::adapt_q) {
        const tensor_t hr = rows ? select_rows<Backend>(s.h, *rows) : tensor_t();
        const tensor_t& hq = rows ? hr : s.h;
        if constexpr (plan::train_q) linear_backward_weight(hq, dq, g.q_proj, "q_proj: dWq += dq^T h");
        if constexpr (plan::adapt_q) lora_backward(w.q_proj, hq, s.u_q, dq, g.q_lora);
      }
      if constexpr (plan::train_k) linear_backward_weight(s.h, dk, g.k_proj, "k_proj: dWk += dk^T h");
      if constexpr (plan::train_v) linear_backward_weight(s.h, dv, g.v_proj, "v_proj: dWv += dv^T h");
      if constexpr (plan::adapt_k) lora_backward(w.k_proj, s.h, s.u_k, dk, g.k_lora);
      if constexpr (plan::adapt_v) lora_backward(w.v_proj, s.h, s.u_v, dv, g.v_lora);
      if constexpr (NeedsInputGrad) {
        tensor_t dh;
        if (rows) {  // dq[rows] Wq spread over zeros, then the K and V terms added to every row
          tensor_t dhr(with_last(dq.shape(), std::size_t(c.hidden)), memory_use::workspace, uninitialized);
          linear_backward_input(w.q_proj, dq, dhr, false, "q_proj: dh[rows] = dq[rows] Wq");
          dh = spread_rows<Backend>(dhr, *rows);
        } else {
          dh = tensor_t(tokens(c.hidden), memory_use::workspace, uninitialized);
          linear_backward_input(w.q_proj, dq, dh, false, "q_proj: dh = dq Wq");
        }
        linear_backward_input(w.k_proj, dk, dh, true, "k_proj: dh += dk Wk");
        linear_backward_input(w.v_proj, dv, dh, true, "v_proj: dh += dv Wv");
        return dh;
      } else {
        return {};
      }
    }
  }

  // Per projection: base weight (and bias), then its adapter, as for_each_parameter orders them.
  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    attention_projections::for_each([&](auto p) { visit_projection<Recipe>(p, w, g, f); });
  }

 private:
  attention_dims dims(int B, int S) const {
    return {B, S, config.n_heads, config.n_kv_heads, config.head_dim, config.causal};
  }
  T scale() const { return T(1) / std::sqrt(T(config.head_dim)); }
};

}  // namespace skillgraft::nn
