#pragma once
// Mixture of experts on the MLP: the frozen original MLP beside tuned copies (one per task),
// mixed per token by a learned router. Top-k with weights renormalised over the chosen
// experts as in Mixtral / Qwen2-MoE; top-1 un-renormalised as in Switch Transformers.
//
//   forward   z = h Wr^T                                 router logits [N, E]
//             S(t) = the k largest z_te (ties: the lower expert index)
//             renormalised  w_te = exp z_te / sum_{j in S(t)} exp z_tj       (e in S(t))
//             softmax       w_te = p_te = exp z_te / sum_j exp z_tj          (e in S(t))
//             out_t = sum_{e in S(t)} w_te f_e(h_t),   f_e = expert e's gated MLP (nn/swiglu.hpp)
//   backward  a_te = dout_t . f_e(h_t)                   (e in S(t))
//             renormalised  dz_te = w_te (a_te - sum_{j in S(t)} w_tj a_tj)  (e in S(t); 0 elsewhere)
//             softmax       dz_te = p_te ([e in S(t)] a_te - sum_{j in S(t)} p_tj a_tj)   (every e)
//             dWr += dz^T h,   dh = dz Wr + sum_e dh_e,   expert e sees dout_te = w_te dout_t
//             The newest expert (E - 1) forms dWg, dWu, dWd, d alpha as the dense MLP does
//             on its tokens; experts 0 .. E-2 only pass gradients through (when dh is wanted).
// Which experts are chosen is piecewise constant in z: no gradient flows through the choice.
// With top-1 a renormalised weight is always 1, so only the softmax form (the default for k = 1)
// lets the router learn.
//
// Weights: mlp_weights with `router` [E, hidden] and `experts` (experts 1 .. E-1; expert 0 is
// the MLP's own gate/up/down). Hugging Face names: mlp.router.weight, mlp.experts.{e}.gate_proj.weight, ...
//
// What forward keeps (the plan below): the choice and its weights [N, k]; the softmax [N, E]
// (softmax form, when the router gradient is formed); h [N, d] when the router or the newest
// Gate/Up trains; the chosen experts' outputs [N, k, d] when the router trains and dh is not
// wanted (with dh, a_te = (dout_t Wd_e) . m_te comes from the pass-through backward instead);
// g and u of every chosen (token, expert) pair [N k, I] when dh is wanted, else of the newest
// expert's tokens only; m of the newest expert's tokens when its Down trains. Buffers of the
// newest expert's tokens hold N rows (every token may choose it), so what forward allocates
// depends on the shape only and memory_report can predict it exactly.
#include <array>
#include <string>
#include <vector>

#include "skillgraft/nn/swiglu.hpp"

