// Learning without forgetting: the chunked distillation loss against finite differences
// and a direct computation; the teacher's memory is only the trainable tensors; the
// teacher reproduces the model before the task; distillation limits drift.
#include "support/gradcheck.hpp"

#include "skillgraft/cl/lwf.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"

namespace sg = skillgraft;
using sg::token_ids;

namespace {

sg::decoder_config cfg(bool tied = false) {
  auto c = sg::test::tiny_config(false, 2);
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
const token_ids targets = {{-100, -100, 2, 11, 9}, {-100, 12, 0, 4, -100}};

}  // namespace

TEST_CASE("LwF loss: gradients by finite differences, any chunking") {
  auto h = sg::test::random_tensor<double>({2, 5, 6}, 1);
  auto ht = sg::test::random_tensor<double>({2, 5, 6}, 2);
  auto W = sg::test::random_tensor<double>({13, 6}, 3);
  auto Wt = sg::test::random_tensor<double>({13, 6}, 4);
  for (bool all : {false, true})
    for (auto [rows, vocab] : {std::pair<std::size_t, std::size_t>{128, 0}, {2, 5}, {1, 1}}) {
      INFO("all positions " << all << ", rows " << rows << ", vocab chunk " << vocab);
      const sg::cl::lwf_options o{.lambda = 0.7, .temperature = 2.0, .all_positions = all, .rows = rows, .vocab = vocab};
      auto dW = sg::cpu::tensor<double>({13, 6}, sg::memory_use::workspace);
      auto r = sg::cl::lwf_loss(h, W, ht, Wt, targets, &dW, o);
      auto loss = [&] { return sg::cl::lwf_loss<double>(h, W, ht, Wt, targets, nullptr, o).loss; };
      sg::test::check_tensor("h", h, r.dh, loss, {});
      sg::test::check_tensor("W", W, dW, loss, {});
      // Against the definition, written out.
      double ce = 0, kl = 0;
      int nce = 0, nkd = 0;
      for (std::size_t b = 0; b < 2; ++b)
        for (std::size_t s = 0; s < 5; ++s) {
          const auto y = targets(b, s);
          if (y == sg::ignore_index && !all) continue;
          std::vector<double> zs(13), zt(13);
          for (int j = 0; j < 13; ++j) {
            zs[j] = zt[j] = 0;
            for (int k = 0; k < 6; ++k) {
              zs[j] += h[(b * 5 + s) * 6 + k] * W[std::size_t(j) * 6 + k];
              zt[j] += ht[(b * 5 + s) * 6 + k] * Wt[std::size_t(j) * 6 + k];
            }
          }
          auto lse = [](const std::vector<double>& z, double sc) {
            double m = -1e300, sum = 0;
            for (double v : z) m = std::max(m, v * sc);
            for (double v : z) sum += std::exp(v * sc - m);
            return m + std::log(sum);
          };
          const double ls = lse(zs, 0.5), lt = lse(zt, 0.5);
          for (int j = 0; j < 13; ++j) {
            const double pt = std::exp(zt[j] * 0.5 - lt);
            kl += pt * ((zt[j] * 0.5 - lt) - (zs[j] * 0.5 - ls));
          }
          ++nkd;
          if (y != sg::ignore_index) {
            ce += lse(zs, 1.0) - zs[std::size_t(y)];
            ++nce;
          }
        }
      CHECK(r.ce == Approx(ce / nce).epsilon(1e-12));
      CHECK(r.kl == Approx(kl / nkd).epsilon(1e-12));
      CHECK(r.loss == Approx(ce / nce + 0.7 * 4.0 * kl / nkd).epsilon(1e-12));
    }
  // Identical teacher and student: no distillation loss and no distillation gradient.
  auto same = sg::cl::lwf_loss<double>(h, W, h, W, targets, nullptr, {.lambda = 5.0});
  auto plain = sg::train::masked_cross_entropy<double>(h, W, targets, sg::train::no_head_grad);
  CHECK(same.kl == Approx(0.0).margin(1e-14));
  CHECK((same.dh.vec() - plain.dh.vec()).cwiseAbs().maxCoeff() < 1e-13);
  CHECK_THROWS_WITH(sg::cl::lwf_loss<double>(h, W, ht, Wt, targets, nullptr, {.temperature = 0}),
                    Catch::Contains("temperature > 0"));
  CHECK_THROWS_WITH(sg::cl::lwf_loss<double>(h, W, ht, Wt, targets, nullptr, {.rows = 0}),
                    Catch::Contains("rows must be at least 1"));
}

TEST_CASE("LwF teacher: holds only the trainable tensors and reproduces the model before the task") {
  const auto c = cfg();
  auto w = random_lm<float>(c, 5);
  sg::model::decoder_lm<float, decltype(sg::recipe::mlp)> student(c, sg::recipe::mlp);
  const auto before = sg::ledger().live(sg::memory_use::method_state);
  sg::cl::teacher<float> teacher(student, w);
  CHECK(sg::ledger().live(sg::memory_use::method_state) - before == std::int64_t(teacher.state_bytes()));
  CHECK(teacher.state_bytes() == student.trainable_elements() * sizeof(float));
  CHECK(teacher.snapshot().size() == 6);  // gate, up, down in two layers
  CHECK(teacher.snapshot().find("model.layers.0.self_attn.q_proj.weight") == nullptr);  // shared, not copied

  sg::model::decoder_lm<float, decltype(sg::recipe::frozen)> frozen(c, sg::recipe::frozen);
  decltype(frozen)::saved_t s0;
  const auto h_before = frozen.forward(w, ids, s0);

  auto g = student.make_grads(w);
  sg::train::adamw<float> opt(student, w, g, {.lr = 0.05});
  sg::train::micro_batch<float> mb{ids, targets};
  const sg::cl::lwf_objective<float> obj{&teacher, {.lambda = 1.0, .temperature = 2.0}};
  for (int i = 0; i < 3; ++i)
    sg::train::train_step(student, w, g, opt, sg::train::constant_schedule{0.05}, std::span(&mb, 1), {}, obj);

  decltype(frozen)::saved_t s1;
  const auto h_after = frozen.forward(w, ids, s1);
  CHECK((h_after.vec() - h_before.vec()).cwiseAbs().maxCoeff() > 1e-3);  // the student moved
  const auto h_teacher = teacher.hidden(w, ids);
  CHECK(std::equal(h_teacher.data(), h_teacher.data() + h_teacher.size(), h_before.data()));  // the teacher did not
  decltype(frozen)::saved_t s2;
  const auto h_again = frozen.forward(w, ids, s2);
  CHECK(std::equal(h_again.data(), h_again.data() + h_again.size(), h_after.data()));  // swapped back exactly

  // An attention-only teacher costs the attention projections only.
  sg::model::decoder_lm<float, decltype(sg::recipe::sa_proj)> sa(c, sg::recipe::sa_proj);
  sg::cl::teacher<float> small(sa, w);
  CHECK(small.state_bytes() == sa.trainable_elements() * sizeof(float));
  CHECK(small.state_bytes() < teacher.state_bytes());
}

TEST_CASE("LwF teacher with a trainable, tied head uses its own copy of the head") {
  const auto c = cfg(true);
  auto w = random_lm<float>(c, 6);
  sg::model::decoder_lm<float, decltype(sg::recipe::llm)> student(c, sg::recipe::llm);
  sg::cl::teacher<float> teacher(student, w);
  CHECK(&teacher.head(w) != &w.head());
  sg::model::decoder_lm<float, decltype(sg::recipe::mlp)> mlp_only(c, sg::recipe::mlp);
  sg::cl::teacher<float> shared(mlp_only, w);
  CHECK(&shared.head(w) == &w.head());
}

TEST_CASE("LwF keeps the output distribution closer to the teacher's") {
  const auto c = cfg();
  auto drift = [&](double lambda) {
    auto w = random_lm<float>(c, 7);
    sg::model::decoder_lm<float, decltype(sg::recipe::llm)> student(c, sg::recipe::llm);
    sg::cl::teacher<float> teacher(student, w);
    auto g = student.make_grads(w);
    sg::train::adamw<float> opt(student, w, g, {.lr = 0.02});
    sg::train::micro_batch<float> mb{ids, targets};
    const sg::cl::lwf_objective<float> obj{&teacher, {.lambda = lambda, .temperature = 2.0, .all_positions = true}};
    for (int i = 0; i < 30; ++i)
      sg::train::train_step(student, w, g, opt, sg::train::constant_schedule{0.02}, std::span(&mb, 1), {}, obj);
    // KL(teacher || student) on held-out text the task never trained on.
    const token_ids other = {{9, 8, 7, 6, 5, 4}, {0, 2, 4, 6, 8, 10}};
    decltype(student)::saved_t s;
    auto h = student.forward(w, other, s);
    auto ht = teacher.hidden(w, other);
    return sg::cl::lwf_loss<float>(h, w.head(), ht, teacher.head(w), xt::full_like(other, sg::ignore_index), nullptr,
                                   {.lambda = 1.0, .temperature = 1.0, .all_positions = true})
        .kl;
  };
  const double free = drift(0.0), held = drift(5.0);
  INFO("KL without distillation " << free << ", with " << held);
  CHECK(held < 0.5 * free);
}
