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
// Routing runs on the backend (route_rows below); the choice is read on the host to group the
// tokens by expert (the GEMM shapes depend on it), and each expert's rows move by gathers and
// by element functors over small uploaded index maps, so the mixture runs on every backend.
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

#include "skillgraft/backend/host_device.hpp"
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
// One element or one token per call (SKILLGRAFT_HD: every backend runs the same functors).
// Index maps (token of row r, pair t K + j of row r) are small host vectors uploaded per expert.
namespace moe_kernels {
// Token t's top K experts of z [N, E] (ties: the lower index), stored as T values, and
// their weights: renormalised over the chosen experts, or the softmax (kept in probs if given).
template <class T, std::size_t K, bool Renormalise>
struct route_rows {
  const T* z;
  T* route;
  T* rw;
  T* probs;  // may be null
  std::int64_t E;
  SKILLGRAFT_HD void operator()(std::int64_t t) const {
    const T* zt = z + t * E;
    std::int64_t sel[K];
    for (std::size_t j = 0; j < K; ++j) {
      std::int64_t best = E;
      for (std::int64_t e = 0; e < E; ++e) {
        bool taken = false;
        for (std::size_t i = 0; i < j; ++i) taken = taken || sel[i] == e;
        if (!taken && (best == E || zt[e] > zt[best])) best = e;
      }
      sel[j] = best;
      route[t * std::int64_t(K) + std::int64_t(j)] = T(best);
    }
    const T top = zt[sel[0]];
    T* w = rw + t * std::int64_t(K);
    if constexpr (Renormalise) {
      T sum = T(0);
      for (std::size_t j = 0; j < K; ++j) sum += (w[j] = scalar::exp_(zt[sel[j]] - top));
      for (std::size_t j = 0; j < K; ++j) w[j] /= sum;
    } else {
      T sum = T(0);
      for (std::int64_t e = 0; e < E; ++e) sum += scalar::exp_(zt[e] - top);
      for (std::size_t j = 0; j < K; ++j) w[j] = scalar::exp_(zt[sel[j]] - top) / sum;
      if (probs)
        for (std::int64_t e = 0; e < E; ++e) probs[t * E + e] = scalar::exp_(zt[e] - top) / sum;
    }
  }
};
// out[token[r]] += weight[pair[r]] in[r] (weight null: 1), per element of in [n, cols]. A
// token appears once per expert, so the rows of one call never collide.
template <class T>
struct add_rows_to {
  T* out;
  const T* in;
  const std::int64_t* token;
  const std::int64_t* pair;
  const T* weight;
  std::int64_t cols;
  SKILLGRAFT_HD void operator()(std::int64_t i) const {
    const std::int64_t r = i / cols, c = i % cols;
    out[token[r] * cols + c] += (weight ? weight[pair[r]] : T(1)) * in[i];
  }
};
// Row pair[r] of out is row r of in (rows of cols).
template <class T>
struct place_rows {
  T* out;
  const T* in;
  const std::int64_t* pair;
  std::int64_t cols;
  SKILLGRAFT_HD void operator()(std::int64_t i) const { out[pair[i / cols] * cols + i % cols] = in[i]; }
};
// Row r of x scaled in place by weight[pair[r]].
template <class T>
struct scale_rows {
  T* x;
  const T* weight;
  const std::int64_t* pair;
  std::int64_t cols;
  SKILLGRAFT_HD void operator()(std::int64_t i) const { x[i] *= weight[pair[i / cols]]; }
};
// a[pair[r]] = x[r] . y[r] (pair null: a[r]), rows of cols; x's row is r / every when x is
// shared by `every` consecutive rows of y (dout_t for the K pairs of token t).
template <class T>
struct row_dots {
  T* a;
  const T* x;
  const T* y;
  const std::int64_t* pair;
  std::int64_t cols, every;
  SKILLGRAFT_HD void operator()(std::int64_t r) const {
    const T* xr = x + (r / every) * cols;
    const T* yr = y + r * cols;
    T acc = T(0);
    for (std::int64_t i = 0; i < cols; ++i) acc += xr[i] * yr[i];
    a[pair ? pair[r] : r] = acc;
  }
};
// Token t's router-logit gradient (math at the top of this file).
template <class T, std::size_t K, bool Renormalise>
struct router_grad {
  T* dz;
  const T* route;
  const T* rw;
  const T* a;
  const T* probs;
  std::int64_t E;
  SKILLGRAFT_HD void operator()(std::int64_t t) const {
    T* dzt = dz + t * E;
    const T* w = rw + t * std::int64_t(K);
    const T* at = a + t * std::int64_t(K);
    const T* rt = route + t * std::int64_t(K);
    if constexpr (Renormalise) {
      T sum = T(0);
      for (std::size_t j = 0; j < K; ++j) sum += w[j] * at[j];
      for (std::size_t j = 0; j < K; ++j) dzt[std::int64_t(rt[j])] = w[j] * (at[j] - sum);
    } else {
      const T* pt = probs + t * E;
      T sum = T(0);
      for (std::size_t j = 0; j < K; ++j) sum += pt[std::int64_t(rt[j])] * at[j];
      for (std::int64_t e = 0; e < E; ++e) dzt[e] = -pt[e] * sum;
      for (std::size_t j = 0; j < K; ++j) dzt[std::int64_t(rt[j])] += pt[std::int64_t(rt[j])] * at[j];
    }
  }
};
}  // namespace moe_kernels

