// A full training step (decoder LM forward, fused masked loss, backward, clipping, AdamW)
// per recipe, on the reference configuration with a vocabulary of 8192 and the loss on
// the second half of each sequence (answer tokens). Reports each recipe's time as a
// ratio to `llm` measured in the same run, the bytes the ledger saw at the step's peak,
// and the process's peak resident set during that recipe's iterations (Linux VmHWM,
// reset per recipe through /proc/self/clear_refs).
#include <algorithm>
#include <chrono>
#include <vector>
#include <benchmark/benchmark.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <string>

#include "reference_lm.hpp"
#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/policy/dispatch.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;

namespace {

using sg::bench::make_batch;
using sg::bench::make_weights;
using sg::bench::config;

long rss_peak_kib() {
  std::ifstream st("/proc/self/status");
  std::string key;
  long v = -1;
  while (st >> key) {
    if (key == "VmHWM:") {
      st >> v;
      break;
    }
    st.ignore(1 << 12, '\n');
  }
  return v;
}
void reset_rss_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

struct result {
  double seconds = 0, ledger_peak = 0, rss_peak = 0, grads = 0, optimizer = 0;
};
std::map<std::string, result> results;

template <class R>
void BM_train_step(benchmark::State& state, R recipe, std::string name) {
  auto w = make_weights();
  const auto mb = make_batch();
  sg::model::decoder_lm<float, R> lm(config(), recipe);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.lr = 1e-5});
  const sg::train::constant_schedule lr{1e-5};
  sg::ledger().reset_peaks();
  const auto live = sg::ledger().live_total();
  reset_rss_peak();
  // One untimed step first, as bench/torch_reference.py warms PyTorch up: the timed steps are
  // the steady state of a training loop. The first step pays for faulting its activations in
  // (the pool is cold); it is reported apart, as first_step_ms.
  const auto cold_misses = sg::cpu::host_pool().misses();
  const auto t0 = std::chrono::steady_clock::now();
  benchmark::DoNotOptimize(sg::train::train_step(lm, w, g, opt, lr, std::span(&mb, 1)).loss);
  state.counters["first_step_ms"] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  state.counters["first_step_pool_misses"] = double(sg::cpu::host_pool().misses() - cold_misses);
  const auto misses = sg::cpu::host_pool().misses();
  for (auto _ : state) {
    auto st = sg::train::train_step(lm, w, g, opt, lr, std::span(&mb, 1));
    benchmark::DoNotOptimize(st.loss);
  }
  // Host blocks the caching pool had to ask the system for in the timed steps (none once warm).
  state.counters["pool_misses_per_step"] =
      double(sg::cpu::host_pool().misses() - misses) / double(state.iterations());
  auto& r = results[name];
  r.ledger_peak = double(sg::ledger().peak_total());
  r.rss_peak = double(rss_peak_kib()) * 1024.0;
  r.grads = double(lm.trainable_elements() * sizeof(float));
  r.optimizer = double(opt.state_bytes());
  state.counters["ledger_peak_MiB"] = r.ledger_peak / (1 << 20);
  state.counters["step_extra_MiB"] = double(sg::ledger().peak_total() - live) / (1 << 20);
  state.counters["rss_peak_MiB"] = r.rss_peak / (1 << 20);
  // Read by bench/compare_torch.py to check that PyTorch trains the same tensors under this recipe.
  state.counters["trainable_elements"] = double(lm.trainable_elements());
}

