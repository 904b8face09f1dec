// Output-distribution probes: the chunked, streaming statistics against a full softmax
// written out in double for many chunkings; token-set validation; teacher-forced, given and
// generated continuations against step-by-step decoding; references (base weights, LwF
// teacher) giving KL exactly 0 when nothing changed; the counting bias showing up.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <span>

#include "skillgraft/cl/probes.hpp"
#include "skillgraft/model/parameters.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"
#include "support/random.hpp"

namespace sg = skillgraft;
using sg::token_ids;
using sg::cl::position_mask;

namespace {

sg::decoder_config lm_config() {
  auto c = sg::test::tiny_config(false, 2);
  c.vocab_size = 29;
  c.max_seq = 24;
  return c;
}

// Every parameter drawn at random: norms around 1, matrices scaled by 1/sqrt(fan-in).
template <class T>
sg::model::lm_weights<T> random_weights(const sg::decoder_config& c, unsigned seed) {
  sg::model::lm_weights<T> w(c);
  std::mt19937 rng(seed);
  sg::model::for_each_parameter(w, [&](const std::string& name, sg::cpu::tensor<T>& t, auto, int) {
    if (name.find("norm") != std::string::npos) sg::test::fill_normal(t, rng, 1.0, 0.1);
    else sg::test::fill_normal(t, rng, 0.0, 1.5 / std::sqrt(double(t.dim(t.rank() - 1))));
  });
  return w;
}

// The probe's quantities from one full row of logits, written out in double.
sg::cl::probe_values naive(const std::vector<double>& z, const std::vector<double>* r, const sg::cl::token_set& s) {
  auto log_softmax = [](const std::vector<double>& x) {
    double mx = x[0];
    for (double v : x) mx = std::max(mx, v);
    double sum = 0;
    for (double v : x) sum += std::exp(v - mx);
    std::vector<double> out(x.size());
    for (std::size_t j = 0; j < x.size(); ++j) out[j] = x[j] - mx - std::log(sum);
    return out;
  };
  const auto lp = log_softmax(z);
  sg::cl::probe_values v;
  v.set_mass = 0;
  v.set_max_prob = 0;
  v.set_max_logit = -1e300;
  for (auto id : s.ids()) {
    v.set_mass += std::exp(lp[std::size_t(id)]);
    v.set_max_prob = std::max(v.set_max_prob, std::exp(lp[std::size_t(id)]));
    v.set_max_logit = std::max(v.set_max_logit, z[std::size_t(id)]);
  }
  if (r) {
    const auto lq = log_softmax(*r);
    v.kl_ref_model = v.kl_model_ref = 0;
    for (std::size_t j = 0; j < z.size(); ++j) {
      v.kl_ref_model += std::exp(lq[j]) * (lq[j] - lp[j]);
      v.kl_model_ref += std::exp(lp[j]) * (lp[j] - lq[j]);
    }
  }
  return v;
}

// Row `row` of h W^T, in double.
template <class T>
std::vector<double> logits_row(const sg::cpu::tensor<T>& h, const sg::cpu::tensor<T>& W, std::size_t row) {
  const std::size_t V = W.dim(0), d = W.dim(1);
  std::vector<double> z(V, 0.0);
  for (std::size_t j = 0; j < V; ++j)
    for (std::size_t k = 0; k < d; ++k) z[j] += double(h[row * d + k]) * double(W[j * d + k]);
  return z;
}

void check_values(const sg::cl::probe_values& got, const sg::cl::probe_values& want, double eps, double margin,
                  bool with_ref) {
  CHECK(got.set_mass == Approx(want.set_mass).epsilon(eps).margin(margin));
  CHECK(got.set_max_prob == Approx(want.set_max_prob).epsilon(eps).margin(margin));
  CHECK(got.set_max_logit == Approx(want.set_max_logit).epsilon(eps).margin(margin));
  if (with_ref) {
    CHECK(got.kl_ref_model == Approx(want.kl_ref_model).epsilon(eps).margin(margin));
    CHECK(got.kl_model_ref == Approx(want.kl_model_ref).epsilon(eps).margin(margin));
  } else {
    CHECK(std::isnan(got.kl_ref_model));
    CHECK(std::isnan(got.kl_model_ref));
  }
}

}  // namespace

