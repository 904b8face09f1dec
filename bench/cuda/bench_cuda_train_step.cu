// GPU training step per recipe at the reference configuration (hidden 512, 8 heads, 4 KV heads,
// MLP 1536, 4 layers; batch 4, sequence 256, vocabulary 8192, loss on the second half of each
// sequence, as bench/bench_train_step.cpp on the CPU).
//
// Reports, per recipe: the median step time and its ratio to `llm` (the full fine-tuning step),
// the GEMM work the step's plan really runs (decoder_stack::flops plus the LM head) as TFLOP/s
// and as a fraction of the cuBLAS SGEMM rate measured in the same run on the MLP's GEMM shape,
// and device memory: bytes the device ledger accounted at the step's peak, bytes the pool held
// at its peak, and the memory plan's prediction (weights, gradients, AdamW state, saved
// activations).
//
//   bench_cuda_train_step [--steps N] [--warmup N] [--tf32] [--recipe NAME]
// Without a CUDA device it says so and exits 0. The numbers go to docs/performance.md.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../reference_lm.hpp"
#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/nn/memory_report.hpp"
#include "skillgraft/policy/dispatch.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/step.hpp"
#include "skillgraft/train/schedule.hpp"

namespace sg = skillgraft;
namespace dev = sg::cuda;

namespace {

using sg::bench::batch;
using sg::bench::config;
using sg::bench::seq;
using sg::bench::vocab;

struct options {
  int steps = 20, warmup = 3;
  bool tf32 = false;
  std::string recipe;
};

sg::model::lm_weights<float> host_weights() { return sg::bench::make_weights(); }

// bench_train_step's batch; ids and targets are host data on every backend.
sg::train::micro_batch<float, sg::backend::cuda> make_batch() {
  const auto host = sg::bench::make_batch();
  return {host.ids, host.targets};
}

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// cuBLAS SGEMM rate (FLOP/s) on C[m, n] = A[m, k] B[k, n]^T, the median of `reps` timed calls.
double gemm_rate(int m, int n, int k, int reps) {
  dev::tensor<float> a({std::size_t(m), std::size_t(k)}, sg::memory_use::workspace),
      b({std::size_t(n), std::size_t(k)}, sg::memory_use::workspace), c({std::size_t(m), std::size_t(n)}, sg::memory_use::workspace);
  a.fill(0.01f);
  b.fill(0.02f);
  std::vector<double> t;
  for (int r = 0; r < reps + 3; ++r) {
    dev::synchronize();
    const double t0 = seconds_now();
    sg::backend::cuda::gemm("reference SGEMM", dev::op::n, dev::op::t, m, n, k, 1.f, a.data(), k, b.data(), k, 0.f, c.data(), n);
    dev::synchronize();
    if (r >= 3) t.push_back(seconds_now() - t0);
  }
  return 2.0 * m * n * k / median(t);
}

struct row {
  std::string name;
  double step_s = 0, flops = 0, ledger_peak = 0, pool_peak = 0;
  sg::memory_report plan;
};

template <class R>
row run_recipe(const std::string& name, R recipe, const options& o, const sg::model::lm_weights<float>& hw,
               const sg::train::micro_batch<float, sg::backend::cuda>& mb) {
  dev::device_pool::instance().release_cached();
  row r;
  r.name = name;
  {
    auto w = sg::model::to_backend<sg::backend::cuda>(hw);
    sg::model::decoder_lm<float, R, sg::backend::cuda> lm(config(), recipe);
    auto g = lm.make_grads(w);
    sg::train::adamw<float, sg::backend::cuda> opt(lm, w, g, {.lr = 1e-5});
    const sg::train::constant_schedule lr{1e-5};
    const sg::seq_shape sh{batch, seq};
    r.plan = sg::plan_memory(lm.stack(), sh);
    const auto fl = lm.stack().flops(sh);
    std::size_t targets = 0;
    for (auto y : mb.targets) targets += (y != sg::ignore_index);
    // LM head: z = h W^T always, dh = dz W (the stack below trains or not, the loss forms it), dW when it trains.
    const double head = 2.0 * double(targets) * config().hidden * vocab * (2 + (lm.train_head ? 1 : 0));
    r.flops = fl.forward + fl.backward + head;
    for (int i = 0; i < o.warmup; ++i) sg::train::train_step(lm, w, g, opt, lr, std::span(&mb, 1));
    dev::synchronize();
    dev::device_ledger().reset_peaks();
    dev::device_pool::instance().reset_peak();
    std::vector<double> t;
    for (int i = 0; i < o.steps; ++i) {
      const double t0 = seconds_now();
      sg::train::train_step(lm, w, g, opt, lr, std::span(&mb, 1));
      dev::synchronize();
      t.push_back(seconds_now() - t0);
    }
    r.step_s = median(t);
    r.ledger_peak = double(dev::device_ledger().peak_total());
    r.pool_peak = double(dev::device_pool::instance().peak_reserved());
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--steps" && i + 1 < argc) o.steps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--warmup" && i + 1 < argc) o.warmup = std::max(0, std::atoi(argv[++i]));
    else if (a == "--tf32") o.tf32 = true;
    else if (a == "--recipe" && i + 1 < argc) o.recipe = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--steps N] [--warmup N] [--tf32] [--recipe NAME]  (recipes: %s)\n", argv[0],
                   sg::recipe_names().c_str());
      return 2;
    }
  }
  if (!dev::device_available()) {
    std::printf("no CUDA device: nothing to measure (this program needs a GPU)\n");
    return 0;
  }