namespace skillgraft::nn {

namespace members {
SKILLGRAFT_OPTIONAL_MEMBER(route);
SKILLGRAFT_OPTIONAL_MEMBER(route_weight);
SKILLGRAFT_OPTIONAL_MEMBER(y);
SKILLGRAFT_OPTIONAL_MEMBER(router);
}  // namespace members

// Runtime settings of a mixture: how many experts every layer has (router rows).
struct moe_options {
  int experts = 2;
  bool operator==(const moe_options&) const = default;
};

template <class Recipe, bool NeedsInputGrad, class Policy>
struct moe_plan {
  using expert = mlp_plan<Recipe, false, typename Policy::activation>;  // the newest expert's own needs
  static constexpr bool train_gate = expert::train_gate;
  static constexpr bool train_up = expert::train_up;
  static constexpr bool train_down = expert::train_down;
  static constexpr bool train_alpha = expert::train_alpha;
  static constexpr bool train_router = trains_v<group::router, Recipe>;
  static constexpr bool newest_dm = expert::need_dm;          // dm of the newest expert
  static constexpr bool newest_active = expert::active;
  static constexpr bool need_dz = train_router || NeedsInputGrad;  // router logits' gradient
  static constexpr bool active = newest_active || need_dz;
  static constexpr bool all_pairs = NeedsInputGrad;          // every expert passes dh through
  // What forward keeps, and why.
  static constexpr bool save_route = active;                          // who is chosen, with which weight
  static constexpr bool save_probs = need_dz && !Policy::renormalise;  // dz of unchosen experts
  static constexpr bool save_x = train_router || train_gate || train_up;  // dWr = dz^T h, dW{g,u} = d{g,u}^T h
  static constexpr bool save_y = train_router && !NeedsInputGrad;     // a = dout . f_e(h)
  static constexpr bool save_g = NeedsInputGrad || newest_dm;
  static constexpr bool save_u = NeedsInputGrad || train_gate || train_alpha;
  static constexpr bool save_m = train_down;
};

// Gradients: the newest expert's trainable tensors (named as in a dense MLP: `gate_proj`,
// ..., `act_alpha`) and the router's.
template <class T, class Recipe, class Act, class Backend = backend::cpu>
struct moe_grads : mlp_grads<T, Recipe, Act, Backend>,
                   members::optional_router<trains_v<group::router, Recipe>, typename Backend::template tensor<T>> {};

// The routing (top-k selection, gathers of the routed rows) runs on the host: the mixture is a
// CPU layer for now, and a block or stack of another backend with an nn::moe policy stops here.
template <class T, class Recipe, bool NeedsInputGrad, class Policy, class Backend = backend::cpu>
struct moe_mlp {
  static_assert(std::is_same_v<Backend, backend::cpu>,
                "skillgraft: the mixture-of-experts MLP (nn::moe) runs on the CPU backend only");
  using value_type = T;
  using weights_t = mlp_weights<T>;
  using activation = typename Policy::activation;
  using options = moe_options;
  using plan = moe_plan<Recipe, NeedsInputGrad, Policy>;
  using Act = activation;
  static constexpr int top_k = Policy::top_k;
  static constexpr std::size_t K = std::size_t(top_k);
  static constexpr bool needs_input_grad = NeedsInputGrad;
  static_assert(!(trains_v<lora<proj::gate>, Recipe> || trains_v<lora<proj::up>, Recipe> ||
                  trains_v<lora<proj::down>, Recipe>),
                "skillgraft: LoRA adapters on the experts of a mixture are not supported (train the newest expert)");
  static_assert(!(plan::train_router && top_k == 1 && Policy::renormalise),
                "skillgraft: a renormalised top-1 weight is always 1, so the router would get no gradient; "
                "use the softmax form (nn::moe<Act, 1>) or top_k >= 2");

  struct saved_t : members::optional_route<plan::save_route, tensor<T>>,
                   members::optional_route_weight<plan::save_route, tensor<T>>,
                   members::optional_probs<plan::save_probs, tensor<T>>,
                   members::optional_x<plan::save_x, tensor<T>>,
                   members::optional_y<plan::save_y, tensor<T>>,
                   members::optional_g<plan::save_g, tensor<T>>,
                   members::optional_u<plan::save_u, tensor<T>>,
                   members::optional_m<plan::save_m, tensor<T>> {};
  using grads_t = moe_grads<T, Recipe, Act>;

  decoder_config config;
  options mlp_options{};

  grads_t make_grads(const weights_t& w) const {
    const std::size_t E = experts_of(w, std::size_t(config.hidden));
    const auto& n = w.expert(E - 1);
    grads_t g;
    if constexpr (plan::train_gate) g.gate_proj = n.gate_proj.like(memory_use::gradients);
    if constexpr (plan::train_up) g.up_proj = n.up_proj.like(memory_use::gradients);
    if constexpr (plan::train_down) g.down_proj = n.down_proj.like(memory_use::gradients);
    if constexpr (plan::train_alpha) g.act_alpha = (detail::range_of<Act>(n), tensor<T>({1}, memory_use::gradients));
    if constexpr (plan::train_router) g.router = tensor<T>(w.router.shape(), memory_use::gradients);
    return g;
  }