template <class T, class Recipe, bool NeedsInputGrad, class Policy, class Backend = backend::cpu>
struct moe_mlp {
  using value_type = T;
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = mlp_weights<T, Backend>;
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

  struct saved_t : members::optional_route<plan::save_route, tensor_t>,
                   members::optional_route_weight<plan::save_route, tensor_t>,
                   members::optional_probs<plan::save_probs, tensor_t>,
                   members::optional_x<plan::save_x, tensor_t>,
                   members::optional_y<plan::save_y, tensor_t>,
                   members::optional_g<plan::save_g, tensor_t>,
                   members::optional_u<plan::save_u, tensor_t>,
                   members::optional_m<plan::save_m, tensor_t> {};
  using grads_t = moe_grads<T, Recipe, Act, Backend>;

  decoder_config config;
  options mlp_options{};

  grads_t make_grads(const weights_t& w) const {
    const std::size_t E = experts_of(w, std::size_t(config.hidden));
    const auto& n = w.expert(E - 1);
    grads_t g;
    mlp_projections::for_each([&](auto e) {
      using P = decltype(e);
      if constexpr (trains_v<typename P::tag, Recipe>) P::grad(g) = P::weight(n).like(memory_use::gradients);
    });
    if constexpr (plan::train_alpha) g.act_alpha = (detail::range_of<Act>(n), tensor_t({1}, memory_use::gradients));
    if constexpr (plan::train_router) g.router = tensor_t(w.router.shape(), memory_use::gradients);
    return g;
  }