#if SKILLGRAFT_CUDA_DEVICE
  cudaDeviceProp prop{};
  dev::check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s, %zu MiB, sm_%d%d\n", prop.name, prop.totalGlobalMem >> 20, prop.major, prop.minor);
  if (o.tf32) dev::blas::set_tf32(true);
#endif
  std::printf("Thrust device system: %s; FP32 GEMMs%s; %d timed steps after %d warm-up\n", dev::device_system_name,
              o.tf32 ? " with TF32 tensor cores" : " (no TF32)", o.steps, o.warmup);

  const auto c = config();
  const int tokens = batch * seq;
  const double mlp_gemm = gemm_rate(tokens, c.intermediate, c.hidden, 20);
  const double square_gemm = gemm_rate(4096, 4096, 4096, 5);
  std::printf("%s: %.2f TFLOP/s at %dx%dx%d (the MLP's up projection), %.2f TFLOP/s at 4096^3\n\n",
              SKILLGRAFT_CUDA_DEVICE ? "cuBLAS SGEMM" : "reference GEMM (Eigen, host build)", mlp_gemm / 1e12, tokens,
              c.intermediate, c.hidden, square_gemm / 1e12);

  const auto hw = host_weights();
  const auto mb = make_batch();
  std::vector<row> rows;
  sg::hana::for_each(sg::named_recipes, [&](const auto& nr) {
    if (!o.recipe.empty() && o.recipe != nr.name) return;
    rows.push_back(run_recipe<std::remove_const_t<decltype(nr.value)>>(std::string(nr.name), nr.value, o, hw, mb));
  });
  double full = 0;
  for (const auto& r : rows)
    if (r.name == "llm") full = r.step_s;
  std::printf("| recipe | step ms | time vs llm | GEMM TFLOP/s | of SGEMM rate | ledger peak MiB | pool peak MiB | "
              "plan: weights | grads | AdamW | saved MiB |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  const double MiB = 1 << 20;
  for (const auto& r : rows) {
    const double tflops = r.flops / r.step_s / 1e12;
    std::printf("| %s | %.2f | %s | %.2f | %.2f | %.0f | %.0f | %.1f | %.1f | %.1f | %.1f |\n", r.name.c_str(), r.step_s * 1e3,
                full > 0 ? std::to_string(r.step_s / full).substr(0, 4).c_str() : "-", tflops, tflops * 1e12 / mlp_gemm,
                r.ledger_peak / MiB, r.pool_peak / MiB, r.plan.weights / MiB, r.plan.gradients / MiB,
                r.plan.optimizer_state / MiB, r.plan.saved_activations / MiB);
  }
  return 0;
}
