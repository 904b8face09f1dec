// The training API cannot be misused silently: Hugging Face labels have their own type
// and train the same step as shifted targets, unshifted labels passed as targets are
// refused, the head's gradient cannot be forgotten under a recipe that trains it,
// rank-1 token ids are refused with their rank, the LoRA rank has one source, and AdamW's state
// saved and loaded again resumes a run bit for bit (or is refused, naming what is wrong).
#include <catch2/catch.hpp>
#include <xtensor/xarray.hpp>

#include "support/random_lm.hpp"
#include "support/temp_dir.hpp"

#include "skillgraft/cl/lora.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/optimizer_state.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;
using Catch::Contains;

namespace {
const sg::token_ids ids = {{1, 5, 7, 2, 11, 4}, {3, 8, 12, 0, 4, 9}};

template <class Recipe>
std::vector<float> one_step(Recipe recipe, const sg::train::micro_batch<float>& mb, sg::train::step_stats* st = nullptr) {
  const auto c = sg::test::tiny_lm_config();
  auto w = sg::test::random_lm<float>(c, 7);
  sg::model::decoder_lm<float, Recipe> lm(c, recipe);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.lr = 1e-2});
  const auto s = sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-2}, std::span(&mb, 1));
  if (st) *st = s;
  std::vector<float> out;
  lm.for_each_trainable(w, g, [&](const std::string&, auto& t, auto&) { out.insert(out.end(), t.data(), t.data() + t.size()); });
  return out;
}
}  // namespace

TEST_CASE("Hugging Face labels: micro_batch shifts them, and the step equals the one on shifted targets") {
  sg::token_ids labels = ids;
  labels(0, 0) = sg::ignore_index;  // a prompt position without a loss
  const sg::train::micro_batch<float> from_labels{ids, sg::hf_labels{labels}};
  CHECK((from_labels.targets == sg::shift_labels(labels)));
  CHECK(from_labels.targets(0, 5) == sg::ignore_index);  // nothing follows the last position
  CHECK(from_labels.targets(0, 0) == 5);

  sg::train::step_stats a, b;
  const auto wa = one_step(sg::recipe::llm, from_labels, &a);
  const auto wb = one_step(sg::recipe::llm, sg::train::micro_batch<float>{ids, sg::shift_labels(labels)}, &b);
  CHECK(a.loss == b.loss);
  CHECK(a.targets == b.targets);
  CHECK(a.targets == 10);
  CHECK(wa == wb);
}

TEST_CASE("Hugging Face labels: with a soft-token prefix they are laid along the whole sequence") {
  sg::cpu::tensor<float> prefix({2, 3, 16}, sg::memory_use::workspace);
  const sg::train::micro_batch<float> text_only{ids, sg::hf_labels{ids}, &prefix};
  REQUIRE(text_only.targets.shape(1) == 3 + 6);
  CHECK(text_only.targets(0, 0) == sg::ignore_index);
  CHECK(text_only.targets(0, 2) == 1);  // the last soft token predicts the first text token
  CHECK(text_only.targets(0, 3) == 5);
  CHECK(text_only.targets(0, 8) == sg::ignore_index);
  sg::token_ids whole = xt::full_like(sg::token_ids::from_shape({2, 9}), sg::ignore_index);
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t s = 0; s < 6; ++s) whole(b, 3 + s) = ids(b, s);
  CHECK((sg::train::micro_batch<float>{ids, sg::hf_labels{whole}, &prefix}.targets == text_only.targets));
  CHECK_THROWS_WITH((sg::train::micro_batch<float>{ids, sg::hf_labels{sg::token_ids::from_shape({2, 5})}, &prefix}),
                    "skillgraft: Hugging Face labels have shape [2, 5], expected [2, 6] (the ids) or [2, 9] (prefix and ids)");
}

TEST_CASE("Unshifted labels passed as targets are refused before any weight changes") {
  const auto c = sg::test::tiny_lm_config();
  auto w = sg::test::random_lm<float>(c, 7);
  sg::model::decoder_lm<float, decltype(sg::recipe::llm)> lm(c, sg::recipe::llm);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.lr = 1e-2});
  const auto head = w.lm_head.clone(sg::memory_use::workspace);
  std::vector<sg::train::micro_batch<float>> mbs{{ids, sg::shift_labels(ids)}, {ids, ids}};  // labels = ids: the mistake
  CHECK_THROWS_WITH(sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-2},
                                          std::span<const sg::train::micro_batch<float>>(mbs)),
                    Contains("micro-batch 1: every target equals the input token at its own position") &&
                        Contains("hf_labels"));
  CHECK(std::equal(head.data(), head.data() + head.size(), w.lm_head.data()));
  CHECK(opt.steps() == 0);
  // A prompt masked out does not hide it; a sequence of one repeated token is ambiguous and trains.
  sg::token_ids masked = ids;
  masked(0, 0) = masked(1, 0) = sg::ignore_index;
  const sg::train::micro_batch<float> prompt_masked{ids, masked};
  CHECK_THROWS_WITH(sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-2}, std::span(&prompt_masked, 1)),
                    Contains("every target equals the input token"));
  const sg::token_ids same = {{4, 4, 4, 4}};
  const sg::train::micro_batch<float> repeated{same, sg::token_ids{{4, 4, 4, sg::ignore_index}}};
  CHECK_NOTHROW(sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-2}, std::span(&repeated, 1)));
}

