// GateSkip's token skipping at inference (model/gate_skip.hpp) at the reference configuration:
// what a skip budget saves in time, against the FLOPs it saves, the gated model at budget 100 %
// and the same model without gates, all measured in the same run.
//
// Reference configuration (hidden 512, 8 heads, 4 KV heads, MLP 1536, 4 layers, vocabulary
// 8192) with vector residual gates; a batch of 4 prompts of 128 tokens. Three workloads:
//   prefill     one decoding step over the whole prompt into a fresh KV cache (512 tokens a layer)
//   generate    32 greedy tokens: the prompt's step gives the first, then 31 steps of one token
//               per prompt (4 tokens a layer a step)
//   generate_1  the same for the first prompt alone (1 token a layer a step)
// For the two generations the time compared, and the counters, are those of the single-token
// steps alone (the prompt's step is prefill's workload); the benchmark's own time is the whole
// generation. A step of a few tokens reads every weight matrix of a branch as long as one of
// its tokens runs the branch, so its time follows the branches no token ran (idle), not the
// FLOPs; generate_1 is the case where the two coincide.
// Budgets: thresholds calibrated to keep 100 / 90 / 75 / 50 % of the branch-tokens of another
// batch of the same shape in layers 1-3 (layer 0 always runs); on the timed tokens the fraction
// skipped is what the counters say. Counters (skip_stats): FLOPs saved against the gated
// model's, branch-tokens skipped, branches idle.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>

#include "reference_lm.hpp"
#include "skillgraft/model/gate_skip.hpp"

namespace sg = skillgraft;