  tensor<T> forward(const weights_t& w, const tensor<T>& h, saved_t& s) const {
    check_linear_input(w.gate_proj, h, "mlp");
    const std::size_t N = std::size_t(h.rows()), d = std::size_t(h.cols()), I = w.gate_proj.out_features(),
                      E = experts_of(w, d), newest = E - 1;
    auto kept = [](bool keep) { return keep ? memory_use::saved_activations : memory_use::workspace; };

    // Route: z = h Wr^T, the k largest logits per token and their weights.
    tensor<T> z({N, E}, memory_use::workspace);
    z.mat().noalias() = h.mat() * w.router.mat().transpose();
    tensor<T> route({N, K}, kept(plan::save_route)), rw({N, K}, kept(plan::save_route));
    tensor<T> probs = plan::save_probs ? tensor<T>({N, E}, memory_use::saved_activations) : tensor<T>();
    route_tokens(z, route, rw, plan::save_probs ? &probs : nullptr);
    const auto grp = group_pairs(route, E);

    // Experts, each on the tokens that chose it.
    const std::size_t rows_kept = plan::all_pairs ? N * K : N;
    tensor<T> sg = plan::save_g ? tensor<T>({rows_kept, I}, memory_use::saved_activations) : tensor<T>();
    tensor<T> su = plan::save_u ? tensor<T>({rows_kept, I}, memory_use::saved_activations) : tensor<T>();
    tensor<T> sm = plan::save_m ? tensor<T>({N, I}, memory_use::saved_activations) : tensor<T>();
    tensor<T> y = plan::save_y ? tensor<T>({N, K, d}, memory_use::saved_activations) : tensor<T>();
    tensor<T> out(h.shape(), memory_use::workspace);
    out.reshape({N, d});
    for (std::size_t e = 0; e < E; ++e) {
      const std::size_t n = grp.count(e);
      if (n == 0) continue;
      const auto& ex = w.expert(e);
      const bool keep_gu = plan::all_pairs || e == newest;
      const std::size_t row0 = plan::all_pairs ? grp.offset[e] : 0;
      tensor<T> he = gather(h, grp, e);
      tensor<T> gw, uw, mw;
      auto g = (plan::save_g && keep_gu) ? rows(sg, row0, n) : fresh(gw, n, I);
      auto u = (plan::save_u && keep_gu) ? rows(su, row0, n) : fresh(uw, n, I);
      auto m = (plan::save_m && e == newest) ? rows(sm, 0, n) : fresh(mw, n, I);
      g.noalias() = he.mat() * ex.gate_proj.weight.mat().transpose();
      u.noalias() = he.mat() * ex.up_proj.weight.mat().transpose();
      cpu::gated_product_n<Act>(g.data(), u.data(), detail::range_value<Act>(ex), m.data(), n * I);
      tensor<T> ye({n, d}, memory_use::workspace);
      ye.mat().noalias() = m * ex.down_proj.weight.mat().transpose();
      for (std::size_t r = 0; r < n; ++r) {
        const std::size_t t = grp.token[grp.offset[e] + r], j = grp.slot[grp.offset[e] + r];
        out.mat().row(Eigen::Index(t)) += rw[t * K + j] * ye.mat().row(Eigen::Index(r));
        if constexpr (plan::save_y) std::copy_n(ye.data() + r * d, d, y.data() + (t * K + j) * d);
      }
    }
    out.reshape(h.shape());
    if constexpr (plan::save_route) {
      s.route = std::move(route);
      s.route_weight = std::move(rw);
    }
    if constexpr (plan::save_probs) s.probs = std::move(probs);
    if constexpr (plan::save_x) s.x = h.clone(memory_use::saved_activations);
    if constexpr (plan::save_y) s.y = std::move(y);
    if constexpr (plan::save_g) s.g = std::move(sg);
    if constexpr (plan::save_u) s.u = std::move(su);
    if constexpr (plan::save_m) s.m = std::move(sm);
    return out;
  }