TEST_CASE("The head's gradient: the model form of the loss finds it under every recipe") {
  const auto c = sg::test::tiny_lm_config();
  auto w = sg::test::random_lm<double>(c, 3);
  const auto targets = sg::shift_labels(ids);
  sg::model::decoder_lm<double, decltype(sg::recipe::llm)> lm(c, sg::recipe::llm);
  auto g = lm.make_grads(w);
  decltype(lm)::saved_t saved;
  const auto h = lm.forward(w, ids, saved);
  const auto r = sg::train::masked_cross_entropy(lm, w, g, h, targets);
  double norm = 0;
  for (std::size_t i = 0; i < g.lm_head.size(); ++i) norm += g.lm_head[i] * g.lm_head[i];
  CHECK(norm > 0);  // the recipe trains the head: its gradient is there
  // The same numbers as the explicit form with the model's head gradient.
  auto g2 = lm.make_grads(w);
  const auto r2 = sg::train::masked_cross_entropy(h, w.head(), targets, lm.head_grad(g2));
  CHECK(r.loss == r2.loss);
  CHECK(std::equal(g.lm_head.data(), g.lm_head.data() + g.lm_head.size(), g2.lm_head.data()));
  // Evaluation: the loss only.
  const auto e = sg::train::masked_cross_entropy(lm, w, h, targets);
  CHECK(e.loss == r.loss);
  CHECK(e.dh.empty());
  // Tied head and embeddings: the gradient lands on embed_tokens.
  auto tc = c;
  tc.tie_word_embeddings = true;
  auto tw = sg::test::random_lm<double>(tc, 3);
  sg::model::decoder_lm<double, decltype(sg::recipe::llm)> tied(tc, sg::recipe::llm);
  auto tg = tied.make_grads(tw);
  decltype(tied)::saved_t ts;
  const auto th = tied.forward(tw, ids, ts);
  sg::train::masked_cross_entropy(tied, tw, tg, th, targets);
  double tnorm = 0;
  for (std::size_t i = 0; i < tg.embed_tokens.size(); ++i) tnorm += tg.embed_tokens[i] * tg.embed_tokens[i];
  CHECK(tnorm > 0);
  // A frozen head: no gradient to give, and no_head_grad says so explicitly.
  sg::model::decoder_lm<double, decltype(sg::recipe::sa_proj)> sa(c, sg::recipe::sa_proj);
  auto sg_ = sa.make_grads(w);
  CHECK(sa.head_grad(sg_) == nullptr);
  CHECK(sg::train::masked_cross_entropy(sa, w, sg_, h, targets).loss ==
        sg::train::masked_cross_entropy(h, w.head(), targets, sg::train::no_head_grad).loss);
}

TEST_CASE("Token ids of rank 1 are refused with their rank") {
  // A fixed rank 1 does not compile (tests/compile_fail/rank1_token_ids.cpp); an xarray is checked at run time.
  const xt::xarray<std::int64_t> one = {1, 5, 7};
  const xt::xarray<std::int64_t> two = {{1, 5, 7}};
  CHECK_THROWS_WITH((sg::train::micro_batch<float>{one, two}),
                    "skillgraft: micro_batch ids have rank 1 (shape [3]); token ids are [batch, seq]: reshape one "
                    "sequence to [1, seq]");
  CHECK_THROWS_WITH((sg::train::micro_batch<float>{two, one}), Contains("micro_batch targets have rank 1"));
  const sg::train::micro_batch<float> ok{two, two};
  CHECK(ok.ids.shape(0) == 1);
  CHECK(ok.ids.shape(1) == 3);
  CHECK(ok.ids(0, 2) == 7);
  const xt::xtensor<std::int64_t, 1> fixed = {1, 5, 7};
  CHECK((sg::train::micro_batch<float>{xt::atleast_2d(fixed), xt::atleast_2d(fixed)}.ids == ok.ids));
}

