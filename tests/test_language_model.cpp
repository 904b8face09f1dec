// The decoder LM and its training step: finite-difference checks of the fused masked
// loss through the whole model under recipes, KV-cached decoding against the full
// forward, accumulation, determinism, schedules, clipping, and a tiny task learned.
#include "support/gradcheck.hpp"

#include "skillgraft/model/generate.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/sgd.hpp"
#include "skillgraft/train/step.hpp"

#include <xtensor/xview.hpp>

namespace sg = skillgraft;
using sg::token_ids;

namespace {

sg::decoder_config lm_config(bool tied, bool bias = false, int layers = 2) {
  auto c = sg::test::tiny_config(bias, layers);
  c.vocab_size = 13;
  c.max_seq = 16;
  c.tie_word_embeddings = tied;
  return c;
}

template <class T>
sg::model::lm_weights<T> random_lm(const sg::decoder_config& c, unsigned seed) {
  sg::model::lm_weights<T> w(c);
  std::mt19937 rng(seed);
  for (auto& l : w.trunk.layers) sg::test::fill_block(l, rng);
  sg::test::fill_normal(w.embed_tokens, rng, 0.0, 1.0);
  sg::test::fill_normal(w.norm, rng, 1.0, 0.1);
  if (!c.tie_word_embeddings) sg::test::fill_normal(w.lm_head, rng, 0.0, 0.5);
  return w;
}

const token_ids ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}};
// Targets on the last three positions only (a prompt of two tokens).
const token_ids targets = {{-100, -100, 2, 11, 9}, {-100, 12, 0, 4, -100}};

template <class R>
void check_lm(R recipe, const sg::decoder_config& c, std::set<std::string> expected, bool with_prefix = false) {
  auto w = random_lm<double>(c, 31);
  sg::model::decoder_lm<double, R> lm(c, recipe);
  auto prefix = sg::test::random_tensor<double>({2, 2, std::size_t(c.hidden)}, 32);
  const sg::cpu::tensor<double>* pre = with_prefix ? &prefix : nullptr;
  token_ids tg = targets;
  if (with_prefix) {
    tg = xt::full_like(token_ids::from_shape({2, 7}), sg::ignore_index);
    for (std::size_t b = 0; b < 2; ++b)
      for (std::size_t s = 0; s < 5; ++s) tg(b, s + 2) = targets(b, s);
  }
  auto loss = [&] {
    typename decltype(lm)::saved_t s;
    auto h = lm.forward(w, ids, s, pre);
    return sg::train::masked_cross_entropy<double>(h, w.head(), tg, sg::train::no_head_grad, {.chunk = 3, .want_dh = false}).loss;
  };
  typename decltype(lm)::saved_t s;
  auto g = lm.make_grads(w);
  auto h = lm.forward(w, ids, s, pre);
  auto r = sg::train::masked_cross_entropy<double>(h, w.head(), tg, lm.head_grad(g), {.chunk = 3});
  auto dprefix = lm.backward(w, s, r.dh, g);
  std::set<std::string> seen;
  lm.for_each_trainable(w, g, [&](const std::string& n, sg::cpu::tensor<double>& p, sg::cpu::tensor<double>& dp) {
    sg::test::check_tensor(n, p, dp, loss, {});
    seen.insert(n);
  });
  CHECK(seen == expected);
  if (with_prefix && decltype(lm)::upstream_trains) sg::test::check_tensor("prefix", prefix, dprefix, loss, {});
  else CHECK(dprefix.empty());
}

std::set<std::string> layer_names(const std::vector<std::string>& suffixes, std::vector<int> layers) {
  std::set<std::string> n;
  for (int l : layers)
    for (const auto& s : suffixes) n.insert("model.layers." + std::to_string(l) + "." + s);
  return n;
}

}  // namespace

TEST_CASE("LM: gradients of the fused masked loss, untied head") {
  const auto c = lm_config(false, true);
  auto all = layer_names({"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
                          "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                          "self_attn.v_proj.bias", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"},
                         {0, 1});
  all.insert({"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"});
  check_lm(sg::recipe::llm, c, all);
  check_lm(sg::recipe::mlp_gate_up, c, layer_names({"mlp.gate_proj.weight", "mlp.up_proj.weight"}, {0, 1}));
  check_lm(sg::recipe::sa_proj.on_layers(1, 1), c,
           layer_names({"self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                        "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                        "self_attn.o_proj.weight"},
                       {1}));
  check_lm(sg::trainable<sg::group::embed>, c, {"model.embed_tokens.weight"});
  check_lm(sg::trainable<sg::group::lm_head>, c, {"lm_head.weight"});
  check_lm(sg::trainable<sg::group::final_norm>, c, {"model.norm.weight"});
  check_lm(sg::recipe::frozen, c, {});
}

