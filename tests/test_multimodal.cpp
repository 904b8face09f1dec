// The multimodal model: bidirectional, rotary-free attention for the vision blocks,
// the vision encoder, the projector and the whole image -> soft tokens -> LM chain,
// checked against finite differences in double precision under the multimodal recipes;
// the recipes' names; train_step driving the multimodal model with frozen parts untouched;
// a mixture of experts on the LM's MLP grown from the dense model.
#include "support/gradcheck.hpp"
#include "support/random_multimodal.hpp"

#include <array>
#include <cstring>

#include "skillgraft/cl/moe.hpp"
#include "skillgraft/model/generate.hpp"
#include "skillgraft/model/multimodal.hpp"
#include "skillgraft/policy/dispatch.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;
using sg::token_ids;
using sg::test::gradcheck;
using sg::test::random_tensor;
using D = double;
using sg::test::random_multimodal;
using sg::test::tiny_merged_multimodal;
using sg::test::tiny_multimodal;
using sg::test::vit_blocks;

namespace {

const token_ids ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}};

}  // namespace

TEST_CASE("attention without causal mask and rotary embeddings: gradients") {
  auto c = vit_blocks();
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.hidden = 16;
  sg::nn::attention_weights<D> w(c, sg::memory_use::weights);
  std::mt19937 rng(3);
  for (auto* l : {&w.q_proj, &w.k_proj, &w.v_proj, &w.o_proj}) sg::test::fill_linear(*l, rng);
  auto x = random_tensor<D>({2, 5, 16}, 8);
  auto check = [&](auto recipe, auto dx) {
    using R = decltype(recipe);
    sg::nn::self_attention<D, R, decltype(dx)::value> attn{c, nullptr, 0};
    gradcheck(attn, w, x);
  };
  check(sg::recipe::sa_proj, std::true_type{});
  check(sg::recipe::sa_proj, std::false_type{});
  check(sg::trainable<sg::proj::q>, std::false_type{});
  check(sg::trainable<sg::proj::k>, std::false_type{});
  check(sg::recipe::frozen, std::true_type{});
}

TEST_CASE("attention without mask or rotation sees every position and is permutation-equivariant") {
  auto c = vit_blocks();
  sg::nn::attention_weights<D> w(c, sg::memory_use::weights);
  std::mt19937 rng(4);
  for (auto* l : {&w.q_proj, &w.k_proj, &w.v_proj, &w.o_proj}) sg::test::fill_linear(*l, rng);
  using frozen = std::remove_cv_t<decltype(sg::recipe::frozen)>;
  sg::nn::self_attention<D, frozen, false> attn{c, nullptr, 0};
  decltype(attn)::saved_t s;
  auto x = random_tensor<D>({1, 4, 8}, 9);
  auto y = attn.forward(w, x, s);
  // Changing the last position changes the first one's output (no causal mask).
  auto x2 = x.clone();
  for (int j = 0; j < 8; ++j) x2[std::size_t(3 * 8 + j)] += 0.5;
  auto y2 = attn.forward(w, x2, s);
  double moved = 0;
  for (int j = 0; j < 8; ++j) moved += std::abs(y2[std::size_t(j)] - y[std::size_t(j)]);
  CHECK(moved > 1e-6);
  // Reversing the positions reverses the outputs (no position information at all).
  auto xr = x.clone();
  for (int p = 0; p < 4; ++p)
    for (int j = 0; j < 8; ++j) xr[std::size_t(p * 8 + j)] = x[std::size_t((3 - p) * 8 + j)];
  auto yr = attn.forward(w, xr, s);
  for (int p = 0; p < 4; ++p)
    for (int j = 0; j < 8; ++j) CHECK(yr[std::size_t(p * 8 + j)] == Approx(y[std::size_t((3 - p) * 8 + j)]).margin(1e-13));
}