TEST_CASE("LoRA: the rank and alpha come from the model's config") {
  auto c = sg::test::tiny_lm_config();
  c.lora_rank = 3;
  c.lora_alpha = 6;
  auto w = sg::test::random_lm<float>(c, 1);
  constexpr auto recipe = sg::trainable<sg::lora<sg::proj::q>, sg::lora<sg::proj::v>>;
  sg::model::decoder_lm<float, decltype(recipe)> lm(c, recipe);
  CHECK(sg::cl::attach_lora(lm, w, {.seed = 1}) == 2 * c.n_layers);
  const auto& q = w.trunk.layers[0].self_attn.q_proj;
  CHECK(q.lora.A.dim(0) == 3);
  CHECK(q.lora.B.dim(1) == 3);
  CHECK(q.lora_scale == 2.0f);
  auto w2 = sg::test::random_lm<float>(c, 1);
  CHECK_THROWS_WITH(sg::cl::attach_lora(lm, w2, {.rank = 4}),
                    Contains("config has lora_rank 3 but adapters of rank 4 were asked for"));
  CHECK(sg::cl::attach_lora(lm, w2, {.rank = 3}) == 2 * c.n_layers);  // naming the same rank again is allowed
  auto nc = c;
  nc.lora_rank = 0;
  sg::model::decoder_lm<float, decltype(recipe)> no_rank(nc, recipe);
  auto w3 = sg::test::random_lm<float>(nc, 1);
  CHECK_THROWS_WITH(sg::cl::attach_lora(no_rank, w3), Contains("set decoder_config::lora_rank"));
}

// --- AdamW's state across a restart ------------------------------------------------------------

namespace {
using sa_r = std::remove_const_t<decltype(sg::recipe::sa_proj)>;
const sg::train::cosine_schedule resume_lr{.peak = 2e-2, .floor = 1e-3, .warmup = 2, .total = 5};

template <class Model, class Weights, class Grads>
std::vector<float> trained(const Model& lm, Weights& w, Grads& g) {
  std::vector<float> out;
  lm.for_each_trainable(w, g, [&](const std::string&, auto& t, auto&) { out.insert(out.end(), t.data(), t.data() + t.size()); });
  return out;
}
std::vector<float> moments(const sg::train::adamw<float>& opt) {
  std::vector<float> out;
  opt.for_each_state([&](const std::string&, const auto& m, const auto& v) {
    out.insert(out.end(), m.data(), m.data() + m.size());
    out.insert(out.end(), v.data(), v.data() + v.size());
  });
  return out;
}
}  // namespace

TEST_CASE("AdamW state: 3 steps, saved, loaded into a fresh optimizer and 2 more equal 5 uninterrupted, bit for bit") {
  const auto c = sg::test::tiny_lm_config();
  const sg::train::micro_batch<float> mb{ids, sg::hf_labels{ids}};
  sg::model::decoder_lm<float, sa_r> lm(c, sg::recipe::sa_proj);
  auto step = [&](auto& w, auto& g, auto& opt) { sg::train::train_step(lm, w, g, opt, resume_lr, std::span(&mb, 1)); };

  auto wa = sg::test::random_lm<float>(c, 7);
  auto ga = lm.make_grads(wa);
  sg::train::adamw<float> oa(lm, wa, ga, {.lr = 2e-2, .weight_decay = 0.01});
  for (int i = 0; i < 5; ++i) step(wa, ga, oa);

  sg::test::temp_dir dir;
  auto wb = sg::test::random_lm<float>(c, 7);
  auto gb = lm.make_grads(wb);
  {
    sg::train::adamw<float> ob(lm, wb, gb, {.lr = 2e-2, .weight_decay = 0.01});
    for (int i = 0; i < 3; ++i) step(wb, gb, ob);
    sg::train::save_optimizer_state(ob, dir / "optimizer.safetensors");
  }
  // Only the recipe's tensors have moments: q, k, v and o of every layer, two moments each.
  const sg::io::safetensors_file file(dir / "optimizer.safetensors");
  CHECK(file.header().tensors.size() == std::size_t(2 * 4 * c.n_layers));
  CHECK(file.contains("model.layers.1.self_attn.v_proj.weight.exp_avg_sq"));
  CHECK(file.metadata().at("skillgraft.optimizer.step") == "3");

  // The restarted run: the weights as saved, an optimizer built afresh (other options), the state loaded.
  const auto before_restart = wb.trunk.layers[0].self_attn.q_proj.weight.clone();
  sg::train::adamw<float> oc(lm, wb, gb, {.lr = 1.0});
  sg::train::load_optimizer_state(oc, dir / "optimizer.safetensors");
  CHECK(oc.steps() == 3);
  CHECK(oc.options().weight_decay == 0.01);
  for (int i = 0; i < 2; ++i) step(wb, gb, oc);
  const auto a = trained(lm, wa, ga), b = trained(lm, wb, gb);
  REQUIRE(a.size() == b.size());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  CHECK(moments(oa) == moments(oc));

  // A restart without the state restarts AdamW (moments and bias correction), and it shows.
  auto wd = sg::test::random_lm<float>(c, 7);
  auto gd = lm.make_grads(wd);
  sg::train::adamw<float> od(lm, wd, gd, {.lr = 2e-2, .weight_decay = 0.01});
  for (int i = 0; i < 3; ++i) step(wd, gd, od);
  sg::train::adamw<float> oe(lm, wd, gd, {.lr = 2e-2, .weight_decay = 0.01});
  for (int i = 0; i < 2; ++i) step(wd, gd, oe);
  CHECK(trained(lm, wd, gd) != a);
  CHECK(!(wb.trunk.layers[0].self_attn.q_proj.weight.vec() == before_restart.vec()));
}