TEST_CASE("LM: tied embeddings train as one tensor") {
  const auto c = lm_config(true);
  check_lm(sg::trainable<sg::group::embed, sg::group::lm_head>, c, {"model.embed_tokens.weight"});
  CHECK_THROWS_WITH((sg::model::decoder_lm<float, decltype(sg::trainable<sg::group::lm_head>)>(c, {})),
                    Catch::Contains("ties lm_head to embed_tokens, so a recipe must train both or neither"));
}

TEST_CASE("LM: soft-token prefix, and its gradient when the projector trains") {
  const auto c = lm_config(false);
  check_lm(sg::trainable<sg::group::projector>, c, {}, true);
  check_lm(sg::trainable<sg::group::projector, sg::proj::up>, c, layer_names({"mlp.up_proj.weight"}, {0, 1}), true);
  check_lm(sg::recipe::mlp_down, c, layer_names({"mlp.down_proj.weight"}, {0, 1}), true);
}

TEST_CASE("LM: chunking the loss does not change it") {
  const auto c = lm_config(false);
  auto w = random_lm<double>(c, 3);
  sg::model::decoder_lm<double, decltype(sg::recipe::frozen)> lm(c, sg::recipe::frozen);
  decltype(lm)::saved_t s;
  auto h = lm.forward(w, ids, s);
  auto a = sg::train::masked_cross_entropy<double>(h, w.head(), targets, sg::train::no_head_grad, {.chunk = 1});
  auto b = sg::train::masked_cross_entropy<double>(h, w.head(), targets, sg::train::no_head_grad, {.chunk = 1000});
  CHECK(a.count == 6);
  CHECK(a.loss == Approx(b.loss).epsilon(1e-13));
  CHECK((a.dh.vec() - b.dh.vec()).cwiseAbs().maxCoeff() < 1e-14);
  // Against the plain definition: mean of -log softmax(h W^T)[target].
  auto z = lm.logits(w, h);
  double ref = 0;
  for (std::size_t bb = 0; bb < 2; ++bb)
    for (std::size_t t = 0; t < 5; ++t) {
      if (targets(bb, t) == sg::ignore_index) continue;
      const double* zr = z.data() + (bb * 5 + t) * 13;
      double sum = 0;
      for (int j = 0; j < 13; ++j) sum += std::exp(zr[j]);
      ref += std::log(sum) - zr[targets(bb, t)];
    }
  CHECK(a.loss == Approx(ref / 6).epsilon(1e-12));
  token_ids bad = targets;
  bad(0, 4) = 13;
  CHECK_THROWS_WITH(sg::train::masked_cross_entropy<double>(h, w.head(), bad, sg::train::no_head_grad),
                    Catch::Contains("target [0, 4] is 13, outside the vocabulary [0, 13)"));
}