TEST_CASE("vision encoder: gradients of every tensor when it trains, nothing when frozen") {
  const auto c = tiny_multimodal();
  auto w = random_multimodal<D>(c, 5);
  auto images = random_tensor<D>({2, 8, 8, 3}, 6, 0.5);
  auto names = gradcheck(sg::model::vision_encoder<D, true>(c.vision), w.vision, images);
  std::set<std::string> expected{"vision_tower.patch_embed.weight", "vision_tower.patch_embed.bias",
                                 "vision_tower.position_embedding", "vision_tower.post_layernorm.weight"};
  for (int l = 0; l < 2; ++l)
    for (const char* n : {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                          "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"})
      expected.insert("vision_tower.layers." + std::to_string(l) + "." + n);
  CHECK(names == expected);
  CHECK(gradcheck(sg::model::vision_encoder<D, false>(c.vision), w.vision, images).empty());
  // A frozen encoder keeps nothing for backward.
  const auto before = sg::ledger().live(sg::memory_use::saved_activations);
  sg::model::vision_encoder<D, false>::saved_t s;
  auto y = sg::model::vision_encoder<D, false>(c.vision).forward(w.vision, images, s);
  CHECK(sg::ledger().live(sg::memory_use::saved_activations) == before);
  CHECK(y.shape() == sg::cpu::shape_t{2, 4, 8});
}

TEST_CASE("vision encoder: patches are cut in row-major grid order") {
  sg::model::vision_config c;
  c.image_size = 4;
  c.patch_size = 2;
  c.channels = 1;
  sg::cpu::tensor<D> img({1, 4, 4, 1}, sg::memory_use::workspace);
  for (std::size_t i = 0; i < 16; ++i) img[i] = double(i);  // pixel (y, x) = 4y + x
  auto p = sg::model::patchify(img, c);
  REQUIRE(p.shape() == sg::cpu::shape_t{1, 4, 4});
  const double expect[4][4] = {{0, 1, 4, 5}, {2, 3, 6, 7}, {8, 9, 12, 13}, {10, 11, 14, 15}};
  for (int q = 0; q < 4; ++q)
    for (int j = 0; j < 4; ++j) CHECK(p[std::size_t(q * 4 + j)] == expect[q][j]);
  sg::cpu::tensor<D> bad({1, 4, 5, 1}, sg::memory_use::workspace);
  CHECK_THROWS_WITH(sg::model::patchify(bad, c), Catch::Contains("images have shape [1, 4, 5, 1], expected [batch, 4, 4, 1]"));
}

TEST_CASE("vision encoder: the patch merger concatenates each 2x2 block of neighbouring patches, in order") {
  sg::model::vision_config c;
  c.image_size = 8;
  c.patch_size = 2;  // a 4x4 grid
  c.channels = 1;
  c.merge = 2;
  c.blocks.hidden = 2;
  REQUIRE(c.tokens() == 4);
  REQUIRE(c.out_features() == 8);
  // Patch (gy, gx) carries features (10 (4 gy + gx), 10 (4 gy + gx) + 1).
  sg::cpu::tensor<D> y({1, 16, 2}, sg::memory_use::workspace);
  for (std::size_t q = 0; q < 16; ++q) y[2 * q] = 10.0 * double(q), y[2 * q + 1] = 10.0 * double(q) + 1;
  auto m = sg::model::merge_patches(y, c);
  REQUIRE(m.shape() == sg::cpu::shape_t{1, 4, 8});
  // Token (Y, X) of the 2x2 merged grid holds patches (2Y, 2X), (2Y, 2X+1), (2Y+1, 2X), (2Y+1, 2X+1).
  const int patches_of[4][4] = {{0, 1, 4, 5}, {2, 3, 6, 7}, {8, 9, 12, 13}, {10, 11, 14, 15}};
  for (int t = 0; t < 4; ++t)
    for (int k = 0; k < 4; ++k)
      for (int f = 0; f < 2; ++f) CHECK(m[std::size_t(8 * t + 2 * k + f)] == 10.0 * patches_of[t][k] + f);
  auto back = sg::model::unmerge_patches(m, c);
  REQUIRE(back.shape() == y.shape());
  CHECK(std::memcmp(back.data(), y.data(), y.size() * sizeof(D)) == 0);
  CHECK_THROWS_WITH(sg::model::merge_patches(m, c), Catch::Contains("patch merger: input of shape [1, 4, 8], expected [1, 16, 2]"));
}

