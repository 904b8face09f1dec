// The multimodal model on the CUDA backend against the CPU backend (whose gradients are
// checked against finite differences in tests/test_multimodal.cpp): the vision encoder with
// and without the patch merger, the projector, and a whole training step under every
// multimodal recipe, with the device's saved activations and gradients equal to the CPU's
// bytes (the same plan) and frozen tensors untouched on the device.
//
// Built twice like parity.cpp: into test_cuda_host (Thrust on the host) and, by nvcc, into
// test_cuda_device (skipped without a GPU).
#include <catch2/catch.hpp>

#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "check.hpp"
#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/model/multimodal.hpp"
#include "skillgraft/policy/dispatch.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/step.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"
#include "support/random_multimodal.hpp"

namespace sg = skillgraft;
using sg::memory_use;
using sg::token_ids;
namespace dev = sg::cuda;
using sg::test::check_close;
using sg::test::check_gradients;

namespace {

// Bytes of `use` in the host ledger and the device ledger since construction.
struct both_ledgers {
  memory_use use;
  std::int64_t host, device;
  explicit both_ledgers(memory_use u) : use(u), host(sg::ledger().live(u)), device(dev::device_ledger().live(u)) {}
  std::int64_t host_delta() const { return sg::ledger().live(use) - host; }
  std::int64_t device_delta() const { return dev::device_ledger().live(use) - device; }
};

template <bool Train>
void vision_parity(const sg::model::multimodal_config& c) {
  using cpu_t = sg::model::vision_encoder<float, Train>;
  using dev_t = sg::model::vision_encoder<float, Train, sg::backend::cuda>;
  INFO("vision trains " << Train << ", merge " << c.vision.merge);
  auto hw = sg::test::random_multimodal<float>(c, 3);
  auto dw = sg::model::to_backend<sg::backend::cuda>(hw.vision);
  const cpu_t ce(c.vision);
  const dev_t de(c.vision);
  const auto images = sg::test::random_tensor<float>({3, 8, 8, 3}, 4, 0.5);
  const auto dimages = dev::tensor<float>::from_host(images, memory_use::workspace);
  auto cg = ce.make_grads(hw.vision);
  auto dg = de.make_grads(dw);
  typename cpu_t::saved_t cs;
  typename dev_t::saved_t ds;
  const both_ledgers saved(memory_use::saved_activations);
  const auto y = ce.forward(hw.vision, images, cs);
  const auto host_saved = saved.host_delta();
  const auto yd = de.forward(dw, dimages, ds);
  CHECK(saved.device_delta() == host_saved);  // the same plan: the same kept tensors
  if (!Train) CHECK(host_saved == 0);
  REQUIRE(y.shape() == sg::cpu::shape_t{3, std::size_t(c.vision.tokens()), std::size_t(c.vision.out_features())});
  check_close("vision encoder output", yd, y);
  if constexpr (Train) {
    const auto dy = sg::test::random_tensor<float>(y.shape(), 5);
    const auto ddy = dev::tensor<float>::from_host(dy, memory_use::workspace);
    ce.backward(hw.vision, cs, dy, cg);
    CHECK(de.backward(dw, ds, ddy, dg).empty());
    CHECK(check_gradients(ce, hw.vision, cg, de, dw, dg) == std::size_t(4 + 9 * c.vision.blocks.n_layers));
    // A gradient of the wrong shape is refused by name.
    const dev::tensor<float> wrong({3, 1, 8}, memory_use::workspace);
    CHECK_THROWS_WITH(de.backward(dw, ds, wrong, dg), Catch::Contains("vision encoder's output gradient"));
  }
}

// A micro-batch with images (every text position after the first predicts the next id) and
// a text-only one, on both backends.
struct batches {
  sg::cpu::tensor<float> images;
  dev::tensor<float> dimages;
  std::vector<sg::train::micro_batch<float>> host;
  std::vector<sg::train::micro_batch<float, sg::backend::cuda>> device;

  explicit batches(std::size_t P) : images(sg::test::random_tensor<float>({2, 8, 8, 3}, 16, 0.5)) {
    dimages = dev::tensor<float>::from_host(images, memory_use::workspace);
    const token_ids ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}};
    token_ids with_image = xt::full_like(token_ids::from_shape({2, P + 5}), sg::ignore_index);
    for (std::size_t b = 0; b < 2; ++b)
      for (std::size_t s = 0; s + 1 < 5; ++s) with_image(b, P + s) = ids(b, s + 1);
    const token_ids text = {{2, 9, 9, 4, 1, 6}};
    host.push_back({ids, with_image, &images});
    host.push_back({text, sg::shift_labels(text), nullptr});
    device.push_back({ids, with_image, &dimages});
    device.push_back({text, sg::shift_labels(text), nullptr});
  }
};

