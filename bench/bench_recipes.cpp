// Forward + backward of the reference trunk under each recipe, against the machine's
// own GEMM rate measured in the same run.
//
// Reference configuration: hidden 512, 8 heads, 4 KV heads (head_dim 64), MLP 1536,
// 4 layers, batch 4, sequence 256, fp32. Each recipe's step is reported as
//   - time, and time relative to the `llm` recipe (everything trains),
//   - its FLOP model (forward + input gradients + trainable weight gradients) and the
//     ratio that model predicts against `llm`,
//   - achieved GFLOP/s as a fraction of the Eigen GEMM rate measured below,
//   - bytes of saved activations, gradients, AdamW state and the step's peak.
// A summary table in Markdown follows Google Benchmark's own output.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "skillgraft/nn/memory_report.hpp"
#include "skillgraft/policy/dispatch.hpp"

namespace sg = skillgraft;

namespace {

const sg::seq_shape shape{4, 256};

sg::nn::trunk_weights<float>& reference_weights() {
  static sg::nn::trunk_weights<float> w = [] {
    sg::nn::trunk_weights<float> t(sg::decoder_config::reference());
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.f, 0.02f);
    auto fill = [&](sg::cpu::tensor<float>& x) {
      for (std::size_t i = 0; i < x.size(); ++i) x[i] = nd(rng);
    };
    for (auto& l : t.layers) {
      l.attn_norm.fill(1.f);
      l.mlp_norm.fill(1.f);
      for (auto* p : {&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj, &l.self_attn.o_proj,
                      &l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj})
        fill(p->weight);
    }
    return t;
  }();
  return w;
}