  tensor<T> backward(const weights_t& w, const saved_t& s, const tensor<T>& dout, grads_t& gr) const {
    if constexpr (!plan::active) {
      return {};
    } else {
      const std::size_t N = s.route.dim(0), d = std::size_t(config.hidden), I = w.gate_proj.out_features(),
                        E = experts_of(w, d), newest = E - 1;
      if (std::size_t(dout.rows()) != N || std::size_t(dout.cols()) != d)
        throw std::invalid_argument("skillgraft: gradient of the MLP output has shape " + dout.shape().str() +
                                    ", expected " + std::to_string(N) + " rows of " + std::to_string(d));
      const auto grp = group_pairs(s.route, E);
      const T* rw = s.route_weight.data();
      tensor<T> a = plan::need_dz ? tensor<T>({N, K}, memory_use::workspace) : tensor<T>();
      tensor<T> dh = NeedsInputGrad ? tensor<T>({N, d}, memory_use::workspace) : tensor<T>();
      if constexpr (plan::save_y) {  // a_tj = dout_t . y_tj
#pragma omp parallel for schedule(static) if (N * K * d > 32768)
        for (std::size_t p = 0; p < N * K; ++p) {
          const T* yp = s.y.data() + p * d;
          const T* dp = dout.data() + (p / K) * d;
          T acc = T(0);
          for (std::size_t i = 0; i < d; ++i) acc += dp[i] * yp[i];
          a[p] = acc;
        }
      }

      for (std::size_t e = 0; e < E; ++e) {
        const std::size_t n = grp.count(e);
        const bool is_newest = e == newest;
        if (n == 0 || !(NeedsInputGrad || (is_newest && plan::newest_active))) continue;
        const auto& ex = w.expert(e);
        const T alpha = detail::range_value<Act>(ex);
        const std::size_t row0 = plan::all_pairs ? grp.offset[e] : 0;
        tensor<T> de = gather(dout, grp, e);  // dout of the tokens that chose e (not yet weighted)
        std::vector<T> we(n);
        for (std::size_t r = 0; r < n; ++r) we[r] = rw[grp.token[grp.offset[e] + r] * K + grp.slot[grp.offset[e] + r]];
        if constexpr (plan::train_down) {  // dWd += (w dout)^T m
          if (is_newest) {
            tensor<T> dy({n, d}, memory_use::workspace);
            for (std::size_t r = 0; r < n; ++r) dy.mat().row(Eigen::Index(r)) = we[r] * de.mat().row(Eigen::Index(r));
            gr.down_proj.weight.mat().noalias() += dy.mat().transpose() * rows(s.m, 0, n);
          }
        }
        if constexpr (plan::save_g) {
          if (!(NeedsInputGrad || (is_newest && plan::newest_dm))) continue;
          const auto g = rows(s.g, row0, n);
          tensor<T> dm({n, I}, memory_use::workspace);  // dout_t Wd, then weighted: w_te dout_t Wd
          dm.mat().noalias() = de.mat() * ex.down_proj.weight.mat();
          if constexpr (NeedsInputGrad) {  // a_te = (dout_t Wd) . m_te, m recomputed from g and u
            const auto u = rows(s.u, row0, n);
            tensor<T> m({n, I}, memory_use::workspace);
            cpu::gated_product_n<Act>(g.data(), u.data(), alpha, m.data(), n * I);
            for (std::size_t r = 0; r < n; ++r)
              a[grp.token[grp.offset[e] + r] * K + grp.slot[grp.offset[e] + r]] =
                  dm.mat().row(Eigen::Index(r)).dot(m.mat().row(Eigen::Index(r)));
          }
          for (std::size_t r = 0; r < n; ++r) dm.mat().row(Eigen::Index(r)) *= we[r];
          const T* up = nullptr;
          if constexpr (plan::save_u) up = rows(s.u, row0, n).data();
          tensor<T> du = (NeedsInputGrad || (is_newest && plan::train_up)) ? tensor<T>({n, I}, memory_use::workspace)
                                                                          : tensor<T>();
          if (is_newest) {
            constexpr bool dg = NeedsInputGrad || plan::train_gate, duu = NeedsInputGrad || plan::train_up;
            const T da = cpu::gated_product_backward_n<Act, dg, duu, plan::train_alpha>(g.data(), up, alpha, dm.data(),
                                                                                      du.data(), n * I);
            if constexpr (plan::train_alpha) gr.act_alpha[0] += da;
            if constexpr (plan::train_gate || plan::train_up) {
              tensor<T> he = gather(s.x, grp, e);
              if constexpr (plan::train_gate) gr.gate_proj.weight.mat().noalias() += dm.mat().transpose() * he.mat();
              if constexpr (plan::train_up) gr.up_proj.weight.mat().noalias() += du.mat().transpose() * he.mat();
            }
          } else if constexpr (NeedsInputGrad) {
            cpu::gated_product_backward_n<Act, true, true, false>(g.data(), up, alpha, dm.data(), du.data(), n * I);
          }
          if constexpr (NeedsInputGrad) {  // dh_t += dg Wg + du Wu
            tensor<T> dhe({n, d}, memory_use::workspace);
            dhe.mat().noalias() = dm.mat() * ex.gate_proj.weight.mat();
            dhe.mat().noalias() += du.mat() * ex.up_proj.weight.mat();
            for (std::size_t r = 0; r < n; ++r)
              dh.mat().row(Eigen::Index(grp.token[grp.offset[e] + r])) += dhe.mat().row(Eigen::Index(r));
          }
        }
      }

      if constexpr (plan::need_dz) {
        tensor<T> dz({N, E}, memory_use::workspace);
        const T* rt = s.route.data();
#pragma omp parallel for schedule(static) if (N * E > 32768)
        for (std::size_t t = 0; t < N; ++t) {
          T* dzt = dz.data() + t * E;
          if constexpr (Policy::renormalise) {
            T sum = T(0);
            for (std::size_t j = 0; j < K; ++j) sum += rw[t * K + j] * a[t * K + j];
            for (std::size_t j = 0; j < K; ++j)
              dzt[std::size_t(rt[t * K + j])] = rw[t * K + j] * (a[t * K + j] - sum);
          } else {
            const T* pt = s.probs.data() + t * E;
            T sum = T(0);
            for (std::size_t j = 0; j < K; ++j) sum += pt[std::size_t(rt[t * K + j])] * a[t * K + j];
            for (std::size_t e = 0; e < E; ++e) dzt[e] = -pt[e] * sum;
            for (std::size_t j = 0; j < K; ++j) {
              const std::size_t e = std::size_t(rt[t * K + j]);
              dzt[e] += pt[e] * a[t * K + j];
            }
          }
        }
        if constexpr (plan::train_router) gr.router.mat().noalias() += dz.mat().transpose() * s.x.mat();
        if constexpr (NeedsInputGrad) dh.mat().noalias() += dz.mat() * w.router.mat();
      }
      if constexpr (NeedsInputGrad) {
        dh.reshape(dout.shape());
        return dh;
      } else {
        return {};
      }
    }
  }