TEST_CASE("vision encoder with a patch merger: gradients of every tensor, merged soft tokens through the LM") {
  const auto c = tiny_merged_multimodal();
  auto w = random_multimodal<D>(c, 5);
  auto images = random_tensor<D>({2, 8, 8, 3}, 6, 0.5);
  auto names = gradcheck(sg::model::vision_encoder<D, true>(c.vision), w.vision, images);
  CHECK(names.size() == 4 + 2 * 9);
  sg::model::vision_encoder<D, false>::saved_t s;
  auto y = sg::model::vision_encoder<D, false>(c.vision).forward(w.vision, images, s);
  CHECK(y.shape() == sg::cpu::shape_t{2, 4, 32});
  // The merged tokens are the unmerged encoder's outputs, rearranged (nothing else changes).
  auto plain = c.vision;
  plain.merge = 1;
  sg::model::vision_encoder<D, false>::saved_t s1;
  auto y1 = sg::model::vision_encoder<D, false>(plain).forward(w.vision, images, s1);
  auto expect = sg::model::merge_patches(y1, c.vision);
  CHECK(std::memcmp(expect.data(), y.data(), y.size() * sizeof(D)) == 0);
  sg::model::multimodal_lm<D, std::remove_cv_t<decltype(sg::recipe::frozen)>> mm(c, sg::recipe::frozen);
  CHECK(mm.image_tokens() == 4);
}

TEST_CASE("projector: gradients for every combination of training and input gradient") {
  const auto c = tiny_multimodal();
  auto w = random_multimodal<D>(c, 7);
  auto x = random_tensor<D>({2, 3, 8}, 8);
  CHECK(gradcheck(sg::model::projector<D, true, true>{}, w.projector, x).size() == 4);
  CHECK(gradcheck(sg::model::projector<D, true, false>{}, w.projector, x).size() == 4);
  CHECK(gradcheck(sg::model::projector<D, false, true>{}, w.projector, x).empty());
  CHECK(gradcheck(sg::model::projector<D, false, false>{}, w.projector, x).empty());
  CHECK(sg::model::gelu(0.0) == 0.0);
  CHECK(sg::model::gelu(1.0) == Approx(0.8413447460685429));
}

namespace {

// Loss through the whole chain: image -> encoder -> projector -> LM, masked CE on the text.
template <class R>
std::set<std::string> check_multimodal(R recipe, const sg::model::multimodal_config& c = tiny_multimodal()) {
  auto w = random_multimodal<D>(c, 11);
  auto images = random_tensor<D>({2, 8, 8, 3}, 12, 0.5);
  sg::model::multimodal_lm<D, R> mm(c, recipe);
  const std::size_t P = std::size_t(mm.image_tokens());
  token_ids tg = xt::full_like(token_ids::from_shape({2, P + 5}), sg::ignore_index);
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t s = 1; s + 1 < 5; ++s) tg(b, P + s) = ids(b, s + 1);
  auto loss = [&] {
    typename decltype(mm)::saved_t s;
    auto h = mm.forward(w, ids, s, &images);
    return sg::train::masked_cross_entropy<D>(h, w.head(), tg, sg::train::no_head_grad, {.want_dh = false}).loss;
  };
  typename decltype(mm)::saved_t s;
  auto g = mm.make_grads(w);
  auto h = mm.forward(w, ids, s, &images);
  auto r = sg::train::masked_cross_entropy<D>(h, w.head(), tg, mm.head_grad(g));
  mm.backward(w, s, r.dh, g);
  std::set<std::string> seen;
  mm.for_each_trainable(w, g, [&](const std::string& n, sg::cpu::tensor<D>& p, sg::cpu::tensor<D>& dp) {
    sg::test::check_tensor(n, p, dp, loss, {.max_elements = 24});
    seen.insert(n);
  });
  return seen;
}

std::size_t count_prefix(const std::set<std::string>& names, const std::string& prefix) {
  std::size_t n = 0;
  for (const auto& s : names) n += s.rfind(prefix, 0) == 0;
  return n;
}

}  // namespace