// C = A B^T at the shape of the MLP's largest GEMM (tokens x hidden -> tokens x intermediate).
void BM_eigen_gemm(benchmark::State& state) {
  const int m = int(shape.tokens()), k = 512, n = 1536;
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(m, k), b = Eigen::MatrixXf::Random(n, k), c(m, n);
  for (auto _ : state) {
    c.noalias() = a * b.transpose();
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * m * n * k, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

// The same product through the backend's GEMM (backend/cpu/gemm.hpp: the library SKILLGRAFT_BLAS
// chose, or Eigen's), the rate the trunk's GEMMs can reach here.
void BM_backend_gemm(benchmark::State& state) {
  const int m = int(shape.tokens()), k = 512, n = 1536;
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(m, k), b = Eigen::MatrixXf::Random(n, k), c(m, n);
  for (auto _ : state) {
    sg::backend::cpu::gemm("bench: x W^T", sg::op::n, sg::op::t, m, n, k, 1.f, a.data(), k, b.data(), k, 0.f, c.data(), n);
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * m * n * k, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

struct recipe_result {
  double seconds = 0, model_flops = 0, saved = 0, grads = 0, optimizer = 0, peak = 0;
};
std::map<std::string, recipe_result> results;
double gemm_gflops = 0, backend_gemm_gflops = 0;

template <class R>
void BM_step(benchmark::State& state, R recipe, std::string name) {
  const auto c = sg::decoder_config::reference();
  auto& w = reference_weights();
  sg::nn::decoder_stack<float, R> stack(c, recipe);
  const auto plan = sg::plan_memory(stack, shape);
  const auto flops = stack.flops(shape);
  auto g = stack.make_grads(w);
  sg::cpu::tensor<float> x({std::size_t(shape.batch), std::size_t(shape.seq), std::size_t(c.hidden)},
                           sg::memory_use::workspace);
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = nd(rng);
  sg::ledger().reset_peaks();
  const auto live_before = sg::ledger().live_total();
  const auto run_step = [&] {
    typename decltype(stack)::saved_t s;
    auto y = stack.forward(w, x, s);
    stack.backward(w, s, y, g);  // dL/dy = y, i.e. L = |y|^2 / 2
    benchmark::DoNotOptimize(y.data());
  };
  // One untimed step first, as bench/torch_reference.py warms PyTorch up: the timed steps are
  // the steady state. The first step's time (activations faulted in, the pool cold) is
  // reported apart, as first_step_ms.
  const auto cold_misses = sg::cpu::host_pool().misses();
  const auto t0 = std::chrono::steady_clock::now();
  run_step();
  state.counters["first_step_ms"] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  state.counters["first_step_pool_misses"] = double(sg::cpu::host_pool().misses() - cold_misses);
  const auto misses = sg::cpu::host_pool().misses();
  for (auto _ : state) run_step();
  const double total_flops = flops.forward + flops.backward;
  state.counters["model_GFLOP"] = total_flops / 1e9;
  state.counters["GFLOP/s"] =
      benchmark::Counter(total_flops, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
  state.counters["saved_MiB"] = double(plan.saved_activations) / (1 << 20);
  state.counters["grads_MiB"] = double(plan.gradients) / (1 << 20);
  state.counters["step_peak_MiB"] = double(sg::ledger().peak_total() - live_before) / (1 << 20);
  state.counters["pool_misses_per_step"] =
      double(sg::cpu::host_pool().misses() - misses) / double(state.iterations());
  auto& r = results[name];
  r.model_flops = total_flops;
  r.saved = double(plan.saved_activations);
  r.grads = double(plan.gradients);
  r.optimizer = double(plan.optimizer_state);
  r.peak = double(sg::ledger().peak_total() - live_before + std::int64_t(plan.optimizer_state));
}

class summary_reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& run : runs) {
      if (run.run_type != Run::RT_Aggregate || run.aggregate_name != "median") continue;
      const std::string n = run.run_name.function_name;
      if (n == "BM_eigen_gemm") gemm_gflops = run.counters.at("GFLOP/s").value / 1e9;
      if (n == "BM_backend_gemm") backend_gemm_gflops = run.counters.at("GFLOP/s").value / 1e9;
      const auto at = n.find("BM_step/");
      if (at != std::string::npos) results[n.substr(at + 8)].seconds = run.GetAdjustedRealTime() / 1e3;
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::RegisterBenchmark("BM_eigen_gemm", BM_eigen_gemm)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("BM_backend_gemm", BM_backend_gemm)->Unit(benchmark::kMillisecond)->UseRealTime();
  sg::hana::for_each(sg::named_recipes, [](const auto& nr) {
    const std::string name(nr.name);
    benchmark::RegisterBenchmark(("BM_step/" + name).c_str(),
                                 [v = nr.value, name](benchmark::State& s) { BM_step(s, v, name); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        // The fastest repetition besides the median: on a shared machine whose slow periods come
        // and go, the least disturbed run (bench/compare_torch.py prints ratios of both).
        ->ComputeStatistics("min", [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); });
  });
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  summary_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();

  if (results.count("llm") && results["llm"].seconds > 0 && gemm_gflops > 0) {
    const auto& full = results["llm"];
    // "of GEMM rate": against the faster of Eigen's and the backend's GEMM in this run.
    const double best = std::max(gemm_gflops, backend_gemm_gflops);
    std::printf("\nEigen GEMM rate (same run): %.1f GFLOP/s; backend GEMM (%s%s%s): %.1f GFLOP/s\n\n", gemm_gflops,
                std::string(sg::cpu::gemm_library::active()).c_str(), sg::cpu::gemm_library::in_use() ? ", core " : "",
                std::string(sg::cpu::gemm_library::in_use() ? sg::cpu::gemm_library::core() : "").c_str(),
                backend_gemm_gflops);
    std::printf("| recipe | step ms | time vs llm | FLOP model vs llm | GFLOP/s | of GEMM rate | saved MiB | grads MiB | AdamW MiB | step peak MiB |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& nr : {"llm", "mlp", "mlp_gate_up", "sa_proj", "mlp_down", "frozen"}) {
      if (!results.count(nr) || results[nr].seconds == 0) continue;
      const auto& r = results[nr];
      const double rate = r.model_flops / r.seconds / 1e9;
      std::printf("| %s | %.1f | %.2f | %.2f | %.1f | %.0f%% | %.1f | %.1f | %.1f | %.1f |\n", nr, r.seconds * 1e3,
                  r.seconds / full.seconds, r.model_flops / full.model_flops, rate, 100 * rate / best,
                  r.saved / (1 << 20), r.grads / (1 << 20), r.optimizer / (1 << 20), r.peak / (1 << 20));
    }
  }
}