TEST_CASE("token sets: sorted, validated, with messages that name the set, the id and where it is") {
  sg::cl::token_set s({17, 3, 9}, 20, "digits");
  CHECK(s.ids() == std::vector<std::int64_t>{3, 9, 17});
  CHECK(s.contains(9));
  CHECK(!s.contains(10));
  CHECK(s.vocab_size() == 20);
  CHECK_THROWS_WITH(sg::cl::token_set({}, 20, "digits"),
                    "skillgraft: token set 'digits' is empty; a probe needs at least one token id");
  CHECK_THROWS_WITH(sg::cl::token_set({1, 20}, 20, "digits"),
                    "skillgraft: token set 'digits' has id 20 at index 1, outside the vocabulary [0, 20)");
  CHECK_THROWS_WITH(sg::cl::token_set({-1}, 20, "digits"),
                    "skillgraft: token set 'digits' has id -1 at index 0, outside the vocabulary [0, 20)");
  CHECK_THROWS_WITH(sg::cl::token_set({4, 7, 5, 7}, 20, "digits"),
                    "skillgraft: token set 'digits' lists id 7 twice (at indices 1 and 3)");
  CHECK_THROWS_WITH(sg::cl::token_set({1}, 0, "digits"), Catch::Contains("positive vocabulary size"));

  // Number tokens as byte-level BPE (Ġ), SentencePiece (▁) and plain vocabularies spell them.
  const std::vector<std::string> vocab = {"<s>",  "0",      "\xC4\xA0" "12", "\xE2\x96\x81three", "Three", "1a",
                                          "\xC4\xA0", "twenty-one", " ten", "ten",          "2.5",   "\xE2\x96\x81"};
  CHECK(sg::cl::number_tokens(vocab).ids() == std::vector<std::int64_t>{1, 2, 3, 4, 8, 9});
  CHECK(sg::cl::number_tokens(vocab, false).ids() == std::vector<std::int64_t>{1, 2});
  CHECK(sg::cl::number_tokens(vocab).name() == "numbers");
  CHECK_THROWS_WITH(sg::cl::number_tokens({"a", "b"}), Catch::Contains("token set 'numbers' is empty"));
}

