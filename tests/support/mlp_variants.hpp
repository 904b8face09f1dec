#pragma once
// Shared by the MLP-policy tests (test_mlp_variants, test_moe_training): random mixtures,
// routing margins, parameter snapshots, member-existence concepts and recipe types.
#include "support/gradcheck.hpp"
#include "support/random_lm.hpp"

#include <cstring>
#include <map>

#include "skillgraft/cl/moe.hpp"
#include "skillgraft/model/parameters.hpp"
#include "skillgraft/nn/memory_report.hpp"
#include "skillgraft/nn/moe_mlp.hpp"
#include "skillgraft/policy/recipes.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;
namespace act = sg::nn::act;
using namespace sg::proj;
using sg::group::act_range;
using sg::group::router;
using sg::memory_use;
using sg::test::gradcheck;
using sg::test::random_tensor;
using D = double;

namespace mlp_variants {

template <class R, bool Dx, class Mlp>
using block = sg::nn::decoder_block<float, std::remove_const_t<R>, Dx, sg::backend::cpu, Mlp>;
using xsilu_mlp = sg::nn::swiglu<act::xsilu>;
using moe2 = sg::nn::moe<act::silu, 2>;
using xmoe2 = sg::nn::moe<act::xsilu, 2>;
using switch1 = sg::nn::moe<act::silu, 1>;  // top-1, softmax weight (Switch)

// Random experts and router for a mixture of E experts on an MLP (its Gate, Up, Down become
// expert 0); alpha of every expert drawn too when `range`.
template <class T>
void make_mixture(sg::nn::mlp_weights<T>& w, const sg::decoder_config& c, int E, bool range, std::mt19937& rng) {
  w.router = sg::cpu::tensor<T>({std::size_t(E), std::size_t(c.hidden)}, memory_use::weights);
  sg::test::fill_normal(w.router, rng, 0.0, 1.0 / std::sqrt(double(c.hidden)));
  w.experts.clear();
  for (int e = 1; e < E; ++e) {
    auto& x = w.experts.emplace_back(c, memory_use::weights);
    for (auto* l : {&x.gate_proj, &x.up_proj, &x.down_proj}) sg::test::fill_linear(*l, rng);
  }
  if (range)
    for (int e = 0; e < E; ++e) {
      auto& x = w.expert(std::size_t(e));
      x.act_alpha = sg::cpu::tensor<T>({1}, memory_use::weights);
      x.act_alpha[0] = T(0.15 + 0.1 * e);
    }
}

// Smallest gap, over tokens, between the k-th and (k+1)-th router logit: far from zero means
// finite differences never cross a change of the chosen experts.
template <class T>
double routing_margin(const sg::nn::mlp_weights<T>& w, const sg::cpu::tensor<T>& h, int k) {
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> z = h.mat() * w.router.mat().transpose();
  double margin = 1e9;
  for (Eigen::Index t = 0; t < z.rows(); ++t) {
    std::vector<T> row(z.row(t).data(), z.row(t).data() + z.cols());
    std::sort(row.begin(), row.end(), std::greater<T>());
    if (std::size_t(k) < row.size()) margin = std::min(margin, double(row[std::size_t(k) - 1] - row[std::size_t(k)]));
  }
  return margin;
}

// Every tensor of a trunk by Hugging Face name (for_each_parameter's walk), as bytes.
template <class T>
std::map<std::string, std::vector<unsigned char>> snapshot(sg::model::lm_weights<T>& w) {
  std::map<std::string, std::vector<unsigned char>> out;
  sg::model::for_each_parameter(w, [&](const std::string& n, sg::cpu::tensor<T>& t, auto, int) {
    std::vector<unsigned char> b(t.bytes());
    if (t.bytes()) std::memcpy(b.data(), t.data(), t.bytes());
    out[n] = std::move(b);
  });
  return out;
}

template <class T>
bool bitwise_equal(const sg::cpu::tensor<T>& a, const sg::cpu::tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

inline sg::decoder_config lm_config(int layers = 2) { return sg::test::tiny_lm_config(layers); }
using sg::test::random_lm;

inline const sg::token_ids ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}};

// Member checks must be dependent to be soft: one concept per member path.
template <class S>
concept has_act_alpha = requires(S g) { g.act_alpha; };
template <class S>
concept has_router = requires(S g) { g.router; };
template <class S>
concept has_gate_proj = requires(S g) { g.gate_proj; };
template <class S>
concept has_down_proj = requires(S g) { g.down_proj; };
template <class S>
concept has_mlp = requires(S s) { s.mlp; };
template <class S>
concept has_mlp_g_u = requires(S s) { s.mlp.g; s.mlp.u; };
template <class S>
concept has_mlp_h = requires(S s) { s.mlp.h; };
template <class S>
concept has_mlp_m = requires(S s) { s.mlp.m; };
template <class S>
concept has_mlp_x = requires(S s) { s.mlp.x; };
template <class S>
concept has_mlp_y = requires(S s) { s.mlp.y; };
template <class S>
concept has_mlp_g = requires(S s) { s.mlp.g; };
template <class S>
concept has_mlp_u = requires(S s) { s.mlp.u; };
template <class S>
concept has_mlp_route = requires(S s) { s.mlp.route; s.mlp.route_weight; };
template <class S>
concept has_mlp_probs = requires(S s) { s.mlp.probs; };

using frozen_r = decltype(sg::recipe::frozen);
using gate_up_r = decltype(sg::recipe::mlp_gate_up);
using range_r = decltype(sg::trainable<act_range>);
using router_r = decltype(sg::trainable<router>);
using gate_up_router_r = decltype(sg::trainable<gate, up, router>);
using sa_router_r = decltype(sg::trainable<q, k, v, o, router>);
using down_r = decltype(sg::recipe::mlp_down);

}  // namespace mlp_variants
using namespace mlp_variants;