TEST_CASE("multimodal: finite differences through image, projector and LM under each recipe") {
  auto vp = check_multimodal(sg::recipe::vision_projector);
  CHECK(count_prefix(vp, "vision_tower.") == 4 + 2 * 9);
  CHECK(count_prefix(vp, "multi_modal_projector.") == 4);
  CHECK(count_prefix(vp, "language_model.") == 0);
  auto full = check_multimodal(sg::recipe::full);
  CHECK(count_prefix(full, "vision_tower.") == 4 + 2 * 9);
  CHECK(count_prefix(full, "multi_modal_projector.") == 4);
  CHECK(count_prefix(full, "language_model.") == 3 + 2 * 9);
  auto proj = check_multimodal(sg::trainable<sg::group::projector>);
  CHECK(proj.size() == 4);
  auto vis = check_multimodal(sg::trainable<sg::group::vision>);
  CHECK(vis.size() == 4 + 2 * 9);
  auto sa = check_multimodal(sg::recipe::sa_proj);
  CHECK(sa.size() == 2 * 4);
  CHECK(count_prefix(sa, "language_model.model.layers.") == 8);
  CHECK(check_multimodal(sg::recipe::mlp_gate_up.on_layers(1, 1)).size() == 2);
  CHECK(check_multimodal(sg::recipe::frozen).empty());
  // With the patch merger between encoder and projector.
  auto merged = check_multimodal(sg::recipe::full, tiny_merged_multimodal());
  CHECK(count_prefix(merged, "vision_tower.") == 4 + 2 * 9);
  CHECK(count_prefix(merged, "multi_modal_projector.") == 4);
  CHECK(count_prefix(merged, "language_model.") == 3 + 2 * 9);
}

TEST_CASE("multimodal: text-only rows, soft tokens, and generation from an image") {
  const auto c = tiny_multimodal();
  auto w = random_multimodal<float>(c, 13);
  auto images = random_tensor<float>({2, 8, 8, 3}, 14, 0.5);
  using R = std::remove_cv_t<decltype(sg::recipe::full)>;
  sg::model::multimodal_lm<float, R> mm(c, sg::recipe::full);
  typename decltype(mm)::saved_t s;
  auto h_text = mm.forward(w, ids, s, nullptr);
  CHECK(h_text.shape() == sg::cpu::shape_t{2, 5, 16});
  auto g = mm.make_grads(w);
  mm.backward(w, s, h_text, g);  // no image: nothing reaches the projector or the encoder
  CHECK(g.projector.linear_1.weight.vec().cwiseAbs().maxCoeff() == 0.0f);
  CHECK(g.vision.patch_embed.weight.vec().cwiseAbs().maxCoeff() == 0.0f);
  // The soft tokens are what forward prefixes: the LM on them gives the same states.
  auto soft = mm.soft_tokens(w, images);
  auto h = mm.forward(w, ids, s, &images);
  sg::model::decoder_lm<float, std::remove_cv_t<decltype(sg::recipe::frozen)>> lm(c.text, sg::recipe::frozen);
  decltype(lm)::saved_t ls;
  auto h2 = lm.forward(w.lm, ids, ls, &soft);
  REQUIRE(h.shape() == h2.shape());
  CHECK((h.vec() - h2.vec()).cwiseAbs().maxCoeff() == 0.0f);
  auto out = sg::model::generate(mm.lm(), w.lm, ids, sg::model::sampling{.max_new_tokens = 3, .allowed = {}}, &soft);
  CHECK(out.shape(1) == 3);
  sg::cpu::tensor<float> three({3, 8, 8, 3}, sg::memory_use::workspace);
  CHECK_THROWS_WITH(mm.forward(w, ids, s, &three), Catch::Contains("3 images for a batch of 2 token rows"));
}

