// WiSE-FT and EWC: interpolation exact at α = 0, ½, 1 and per group, the sequential
// average against its closed form, frozen tensors bit-identical; the Fisher against
// per-example finite differences (empirical) and its exact expectation (sampled); the
// penalty's gradient against finite differences; memory equal to the ledger; EWC keeping
// weights near θ*; bad input named.
#include "support/gradcheck.hpp"

#include <cstring>
#include <map>

#include "skillgraft/cl/ewc.hpp"
#include "skillgraft/cl/wise_ft.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/sgd.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;

// The MLP policies' own tensors (expanded-gate range, MoE router) interpolate with the MLP group.
static_assert(sg::cl::group_of<sg::group::router>() == sg::cl::param_group::mlp);
static_assert(sg::cl::group_of<sg::group::act_range>() == sg::cl::param_group::mlp);
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

// Copies of every parameter (trainable or not), to check bit-identity afterwards.
template <class T>
std::map<std::string, sg::cpu::tensor<T>> copy_all(sg::model::lm_weights<T>& w) {
  std::map<std::string, sg::cpu::tensor<T>> m;
  sg::model::for_each_parameter(w, [&](const std::string& n, sg::cpu::tensor<T>& t, auto, int) {
    m.emplace(n, t.clone(sg::memory_use::workspace));
  });
  return m;
}
template <class T>
bool same_bits(const sg::cpu::tensor<T>& a, const sg::cpu::tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

// Adds noise to the trainable tensors (a stand-in for fine-tuning).
template <class Model, class T>
void perturb(const Model& m, sg::model::lm_weights<T>& w, unsigned seed, double stddev = 0.1) {
  std::mt19937 rng(seed);
  sg::model::for_each_trainable_weight(m, w, [&](const std::string&, sg::cpu::tensor<T>& t) {
    std::normal_distribution<double> nd(0.0, stddev);
    for (std::size_t j = 0; j < t.size(); ++j) t[j] = T(double(t[j]) + nd(rng));
  });
}

// The group a Hugging Face name belongs to, spelled out independently of the library.
double alpha_by_name(const std::string& n, const sg::cl::group_alpha& a) {
  if (n.find("self_attn.") != std::string::npos) return a.attention;
  if (n.find("mlp.") != std::string::npos) return a.mlp;
  if (n.find("layernorm") != std::string::npos || n == "model.norm.weight") return a.norm;
  if (n == "model.embed_tokens.weight") return a.embedding;
  if (n == "lm_head.weight") return a.head;
  FAIL("unexpected name " << n);
  return 0;
}

std::int64_t method_state() { return sg::ledger().live(sg::memory_use::method_state); }

}  // namespace

TEST_CASE("WiSE-FT: interpolation is exact at alpha 0, 1, 1/2 and per group, frozen tensors untouched") {
  const auto c = cfg();
  using Recipe = std::remove_cv_t<decltype(sg::recipe::sa_proj | sg::trainable<sg::group::lm_head>)>;
  sg::model::decoder_lm<float, Recipe> lm(c, Recipe{});
  auto w = random_lm<float>(c, 1);
  const auto original = copy_all(w);

  const auto m0 = method_state();
  sg::cl::weight_snapshot<float> before(lm, w);
  CHECK(before.state_bytes() == lm.trainable_elements() * sizeof(float));
  CHECK(method_state() - m0 == std::int64_t(before.state_bytes()));
  CHECK(before.size() == 9);  // q, k, v, o in two layers, and the head
  CHECK(before.find("model.layers.0.mlp.up_proj.weight") == nullptr);  // frozen: shared, not copied
  CHECK(before.find("model.embed_tokens.weight") == nullptr);

  perturb(lm, w, 2);
  sg::cl::weight_snapshot<float> after(lm, w);

  auto check_frozen = [&] {
    std::size_t frozen = 0;
    sg::model::for_each_parameter(w, [&](const std::string& n, sg::cpu::tensor<float>& t, auto, int) {
      if (before.find(n)) return;
      ++frozen;
      INFO(n);
      CHECK(same_bits(t, original.at(n)));
    });
    CHECK(frozen == 2 * 5 + 2);  // gate, up, down and the two norms per layer; embed_tokens, final norm
  };

  for (double alpha : {0.0, 1.0, 0.5}) {
    INFO("alpha " << alpha);
    sg::cl::interpolate(lm, w, before, after, alpha);
    before.for_each([&](const std::string& n, sg::cl::param_group, const sg::cpu::tensor<float>& b) {
      const auto& a = *after.find(n);
      const sg::cpu::tensor<float>* now = nullptr;
      sg::model::for_each_parameter(w, [&](const std::string& m, sg::cpu::tensor<float>& t, auto, int) {
        if (m == n) now = &t;
      });
      REQUIRE(now);
      if (alpha == 0.0) CHECK(same_bits(*now, b));
      if (alpha == 1.0) CHECK(same_bits(*now, a));
      if (alpha == 0.5) {
        bool exact = true;
        for (std::size_t j = 0; j < b.size(); ++j) exact &= ((*now)[j] == 0.5f * b[j] + 0.5f * a[j]);
        CHECK(exact);
      }
    });
    check_frozen();
  }

  // In place (w holds θ_after) gives the same as from two snapshots.
  sg::cl::interpolate(lm, w, before, after, 1.0);
  sg::cl::wise_ft(lm, w, before, 0.5);
  before.for_each([&](const std::string& n, sg::cl::param_group, const sg::cpu::tensor<float>& b) {
    const auto& a = *after.find(n);
    const sg::cpu::tensor<float>* now = nullptr;
    sg::model::for_each_parameter(w, [&](const std::string& m, sg::cpu::tensor<float>& t, auto, int) {
      if (m == n) now = &t;
    });
    bool exact = true;
    for (std::size_t j = 0; j < b.size(); ++j) exact &= ((*now)[j] == 0.5f * b[j] + 0.5f * a[j]);
    CHECK(exact);
  });
  check_frozen();
}