TEST_CASE("probe statistics equal a full softmax in double, for any chunking of positions and vocabulary") {
  const std::size_t B = 3, P = 7, d = 6, dr = 5, V = 37;
  auto h = sg::test::random_tensor<double>({B, P, d}, 1);
  auto W = sg::test::random_tensor<double>({V, d}, 2);
  auto hr = sg::test::random_tensor<double>({B, P, dr}, 3);  // a reference of another width
  auto Wr = sg::test::random_tensor<double>({V, dr}, 4);
  const sg::cl::token_set set({36, 0, 5, 17, 18}, int(V), "S");  // first and last id of the vocabulary included
  position_mask mask = xt::zeros<bool>({B, P});
  for (std::size_t s : {0, 2, 3, 6}) mask(0, s) = true;
  for (std::size_t s = 0; s < P; ++s) mask(2, s) = true;  // text 1 has no probed position

  for (double scale : {1.0, 40.0}) {  // 40: logits in the hundreds, where exp() overflows without max-shifting
    auto hs = h.clone();
    hs.vec() *= scale;
    for (bool with_ref : {false, true})
      for (auto [rows, vocab] : {std::pair<std::size_t, std::size_t>{64, 0}, {1, 1}, {2, 5}, {5, 7}, {3, 36}, {100, 37},
                                 {4, 40}, {11, 18}}) {
        INFO("scale " << scale << ", reference " << with_ref << ", rows " << rows << ", vocab chunk " << vocab);
        sg::cl::probe_accumulator acc(set, true);
        sg::cl::probe_hidden(acc, hs, W, mask, with_ref ? &hr : nullptr, with_ref ? &Wr : nullptr,
                             {.rows = rows, .vocab = vocab});
        REQUIRE(acc.texts() == B);
        REQUIRE(acc.kept().size() == 4 + P);
        CHECK(acc.has_reference() == with_ref);
        // Per position. Values are O(1) at scale 1; at scale 40 logits reach ~10², and a KL is a
        // difference of such terms, so its rounding is ~1e-16 · 10² · a few: margin 1e-12 · scale.
        std::vector<double> sum_text(B, 0.0), kl_text(B, 0.0);
        std::vector<std::size_t> n_text(B, 0);
        double sum_all = 0, kl_all = 0;
        for (const auto& rec : acc.kept()) {
          INFO("text " << rec.text << ", position " << rec.position);
          REQUIRE(mask(rec.text, rec.position));
          const auto z = logits_row(hs, W, rec.text * P + rec.position);
          const auto r = logits_row(hr, Wr, rec.text * P + rec.position);
          const auto want = naive(z, with_ref ? &r : nullptr, set);
          check_values(rec.value, want, 1e-12, 1e-12 * scale, with_ref);
          sum_text[rec.text] += want.set_mass;
          kl_text[rec.text] += want.kl_ref_model;
          ++n_text[rec.text];
          sum_all += want.set_mass;
          kl_all += want.kl_ref_model;
        }
        // Means: over positions, per text, and over texts that have positions.
        const auto all = acc.positions();
        CHECK(all.count == 4 + P);
        CHECK(all.mean.set_mass == Approx(sum_all / double(4 + P)).epsilon(1e-12));
        if (with_ref) CHECK(all.mean.kl_ref_model == Approx(kl_all / double(4 + P)).epsilon(1e-12).margin(1e-12 * scale));
        const auto texts = acc.per_text();
        REQUIRE(texts.size() == B);
        CHECK(texts[0].count == 4);
        CHECK(texts[1].count == 0);
        CHECK(std::isnan(texts[1].mean.set_mass));
        CHECK(texts[2].count == P);
        CHECK(texts[0].mean.set_mass == Approx(sum_text[0] / 4.0).epsilon(1e-12));
        CHECK(texts[2].mean.set_mass == Approx(sum_text[2] / double(P)).epsilon(1e-12));
        const auto macro = acc.text_mean();
        CHECK(macro.count == 2);
        CHECK(macro.mean.set_mass == Approx((sum_text[0] / 4.0 + sum_text[2] / double(P)) / 2.0).epsilon(1e-12));
        if (with_ref)
          CHECK(macro.mean.kl_ref_model ==
                Approx((kl_text[0] / 4.0 + kl_text[2] / double(P)) / 2.0).epsilon(1e-12).margin(1e-12 * scale));
      }
  }

  // A reference identical to the model: both KLs are exactly 0, not merely small.
  sg::cl::probe_accumulator same(set, true);
  sg::cl::probe_hidden(same, h, W, mask, &h, &W, {.rows = 3, .vocab = 8});
  for (const auto& rec : same.kept()) {
    CHECK(rec.value.kl_ref_model == 0.0);
    CHECK(rec.value.kl_model_ref == 0.0);
  }
  // Batches add texts in order; the summary line reports the overall means.
  sg::cl::probe_hidden(same, h, W, mask, &h, &W);
  CHECK(same.texts() == 2 * B);
  CHECK(same.text(3).count == 4);
  CHECK(same.summary().find("S (5 ids): mass ") == 0);
  CHECK(same.summary().find("KL(ref||model) 0, KL(model||ref) 0 over 22 positions in 6 texts") != std::string::npos);
}