TEST_CASE("multimodal: a mixture grown from the dense MLP starts at the dense model bit for bit, its router trains") {
  const auto c = tiny_multimodal();
  const auto dense = random_multimodal<float>(c, 17);
  auto grown = random_multimodal<float>(c, 17);
  REQUIRE(sg::cl::add_expert(grown.lm) == 2);
  auto images = random_tensor<float>({2, 8, 8, 3}, 18, 0.5);
  using frozen = std::remove_cv_t<decltype(sg::recipe::frozen)>;
  constexpr auto recipe = sg::recipe::mlp | sg::trainable<sg::group::router>;
  using moe2 = sg::nn::moe<sg::nn::act::silu, 2>;
  sg::model::multimodal_lm<float, frozen> base(c, sg::recipe::frozen);
  sg::model::multimodal_lm<float, std::remove_cv_t<decltype(recipe)>, sg::backend::cpu, moe2> mm(c, recipe, {.experts = 2});
  CHECK(mm.mlp_options().experts == 2);
  using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  auto logits = [](const sg::cpu::tensor<float>& h, const sg::model::multimodal_weights<float>& w) {
    const auto d = Eigen::Index(h.shape().last());
    Eigen::Map<const matrix> H(h.data(), Eigen::Index(h.size()) / d, d);
    Eigen::Map<const matrix> W(w.head().data(), Eigen::Index(w.head().dim(0)), d);
    return matrix(H * W.transpose());
  };
  // Both experts compute f and each weighs exactly 1/2 (zero router): f/2 + f/2 = f.
  for (const auto* img : std::array<const sg::cpu::tensor<float>*, 2>{&images, nullptr}) {
    decltype(base)::saved_t s0;
    decltype(mm)::saved_t s1;
    const auto h0 = base.forward(dense, ids, s0, img);
    const auto h1 = mm.forward(grown, ids, s1, img);
    REQUIRE(h0.shape() == h1.shape());
    CHECK(std::memcmp(h0.data(), h1.data(), h0.bytes()) == 0);
    CHECK(logits(h0, dense) == logits(h1, grown));
  }
  const auto soft = mm.soft_tokens(grown, images);
  const sg::model::sampling greedy{.max_new_tokens = 4, .allowed = {}};
  const bool same_tokens = sg::model::generate(mm.lm(), grown.lm, ids, greedy, &soft) ==
                           sg::model::generate(base.lm(), dense.lm, ids, greedy, &soft);
  CHECK(same_tokens);
  // Identical experts give the router no gradient; once the newest expert has moved away
  // from the original, the router learns which to use.
  auto g = mm.make_grads(grown);
  sg::train::adamw<float> opt(mm, grown, g, {.lr = 1e-2});
  const std::size_t P = std::size_t(mm.image_tokens());
  sg::train::micro_batch<float> mb{ids, xt::full_like(token_ids::from_shape({2, P + 5}), sg::ignore_index), &images};
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t s = 0; s + 1 < 5; ++s) mb.targets(b, P + s) = ids(b, s + 1);
  for (int step = 0; step < 3; ++step)
    sg::train::train_step(mm, grown, g, opt, sg::train::constant_schedule{1e-2}, std::span(&mb, 1));
  decltype(mm)::saved_t s;
  auto g_after = mm.make_grads(grown);
  const auto h = mm.forward(grown, ids, s, &images);
  const auto r = sg::train::masked_cross_entropy<float>(h, grown.head(), mb.targets, mm.head_grad(g_after));
  mm.backward(grown, s, r.dh, g_after);
  std::set<std::string> routers;
  mm.for_each_trainable(grown, g_after, [&](const std::string& n, sg::cpu::tensor<float>& p, sg::cpu::tensor<float>& dp) {
    if (n.find("mlp.router.") == std::string::npos) return;
    routers.insert(n);
    INFO(n);
    CHECK(p.vec().cwiseAbs().maxCoeff() > 0.0f);
    CHECK(dp.vec().cwiseAbs().maxCoeff() > 0.0f);
  });
  CHECK(routers.size() == std::size_t(c.text.n_layers));
  // The original MLP (expert 0) stays the dense model's; the newest expert trained.
  for (std::size_t l = 0; l < grown.lm.trunk.layers.size(); ++l) {
    const auto& m = grown.lm.trunk.layers[l].mlp;
    const auto& original = dense.lm.trunk.layers[l].mlp.gate_proj.weight;
    CHECK(std::memcmp(m.gate_proj.weight.data(), original.data(), original.bytes()) == 0);
    CHECK(std::memcmp(m.experts[0].gate_proj.weight.data(), original.data(), original.bytes()) != 0);
  }
}

