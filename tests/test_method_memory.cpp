// The memory plan of a continual-learning method against the ledger: build the model and the
// method, run a real training step (and EWC's consolidation), and hold every category's
// ledger peak equal to the plan — for several recipes, every method and optimizer, with soft
// tokens and LoRA adapters. An attention-only LwF teacher is checked against element counts
// written out by hand.
#include <catch2/catch.hpp>

#include <random>
#include <span>

#include "skillgraft/cl/ewc.hpp"
#include "skillgraft/cl/lora.hpp"
#include "skillgraft/cl/lwf.hpp"
#include "skillgraft/cl/memory_plan.hpp"
#include "skillgraft/cl/wise_ft.hpp"
#include "skillgraft/model/parameters.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/sgd.hpp"
#include "support/random.hpp"

namespace sg = skillgraft;
using sg::memory_use;
using sg::token_ids;
using sg::cl::method;
using sg::cl::optimizer_kind;

namespace {

constexpr memory_use planned[] = {memory_use::weights,           memory_use::gradients,    memory_use::optimizer_state,
                                  memory_use::saved_activations, memory_use::method_state, memory_use::constants};

// Small, deterministic weights: every matrix element a few hundredths, norms 1.
template <class T>
void fill_small(sg::model::lm_weights<T>& w, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-0.3, 0.3);
  sg::model::for_each_parameter(w, [&](const std::string& name, sg::cpu::tensor<T>& t, auto, int) {
    const bool norm = name.find("norm") != std::string::npos;
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = norm ? T(1) : T(u(rng));
  });
}

struct ledger_mark {
  std::int64_t live[int(memory_use::count_)];
  ledger_mark() {
    sg::ledger().reset_peaks();
    for (int u = 0; u < int(memory_use::count_); ++u) live[u] = sg::ledger().live(memory_use(u));
  }
  std::int64_t peak(memory_use u) const { return sg::ledger().peak(u) - live[int(u)]; }
  std::int64_t now(memory_use u) const { return sg::ledger().live(u) - live[int(u)]; }
};

// Builds weights, adapters, model, method state, gradients and optimizer; runs one training step
// with the method's objective (EWC consolidates first, with the training gradients alive), then
// checks the ledger's peaks and live bytes against the plan.
template <class R, class Opt>
void run_and_compare(const sg::decoder_config& c, R recipe, method m, optimizer_kind ok, bool soft_tokens) {
  using Model = sg::model::decoder_lm<float, R>;
  const token_ids ids = {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}};
  const std::size_t P = soft_tokens ? 2 : 0;
  token_ids targets = xt::full_like(token_ids::from_shape({2, P + 5}), sg::ignore_index);
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t s = P + 1; s < P + 5; ++s) targets(b, s) = ids(b, (s - P + 1) % 5);
  auto prefix = sg::test::random_tensor<float>({2, P, std::size_t(c.hidden)}, 9);  // workspace, not planned
  const sg::train::micro_batch<float> mb{ids, targets, soft_tokens ? &prefix : nullptr};

  // 8 targets: train_step keeps the top MLP half and the final norm of those rows only.
  const auto plan = sg::cl::plan_method_memory<float>(c, recipe, m, {2, int(P + 5)}, ok, 8);
  ledger_mark mark;
  {
    sg::model::lm_weights<float> w(c);
    fill_small(w, 3);
    Model model(c, recipe);
    if (c.lora_rank > 0) CHECK(sg::cl::attach_lora(model, w, {.rank = c.lora_rank, .alpha = 4.0, .seed = 1}) > 0);
    auto g = model.make_grads(w);
    Opt opt = [&] {
      if constexpr (std::is_same_v<Opt, sg::train::adamw<float>>) return Opt(model, w, g, {.lr = 1e-3});
      else return Opt(model, w, g, {.lr = 1e-3, .momentum = ok == optimizer_kind::sgd_momentum ? 0.9 : 0.0});
    }();
    const auto step = [&](const auto& objective) {
      sg::train::train_step(model, w, g, opt, sg::train::constant_schedule{1e-3}, std::span(&mb, 1), {}, objective);
    };
    // After the step, with the method's state alive: the steady state, saved activations given back.
    const auto check_live = [&] {
      for (auto u : planned) {
        INFO("live " << sg::memory_use_names[std::size_t(u)]);
        CHECK(mark.now(u) == (u == memory_use::saved_activations ? 0 : std::int64_t(plan.bytes(u))));
      }
    };
    switch (m) {
      case method::none:
        step(sg::train::masked_ce_objective{});
        check_live();
        break;
      case method::lwf: {
        sg::cl::teacher<float> teacher(model, w);
        step(sg::cl::lwf_objective<float>{&teacher, {.lambda = 1.0, .temperature = 2.0, .all_positions = true}});
        check_live();
        break;
      }
      case method::ewc: {
        sg::cl::ewc<float> e(model, w, {.lambda = 0.5});
        e.consolidate(model, w, std::span(&mb, 1));
        step(sg::cl::ewc_objective<float>{&e});
        check_live();
        break;
      }
      case method::wise_ft: {
        sg::cl::weight_snapshot<float> before(model, w);
        step(sg::train::masked_ce_objective{});
        sg::cl::wise_ft(model, w, before, 0.5);
        check_live();
        break;
      }
      case method::wise_ft_interpolate: {
        sg::cl::weight_snapshot<float> before(model, w);
        step(sg::train::masked_ce_objective{});
        sg::cl::weight_snapshot<float> after(model, w);
        sg::cl::interpolate(model, w, before, after, sg::cl::group_alpha{.attention = 0.3, .mlp = 0.6});
        check_live();
        break;
      }
      case method::running_average: {
        sg::cl::running_average<float> avg(model, w);
        step(sg::train::masked_ce_objective{});
        avg.after_task(model, w);
        check_live();
        break;
      }
    }
    for (auto u : planned) {
      INFO("category " << sg::memory_use_names[std::size_t(u)]);
      CHECK(mark.peak(u) == std::int64_t(plan.peak(u)));
    }
  }
  for (auto u : planned) CHECK(mark.now(u) == 0);  // everything given back
}