  // The router, then the newest expert's tensors, as for_each_parameter orders them.
  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    if constexpr (plan::train_router) f(std::string("router.weight"), w.router, g.router);
    if constexpr (plan::newest_active) {
      const std::size_t E = w.expert_count();
      auto& n = w.expert(E - 1);
      const std::string p = "experts." + std::to_string(E - 1) + ".";
      if constexpr (plan::train_gate) f(p + "gate_proj.weight", n.gate_proj.weight, g.gate_proj.weight);
      if constexpr (plan::train_up) f(p + "up_proj.weight", n.up_proj.weight, g.up_proj.weight);
      if constexpr (plan::train_down) f(p + "down_proj.weight", n.down_proj.weight, g.down_proj.weight);
      if constexpr (plan::train_alpha) f(p + "act_fn.alpha", n.act_alpha, g.act_alpha);
    }
  }

  // --- what it costs, from the plan --------------------------------------------------------
  static std::size_t saved_elements(const decoder_config& c, seq_shape sh, const options& o) {
    const std::size_t N = sh.tokens(), d = std::size_t(c.hidden), I = std::size_t(c.intermediate),
                      E = std::size_t(o.experts), rows_kept = plan::all_pairs ? N * K : N;
    std::size_t n = 0;
    if (plan::save_route) n += 2 * N * K;
    if (plan::save_probs) n += N * E;
    if (plan::save_x) n += N * d;
    if (plan::save_y) n += N * K * d;
    if (plan::save_g) n += rows_kept * I;
    if (plan::save_u) n += rows_kept * I;
    if (plan::save_m) n += N * I;
    return n;
  }
  static std::size_t trainable_elements(const decoder_config& c, const options& o) {
    const std::size_t d = std::size_t(c.hidden), I = std::size_t(c.intermediate);
    std::size_t n = 0;
    if (plan::train_router) n += std::size_t(o.experts) * d;
    if (plan::train_gate) n += I * d;
    if (plan::train_up) n += I * d;
    if (plan::train_down) n += d * I;
    if (plan::train_alpha) n += 1;
    return n;
  }
  struct flop_count {
    double forward = 0, backward = 0;
  };
  // GEMM FLOPs, counting N k / E tokens per expert (balanced routing).
  static flop_count flops(const decoder_config& c, seq_shape sh, const options& o) {
    const double N = double(sh.tokens()), d = c.hidden, I = c.intermediate, E = o.experts, k = double(K),
                 Ne = N * k / E;
    flop_count f;
    f.forward = 2 * N * d * E + 3 * 2 * N * k * d * I;
    double b = 0;
    const double pass = NeedsInputGrad ? N * k : (plan::newest_dm ? Ne : 0);  // tokens that form dm
    b += 2 * pass * d * I;
    if (NeedsInputGrad) b += 2 * 2 * N * k * d * I;
    if (plan::train_down) b += 2 * Ne * d * I;
    if (plan::train_gate) b += 2 * Ne * d * I;
    if (plan::train_up) b += 2 * Ne * d * I;
    if (plan::train_router) b += 2 * N * d * E;
    if (NeedsInputGrad) b += 2 * N * d * E;
    f.backward = b;
    return f;
  }