// Every tensor's bytes, by checkpoint name.
std::map<std::string, std::vector<unsigned char>> snapshot(sg::model::multimodal_weights<float>& w) {
  std::map<std::string, std::vector<unsigned char>> out;
  sg::model::for_each_multimodal_parameter(w, [&](const std::string& n, sg::cpu::tensor<float>& t) {
    std::vector<unsigned char> b(t.bytes());
    if (t.bytes()) std::memcpy(b.data(), t.data(), t.bytes());
    out[n] = std::move(b);
  });
  return out;
}

template <class R>
void step_parity(R recipe, const sg::model::multimodal_config& c) {
  auto hw = sg::test::random_multimodal<float>(c, 21);
  auto dw = sg::model::to_backend<sg::backend::cuda>(hw);
  sg::model::multimodal_lm<float, R> cm(c, recipe);
  sg::model::multimodal_lm<float, R, sg::backend::cuda> dm(c, recipe);
  CHECK(dm.image_tokens() == cm.image_tokens());
  CHECK(dm.trainable_elements(dw) == cm.trainable_elements(hw));
  const both_ledgers grads(memory_use::gradients);
  auto cg = cm.make_grads(hw);
  const auto host_grads = grads.host_delta();
  auto dg = dm.make_grads(dw);
  CHECK(grads.device_delta() == host_grads);
  // eps well above the gradients' rounding: AdamW's first step moves each weight by about
  // lr g / (|g| + eps), whose slope at g = 0 is lr / eps. With the default 1e-8 that multiplies
  // the two backends' rounding of a near-zero gradient (well within the gradient check's
  // tolerance) by 1e6 into the weights, and the weight check then compares rounding noise, not
  // the update: seen on a CPU whose GEMM sums in another order (2e-4 apart on one weight of the
  // vision MLP, 2 % of its update). At 1e-2 the slope is 1 and every term of the update still runs.
  const sg::train::adamw_options o{.lr = 1e-2, .eps = 1e-2, .weight_decay = 0.1};
  sg::train::adamw<float> copt(cm, hw, cg, o);
  sg::train::adamw<float, sg::backend::cuda> dopt(dm, dw, dg, o);
  batches b(std::size_t(cm.image_tokens()));

  // Forward alone: the hidden states and the activations kept for backward.
  {
    const both_ledgers saved(memory_use::saved_activations);
    typename decltype(cm)::saved_t cs;
    typename decltype(dm)::saved_t ds;
    const auto h = cm.forward(hw, b.host[0].ids, cs, &b.images);
    const auto host_saved = saved.host_delta();
    const auto hd = dm.forward(dw, b.device[0].ids, ds, &b.dimages);
    CHECK(saved.device_delta() == host_saved);
    check_close("hidden states", hd, h);
    check_close("soft tokens", dm.soft_tokens(dw, b.dimages), cm.soft_tokens(hw, b.images));
  }

  const sg::train::constant_schedule lr{1e-2};
  const sg::train::step_options so{.max_grad_norm = 0.5};
  const auto before = snapshot(hw);
  const auto cst = sg::train::train_step(cm, hw, cg, copt, lr, std::span<const sg::train::micro_batch<float>>(b.host), so);
  const auto dst =
      sg::train::train_step(dm, dw, dg, dopt, lr, std::span<const sg::train::micro_batch<float, sg::backend::cuda>>(b.device), so);
  CHECK(dst.targets == cst.targets);
  CHECK(std::abs(dst.loss - cst.loss) <= 1e-5 * std::abs(cst.loss));
  CHECK(std::abs(dst.grad_norm - cst.grad_norm) <= sg::test::rel * cst.grad_norm);
  CHECK(check_gradients(cm, hw, cg, dm, dw, dg) > 0);
  // After the step: trainable tensors moved, frozen ones are bit-identical on the device.
  std::set<std::string> trainable;
  dm.for_each_trainable(dw, dg, [&](const std::string& name, auto&, auto&) { trainable.insert(name); });
  auto back = sg::test::random_multimodal<float>(c, 99);
  sg::model::download(dw, back);
  const auto after = snapshot(back);
  const auto host_after = snapshot(hw);
  for (const auto& [name, bytes] : before) {
    INFO(name);
    if (trainable.count(name)) {
      CHECK(after.at(name) != bytes);
      // Moved by the same update as on the CPU (float rounding apart).
      sg::cpu::tensor<float> d({after.at(name).size() / sizeof(float)}, memory_use::workspace),
          h({host_after.at(name).size() / sizeof(float)}, memory_use::workspace);
      std::memcpy(d.data(), after.at(name).data(), d.bytes());
      std::memcpy(h.data(), host_after.at(name).data(), h.bytes());
      check_close("weight after the step", dev::tensor<float>::from_host(d, memory_use::workspace), h);
    } else {
      CHECK(after.at(name) == bytes);
    }
  }
}

}  // namespace