template <class R>
void every_method(const sg::decoder_config& c, R recipe, bool soft_tokens) {
  for (method m : {method::none, method::lwf, method::ewc, method::wise_ft, method::wise_ft_interpolate,
                   method::running_average})
    for (auto ok : {optimizer_kind::adamw, optimizer_kind::sgd_momentum, optimizer_kind::sgd}) {
      INFO("method " << sg::cl::method_name(m) << ", optimizer " << int(ok) << ", soft tokens " << soft_tokens);
      if (ok == optimizer_kind::adamw) run_and_compare<R, sg::train::adamw<float>>(c, recipe, m, ok, soft_tokens);
      else run_and_compare<R, sg::train::sgd<float>>(c, recipe, m, ok, soft_tokens);
    }
}

sg::decoder_config small_config() {
  auto c = sg::test::tiny_config(true, 3);  // Qwen2-style Q/K/V biases
  c.vocab_size = 13;
  c.max_seq = 16;
  return c;
}

}  // namespace

TEST_CASE("method memory plan equals the ledger's peaks: attention and MLP recipes, every method and optimizer") {
  const auto c = small_config();
  every_method(c, sg::recipe::sa_proj, false);
  every_method(c, sg::recipe::mlp_gate_up, true);
  every_method(c, sg::recipe::mlp_down.on_layers(1, 1), false);
}

TEST_CASE("method memory plan equals the ledger's peaks: whole LM with tied embeddings, and LoRA adapters") {
  auto tied = small_config();
  tied.tie_word_embeddings = true;
  every_method(tied, sg::recipe::llm, true);
  auto lora = small_config();
  lora.lora_rank = 3;
  every_method(lora, sg::trainable<sg::lora<sg::proj::q>, sg::lora<sg::proj::v>, sg::lora<sg::proj::down>>.on_layers(1, 2),
               false);
}

TEST_CASE("method memory plan: the parts, by formula") {
  auto c = small_config();
  c.lora_rank = 3;
  const std::size_t d = 16, qd = 16, kvd = 8, I = 24, V = 13, L = 3, f = sizeof(float);
  const auto lora = sg::cl::plan_method_memory<float>(
      c, sg::trainable<sg::lora<sg::proj::q>, sg::lora<sg::proj::v>>.on_layers(1, 2), method::lwf, {2, 5});
  const std::size_t adapters = 2 * (3 * (d + qd) + 3 * (d + kvd));  // two layers, r (in + out) per projection
  CHECK(lora.lora_adapters == adapters * f);
  CHECK(lora.trainable_elements == adapters);
  CHECK(lora.method_copies == adapters * f);  // the LwF teacher copies what trains: the adapters
  CHECK(lora.method_state() == 2 * adapters * f);
  const std::size_t block = 2 * d + d * qd + 2 * d * kvd + (qd + 2 * kvd) + qd * d + 3 * d * I;
  CHECK(lora.weights == (2 * V * d + d + L * block) * f);
  CHECK(lora.constants == 2 * 2 * std::size_t(c.max_seq) * 2 * f);  // model's and teacher's cos and sin [16, 2]
  CHECK(lora.recipe_label == "{lora(q_proj), lora(v_proj)} on layers 1..2");

  const auto ewc = sg::cl::plan_method_memory<float>(c, sg::recipe::mlp_gate_up, method::ewc, {4, 6}, optimizer_kind::sgd);
  const std::size_t A = L * 2 * I * d * f;
  CHECK(ewc.gradients == A);
  CHECK(ewc.optimizer_state == 0);
  CHECK(ewc.method_state() == 2 * A);
  CHECK(ewc.peak(memory_use::method_state) == 3 * A);
  CHECK(ewc.peak(memory_use::gradients) == 2 * A);
  CHECK(ewc.consolidation_saved < ewc.saved_activations);
  CHECK_THROWS_WITH(ewc.bytes(memory_use::workspace), "skillgraft: the memory plan does not cover 'workspace'");
  CHECK_THROWS_WITH(sg::cl::plan_method_memory<float>(c, sg::recipe::sa_proj, method::none, {0, 4}),
                    Catch::Contains("positive micro-batch shape (got 0 x 4)"));
  CHECK(sg::cl::method_from_name("wise_ft_interpolate") == method::wise_ft_interpolate);
  CHECK_THROWS_WITH(sg::cl::method_from_name("lfw"), Catch::Contains("unknown method 'lfw'; valid names: none, lwf"));
}