TEST_CASE("LM: cached decoding matches the full forward, sampling is seeded") {
  const auto c = lm_config(false, true);
  auto w = random_lm<double>(c, 4);
  sg::model::decoder_lm<double, decltype(sg::recipe::frozen)> lm(c, sg::recipe::frozen);
  auto prefix = sg::test::random_tensor<double>({2, 2, std::size_t(c.hidden)}, 5);
  decltype(lm)::saved_t s;
  auto full = lm.logits(w, lm.forward(w, ids, s, &prefix));
  // Feed the same sequence in three pieces through the cache.
  sg::model::kv_cache<double> cache(c, 2, 7);
  auto x = lm.embed(w, ids, &prefix);
  std::vector<double> pieces;
  for (auto [from, n] : {std::pair{0, 3}, std::pair{3, 1}, std::pair{4, 3}}) {
    sg::cpu::tensor<double> part({2, std::size_t(n), std::size_t(c.hidden)}, sg::memory_use::workspace);
    for (std::size_t b = 0; b < 2; ++b)
      std::copy_n(x.data() + (b * 7 + std::size_t(from)) * 16, std::size_t(n) * 16, part.data() + b * std::size_t(n) * 16);
    auto z = lm.logits(w, sg::model::decode(lm, w, cache, part));
    for (std::size_t b = 0; b < 2; ++b)
      for (int t = 0; t < n; ++t)
        for (int j = 0; j < 13; ++j)
          CHECK(z[(b * std::size_t(n) + std::size_t(t)) * 13 + std::size_t(j)] ==
                Approx(full[(b * 7 + std::size_t(from + t)) * 13 + std::size_t(j)]).epsilon(1e-12));
  }
  // Greedy generation equals argmax over repeated full forwards.
  auto gen = sg::model::generate(lm, w, ids, {.max_new_tokens = 4});
  token_ids seq = ids;
  for (int t = 0; t < 4; ++t) {
    decltype(lm)::saved_t s2;
    auto z = lm.logits(w, lm.forward(w, seq, s2));
    token_ids next = token_ids::from_shape({2, seq.shape(1) + 1});
    for (std::size_t b = 0; b < 2; ++b) {
      const double* zr = z.data() + (b * seq.shape(1) + seq.shape(1) - 1) * 13;
      std::int64_t best = 0;
      for (int j = 1; j < 13; ++j)
        if (zr[j] > zr[best]) best = j;
      CHECK(gen(b, std::size_t(t)) == best);
      for (std::size_t k = 0; k < seq.shape(1); ++k) next(b, k) = seq(b, k);
      next(b, seq.shape(1)) = best;
    }
    seq = next;
  }
  auto s1 = sg::model::generate(lm, w, ids, {.max_new_tokens = 6, .temperature = 1.0, .seed = 9});
  auto s2 = sg::model::generate(lm, w, ids, {.max_new_tokens = 6, .temperature = 1.0, .seed = 9});
  CHECK(bool(s1 == s2));
  auto restricted = sg::model::generate(lm, w, ids, {.max_new_tokens = 5, .allowed = {3, 4}});
  for (auto t : restricted) CHECK((t == 3 || t == 4));
  // log p(continuation | prompt) from the same logits.
  token_ids prompt = xt::view(ids, xt::all(), xt::range(0, 2)), cont = xt::view(ids, xt::all(), xt::range(2, 5));
  auto lp = sg::model::continuation_logprob(lm, w, prompt, cont);
  decltype(lm)::saved_t s3;
  auto z = lm.logits(w, lm.forward(w, ids, s3));
  for (std::size_t b = 0; b < 2; ++b) {
    double ref = 0;
    for (std::size_t t = 2; t < 5; ++t) {
      const double* zr = z.data() + (b * 5 + t - 1) * 13;
      double sum = 0;
      for (int j = 0; j < 13; ++j) sum += std::exp(zr[j]);
      ref += zr[ids(b, t)] - std::log(sum);
    }
    CHECK(lp[b] == Approx(ref).epsilon(1e-12));
  }
}

namespace {
// A copy task: "a b c d SEP" -> "a b c d"; loss only on the copied half.
sg::train::micro_batch<float> copy_batch(std::mt19937& rng, int batch) {
  const int n = 4, sep = 12;
  std::uniform_int_distribution<int> tok(0, 11);
  sg::train::micro_batch<float> mb;
  mb.ids = token_ids::from_shape({std::size_t(batch), std::size_t(2 * n + 1)});
  mb.targets = xt::full_like(mb.ids, sg::ignore_index);
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < n; ++i) mb.ids(b, i) = mb.ids(b, n + 1 + i) = tok(rng);
    mb.ids(b, n) = sep;
    for (int i = 0; i < n; ++i) mb.targets(b, n + i) = mb.ids(b, n + 1 + i);
  }
  return mb;
}

template <class R>
std::pair<double, sg::model::lm_weights<float>> train_copy(R recipe, int steps, unsigned seed) {
  auto c = lm_config(false, false, 2);
  c.hidden = 32;
  c.head_dim = 8;
  c.intermediate = 64;
  auto w = random_lm<float>(c, seed);
  sg::model::decoder_lm<float, R> lm(c, recipe);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.weight_decay = 0.0});
  const sg::train::cosine_schedule sched{.peak = 1e-2, .floor = 1e-3, .warmup = 10, .total = steps};
  std::mt19937 rng(seed);
  double last = 0;
  for (int s = 0; s < steps; ++s) {
    auto mb = copy_batch(rng, 16);
    last = sg::train::train_step(lm, w, g, opt, sched, std::span(&mb, 1)).loss;
  }
  return {last, std::move(w)};
}
}  // namespace

TEST_CASE("LM: learns a copy task (loss below 0.3 nats from ln 13 = 2.56)") {
  auto [loss, w] = train_copy(sg::recipe::llm, 300, 1);
  INFO("final loss " << loss);
  CHECK(loss < 0.3);
}

TEST_CASE("LM: training is repeatable bit for bit") {
  auto a = train_copy(sg::recipe::sa_proj, 5, 2);
  auto b = train_copy(sg::recipe::sa_proj, 5, 2);
  CHECK(a.first == b.first);
  const auto& qa = a.second.trunk.layers[1].self_attn.q_proj.weight;
  const auto& qb = b.second.trunk.layers[1].self_attn.q_proj.weight;
  CHECK(std::equal(qa.data(), qa.data() + qa.size(), qb.data()));
}