TEST_CASE("probe arguments are checked before anything changes") {
  auto h = sg::test::random_tensor<double>({2, 4, 6}, 1);
  auto W = sg::test::random_tensor<double>({11, 6}, 2);
  auto W12 = sg::test::random_tensor<double>({12, 6}, 3);
  const sg::cl::token_set set({1, 2}, 11, "S");
  sg::cl::probe_accumulator acc(set);
  const position_mask mask = xt::ones<bool>({2, 4});
  const position_mask wrong = xt::ones<bool>({2, 5});
  CHECK_THROWS_WITH(sg::cl::probe_hidden(acc, h, W, wrong),
                    "skillgraft: probe mask has shape [2, 5], expected [2, 4] (one per position of the hidden "
                    "states [2, 4, 6])");
  CHECK_THROWS_WITH(sg::cl::probe_hidden(acc, h, W12, mask),
                    "skillgraft: LM head has shape [12, 6], expected [11, 6] (the vocabulary of token set 'S' by the "
                    "hidden width)");
  CHECK_THROWS_WITH(sg::cl::probe_hidden(acc, h, W, mask, &h, static_cast<const sg::cpu::tensor<double>*>(nullptr)),
                    Catch::Contains("needs both its hidden states and its LM head"));
  CHECK_THROWS_WITH(sg::cl::probe_hidden(acc, h, W, mask, &h, &W12), Catch::Contains("reference LM head has shape [12, 6]"));
  CHECK_THROWS_WITH(sg::cl::probe_hidden(acc, h, W, mask, nullptr, nullptr, {.rows = 0}), Catch::Contains("rows"));
  auto bad = h.clone();
  bad[1 * 4 * 6 + 2 * 6] = std::numeric_limits<double>::quiet_NaN();  // text 1, position 2
  CHECK_THROWS_WITH(sg::cl::probe_hidden(acc, bad, W, mask),
                    "skillgraft: the logits at position [1, 2] are not finite; the probe was not updated");
  CHECK_THROWS_WITH(sg::cl::probe_hidden(acc, h, W, mask, &bad, &W),
                    Catch::Contains("the reference's logits at position [1, 2] are not finite"));
  CHECK(acc.texts() == 0);
  // With and without a reference do not mix in one accumulator.
  sg::cl::probe_hidden(acc, h, W, mask, &h, &W);
  CHECK_THROWS_WITH(sg::cl::probe_hidden(acc, h, W, mask), Catch::Contains("mix positions with and without a reference"));
  CHECK(acc.texts() == 2);
}

TEST_CASE("teacher-forced probe of a decoder LM, with soft tokens, equals the model's full logits") {
  const auto c = lm_config();
  auto w = random_weights<double>(c, 11);
  auto w_other = random_weights<double>(c, 12);
  const token_ids ids = {{1, 5, 7, 2, 11, 4}, {3, 3, 12, 0, 28, 9}};
  auto prefix = sg::test::random_tensor<double>({2, 2, std::size_t(c.hidden)}, 13);
  position_mask mask = xt::zeros<bool>({2, 8});
  for (std::size_t s = 1; s < 8; s += 2) mask(0, s) = true;  // position 1 is a soft token
  for (std::size_t s = 2; s < 7; ++s) mask(1, s) = true;
  const sg::cl::token_set set({2, 3, 4, 5, 6}, c.vocab_size, "S");

  sg::cl::distribution_probe<double> probe(c, {.rows = 3, .vocab = 7});
  sg::cl::probe_accumulator acc(set, true);
  probe.teacher_forced(acc, w, ids, mask, &prefix, sg::cl::weights_reference<double>{&w_other});

  // The model's own path: decoder_lm forward (any recipe computes the same forward) and its logits.
  sg::model::decoder_lm<double, decltype(sg::recipe::sa_proj)> lm(c, sg::recipe::sa_proj);
  auto logits_of = [&](const sg::model::lm_weights<double>& wx) {
    decltype(lm)::saved_t s;
    return lm.logits(wx, lm.forward(wx, ids, s, &prefix));
  };
  const auto z = logits_of(w), zr = logits_of(w_other);
  const std::size_t V = std::size_t(c.vocab_size);
  REQUIRE(acc.kept().size() == 9);
  for (const auto& rec : acc.kept()) {
    INFO("text " << rec.text << ", position " << rec.position);
    const std::size_t row = rec.text * 8 + rec.position;
    const std::vector<double> zi(z.data() + row * V, z.data() + (row + 1) * V), ri(zr.data() + row * V, zr.data() + (row + 1) * V);
    check_values(rec.value, naive(zi, &ri, set), 1e-10, 1e-12, true);
  }
  // A mask that forgets the soft tokens is named with the shape it should have had.
  const position_mask short_mask = xt::ones<bool>({2, 6});
  CHECK_THROWS_WITH(probe.teacher_forced(acc, w, ids, short_mask, &prefix),
                    Catch::Contains("probe mask has shape [2, 6], expected [2, 8]"));
  const bool from_targets = sg::cl::mask_from_targets(token_ids{{-100, 4, -100}}) == position_mask{{false, true, false}};
  CHECK(from_targets);
}