TEST_CASE("WiSE-FT: alpha per group and per name") {
  const auto c = cfg();
  sg::model::decoder_lm<double, std::remove_cv_t<decltype(sg::recipe::llm)>> lm(c, sg::recipe::llm);
  auto w = random_lm<double>(c, 3);
  sg::cl::weight_snapshot<double> before(lm, w);
  perturb(lm, w, 4);
  sg::cl::weight_snapshot<double> after(lm, w);
  CHECK(before.state_bytes() == lm.trainable_elements() * sizeof(double));

  const sg::cl::group_alpha ga{.attention = 0.25, .mlp = 0.75, .norm = 0.0, .embedding = 1.0, .head = 0.3};
  std::set<sg::cl::param_group> groups;
  before.for_each([&](const std::string&, sg::cl::param_group g, const auto&) { groups.insert(g); });
  CHECK(groups.size() == 5);

  auto expect = [&](auto alpha_of) {
    before.for_each([&](const std::string& n, sg::cl::param_group, const sg::cpu::tensor<double>& b) {
      const auto& a = *after.find(n);
      const double al = alpha_of(n);
      const sg::cpu::tensor<double>* now = nullptr;
      sg::model::for_each_parameter(w, [&](const std::string& m, sg::cpu::tensor<double>& t, auto, int) {
        if (m == n) now = &t;
      });
      double worst = 0;
      for (std::size_t j = 0; j < b.size(); ++j)
        worst = std::max(worst, std::abs((*now)[j] - ((1 - al) * b[j] + al * a[j])));
      INFO(n << " alpha " << al);
      CHECK(worst <= 1e-15);
      if (al == 0.0) CHECK(same_bits(*now, b));
      if (al == 1.0) CHECK(same_bits(*now, a));
    });
  };
  sg::cl::interpolate(lm, w, before, after, ga);
  expect([&](const std::string& n) { return alpha_by_name(n, ga); });

  // A callable of the name alone: layer 0 keeps the fine-tuned weights, the rest go back.
  auto by_layer = [](const std::string& n) { return n.rfind("model.layers.0.", 0) == 0 ? 1.0 : 0.2; };
  sg::cl::interpolate(lm, w, before, after, by_layer);
  expect(by_layer);
}