TEST_CASE("LM: two micro-batches give the gradient of their union") {
  const auto c = lm_config(false);
  auto w = random_lm<double>(c, 6);
  sg::model::decoder_lm<double, decltype(sg::recipe::llm)> lm(c, sg::recipe::llm);
  auto g1 = lm.make_grads(w), g2 = lm.make_grads(w);
  sg::train::sgd<double> o1(lm, w, g1, {.lr = 0.0, .momentum = 0.0}), o2(lm, w, g2, {.lr = 0.0, .momentum = 0.0});
  sg::train::micro_batch<double> whole{ids, targets};
  std::vector<sg::train::micro_batch<double>> halves(2);
  for (std::size_t b = 0; b < 2; ++b) {
    halves[b].ids = xt::view(ids, xt::range(b, b + 1), xt::all());
    halves[b].targets = xt::view(targets, xt::range(b, b + 1), xt::all());
  }
  const sg::train::constant_schedule zero{0.0};
  auto s1 = sg::train::train_step(lm, w, g1, o1, zero, std::span(&whole, 1), {.max_grad_norm = 0});
  auto s2 = sg::train::train_step(lm, w, g2, o2, zero, std::span<const sg::train::micro_batch<double>>(halves),
                                  {.max_grad_norm = 0});
  CHECK(s1.loss == Approx(s2.loss).epsilon(1e-12));
  CHECK(s1.grad_norm == Approx(s2.grad_norm).epsilon(1e-12));
  std::vector<double> a, b;
  lm.for_each_trainable(w, g1, [&](const std::string&, auto&, auto& d) { a.insert(a.end(), d.data(), d.data() + d.size()); });
  lm.for_each_trainable(w, g2, [&](const std::string&, auto&, auto& d) { b.insert(b.end(), d.data(), d.data() + d.size()); });
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i] == Approx(b[i]).margin(1e-13));
}

TEST_CASE("schedules and clipping") {
  const sg::train::cosine_schedule s{.peak = 1.0, .floor = 0.1, .warmup = 4, .total = 14};
  CHECK(s(0) == Approx(0.25));
  CHECK(s(3) == Approx(1.0));
  CHECK(s(4) == Approx(1.0));
  CHECK(s(9) == Approx(0.55));
  CHECK(s(14) == Approx(0.1));
  CHECK(s(100) == Approx(0.1));
  const auto c = lm_config(false);
  auto w = random_lm<double>(c, 7);
  sg::model::decoder_lm<double, decltype(sg::recipe::mlp)> lm(c, sg::recipe::mlp);
  auto g = lm.make_grads(w);
  double expect = 0;
  lm.for_each_trainable(w, g, [&](const std::string&, auto&, auto& d) {
    for (std::size_t i = 0; i < d.size(); ++i) d[i] = 0.01 * double(i % 7);
    expect += d.vec().squaredNorm();
  });
  expect = std::sqrt(expect);
  CHECK(sg::train::clip_grad_norm(lm, w, g, 1e9) == Approx(expect));
  CHECK(sg::train::clip_grad_norm(lm, w, g, 0.5) == Approx(expect));
  CHECK(sg::train::clip_grad_norm(lm, w, g, 1e9) == Approx(0.5).epsilon(1e-5));
}

TEST_CASE("LM: a NaN loss stops training before any weight changes") {
  const auto c = lm_config(false);
  auto w = random_lm<float>(c, 8);
  sg::model::decoder_lm<float, decltype(sg::recipe::llm)> lm(c, sg::recipe::llm);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g);
  w.norm[3] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> before(w.trunk.layers[0].mlp.up_proj.weight.data(),
                            w.trunk.layers[0].mlp.up_proj.weight.data() + w.trunk.layers[0].mlp.up_proj.weight.size());
  sg::train::micro_batch<float> mb{ids, targets};
  CHECK_THROWS_WITH(sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-3}, std::span(&mb, 1)),
                    Catch::Contains("not finite"));
  CHECK(std::equal(before.begin(), before.end(), w.trunk.layers[0].mlp.up_proj.weight.data()));
  CHECK(opt.steps() == 0);
  sg::token_ids bad = ids;
  bad(1, 1) = 99;
  decltype(lm)::saved_t s;
  CHECK_THROWS_WITH(lm.forward(w, bad, s), Catch::Contains("token id [1, 1] is 99, outside the vocabulary [0, 13)"));
}