 private:
  // (token, slot) pairs grouped by expert, tokens ascending within a group.
  struct pairs {
    std::vector<std::size_t> offset, token, slot;
    std::size_t count(std::size_t e) const { return offset[e + 1] - offset[e]; }
  };
  static pairs group_pairs(const tensor<T>& route, std::size_t E) {
    const std::size_t N = route.dim(0);
    pairs p;
    p.offset.assign(E + 1, 0);
    for (std::size_t i = 0; i < N * K; ++i) ++p.offset[std::size_t(route[i]) + 1];
    for (std::size_t e = 0; e < E; ++e) p.offset[e + 1] += p.offset[e];
    p.token.resize(N * K);
    p.slot.resize(N * K);
    std::vector<std::size_t> at(p.offset.begin(), p.offset.end() - 1);
    for (std::size_t t = 0; t < N; ++t)
      for (std::size_t j = 0; j < K; ++j) {
        const std::size_t e = std::size_t(route[t * K + j]);
        p.token[at[e]] = t;
        p.slot[at[e]++] = j;
      }
    return p;
  }

  // Chosen experts (as T values), their weights, and the softmax when it is kept.
  static void route_tokens(const tensor<T>& z, tensor<T>& route, tensor<T>& rw, tensor<T>* probs) {
    const std::size_t N = z.dim(0), E = z.dim(1);
#pragma omp parallel for schedule(static) if (N * E > 32768)
    for (std::size_t t = 0; t < N; ++t) {
      const T* zt = z.data() + t * E;
      std::array<std::size_t, K> sel{};
      for (std::size_t j = 0; j < K; ++j) {
        std::size_t best = E;
        for (std::size_t e = 0; e < E; ++e) {
          bool taken = false;
          for (std::size_t i = 0; i < j; ++i) taken = taken || sel[i] == e;
          if (!taken && (best == E || zt[e] > zt[best])) best = e;
        }
        sel[j] = best;
        route[t * K + j] = T(best);
      }
      const T top = zt[sel[0]];
      if constexpr (Policy::renormalise) {
        T sum = T(0);
        for (std::size_t j = 0; j < K; ++j) sum += (rw[t * K + j] = std::exp(zt[sel[j]] - top));
        for (std::size_t j = 0; j < K; ++j) rw[t * K + j] /= sum;
      } else {
        T sum = T(0);
        for (std::size_t e = 0; e < E; ++e) sum += std::exp(zt[e] - top);
        for (std::size_t j = 0; j < K; ++j) rw[t * K + j] = std::exp(zt[sel[j]] - top) / sum;
        if (probs)
          for (std::size_t e = 0; e < E; ++e) (*probs)[t * E + e] = std::exp(zt[e] - top) / sum;
      }
    }
  }

  using row_block = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
  using const_row_block = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
  // Rows [row0, row0 + n) of a matrix tensor, as a matrix.
  static row_block rows(tensor<T>& t, std::size_t row0, std::size_t n) {
    return {t.data() + row0 * std::size_t(t.cols()), Eigen::Index(n), t.cols()};
  }
  static const_row_block rows(const tensor<T>& t, std::size_t row0, std::size_t n) {
    return {t.data() + row0 * std::size_t(t.cols()), Eigen::Index(n), t.cols()};
  }
  static row_block fresh(tensor<T>& t, std::size_t n, std::size_t cols) {
    t = tensor<T>({n, cols}, memory_use::workspace);
    return rows(t, 0, n);
  }
  // The rows of x (tokens in order) that chose expert e.
  static tensor<T> gather(const tensor<T>& x, const pairs& p, std::size_t e) {
    const std::size_t n = p.count(e), d = std::size_t(x.cols());
    tensor<T> out({n, d}, memory_use::workspace);
    for (std::size_t r = 0; r < n; ++r) std::copy_n(x.data() + p.token[p.offset[e] + r] * d, d, out.data() + r * d);
    return out;
  }