TEST_CASE("WiSE-FT sequential: the running average after three tasks equals its closed form") {
  const auto c = cfg();
  sg::model::decoder_lm<float, std::remove_cv_t<decltype(sg::recipe::mlp_gate_up)>> lm(c, sg::recipe::mlp_gate_up);
  auto w = random_lm<float>(c, 5);
  const auto original = copy_all(w);
  const auto m0 = method_state();
  sg::cl::running_average<float> avg(lm, w);
  CHECK(avg.state_bytes() == lm.trainable_elements() * sizeof(float));
  CHECK(method_state() - m0 == std::int64_t(avg.state_bytes()));

  std::vector<sg::cl::weight_snapshot<float>> theta;  // θ_0 .. θ_3: weights at the end of each task
  theta.emplace_back(lm, w);
  auto g = lm.make_grads(w);
  std::mt19937 rng(6);
  for (int task = 1; task <= 3; ++task) {
    // A task: a few AdamW steps on its own random batch, from the current average.
    sg::train::adamw<float> opt(lm, w, g, {.lr = 0.05});
    sg::train::micro_batch<float> mb{token_ids::from_shape({2, 6}), token_ids::from_shape({2, 6})};
    std::uniform_int_distribution<int> tok(0, 12);
    for (auto& t : mb.ids) t = tok(rng);
    for (auto& t : mb.targets) t = tok(rng);
    for (int s = 0; s < 5; ++s)
      sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{0.05}, std::span(&mb, 1));
    theta.emplace_back(lm, w);
    avg.after_task(lm, w);
  }
  CHECK(avg.tasks() == 3);

  const double coef[4] = {1.0 / 8, 1.0 / 8, 1.0 / 4, 1.0 / 2};
  std::size_t checked = 0;
  sg::model::for_each_parameter(w, [&](const std::string& n, sg::cpu::tensor<float>& t, auto, int) {
    INFO(n);
    const auto* mean = avg.average().find(n);
    if (!mean) {
      CHECK(same_bits(t, original.at(n)));  // frozen: bit-identical
      return;
    }
    CHECK(same_bits(t, *mean));  // the model continues from the average
    double worst = 0, moved = 0;
    for (std::size_t j = 0; j < t.size(); ++j) {
      double ref = 0;
      for (int k = 0; k < 4; ++k) ref += coef[k] * double((*theta[std::size_t(k)].find(n))[j]);
      worst = std::max(worst, std::abs(double(t[j]) - ref));
      moved = std::max(moved, std::abs(double((*theta[3].find(n))[j]) - double((*theta[0].find(n))[j])));
    }
    CHECK(worst <= 2e-7);
    CHECK(moved > 1e-2);  // the tasks did change the weights
    ++checked;
  });
  CHECK(checked == 4);  // gate and up in two layers
}

namespace {
// Two micro-batches: three sequences (the last without any target) and two with soft tokens.
template <class T>
struct fisher_data {
  sg::cpu::tensor<T> prefix;
  std::vector<sg::train::micro_batch<T>> batches;
  explicit fisher_data(const sg::decoder_config& c) : prefix(sg::test::random_tensor<T>({2, 2, std::size_t(c.hidden)}, 41)) {
    sg::train::micro_batch<T> a;
    a.ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}, {6, 6, 6, 6, 6}};
    a.targets = {{-100, -100, 2, 11, 9}, {-100, 12, 0, 4, -100}, {-100, -100, -100, -100, -100}};
    sg::train::micro_batch<T> b;
    b.ids = {{9, 8, 7, 6}, {0, 1, 0, 1}};
    b.targets = {{-100, -100, -100, 8, 7, 6}, {-100, -100, 1, -100, -100, 10}};
    b.prefix = &prefix;
    batches.push_back(std::move(a));
    batches.push_back(std::move(b));
  }
};

// Σ_t log p(y_t) of sequence `row` of a micro-batch: the batch runs whole, and only that
// row keeps its targets (sequences do not interact, so this is the example on its own).
template <class Model>
double example_loglik(const Model& lm, const sg::model::lm_weights<double>& w, const sg::train::micro_batch<double>& mb,
                      std::size_t row, const token_ids& tg) {
  typename Model::saved_t s;
  auto h = lm.forward(w, mb.ids, s, mb.prefix);
  token_ids only = xt::full_like(tg, sg::ignore_index);
  for (std::size_t t = 0; t < tg.shape(1); ++t) only(row, t) = tg(row, t);
  auto r = sg::train::masked_cross_entropy<double>(h, w.head(), only, sg::train::no_head_grad, {.want_dh = false, .normaliser = 1});
  return -r.loss;
}
}  // namespace