namespace {

using frozen_r = std::remove_cv_t<decltype(sg::recipe::frozen)>;
using gated_lm = sg::model::decoder_lm<float, frozen_r, sg::backend::cpu, sg::nn::gate_skip<>>;
using plain_lm = sg::model::decoder_lm<float, frozen_r>;

constexpr int prompts = 4, prompt_len = 128, new_tokens = 32;
const int budgets[] = {100, 90, 75, 50};

sg::token_ids random_ids(unsigned seed, int rows = prompts) {
  auto ids = sg::token_ids::from_shape({std::size_t(rows), std::size_t(prompt_len)});
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> tok(0, sg::bench::vocab - 1);
  for (auto& t : ids) t = tok(rng);
  return ids;
}

struct setup {
  sg::model::lm_weights<float> plain_w = sg::bench::make_weights(), gated_w = sg::bench::make_weights();
  plain_lm plain{sg::bench::config(), sg::recipe::frozen};
  gated_lm gated{sg::bench::config(), sg::recipe::frozen};
  sg::token_ids prompt = random_ids(3), one_prompt = random_ids(3, 1);
  std::map<int, sg::model::skip_plan> plans;
  setup() {
    // Gates that open and close (bias 0.5, weights of the scale a trained gate reaches), the
    // same model otherwise.
    sg::nn::add_residual_gates(gated_w.trunk, sg::nn::gate_shape::vector, {.bias = 0.5, .weight_std = 0.05, .seed = 5});
    const auto calibration = random_ids(4);
    for (int b : budgets) plans[b] = sg::model::calibrate_skipping(gated, gated_w, calibration, b / 100.0);
  }
};
setup& the_setup() {
  static setup s;
  return s;
}

sg::model::sampling greedy() {
  sg::model::sampling s;
  s.max_new_tokens = new_tokens;
  return s;  // eos -1: every row generates all its tokens
}

void report(benchmark::State& state, const sg::model::skip_stats& st, double step_seconds) {
  state.counters["step_ms"] = 1e3 * step_seconds / double(state.iterations());
  if (st.branch_steps == 0) return;  // the ungated model
  state.counters["flops_saved_pct"] = 100 * st.flops_saved();
  state.counters["skipped_pct"] = 100 * st.skipped_fraction();
  state.counters["idle_pct"] = 100 * st.idle_fraction();
}

// One decoding step of the model the budget names (0: the ungated one), its skipping counted in
// `stats` where given; both workloads go through it.
sg::cpu::tensor<float> decode_step(int budget, sg::model::kv_cache<float>& cache, const sg::cpu::tensor<float>& x,
                                   sg::model::skip_stats* stats) {
  auto& s = the_setup();
  return budget ? sg::model::decode_skipping(s.gated, s.gated_w, cache, x, s.plans.at(budget), stats)
                : sg::model::decode(s.plain, s.plain_w, cache, x);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void BM_prefill(benchmark::State& state, int budget) {
  auto& s = the_setup();
  const auto x = s.plain.embed(s.plain_w, s.prompt, nullptr);  // both models share the embedding
  sg::model::skip_stats st;
  double seconds = 0;
  for (auto _ : state) {
    sg::model::kv_cache<float> cache(sg::bench::config(), prompts, prompt_len);
    const auto t0 = std::chrono::steady_clock::now();
    auto h = decode_step(budget, cache, x, &st);
    seconds += seconds_since(t0);
    benchmark::DoNotOptimize(h.data());
  }
  report(state, st, seconds);
}

void BM_generate(benchmark::State& state, int budget, bool one) {
  auto& s = the_setup();
  const auto& prompt = one ? s.one_prompt : s.prompt;
  sg::model::skip_stats steps;  // the single-token steps only
  double seconds = 0;
  const auto decode = [&](sg::model::kv_cache<float>& cache, const sg::cpu::tensor<float>& x) {
    const bool step = x.dim(1) == 1;
    const auto t0 = std::chrono::steady_clock::now();
    auto h = decode_step(budget, cache, x, step ? &steps : nullptr);
    if (step) seconds += seconds_since(t0);
    return h;
  };
  for (auto _ : state) {
    auto out = budget ? sg::model::generate_with(s.gated, s.gated_w, prompt, greedy(), nullptr, decode)
                      : sg::model::generate_with(s.plain, s.plain_w, prompt, greedy(), nullptr, decode);
    benchmark::DoNotOptimize(out.data());
  }
  report(state, steps, seconds);
}

// Per benchmark name, from the reporter (the median of repetitions, or the one run).
std::map<std::string, double> seconds, step_ms, saved_pct, idle_pct;

class summary_reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& run : runs) {
      const bool single = run.run_type == Run::RT_Iteration && run.repetitions <= 1;
      if (!single && !(run.run_type == Run::RT_Aggregate && run.aggregate_name == "median")) continue;
      const std::string n = run.run_name.function_name;
      seconds[n] = run.GetAdjustedRealTime() / 1e3;
      step_ms[n] = run.counters.at("step_ms").value;
      if (run.counters.count("flops_saved_pct")) saved_pct[n] = run.counters.at("flops_saved_pct").value;
      if (run.counters.count("idle_pct")) idle_pct[n] = run.counters.at("idle_pct").value;
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

std::string formatted(const char* format, double x) {
  char b[32];
  std::snprintf(b, sizeof b, format, x);
  return b;
}
std::string percent(double x) { return formatted("%.1f %%", x); }
std::string ratio(double x) { return formatted("%.3f", x); }

std::string name(const std::string& part, int budget) {
  return "BM_" + part + (budget ? "/budget_" + std::to_string(budget) : std::string("/no_gates"));
}

}  // namespace

int main(int argc, char** argv) {
  for (const std::string part : {"prefill", "generate", "generate_1"})
    for (int b : {0, 100, 90, 75, 50}) {
      auto* bm = part == "prefill"
                     ? benchmark::RegisterBenchmark(name(part, b).c_str(), [b](benchmark::State& s) { BM_prefill(s, b); })
                     : benchmark::RegisterBenchmark(name(part, b).c_str(), [b, one = part == "generate_1"](
                                                                               benchmark::State& s) { BM_generate(s, b, one); });
      bm->Unit(benchmark::kMillisecond)->UseRealTime();
    }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  summary_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();

  std::printf("\n| part | budget | ms | of it, the timed steps ms | FLOPs saved | branches idle | steps vs budget 100 %% | "
              "steps vs no gates |\n|---|---|---|---|---|---|---|---|\n");
  for (const std::string part : {"prefill", "generate", "generate_1"}) {
    const double full = step_ms.count(name(part, 100)) ? step_ms[name(part, 100)] : 0;
    const double plain = step_ms.count(name(part, 0)) ? step_ms[name(part, 0)] : 0;
    for (int b : {0, 100, 90, 75, 50}) {
      const auto n = name(part, b);
      if (!seconds.count(n)) continue;
      const double t = step_ms[n];
      const auto pct = [&](std::map<std::string, double>& m) { return b ? percent(m[n]) : std::string(); };
      std::printf("| %s | %s | %.2f | %.2f | %s | %s | %s | %s |\n", part.c_str(),
                  b ? (std::to_string(b) + " %").c_str() : "no gates", seconds[n] * 1e3, t, pct(saved_pct).c_str(),
                  pct(idle_pct).c_str(), full > 0 && b ? ratio(t / full).c_str() : "",
                  plain > 0 ? ratio(t / plain).c_str() : "");
    }
  }
}