TEST_CASE("AdamW state: another recipe's, a truncated, a poisoned or an unmarked file is refused by name and changes nothing") {
  const auto c = sg::test::tiny_lm_config();
  const sg::train::micro_batch<float> mb{ids, sg::hf_labels{ids}};
  sg::test::temp_dir dir;
  sg::model::decoder_lm<float, sa_r> lm(c, sg::recipe::sa_proj);
  auto w = sg::test::random_lm<float>(c, 7);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g);
  for (int i = 0; i < 2; ++i) sg::train::train_step(lm, w, g, opt, resume_lr, std::span(&mb, 1));
  const auto state = moments(opt);
  const auto unchanged = [&] {
    CHECK(opt.steps() == 2);
    CHECK(moments(opt) == state);
  };

  using mgu_r = std::remove_const_t<decltype(sg::recipe::mlp_gate_up)>;
  sg::model::decoder_lm<float, mgu_r> other(c, sg::recipe::mlp_gate_up);
  auto go = other.make_grads(w);
  sg::train::adamw<float> other_opt(other, w, go);
  sg::train::save_optimizer_state(other_opt, dir / "mlp.safetensors");
  CHECK_THROWS_WITH(sg::train::load_optimizer_state(opt, dir / "mlp.safetensors"),
                    Contains("has no model.layers.0.self_attn.q_proj.weight.exp_avg") && Contains("another model or recipe"));
  unchanged();

  using llm_r = std::remove_const_t<decltype(sg::recipe::llm)>;
  sg::model::decoder_lm<float, llm_r> whole(c, sg::recipe::llm);
  auto gw = whole.make_grads(w);
  sg::train::adamw<float> whole_opt(whole, w, gw);
  sg::train::save_optimizer_state(whole_opt, dir / "llm.safetensors");
  CHECK_THROWS_WITH(sg::train::load_optimizer_state(opt, dir / "llm.safetensors"), Contains("which this optimizer does not train"));
  unchanged();

  sg::train::save_optimizer_state(opt, dir / "mine.safetensors");
  const auto bytes = sg::test::read_text(dir / "mine.safetensors");
  {
    std::ofstream cut(dir / "cut.safetensors", std::ios::binary);
    cut.write(bytes.data(), std::streamsize(bytes.size() - 100));
  }
  CHECK_THROWS_AS(sg::train::load_optimizer_state(opt, dir / "cut.safetensors"), sg::io::safetensors_error);
  unchanged();

  // A second moment below zero, and a file without the optimizer's mark.
  const sg::io::safetensors_file mine(dir / "mine.safetensors");
  std::vector<sg::cpu::tensor<float>> held;
  held.reserve(mine.header().tensors.size());
  sg::io::safetensors_writer poisoned, unmarked;
  for (const auto& t : mine.header().tensors) {
    held.push_back(mine.load<float>(t.name));
    if (t.name == "model.layers.1.self_attn.k_proj.weight.exp_avg_sq") held.back()[5] = -1.0f;
    poisoned.add(t.name, held.back());
    unmarked.add(t.name, held.back());
  }
  for (const auto& [k, v] : mine.metadata()) poisoned.set_metadata(k, v);
  poisoned.write(dir / "poisoned.safetensors");
  unmarked.write(dir / "unmarked.safetensors");
  CHECK_THROWS_WITH(sg::train::load_optimizer_state(opt, dir / "poisoned.safetensors"),
                    Contains("model.layers.1.self_attn.k_proj.weight.exp_avg_sq holds -1 at element 5"));
  unchanged();
  CHECK_THROWS_WITH(sg::train::load_optimizer_state(opt, dir / "unmarked.safetensors"),
                    Contains("is not an AdamW state"));
  unchanged();
  sg::train::load_optimizer_state(opt, dir / "mine.safetensors");  // its own state loads
  unchanged();
}