TEST_CASE("EWC: empirical Fisher equals per-example squared gradients by finite differences") {
  const auto c = cfg();
  using Recipe = std::remove_cv_t<decltype(sg::recipe::sa_proj | sg::trainable<sg::group::final_norm, sg::group::lm_head,
                                                                            sg::proj::down>)>;
  sg::model::decoder_lm<double, Recipe> lm(c, Recipe{});
  auto w = random_lm<double>(c, 7);
  fisher_data<double> data(c);
  const auto original = copy_all(w);

  const auto m0 = method_state();
  auto F = sg::cl::estimate_fisher(lm, w, std::span(data.batches));
  auto Ft = sg::cl::estimate_fisher(lm, w, std::span(data.batches), {.per_token = true});
  CHECK(method_state() - m0 == std::int64_t(F.state_bytes() + Ft.state_bytes()));
  CHECK(F.state_bytes() == lm.trainable_elements() * sizeof(double));
  CHECK(F.examples() == 4);  // the sequence without targets does not count
  sg::model::for_each_parameter(w, [&](const std::string& n, sg::cpu::tensor<double>& t, auto, int) {
    CHECK(same_bits(t, original.at(n)));  // estimating changes no weight
  });

  // Brute force: F_j = (1/N) Σ_n (∂ℓ_n/∂θ_j)², each ∂ℓ_n/∂θ_j a central difference.
  struct ex {
    std::size_t batch, row, count;
  };
  std::vector<ex> examples = {{0, 0, 3}, {0, 1, 3}, {1, 0, 3}, {1, 1, 2}};
  std::size_t tensors = 0;
  sg::model::for_each_trainable_weight(lm, w, [&](const std::string& n, sg::cpu::tensor<double>& t) {
    const auto& f = *F.find(n);
    const auto& ft = *Ft.find(n);
    double worst = 0, worst_t = 0, largest = 0;
    for (std::size_t j : sg::test::probe_indices(t.size(), 10, 77u + unsigned(t.size()))) {
      double ref = 0, ref_t = 0;
      const double keep = t[j], h = 1e-5;
      for (const auto& e : examples) {
        const auto& mb = data.batches[e.batch];
        t[j] = keep + h;
        const double up = example_loglik(lm, w, mb, e.row, mb.targets);
        t[j] = keep - h;
        const double down = example_loglik(lm, w, mb, e.row, mb.targets);
        t[j] = keep;
        const double d = (up - down) / (2 * h);
        ref += d * d / 4;
        ref_t += d * d / double(e.count * e.count) / 4;
      }
      worst = std::max(worst, std::abs(f[j] - ref) / std::max(1e-3, ref));
      worst_t = std::max(worst_t, std::abs(ft[j] - ref_t) / std::max(1e-3, ref_t));
      largest = std::max(largest, ref);
    }
    INFO(n << ": worst relative error " << worst << " (per token " << worst_t << ")");
    CHECK(worst < 1e-6);
    CHECK(worst_t < 1e-6);
    CHECK(largest > 1e-4);  // the check is not vacuous
    ++tensors;
  });
  CHECK(tensors == 4 * 2 + 2 + 2);
}