  tensor_t forward(const weights_t& w, const tensor_t& h, saved_t& s) const {
    check_linear_input(w.gate_proj, h, "mlp");
    const std::size_t d = h.dim(h.rank() - 1), N = h.size() / d, I = w.gate_proj.out_features(),
                      E = experts_of(w, d), newest = E - 1;
    const int di = int(d), Ii = int(I);
    auto kept = [](bool keep) { return keep ? memory_use::saved_activations : memory_use::workspace; };

    // Route: z = h Wr^T, the k largest logits per token and their weights (on the backend);
    // the choice is then grouped by expert on the host.
    tensor_t z({N, E}, memory_use::workspace);
    Backend::gemm("router: z = h Wr^T", op::n, op::t, int(N), int(E), di, T(1), h.data(), di, w.router.data(), di, T(0),
                  z.data(), int(E));
    tensor_t route({N, K}, kept(plan::save_route)), rw({N, K}, kept(plan::save_route));
    tensor_t probs = plan::save_probs ? tensor_t({N, E}, memory_use::saved_activations) : tensor_t();
    Backend::for_each_index(std::int64_t(N), moe_kernels::route_rows<T, K, Policy::renormalise>{
                                                  z.data(), route.data(), rw.data(),
                                                  plan::save_probs ? probs.data() : nullptr, std::int64_t(E)});
    const auto grp = group_pairs(route, E);

    // Experts, each on the tokens that chose it.
    const std::size_t rows_kept = plan::all_pairs ? N * K : N;
    tensor_t sg = plan::save_g ? tensor_t({rows_kept, I}, memory_use::saved_activations) : tensor_t();
    tensor_t su = plan::save_u ? tensor_t({rows_kept, I}, memory_use::saved_activations) : tensor_t();
    tensor_t sm = plan::save_m ? tensor_t({N, I}, memory_use::saved_activations) : tensor_t();
    tensor_t y = plan::save_y ? tensor_t({N, K, d}, memory_use::saved_activations) : tensor_t();
    tensor_t out(h.shape(), memory_use::workspace);
    for (std::size_t e = 0; e < E; ++e) {
      const std::size_t n = grp.count(e);
      if (n == 0) continue;
      const auto& ex = w.expert(e);
      const bool keep_gu = plan::all_pairs || e == newest;
      const std::size_t row0 = plan::all_pairs ? grp.offset[e] : 0;
      const expert_maps maps(grp, e);
      tensor_t he = gather(h, maps);
      tensor_t gw, uw, mw;
      T* g = (plan::save_g && keep_gu) ? sg.data() + row0 * I : fresh(gw, n, I);
      T* u = (plan::save_u && keep_gu) ? su.data() + row0 * I : fresh(uw, n, I);
      T* m = (plan::save_m && e == newest) ? sm.data() : fresh(mw, n, I);
      Backend::gemm("expert: g = h Wg^T", op::n, op::t, int(n), Ii, di, T(1), he.data(), di,
                    ex.gate_proj.weight.data(), di, T(0), g, Ii);
      Backend::gemm("expert: u = h Wu^T", op::n, op::t, int(n), Ii, di, T(1), he.data(), di, ex.up_proj.weight.data(),
                    di, T(0), u, Ii);
      Backend::template gated_product<Act>(g, u, detail::range_of<Act>(ex), m, n * I);
      tensor_t ye({n, d}, memory_use::workspace);
      Backend::gemm("expert: y = m Wd^T", op::n, op::t, int(n), di, Ii, T(1), m, Ii, ex.down_proj.weight.data(), Ii, T(0),
                    ye.data(), di);
      const auto nd = std::int64_t(n * d);
      Backend::for_each_index(nd, moe_kernels::add_rows_to<T>{out.data(), ye.data(), maps.token_d.data(),
                                                              maps.pair_d.data(), rw.data(), std::int64_t(d)});
      if constexpr (plan::save_y)
        Backend::for_each_index(nd, moe_kernels::place_rows<T>{y.data(), ye.data(), maps.pair_d.data(), std::int64_t(d)});
    }
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

  tensor_t backward(const weights_t& w, const saved_t& s, const tensor_t& dout, grads_t& gr) const {
    if constexpr (!plan::active) {
      return {};
    } else {
      const std::size_t N = s.route.dim(0), d = std::size_t(config.hidden), I = w.gate_proj.out_features(),
                        E = experts_of(w, d), newest = E - 1;
      const int di = int(d), Ii = int(I);
      if (dout.size() != N * d || dout.dim(dout.rank() - 1) != d)
        throw std::invalid_argument("skillgraft: gradient of the MLP output has shape " + dout.shape().str() +
                                    ", expected " + std::to_string(N) + " rows of " + std::to_string(d));
      const auto grp = group_pairs(s.route, E);
      const T* rw = s.route_weight.data();
      tensor_t a = plan::need_dz ? tensor_t({N, K}, memory_use::workspace) : tensor_t();
      tensor_t dh = NeedsInputGrad ? tensor_t(dout.shape(), memory_use::workspace) : tensor_t();
      if constexpr (plan::save_y)  // a_tj = dout_t . y_tj
        Backend::for_each_index(std::int64_t(N * K), moe_kernels::row_dots<T>{a.data(), dout.data(), s.y.data(), nullptr,
                                                                             std::int64_t(d), std::int64_t(K)});

      for (std::size_t e = 0; e < E; ++e) {
        const std::size_t n = grp.count(e);
        const bool is_newest = e == newest;
        if (n == 0 || !(NeedsInputGrad || (is_newest && plan::newest_active))) continue;
        const auto& ex = w.expert(e);
        const tensor_t* alpha = detail::range_of<Act>(ex);
        const std::size_t row0 = plan::all_pairs ? grp.offset[e] : 0;
        const expert_maps maps(grp, e);
        tensor_t de = gather(dout, maps);  // dout of the tokens that chose e (not yet weighted)
        if constexpr (plan::train_down) {  // dWd += (w dout)^T m
          if (is_newest) {
            tensor_t dy = de.clone(memory_use::workspace);
            Backend::for_each_index(std::int64_t(n * d),
                                    moe_kernels::scale_rows<T>{dy.data(), rw, maps.pair_d.data(), std::int64_t(d)});
            Backend::gemm("expert: dWd += dy^T m", op::t, op::n, di, Ii, int(n), T(1), dy.data(), di, s.m.data(), Ii, T(1),
                          gr.down_proj.weight.data(), Ii);
          }
        }
        if constexpr (plan::save_g) {
          if (!(NeedsInputGrad || (is_newest && plan::newest_dm))) continue;
          const T* g = s.g.data() + row0 * I;
          const T* up = nullptr;
          if constexpr (plan::save_u) up = s.u.data() + row0 * I;
          tensor_t dm({n, I}, memory_use::workspace);  // dout_t Wd, then weighted: w_te dout_t Wd
          Backend::gemm("expert: dm = dout Wd", op::n, op::n, int(n), Ii, di, T(1), de.data(), di,
                        ex.down_proj.weight.data(), Ii, T(0), dm.data(), Ii);
          if constexpr (NeedsInputGrad) {  // a_te = (dout_t Wd) . m_te, m recomputed from g and u
            tensor_t m({n, I}, memory_use::workspace);
            Backend::template gated_product<Act>(g, up, alpha, m.data(), n * I);
            Backend::for_each_index(std::int64_t(n), moe_kernels::row_dots<T>{a.data(), dm.data(), m.data(),
                                                                              maps.pair_d.data(), std::int64_t(I), 1});
          }
          Backend::for_each_index(std::int64_t(n * I),
                                  moe_kernels::scale_rows<T>{dm.data(), rw, maps.pair_d.data(), std::int64_t(I)});
          tensor_t du = (NeedsInputGrad || (is_newest && plan::train_up)) ? tensor_t({n, I}, memory_use::workspace)
                                                                           : tensor_t();
          if (is_newest) {
            constexpr bool dg = NeedsInputGrad || plan::train_gate, duu = NeedsInputGrad || plan::train_up;
            tensor_t* dalpha = nullptr;
            if constexpr (plan::train_alpha) dalpha = &gr.act_alpha;
            Backend::template gated_product_backward<Act, dg, duu, plan::train_alpha>(
                g, up, alpha, dm.data(), du.empty() ? nullptr : du.data(), dalpha, n * I);
            if constexpr (plan::train_gate || plan::train_up) {
              tensor_t he = gather(s.x, maps);
              if constexpr (plan::train_gate)
                Backend::gemm("expert: dWg += dg^T h", op::t, op::n, Ii, di, int(n), T(1), dm.data(), Ii, he.data(), di,
                              T(1), gr.gate_proj.weight.data(), di);
              if constexpr (plan::train_up)
                Backend::gemm("expert: dWu += du^T h", op::t, op::n, Ii, di, int(n), T(1), du.data(), Ii, he.data(), di,
                              T(1), gr.up_proj.weight.data(), di);
            }
          } else if constexpr (NeedsInputGrad) {
            Backend::template gated_product_backward<Act, true, true, false>(g, up, alpha, dm.data(), du.data(),
                                                                                   nullptr, n * I);
          }
          if constexpr (NeedsInputGrad) {  // dh_t += dg Wg + du Wu
            tensor_t dhe({n, d}, memory_use::workspace);
            Backend::gemm("expert: dh = dg Wg", op::n, op::n, int(n), di, Ii, T(1), dm.data(), Ii,
                          ex.gate_proj.weight.data(), di, T(0), dhe.data(), di);
            Backend::gemm("expert: dh += du Wu", op::n, op::n, int(n), di, Ii, T(1), du.data(), Ii,
                          ex.up_proj.weight.data(), di, T(1), dhe.data(), di);
            Backend::for_each_index(std::int64_t(n * d), moe_kernels::add_rows_to<T>{dh.data(), dhe.data(),
                                                                                     maps.token_d.data(), nullptr,
                                                                                     nullptr, std::int64_t(d)});
          }
        }
      }

      if constexpr (plan::need_dz) {
        tensor_t dz({N, E}, memory_use::workspace);
        const T* probs = nullptr;
        if constexpr (plan::save_probs) probs = s.probs.data();
        Backend::for_each_index(std::int64_t(N), moe_kernels::router_grad<T, K, Policy::renormalise>{
                                                     dz.data(), s.route.data(), rw, a.data(), probs, std::int64_t(E)});
        if constexpr (plan::train_router)
          Backend::gemm("router: dWr += dz^T h", op::t, op::n, int(E), di, int(N), T(1), dz.data(), int(E), s.x.data(),
                        di, T(1), gr.router.data(), di);
        if constexpr (NeedsInputGrad)
          Backend::gemm("router: dh += dz Wr", op::n, op::n, int(N), di, int(E), T(1), dz.data(), int(E),
                        w.router.data(), di, T(1), dh.data(), di);
      }
      if constexpr (NeedsInputGrad) {
        return dh;
      } else {
        return {};
      }
    }
  }

  // The router, then the newest expert's tensors, as for_each_parameter orders them.
  template <class F>
  static void for_each_trainable(weights_t& w, grads_t& g, F&& f) {
    if constexpr (plan::train_router) f(schema::router::name(), w.router, g.router);
    if constexpr (plan::newest_active) {
      const std::size_t E = w.expert_count();
      auto& n = w.expert(E - 1);
      const std::string p = schema::expert_prefix(E - 1);
      mlp_projections::for_each([&](auto e) {
        using P = decltype(e);
        if constexpr (trains_v<typename P::tag, Recipe>) f(p + P::name() + ".weight", P::weight(n).weight, P::grad(g).weight);
      });
      if constexpr (plan::train_alpha) f(p + schema::act_fn_alpha::name(), n.act_alpha, g.act_alpha);
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
  // (token, slot) pairs grouped by expert, tokens ascending within a group, from the route
  // (read on the host).
  struct pairs {
    std::vector<std::size_t> offset, token, slot;
    std::size_t count(std::size_t e) const { return offset[e + 1] - offset[e]; }
  };
  static pairs group_pairs(const tensor_t& route_t, std::size_t E) {
    const std::size_t N = route_t.dim(0);
    cpu::tensor<T> route({N, K}, memory_use::workspace);
    Backend::download(route_t, route);
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

  // Expert e's rows: their tokens (host, for gathers) and, on the backend, their tokens and
  // (token, slot) pairs t K + j.
  struct expert_maps {
    std::vector<std::int64_t> token;
    typename Backend::template tensor<std::int64_t> token_d, pair_d;
    expert_maps(const pairs& p, std::size_t e) {
      const std::size_t n = p.count(e);
      cpu::tensor<std::int64_t> t({n}, memory_use::workspace), pr({n}, memory_use::workspace);
      token.resize(n);
      for (std::size_t r = 0; r < n; ++r) {
        token[r] = t[r] = std::int64_t(p.token[p.offset[e] + r]);
        pr[r] = std::int64_t(p.token[p.offset[e] + r] * K + p.slot[p.offset[e] + r]);
      }
      token_d = Backend::upload(t, memory_use::workspace);
      pair_d = Backend::upload(pr, memory_use::workspace);
    }
  };

  static T* fresh(tensor_t& t, std::size_t n, std::size_t cols) {
    t = tensor_t({n, cols}, memory_use::workspace);
    return t.data();
  }
  // The rows of x (tokens in order) that chose expert e.
  static tensor_t gather(const tensor_t& x, const expert_maps& m) {
    const std::size_t d = x.dim(x.rank() - 1);
    tensor_t out({m.token.size(), d}, memory_use::workspace);
    Backend::gather_rows(x, d, m.token, out);
    return out;
  }

  // E, after checking the router and the experts' count against the policy and the options.
  std::size_t experts_of(const weights_t& w, std::size_t d) const {
    if (!w.is_mixture())
      throw std::invalid_argument("skillgraft: " + schema::router::path() + " is missing: an nn::moe MLP needs a router and its "
                                  "experts (cl::add_expert)");
    const std::size_t E = w.router.dim(0);
    if (w.router.rank() != 2 || w.router.dim(1) != d || E != std::size_t(mlp_options.experts))
      throw std::invalid_argument("skillgraft: " + schema::router::path() + " has shape " + w.router.shape().str() + ", expected [" +
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
  template <class T, class B>
  static void check_weights(const mlp_weights<T, B>& w, const decoder_config& c, const options& o,
                            const std::string& prefix) {
    const std::size_t d = std::size_t(c.hidden), E = std::size_t(o.experts);
    if (o.experts < TopK)
      throw std::invalid_argument("skillgraft: moe_options.experts is " + std::to_string(o.experts) +
                                  ", fewer than the " + std::to_string(TopK) + " experts chosen per token");
    if (!w.is_mixture())
      throw std::invalid_argument("skillgraft: " + prefix + schema::router::name() + " is missing: an nn::moe MLP needs a router "
                                  "and its experts (cl::add_expert turns a dense MLP into a mixture)");
    cpu::expect_shape(w.router, {E, d}, prefix + schema::router::name());
    if (w.experts.size() + 1 != E)
      throw std::invalid_argument("skillgraft: " + prefix + "experts has " + std::to_string(w.experts.size() + 1) +
                                  " experts, expected " + std::to_string(E));
    for (std::size_t e = 0; e < E; ++e) {
      const auto& x = w.expert(e);
      const std::string p = prefix + schema::expert_prefix(e);
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