TEST_CASE("multimodal on the device: the vision encoder's output and gradients equal the CPU's, with a patch merger") {
  vision_parity<true>(sg::test::tiny_multimodal());
  vision_parity<true>(sg::test::tiny_merged_multimodal());
  vision_parity<false>(sg::test::tiny_multimodal());
  vision_parity<false>(sg::test::tiny_merged_multimodal());
}

TEST_CASE("multimodal on the device: one training step gives the CPU's loss, gradients and update, every recipe") {
  const auto c = sg::test::tiny_multimodal();
  SECTION("full") { step_parity(sg::recipe::full, c); }
  SECTION("full, patch merger") { step_parity(sg::recipe::full, sg::test::tiny_merged_multimodal()); }
  SECTION("vision_projector") { step_parity(sg::recipe::vision_projector, c); }
  SECTION("projector and v") { step_parity(sg::trainable<sg::group::projector, sg::proj::v>, c); }
  SECTION("llm") { step_parity(sg::recipe::llm, c); }
  SECTION("mlp_gate_up") { step_parity(sg::recipe::mlp_gate_up, c); }
  SECTION("sa_proj") { step_parity(sg::recipe::sa_proj, c); }
}

TEST_CASE("multimodal on the device: bad images and mismatched weights are refused by name") {
  const auto c = sg::test::tiny_multimodal();
  auto hw = sg::test::random_multimodal<float>(c, 31);
  auto dw = sg::model::to_backend<sg::backend::cuda>(hw);
  using R = std::remove_const_t<decltype(sg::recipe::full)>;
  sg::model::multimodal_lm<float, R, sg::backend::cuda> dm(c, sg::recipe::full);
  typename decltype(dm)::saved_t s;
  const token_ids ids = {{1, 2, 3}, {4, 5, 6}};
  const dev::tensor<float> wrong_size({2, 9, 9, 3}, memory_use::workspace);
  CHECK_THROWS_WITH(dm.forward(dw, ids, s, &wrong_size), Catch::Contains("[2, 9, 9, 3]") && Catch::Contains("[batch, 8, 8, 3]"));
  const dev::tensor<float> three_images({3, 8, 8, 3}, memory_use::workspace);
  CHECK_THROWS_WITH(dm.forward(dw, ids, s, &three_images), Catch::Contains("3 images for a batch of 2"));
  // A weight of the wrong shape names its tensor.
  const dev::tensor<float> two_images({2, 8, 8, 3}, memory_use::workspace);
  CHECK_NOTHROW(dm.forward(dw, ids, s, &two_images));
  dw.vision.position_embedding = dev::tensor<float>({3, 8}, memory_use::weights);
  CHECK_THROWS_WITH(dm.forward(dw, ids, s, &two_images),
                    Catch::Contains("vision_tower.position_embedding") && Catch::Contains("[3, 8]"));
  // Downloading into host weights of another shape names the tensor.
  dw = sg::model::to_backend<sg::backend::cuda>(hw);
  auto back = sg::test::random_multimodal<float>(c, 32);
  back.lm.norm = sg::cpu::tensor<float>({5}, memory_use::weights);
  CHECK_THROWS_WITH(sg::model::download(dw, back), Catch::Contains("model.norm.weight") && Catch::Contains("[5]"));
  back.lm.norm = sg::cpu::tensor<float>({std::size_t(c.text.hidden)}, memory_use::weights);
  back.lm.trunk.layers[1].self_attn.q_proj.weight = sg::cpu::tensor<float>({3, 3}, memory_use::weights);
  CHECK_THROWS_WITH(sg::model::download(dw, back), Catch::Contains("model.layers.1.self_attn.q_proj.weight") &&
                                           Catch::Contains("[3, 3]"));
}