TEST_CASE("EWC: sampled Fisher is seeded and converges to the true Fisher") {
  const auto c = cfg();
  using Recipe = std::remove_cv_t<decltype(sg::recipe::mlp_gate_up | sg::trainable<sg::group::lm_head>)>;
  sg::model::decoder_lm<double, Recipe> lm(c, Recipe{});
  auto w = random_lm<double>(c, 8);
  fisher_data<double> data(c);

  const sg::cl::fisher_options o{.kind = sg::cl::fisher_kind::sampled, .seed = 11, .samples = 3};
  auto a = sg::cl::estimate_fisher(lm, w, std::span(data.batches), o);
  auto b = sg::cl::estimate_fisher(lm, w, std::span(data.batches), o);
  auto other = sg::cl::estimate_fisher(lm, w, std::span(data.batches), {.kind = sg::cl::fisher_kind::sampled, .seed = 12, .samples = 3});
  CHECK(a.examples() == 12);
  bool same = true, differs = false;
  a.for_each([&](const std::string& n, const sg::cpu::tensor<double>& t) {
    same &= same_bits(t, *b.find(n));
    differs |= !same_bits(t, *other.find(n));
  });
  CHECK(same);
  CHECK(differs);

  // The true Fisher, exactly: labels drawn independently per position have E[∇ log p] = 0,
  // so the cross terms vanish and F = (1/N) Σ_n Σ_t Σ_y p_t(y) (∂ log p_t(y)/∂θ)².
  sg::cl::diagonal_fisher<double> exact(lm, w);
  std::vector<sg::cpu::tensor<double>*> dst;
  exact.for_each([&](const std::string&, sg::cpu::tensor<double>& t) { dst.push_back(&t); });
  auto g = lm.make_grads(w);
  for (const auto& mb : data.batches) {
    typename decltype(lm)::saved_t s;
    auto h = lm.forward(w, mb.ids, s, mb.prefix);
    auto z = lm.logits(w, h);
    const std::size_t P = mb.targets.shape(1);
    for (std::size_t r = 0; r < mb.targets.shape(0); ++r)
      for (std::size_t t = 0; t < P; ++t) {
        if (mb.targets(r, t) == sg::ignore_index) continue;
        const double* zr = z.data() + (r * P + t) * 13;
        double sum = 0;
        for (int y = 0; y < 13; ++y) sum += std::exp(zr[y]);
        for (int y = 0; y < 13; ++y) {
          token_ids one = xt::full_like(mb.targets, sg::ignore_index);
          one(r, t) = y;
          sg::train::zero_grads(lm, w, g);
          auto res = sg::train::masked_cross_entropy<double>(h, w.head(), one, lm.head_grad(g), {.normaliser = 1});
          lm.backward(w, s, res.dh, g);
          std::size_t i = 0;
          lm.for_each_trainable(w, g, [&](const std::string&, auto&, sg::cpu::tensor<double>& dp) {
            dst[i++]->vec().array() += std::exp(zr[y]) / sum / 4.0 * dp.vec().array().square();
          });
        }
      }
  }
  auto mc = sg::cl::estimate_fisher(lm, w, std::span(data.batches),
                                    {.kind = sg::cl::fisher_kind::sampled, .seed = 3, .samples = 1500});
  auto emp = sg::cl::estimate_fisher(lm, w, std::span(data.batches));
  double err = 0, err_emp = 0, norm = 0;
  exact.for_each([&](const std::string& n, const sg::cpu::tensor<double>& t) {
    err += (mc.find(n)->vec() - t.vec()).squaredNorm();
    err_emp += (emp.find(n)->vec() - t.vec()).squaredNorm();
    norm += t.vec().squaredNorm();
  });
  const double rel = std::sqrt(err / norm), rel_emp = std::sqrt(err_emp / norm);
  INFO("relative error of the sampled Fisher " << rel << ", of the empirical Fisher " << rel_emp);
  CHECK(rel < 0.08);  // Monte Carlo error, about 0.03 with these 6000 draws
  CHECK(rel_emp > 2 * rel);  // the two estimators do differ: the check tells them apart
}