TEST_CASE("an attention-only LwF teacher is a small fraction of the model, by exact element count") {
  // The reference configuration: hidden 512, 8 heads / 4 KV heads of 64, MLP 1536, 4 layers, vocab 32000.
  const auto c = sg::decoder_config::reference();
  const auto plan = sg::cl::plan_method_memory<float>(c, sg::recipe::sa_proj, method::lwf, {1, 8});
  const std::size_t attention = 4 * (512 * 512 + 512 * 256 + 512 * 256 + 512 * 512);          // q, k, v, o
  const std::size_t model = 2 * 32000 * 512 + 512 + 4 * (2 * 512 + 786432 + 3 * 512 * 1536);  // untied head
  CHECK(plan.method_copies == attention * sizeof(float));
  CHECK(plan.weights == model * sizeof(float));
  CHECK(attention == 3145728);
  CHECK(model == 45355520);
  CHECK(double(plan.method_copies) / double(plan.weights) == Approx(double(attention) / double(model)).epsilon(1e-15));
  CHECK(double(plan.method_copies) / double(plan.weights) < 0.07);
  // And the teacher really allocates that much.
  {
    const auto m0 = sg::ledger().live(memory_use::method_state), w0 = sg::ledger().live(memory_use::weights);
    sg::model::lm_weights<float> w(c);
    sg::model::decoder_lm<float, decltype(sg::recipe::sa_proj)> student(c, sg::recipe::sa_proj);
    sg::cl::teacher<float> teacher(student, w);
    CHECK(sg::ledger().live(memory_use::method_state) - m0 == std::int64_t(plan.method_copies));
    CHECK(sg::ledger().live(memory_use::weights) - w0 == std::int64_t(plan.weights));
  }

  // Qwen2-7B's shapes (plan only): 28 layers, hidden 3584, 28 heads / 4 KV heads of 128, MLP 18944,
  // vocab 152064, Q/K/V biases. Attention is ~11 % of the parameters.
  sg::decoder_config q;
  q.hidden = 3584;
  q.n_heads = 28;
  q.n_kv_heads = 4;
  q.head_dim = 128;
  q.intermediate = 18944;
  q.n_layers = 28;
  q.max_seq = 4096;
  q.vocab_size = 152064;
  q.attention_bias = true;
  const auto big = sg::cl::plan_method_memory<float>(q, sg::recipe::sa_proj, method::lwf, {1, 1024});
  const std::size_t q_att = 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3584 + 2 * 512);
  const std::size_t q_all = 2 * std::size_t(152064) * 3584 + 3584 + 28 * (2 * 3584 + q_att / 28 + 3 * std::size_t(3584) * 18944);
  CHECK(q_all == 7615616512);  // Qwen2-7B's published parameter count
  CHECK(big.method_copies == q_att * sizeof(float));
  CHECK(double(big.method_copies) / double(big.weights) == Approx(double(q_att) / double(q_all)).epsilon(1e-15));
  CHECK(double(big.method_copies) / double(big.weights) < 0.11);
}

TEST_CASE("method memory plan prints as one line and as a table") {
  const auto c = small_config();
  const auto plan = sg::cl::plan_method_memory<float>(c, sg::recipe::sa_proj, method::ewc, {2, 7});
  const auto line = plan.line();
  INFO(line);
  CHECK(line.find("ewc | {q_proj, k_proj, v_proj, o_proj} on layers 0..2 | adamw | micro-batch 2 x 7 | weights ") == 0);
  CHECK(line.find(" while consolidating)") != std::string::npos);
  const auto table = plan.table();
  INFO(table);
  CHECK(table.find("memory plan: ewc, {q_proj, k_proj, v_proj, o_proj} on layers 0..2, adamw, micro-batch 2 x 7\n") == 0);
  for (const char* row : {"\nweights ", "\ngradients ", "\noptimizer_state ", "\nsaved_activations ", "\nmethod_state ",
                          "\nconstants ", "\ntotal ", "\n+ consolidation "})
    CHECK(table.find(row) != std::string::npos);
  CHECK(table.find(" " + std::to_string(plan.method_state()) + " ") != std::string::npos);
  CHECK(table.find(" " + std::to_string(plan.total()) + " ") != std::string::npos);
  CHECK(table.find("EWC: Fisher F and anchor") != std::string::npos);
  CHECK(table.find(" \n") == std::string::npos);  // no trailing spaces
}