TEST_CASE("generation probe: each step's distribution, as the decoder saw it, stopping at EOS") {
  const auto c = lm_config();
  auto w = random_weights<double>(c, 21);
  auto w_ref = random_weights<double>(c, 22);
  const token_ids prompt = {{1, 5, 7}, {3, 3, 12}, {8, 0, 2}};
  const sg::cl::token_set set({0, 1, 2, 3}, c.vocab_size, "S");
  sg::cl::distribution_probe<double> probe(c, {.rows = 4, .vocab = 10});

  // EOS = the token row 0 emits at its second step, so row 0 stops there (and pads after).
  sg::cl::probe_accumulator first_acc(set);
  sg::model::sampling s;
  s.max_new_tokens = 6;
  const auto first_run = probe.generated(first_acc, w, prompt, s);
  const std::int64_t eos = first_run(0, 1);
  s.eos = eos;
  sg::cl::probe_accumulator acc(set, true);
  const auto out = probe.generated(acc, w, prompt, s, nullptr, sg::cl::weights_reference<double>{&w_ref});
  const bool same_tokens = out == sg::model::generate(probe.model(), w, prompt, s);
  CHECK(same_tokens);

  // Step by step with the KV cache, as generate() decodes; the reference decodes the same tokens.
  const std::size_t B = 3, G = 6, V = std::size_t(c.vocab_size), d = std::size_t(c.hidden);
  std::vector<std::vector<sg::cl::probe_values>> want(B);
  {
    const auto& m = probe.model();
    sg::model::kv_cache<double> cache(c, int(B), 3 + int(G)), cache_ref(c, int(B), 3 + int(G));
    auto h = sg::model::decode(m, w, cache, m.embed(w, prompt, nullptr));
    auto hr = sg::model::decode(m, w_ref, cache_ref, m.embed(w_ref, prompt, nullptr));
    std::vector<bool> done(B, false);
    for (std::size_t t = 0; t < G; ++t) {
      for (std::size_t b = 0; b < B; ++b) {
        const std::size_t last = (b * h.dim(1) + h.dim(1) - 1) * d;
        auto row = [&](const sg::cpu::tensor<double>& hh, const sg::model::lm_weights<double>& ww) {
          std::vector<double> z(V, 0.0);
          for (std::size_t j = 0; j < V; ++j)
            for (std::size_t k = 0; k < d; ++k) z[j] += hh[last + k] * ww.head()[j * d + k];
          return z;
        };
        const auto z = row(h, w), r = row(hr, w_ref);
        if (!done[b]) want[b].push_back(naive(z, &r, set));
        if (out(b, t) == eos) done[b] = true;
      }
      token_ids next = token_ids::from_shape({B, 1});
      for (std::size_t b = 0; b < B; ++b) next(b, 0) = out(b, t);
      if (t + 1 == G) break;
      h = sg::model::decode(m, w, cache, m.embed(w, next, nullptr));
      hr = sg::model::decode(m, w_ref, cache_ref, m.embed(w_ref, next, nullptr));
    }
  }
  // The step that emitted EOS counts, the padding after it does not (greedy: the same tokens up to EOS).
  for (std::size_t b = 0; b < B; ++b) {
    std::size_t steps = 0;
    while (steps < G && first_run(b, steps) != eos) ++steps;
    CHECK(want[b].size() == std::min(G, steps + 1));
  }
  CHECK(want[0].size() <= 2);
  std::vector<std::size_t> seen(B, 0);
  for (const auto& rec : acc.kept()) {
    INFO("text " << rec.text << ", position " << rec.position);
    const std::size_t t = rec.position - 2;  // position p predicts the token at p + 1
    REQUIRE(t == seen[rec.text]);
    // Cached decoding and one causal pass differ only by rounding (double).
    check_values(rec.value, want[rec.text][t], 1e-9, 1e-11, true);
    ++seen[rec.text];
  }
  for (std::size_t b = 0; b < B; ++b) {
    CHECK(seen[b] == want[b].size());
    CHECK(acc.text(b).count == want[b].size());
  }
  // Given continuations: every token counts without an EOS.
  sg::cl::probe_accumulator given(set);
  probe.continuations(given, w, prompt, out);
  CHECK(given.positions().count == B * G);
  s.max_new_tokens = 0;
  CHECK_THROWS_WITH(probe.generated(given, w, prompt, s), Catch::Contains("max_new_tokens >= 1"));
}