TEST_CASE("EWC: penalty and its gradient by finite differences, in train_step, online updates") {
  const auto c = cfg();
  using Recipe = std::remove_cv_t<decltype(sg::recipe::sa_proj | sg::trainable<sg::group::mlp_norm, sg::group::embed>)>;
  sg::model::decoder_lm<double, Recipe> lm(c, Recipe{});
  auto w = random_lm<double>(c, 9);
  fisher_data<double> data(c);

  const auto m0 = method_state();
  sg::cl::ewc<double> e(lm, w, {.lambda = 0.7, .gamma = 0.5});
  CHECK(e.state_bytes() == 2 * lm.trainable_elements() * sizeof(double));
  CHECK(method_state() - m0 == std::int64_t(e.state_bytes()));
  CHECK(e.penalty(lm, w) == 0.0);  // no task consolidated yet

  auto F1 = sg::cl::estimate_fisher(lm, w, std::span(data.batches));
  e.consolidate(lm, w, F1);
  CHECK(e.tasks() == 1);
  CHECK(method_state() - m0 == std::int64_t(e.state_bytes() + F1.state_bytes()));
  perturb(lm, w, 10, 0.05);

  // Gradient of the penalty alone.
  auto g = lm.make_grads(w);
  sg::train::zero_grads(lm, w, g);
  const double p = e.add_penalty_gradient(lm, w, g);
  CHECK(p == Approx(e.penalty(lm, w)).epsilon(1e-13));
  CHECK(p > 0);
  lm.for_each_trainable(w, g, [&](const std::string& n, sg::cpu::tensor<double>& t, sg::cpu::tensor<double>& dt) {
    sg::test::check_tensor(n, t, dt, [&] { return e.penalty(lm, w); }, {});
  });

  // Cross-entropy + penalty through the objective, as train_step runs it.
  const sg::cl::ewc_objective<double> obj{&e};
  const auto& mb = data.batches[0];
  auto total = [&] {
    typename decltype(lm)::saved_t s;
    auto h = lm.forward(w, mb.ids, s);
    return sg::train::masked_cross_entropy<double>(h, w.head(), mb.targets, sg::train::no_head_grad, {.want_dh = false}).loss +
           e.penalty(lm, w);
  };
  sg::train::zero_grads(lm, w, g);
  typename decltype(lm)::saved_t s;
  auto h = lm.forward(w, mb.ids, s);
  auto r = obj.micro(lm, w, g, mb, h, mb.targets, 6);
  lm.backward(w, s, r.dh, g);
  const double pen = obj.finish(lm, w, g);
  CHECK(r.loss + pen == Approx(total()).epsilon(1e-13));
  lm.for_each_trainable(w, g, [&](const std::string& n, sg::cpu::tensor<double>& t, sg::cpu::tensor<double>& dt) {
    sg::test::check_tensor(n, t, dt, total, {});
  });

  // train_step reports cross-entropy + penalty at the weights before the step.
  const double before = total();
  sg::train::sgd<double> opt(lm, w, g, {.lr = 0.01, .momentum = 0.0});
  auto st = sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{0.01}, std::span(&mb, 1),
                                  {.max_grad_norm = 0}, obj);
  CHECK(st.loss == Approx(before).epsilon(1e-12));

  // Online: F ← γ F_1 + F_2, θ* ← the weights at the second consolidation.
  auto F2 = sg::cl::estimate_fisher(lm, w, std::span(data.batches));
  e.consolidate(lm, w, F2);
  CHECK(e.tasks() == 2);
  sg::model::for_each_trainable_weight(lm, w, [&](const std::string& n, sg::cpu::tensor<double>& t) {
    INFO(n);
    CHECK(same_bits(*e.anchor(n), t));
    CHECK((e.fisher(n)->vec() - (0.5 * F1.find(n)->vec() + F2.find(n)->vec())).cwiseAbs().maxCoeff() <= 1e-15);
  });
  CHECK(e.penalty(lm, w) == 0.0);  // at θ* the penalty vanishes
}

TEST_CASE("EWC: state only for trainable tensors, equal to the ledger") {
  auto check = [](auto recipe, bool tied, auto zero) {
    using T = decltype(zero);
    const auto c = cfg(tied);
    sg::model::decoder_lm<T, std::remove_cv_t<decltype(recipe)>> lm(c, recipe);
    auto w = random_lm<T>(c, 12);
    const auto m0 = method_state();
    {
      sg::cl::ewc<T> e(lm, w, {.lambda = 1.0});
      INFO("recipe trains " << lm.trainable_elements() << " elements");
      CHECK(e.state_bytes() == 2 * lm.trainable_elements() * sizeof(T));
      CHECK(method_state() - m0 == std::int64_t(e.state_bytes()));
      sg::train::micro_batch<T> mb{ids, targets};
      e.consolidate(lm, w, std::span(&mb, 1));  // the estimate's temporaries are gone afterwards
      CHECK(method_state() - m0 == std::int64_t(e.state_bytes()));
      CHECK((e.fisher("model.layers.1.self_attn.q_proj.weight") != nullptr) ==
            sg::trains_v<sg::proj::q, std::remove_cv_t<decltype(recipe)>>);
    }
    CHECK(method_state() == m0);
  };
  check(sg::recipe::mlp_gate_up, false, float{});
  check(sg::recipe::sa_proj, false, double{});
  check(sg::recipe::llm, true, float{});  // the tied head is embed_tokens, held once
  check(sg::recipe::sa_proj.on_layers(1, 1), false, float{});
}

namespace {
sg::train::micro_batch<float> task_batch(unsigned seed, int shift) {
  // "a b c SEP" -> "(a+shift) (b+shift) (c+shift)" modulo 12: two tasks that disagree.
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> tok(0, 11);
  sg::train::micro_batch<float> mb;
  mb.ids = token_ids::from_shape({16, 7});
  mb.targets = xt::full_like(mb.ids, sg::ignore_index);
  for (std::size_t b = 0; b < 16; ++b) {
    for (std::size_t i = 0; i < 3; ++i) {
      mb.ids(b, i) = tok(rng);
      mb.ids(b, 4 + i) = (mb.ids(b, i) + shift) % 12;
    }
    mb.ids(b, 3) = 12;
    for (std::size_t i = 0; i < 3; ++i) mb.targets(b, 3 + i) = mb.ids(b, 4 + i);
  }
  return mb;
}
}  // namespace