namespace {
template <class R>
void check_train_step(R recipe) {
  const auto c = tiny_multimodal();
  auto w = random_multimodal<float>(c, 15);
  auto images = random_tensor<float>({2, 8, 8, 3}, 16, 0.5);
  sg::model::multimodal_lm<float, R> mm(c, recipe);
  std::map<std::string, std::vector<float>> before;
  sg::model::for_each_multimodal_parameter(w, [&](const std::string& n, sg::cpu::tensor<float>& t) {
    before[n].assign(t.data(), t.data() + t.size());
  });
  std::set<std::string> trained;
  auto g = mm.make_grads(w);
  mm.for_each_trainable(w, g, [&](const std::string& n, auto&, auto&) { trained.insert(n); });
  sg::train::adamw<float> opt(mm, w, g, {.lr = 1e-2});
  const std::size_t P = std::size_t(mm.image_tokens());
  sg::train::micro_batch<float> mb{ids, xt::full_like(token_ids::from_shape({2, P + 5}), sg::ignore_index), &images};
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t s = 0; s + 1 < 5; ++s) mb.targets(b, P + s) = ids(b, s + 1);
  double first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    auto st = sg::train::train_step(mm, w, g, opt, sg::train::constant_schedule{1e-2}, std::span(&mb, 1));
    if (step == 0) first = st.loss;
    last = st.loss;
  }
  INFO("loss " << first << " -> " << last);
  CHECK(last < first);
  sg::model::for_each_multimodal_parameter(w, [&](const std::string& n, sg::cpu::tensor<float>& t) {
    const bool same = std::equal(t.data(), t.data() + t.size(), before[n].data());
    INFO(n);
    CHECK(same == !trained.count(n));
  });
}
}  // namespace

TEST_CASE("multimodal: train_step drives the model, frozen tensors stay bit-identical") {
  check_train_step(sg::recipe::vision_projector);
  check_train_step(sg::recipe::sa_proj);
  check_train_step(sg::recipe::full);
}

TEST_CASE("multimodal recipes by name") {
  CHECK(sg::recipe::full == (sg::recipe::llm | sg::recipe::vision_projector));
  CHECK(sg::recipe::vision_projector.trains<sg::group::vision>);
  CHECK_FALSE(sg::recipe::vision_projector.trains<sg::proj::q>);
  CHECK(sg::multimodal_recipe_names() == "sa_proj, mlp, mlp_gate_up, mlp_down, llm, frozen, vision_projector, full");
  auto count = [](auto r) { return int(decltype(sg::hana::length(r.set))::value); };
  CHECK(sg::with_multimodal_recipe("full", count) == 14);
  CHECK(sg::with_multimodal_recipe("vision_projector", count) == 2);
  CHECK(sg::with_multimodal_recipe("sa_proj", count) == 4);
  CHECK(sg::is_multimodal_recipe_name("full"));
  CHECK_FALSE(sg::is_recipe_name("full"));
  CHECK_THROWS_WITH(sg::with_recipe("full", count), Catch::Contains("use with_multimodal_recipe"));
  CHECK_THROWS_WITH(sg::with_multimodal_recipe("vision", count),
                    "skillgraft: unknown recipe 'vision'; valid names: sa_proj, mlp, mlp_gate_up, mlp_down, llm, frozen, "
                    "vision_projector, full");
}

TEST_CASE("multimodal: configuration errors name the mismatch") {
  auto c = tiny_multimodal();
  c.projector.out = 12;
  CHECK_THROWS_WITH(sg::model::multimodal_weights<float>(c), Catch::Contains("the projector gives 12 features, the language model's hidden size is 16"));
  c = tiny_multimodal();
  c.vision.blocks.causal = true;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("bidirectional and rotary-free"));
  c = tiny_multimodal();
  c.vision.patch_size = 3;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("image_size (8) is not a multiple of patch_size (3)"));
  c = tiny_multimodal();
  c.vision.merge = 3;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("merge (3) must be positive and divide the patch grid (2)"));
  c = tiny_merged_multimodal();
  c.projector.in = 8;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("the projector takes 8 features, the vision encoder gives 32"));
}