TEST_CASE("references: an LwF teacher and the base weights give the same KL, KL is 0 before training") {
  const auto c = lm_config();
  auto w = random_weights<float>(c, 31);
  const auto w_base = random_weights<float>(c, 31);  // the same draws: the base model
  sg::model::decoder_lm<float, decltype(sg::recipe::sa_proj)> student(c, sg::recipe::sa_proj);
  sg::cl::teacher<float> teacher(student, w);
  const token_ids ids = {{4, 9, 1, 22, 7, 13, 2}, {17, 3, 3, 8, 26, 0, 5}};
  const position_mask mask = xt::ones<bool>({2, 7});
  const sg::cl::token_set numbers({10, 11, 12, 13, 14, 15}, c.vocab_size, "numbers");
  sg::cl::distribution_probe<float> probe(c);

  auto probe_both = [&] {
    sg::cl::probe_accumulator by_teacher(numbers, true), by_base(numbers, true);
    probe.teacher_forced(by_teacher, w, ids, mask, nullptr, sg::cl::teacher_reference<float>{&teacher, &w});
    probe.teacher_forced(by_base, w, ids, mask, nullptr, sg::cl::weights_reference<float>{&w_base});
    REQUIRE(by_teacher.kept().size() == by_base.kept().size());
    for (std::size_t i = 0; i < by_base.kept().size(); ++i) {  // the same frozen forward: bit-identical
      CHECK(by_teacher.kept()[i].value.kl_ref_model == by_base.kept()[i].value.kl_ref_model);
      CHECK(by_teacher.kept()[i].value.kl_model_ref == by_base.kept()[i].value.kl_model_ref);
      CHECK(by_teacher.kept()[i].value.set_mass == by_base.kept()[i].value.set_mass);
    }
    return by_base.positions().mean;
  };
  const auto before = probe_both();
  CHECK(before.kl_ref_model == 0.0);
  CHECK(before.kl_model_ref == 0.0);

  // Train the attention projections on a task whose targets are all number tokens.
  auto g = student.make_grads(w);
  sg::train::adamw<float> opt(student, w, g, {.lr = 0.03});
  const token_ids task = {{2, 6, 8, 20, 1}, {7, 7, 19, 4, 9}};
  const token_ids targets = {{10, 11, 12, 13, 14}, {15, 10, 11, 12, 13}};
  sg::train::micro_batch<float> mb{task, targets};
  for (int i = 0; i < 20; ++i)
    sg::train::train_step(student, w, g, opt, sg::train::constant_schedule{0.03}, std::span(&mb, 1));

  const auto hidden_now = probe.hidden(w, ids);
  const auto after = probe_both();
  // Captions without numbers: the counting bias appears as mass moved onto the number tokens,
  // and the distribution moved away from the base model's.
  INFO("mass on numbers before " << before.set_mass << ", after " << after.set_mass);
  CHECK(after.set_mass > 2 * before.set_mass);
  CHECK(after.set_max_logit > before.set_max_logit);
  CHECK(after.kl_ref_model > 1e-3);
  CHECK(after.kl_model_ref > 1e-3);
  // The teacher was swapped back: the student's weights are as they were before probing.
  const auto hidden_again = probe.hidden(w, ids);
  CHECK(std::equal(hidden_now.data(), hidden_now.data() + hidden_now.size(), hidden_again.data()));
}