TEST_CASE("EWC: a large lambda keeps the weights near theta* and the first task's loss low") {
  const auto c = cfg();
  using Recipe = std::remove_cv_t<decltype(sg::recipe::llm)>;
  sg::model::decoder_lm<float, Recipe> lm(c, sg::recipe::llm);
  auto loss_on = [&](sg::model::lm_weights<float>& w, const sg::train::micro_batch<float>& mb) {
    typename decltype(lm)::saved_t s;
    auto h = lm.forward(w, mb.ids, s);
    return sg::train::masked_cross_entropy<float>(h, w.head(), mb.targets, sg::train::no_head_grad, {.want_dh = false}).loss;
  };
  const auto a = task_batch(1, 1), b = task_batch(2, 5);
  auto run = [&](double lambda) {
    auto w = random_lm<float>(c, 13);
    auto g = lm.make_grads(w);
    {
      sg::train::adamw<float> opt(lm, w, g, {.lr = 0.01});
      // Task A, learned part way (a model that has memorised its data has a vanishing
      // empirical Fisher, and EWC then protects nothing).
      for (int s = 0; s < 20; ++s)
        sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{0.01}, std::span(&a, 1));
    }
    const double loss_a = loss_on(w, a);
    sg::cl::ewc<float> e(lm, w, {.lambda = lambda});
    e.consolidate(lm, w, std::span(&a, 1));
    sg::train::adamw<float> opt(lm, w, g, {.lr = 0.01});
    const sg::cl::ewc_objective<float> obj{&e};
    for (int s = 0; s < 60; ++s)
      sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{0.01}, std::span(&b, 1), {}, obj);
    e.set_lambda(1.0);
    return std::tuple{e.penalty(lm, w), loss_on(w, a) - loss_a, loss_on(w, b)};
  };
  const auto [dist_free, forget_free, learn_free] = run(0.0);
  const auto [dist_ewc, forget_ewc, learn_ewc] = run(100.0);
  INFO("Fisher-weighted distance to theta*: " << dist_free << " without EWC, " << dist_ewc << " with");
  INFO("loss increase on the first task: " << forget_free << " without EWC, " << forget_ewc << " with");
  INFO("loss on the second task: " << learn_free << " without EWC, " << learn_ewc << " with");
  CHECK(dist_ewc < 0.25 * dist_free);
  CHECK(forget_ewc < 0.5 * forget_free);
  CHECK(forget_free > 2.0);  // without EWC the first task is really forgotten
  CHECK(learn_ewc < 0.25);   // with it the second task is still learned (from ln 13 = 2.56)
}