  // E, after checking the router and the experts' count against the policy and the options.
  std::size_t experts_of(const weights_t& w, std::size_t d) const {
    if (!w.is_mixture())
      throw std::invalid_argument("skillgraft: mlp.router.weight is missing: an nn::moe MLP needs a router and its "
                                  "experts (cl::add_expert)");
    const std::size_t E = w.router.dim(0);
    if (w.router.rank() != 2 || w.router.dim(1) != d || E != std::size_t(mlp_options.experts))
      throw std::invalid_argument("skillgraft: mlp.router.weight has shape " + w.router.shape().str() + ", expected [" +
                                  std::to_string(mlp_options.experts) + ", " + std::to_string(d) + "]");
    if (w.experts.size() + 1 != E)
      throw std::invalid_argument("skillgraft: the router has " + std::to_string(E) + " rows but the MLP has " +
                                  std::to_string(w.experts.size() + 1) + " experts");
    if (E < K)
      throw std::invalid_argument("skillgraft: a mixture of " + std::to_string(E) + " experts cannot choose the top " +
                                  std::to_string(K));
    return E;
  }
};

// --- the policy --------------------------------------------------------------------------------

// A mixture of experts on the MLP: every expert a gated MLP with activation Act, the top TopK
// chosen per token. Renormalise (default for TopK >= 2) mixes the chosen experts with weights
// that sum to 1; for TopK = 1 the default is the softmax probability (Switch), which lets the
// router learn.
template <class Act = act::silu, int TopK = 2, bool Renormalise = (TopK > 1)>
struct moe {
  static_assert(TopK >= 1, "skillgraft: a mixture chooses at least one expert per token");
  using activation = Act;
  static constexpr int top_k = TopK;
  static constexpr bool renormalise = Renormalise;
  using options = moe_options;
  template <class T, class Recipe, bool NeedsInputGrad, class Backend = backend::cpu>
  using layer = moe_mlp<T, Recipe, NeedsInputGrad, moe, Backend>;
  template <class T, class Recipe, class Backend = backend::cpu>
  using grads = moe_grads<T, Recipe, Act, Backend>;
  template <class Tag>
  static constexpr bool accepts = !std::is_same_v<Tag, lora<proj::gate>> && !std::is_same_v<Tag, lora<proj::up>> &&
                                  !std::is_same_v<Tag, lora<proj::down>> &&
                                  (Act::has_range || !std::is_same_v<Tag, group::act_range>);

  // Throws, naming the tensor, unless w is a mixture of o.experts experts of this activation.
  template <class T>
  static void check_weights(const mlp_weights<T>& w, const decoder_config& c, const options& o, const std::string& prefix) {
    const std::size_t d = std::size_t(c.hidden), E = std::size_t(o.experts);
    if (o.experts < TopK)
      throw std::invalid_argument("skillgraft: moe_options.experts is " + std::to_string(o.experts) +
                                  ", fewer than the " + std::to_string(TopK) + " experts chosen per token");
    if (!w.is_mixture())
      throw std::invalid_argument("skillgraft: " + prefix + "router.weight is missing: an nn::moe MLP needs a router "
                                  "and its experts (cl::add_expert turns a dense MLP into a mixture)");
    cpu::expect_shape(w.router, {E, d}, prefix + "router.weight");
    if (w.experts.size() + 1 != E)
      throw std::invalid_argument("skillgraft: " + prefix + "experts has " + std::to_string(w.experts.size() + 1) +
                                  " experts, expected " + std::to_string(E));
    for (std::size_t e = 0; e < E; ++e) {
      const auto& x = w.expert(e);
      const std::string p = prefix + "experts." + std::to_string(e) + ".";
      detail::check_expert<Act>(x, c, p);
      for (const auto* l : {&x.gate_proj, &x.up_proj, &x.down_proj})
        if (l->has_lora())
          throw std::invalid_argument("skillgraft: " + p + " has a LoRA adapter; experts of a mixture take none");
      if (e > 0 && (x.is_mixture() || !x.experts.empty()))
        throw std::invalid_argument("skillgraft: " + p + " has a router of its own");
    }
  }
  // Parameters beyond expert 0's Gate, Up and Down: the router, the other experts, the ranges.
  static std::size_t extra_weight_elements(const decoder_config& c, const options& o) {
    const std::size_t d = std::size_t(c.hidden), I = std::size_t(c.intermediate), E = std::size_t(o.experts);
    return E * d + (E - 1) * 3 * d * I + (Act::has_range ? E : 0);
  }
};

}  // namespace skillgraft::nn