// The step's last phase alone, clipping and AdamW over a recipe's trainable tensors, in the two
// forms the library has: clipping's own pass then step() (norm, scale, check, update: four passes
// over the gradients, the check and the update also over weights and moments), and the form
// train_step uses, step() given clipping's decision (norm, a screen of the weights, one update
// that also scales). The gradients come from one real step; each iteration starts from them again
// (untimed), so clipping acts every time at the same scale. `clip`: max_norm half the norm
// (every element scaled), else twice it (nothing to scale).
std::map<std::string, double> phase_ms;
template <class R>
void BM_optimizer_phase(benchmark::State& state, R recipe, bool fused, bool clip) {
  auto w = make_weights();
  const auto mb = make_batch();
  sg::model::decoder_lm<float, R> lm(config(), recipe);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.lr = 1e-5});
  sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-5}, std::span(&mb, 1), {.max_grad_norm = 0});
  std::vector<std::vector<float>> saved;
  lm.for_each_trainable(w, g, [&](const std::string&, auto&, auto& dp) {
    saved.emplace_back(dp.data(), dp.data() + dp.size());
  });
  const double norm = sg::train::gradient_norm(lm, w, g), max_norm = clip ? norm / 2 : norm * 2;
  for (auto _ : state) {
    state.PauseTiming();
    std::size_t i = 0;
    lm.for_each_trainable(w, g, [&](const std::string&, auto&, auto& dp) {
      std::copy(saved[i].begin(), saved[i].end(), dp.data());
      ++i;
    });
    state.ResumeTiming();
    if (fused) {
      opt.step(lm, w, g, sg::train::decide_clipping(lm, w, g, max_norm));
    } else {
      sg::train::clip_grad_norm(lm, w, g, max_norm);
      opt.step(lm, w, g);
    }
  }
  state.counters["trainable_elements"] = double(lm.trainable_elements());
}

class summary_reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& run : runs) {
      if (run.run_type == Run::RT_Aggregate && run.aggregate_name != "median") continue;
      const std::string n = run.run_name.function_name;
      const auto at = n.find("BM_train_step/");
      if (at != std::string::npos) results[n.substr(at + 14)].seconds = run.GetAdjustedRealTime() / 1e3;
      const auto phase = n.find("BM_optimizer_phase/");
      if (phase != std::string::npos) phase_ms[n.substr(phase + 19)] = run.GetAdjustedRealTime();
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

}  // namespace

int main(int argc, char** argv) {
  sg::hana::for_each(sg::named_recipes, [](const auto& nr) {
    const std::string name(nr.name);
    benchmark::RegisterBenchmark(("BM_train_step/" + name).c_str(),
                                 [v = nr.value, name](benchmark::State& s) { BM_train_step(s, v, name); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        // The fastest repetition besides the median: on a shared machine whose slow periods come
        // and go, the least disturbed run (bench/compare_torch.py prints ratios of both).
        ->ComputeStatistics("min", [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); });
  });
  // The two forms alternate, recipe by recipe, so that a slow stretch of a shared machine falls
  // on both.
  sg::hana::for_each(sg::named_recipes, [](const auto& nr) {
    const std::string name(nr.name);
    if (name == "frozen") return;
    for (const bool clip : {true, false})
      for (const bool fused : {false, true})
        benchmark::RegisterBenchmark(
            ("BM_optimizer_phase/" + name + (clip ? "/clip/" : "/no_clip/") + (fused ? "fused" : "passes")).c_str(),
            [v = nr.value, fused, clip](benchmark::State& s) { BM_optimizer_phase(s, v, fused, clip); })
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
  });
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  summary_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  if (!phase_ms.empty()) {
    std::printf("\n| recipe | clipping | passes ms | fused ms | fused / passes |\n|---|---|---|---|---|\n");
    for (const auto& [key, passes] : phase_ms) {
      const auto slash = key.rfind('/');
      if (key.substr(slash + 1) != "passes" || !phase_ms.count(key.substr(0, slash) + "/fused")) continue;
      const double fused = phase_ms[key.substr(0, slash) + "/fused"];
      const auto mid = key.find('/');
      std::printf("| %s | %s | %.2f | %.2f | %.3f |\n", key.substr(0, mid).c_str(),
                  key.substr(mid + 1, slash - mid - 1) == "clip" ? "acts" : "no", passes, fused, fused / passes);
    }
  }
  if (!results.count("llm") || results["llm"].seconds == 0) return 0;
  const double full = results["llm"].seconds;
  std::printf("\n| recipe | step ms | time vs llm | grads MiB | AdamW MiB | ledger peak MiB | peak RSS MiB |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const auto& n : {"llm", "mlp", "mlp_gate_up", "sa_proj", "mlp_down", "frozen"}) {
    if (!results.count(n) || results[n].seconds == 0) continue;
    const auto& r = results[n];
    std::printf("| %s | %.0f | %.2f | %.1f | %.1f | %.0f | %.0f |\n", n, r.seconds * 1e3, r.seconds / full,
                r.grads / (1 << 20), r.optimizer / (1 << 20), r.ledger_peak / (1 << 20), r.rss_peak / (1 << 20));
  }
}