TEST_CASE("EWC and WiSE-FT: bad input is named and changes nothing") {
  const auto c = cfg();
  sg::model::decoder_lm<float, std::remove_cv_t<decltype(sg::recipe::mlp)>> mlp(c, sg::recipe::mlp);
  sg::model::decoder_lm<float, std::remove_cv_t<decltype(sg::recipe::sa_proj)>> sa(c, sg::recipe::sa_proj);
  auto w = random_lm<float>(c, 14);
  sg::train::micro_batch<float> mb{ids, targets};

  CHECK_THROWS_AS(sg::cl::ewc<float>(mlp, w, {.lambda = -1.0}), std::invalid_argument);
  CHECK_THROWS_WITH(sg::cl::ewc<float>(mlp, w, {.lambda = -1.0}), Catch::Contains("EWC lambda is -1"));
  CHECK_THROWS_WITH(sg::cl::ewc<float>(mlp, w, {.gamma = 1.5}), Catch::Contains("online EWC gamma is 1.5"));
  CHECK_THROWS_WITH(sg::cl::ewc<float>(mlp, w, {.gamma = -0.1}), Catch::Contains("expected a value in [0, 1]"));
  sg::cl::ewc<float> e(mlp, w, {.lambda = 2.0, .gamma = 0.9});
  CHECK_THROWS_AS(e.set_lambda(std::nan("")), std::invalid_argument);
  CHECK_THROWS_AS(e.set_gamma(2.0), std::invalid_argument);
  CHECK(e.lambda() == 2.0);
  CHECK(e.gamma() == 0.9);

  // A Fisher estimated for another recipe, or another model of the same recipe.
  auto f_sa = sg::cl::estimate_fisher(sa, w, std::span(&mb, 1));
  CHECK_THROWS_AS(e.consolidate(mlp, w, f_sa), std::invalid_argument);
  CHECK_THROWS_WITH(e.consolidate(mlp, w, f_sa),
                    Catch::Contains("the Fisher was estimated under another recipe or model") &&
                        Catch::Contains("model.layers.0.self_attn.q_proj.weight"));
  auto c2 = cfg();
  c2.intermediate = 32;
  sg::model::decoder_lm<float, std::remove_cv_t<decltype(sg::recipe::mlp)>> wide(c2, sg::recipe::mlp);
  auto w2 = random_lm<float>(c2, 15);
  auto f_wide = sg::cl::estimate_fisher(wide, w2, std::span(&mb, 1));
  CHECK_THROWS_WITH(e.consolidate(mlp, w, f_wide),
                    Catch::Contains("the Fisher of model.layers.0.mlp.gate_proj.weight has shape [32, 16]"));
  auto f_layer = sg::cl::estimate_fisher(
      sg::model::decoder_lm<float, std::remove_cv_t<decltype(sg::recipe::mlp)>>(c, sg::recipe::mlp.on_layers(1, 1)), w,
      std::span(&mb, 1));
  CHECK_THROWS_WITH(e.consolidate(mlp, w, f_layer), Catch::Contains("another recipe or model"));
  // A Fisher with a negative entry.
  sg::cl::diagonal_fisher<float> neg(mlp, w);
  neg.for_each([](const std::string&, sg::cpu::tensor<float>& t) { t[3] = -1.0f; });
  CHECK_THROWS_WITH(e.consolidate(mlp, w, neg), Catch::Contains("the Fisher of model.layers.0.mlp.gate_proj.weight is -1") &&
                                                    Catch::Contains("at element 3"));
  CHECK(e.tasks() == 0);  // nothing changed
  CHECK(e.fisher("model.layers.0.mlp.gate_proj.weight")->vec().cwiseAbs().maxCoeff() == 0.0f);
  // The penalty of a model under another recipe.
  auto g_sa = sa.make_grads(w);
  CHECK_THROWS_WITH(e.penalty(sa, w), Catch::Contains("EWC state was built under another recipe or model"));
  CHECK_THROWS_WITH(e.add_penalty_gradient(sa, w, g_sa), Catch::Contains("another recipe or model"));
  // Estimation input.
  CHECK_THROWS_WITH(sg::cl::estimate_fisher(mlp, w, std::span(&mb, 1), {.kind = sg::cl::fisher_kind::sampled, .samples = 0}),
                    Catch::Contains("samples per example must be at least 1"));
  sg::train::micro_batch<float> empty{ids, xt::full_like(targets, sg::ignore_index)};
  CHECK_THROWS_WITH(sg::cl::estimate_fisher(mlp, w, std::span(&empty, 1)), Catch::Contains("no target tokens"));

  // WiSE-FT: α outside [0, 1], a snapshot of another recipe, a bad running-average weight.
  sg::cl::weight_snapshot<float> snap(mlp, w);
  perturb(mlp, w, 16);
  const auto tuned = copy_all(w);
  CHECK_THROWS_WITH(sg::cl::wise_ft(mlp, w, snap, sg::cl::group_alpha{.mlp = 1.5}),
                    Catch::Contains("WiSE-FT alpha for model.layers.0.mlp.gate_proj.weight is 1.5") &&
                        Catch::Contains("expected a value in [0, 1]"));
  CHECK_THROWS_AS(sg::cl::wise_ft(mlp, w, snap, std::nan("")), std::invalid_argument);
  CHECK_THROWS_WITH(sg::cl::wise_ft(sa, w, snap, 0.5),
                    Catch::Contains("the snapshot before fine-tuning was taken under another recipe or model"));
  sg::model::for_each_parameter(w, [&](const std::string& n, sg::cpu::tensor<float>& t, auto, int) {
    CHECK(same_bits(t, tuned.at(n)));  // no failed call wrote anything
  });
  CHECK_THROWS_WITH(sg::cl::running_average<float>(mlp, w, 0.0), Catch::Contains("beta is 0"));
  sg::cl::running_average<float> avg(mlp, w);
  CHECK_THROWS_WITH(avg.after_task(sa, w), Catch::Contains("the running average was taken under another recipe"));
  CHECK(avg.tasks() == 0);
}
