// Data-parallel training over MPI on this machine: bytes sent per step per recipe, and the
// step time of 2 ranks x 1 thread against 1 rank x 2 threads at the same global batch.
//
//   mpirun -np 2 bench_distributed          (Open MPI as root: --allow-run-as-root; 2 cores: --bind-to none)
//
// The global batch is bench_train_step's (reference configuration, vocabulary 8192, 4 x 256
// tokens). Per recipe, in one run:
//   BM_one_rank_2_threads/<recipe>   rank 0 alone, 2 OpenMP threads, the whole batch, no
//                                    communicator; rank 1 waits (sleeping) for the next benchmark
//   BM_two_ranks_1_thread/<recipe>   both ranks, 1 thread each, half the batch each, summing the
//                                    trainable gradients over MPI in buckets that overlap with backward
//   BM_two_ranks_1_thread_after_backward/<recipe>   the same, every bucket summed after backward
// Bytes per step are what reduce_gradients sent from one rank, reported as a ratio to the
// memory plan's gradient bytes (cl::plan_method_memory): only trainable gradients travel, so
// the ratio is 1 and the bytes follow the recipe. Iteration counts are fixed (--iterations,
// default 3) because both ranks must run the same number of steps. Rank 0 prints a Markdown table.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdio>
#include <map>
#include <string>
#include <xtensor/xview.hpp>

#include "reference_lm.hpp"
#include "skillgraft/cl/memory_plan.hpp"
#include "skillgraft/dist/mpi.hpp"
#include "skillgraft/policy/dispatch.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"

namespace sg = skillgraft;

namespace {

struct result {
  double one_rank = 0, two_ranks = 0, two_ranks_after = 0;  // seconds per step
  double bytes = 0, plan_bytes = 0, buckets = 0;
};
std::map<std::string, result> results;
sg::dist::mpi_communicator* world = nullptr;  // buckets overlap with backward
sg::dist::basic_mpi_communicator<sg::train::reduce_after_backward>* world_after = nullptr;

// This rank's half of the global batch (rows [2r, 2r + 2) of 4).
sg::train::micro_batch<float> half_batch(const sg::train::micro_batch<float>& whole, int rank, int ranks) {
  const std::size_t n = whole.ids.shape(0), first = n * std::size_t(rank) / std::size_t(ranks),
                    last = n * std::size_t(rank + 1) / std::size_t(ranks);
  return {xt::eval(xt::view(whole.ids, xt::range(first, last), xt::all())),
          xt::eval(xt::view(whole.targets, xt::range(first, last), xt::all()))};
}

template <class R, class Comm>
void run_steps(benchmark::State& state, R recipe, const sg::train::micro_batch<float>& mb, Comm& comm) {
  auto w = sg::bench::make_weights();
  sg::model::decoder_lm<float, R> lm(sg::bench::config(), recipe);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.lr = 1e-5});
  const sg::train::constant_schedule lr{1e-5};
  for (auto _ : state) {
    auto st = sg::train::train_step(lm, w, g, opt, lr, std::span(&mb, 1), {}, {}, comm);
    benchmark::DoNotOptimize(st.loss);
  }
}

template <class R>
void BM_one_rank_2_threads(benchmark::State& state, R recipe) {
  if (world->rank() != 0) {  // not part of this measurement
    for (auto _ : state) {
    }
    return;
  }
  omp_set_num_threads(2);
  sg::train::no_communicator one;
  run_steps(state, recipe, sg::bench::make_batch(), one);
}

template <class R>
void BM_two_ranks_1_thread(benchmark::State& state, R recipe, const std::string& name) {
  omp_set_num_threads(1);
  run_steps(state, recipe, half_batch(sg::bench::make_batch(), world->rank(), world->size()), *world);
  sg::model::decoder_lm<float, R> lm(sg::bench::config(), recipe);
  const auto plan = sg::cl::plan_method_memory(lm, sg::cl::method::none, {sg::bench::batch / 2, sg::bench::seq});
  auto& r = results[name];
  r.bytes = double(world->last_reduction().bytes);
  r.buckets = double(world->last_reduction().buckets);
  r.plan_bytes = double(plan.gradients);
  state.counters["bytes_per_step_MiB"] = r.bytes / (1 << 20);
  state.counters["of_plan_gradient_bytes"] = r.plan_bytes ? r.bytes / r.plan_bytes : 0.0;
  state.counters["buckets"] = r.buckets;
}

// The same steps with every bucket summed after backward: what overlap gains.
template <class R>
void BM_two_ranks_1_thread_after_backward(benchmark::State& state, R recipe) {
  omp_set_num_threads(1);
  run_steps(state, recipe, half_batch(sg::bench::make_batch(), world->rank(), world->size()), *world_after);
}

class summary_reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& run : runs) {
      const std::string n = run.run_name.function_name;
      const auto slash = n.find('/');
      if (slash == std::string::npos) continue;
      auto& r = results[n.substr(slash + 1)];
      (n.starts_with("BM_one_rank")                             ? r.one_rank
       : n.starts_with("BM_two_ranks_1_thread_after_backward/") ? r.two_ranks_after
                                                                : r.two_ranks) = run.GetAdjustedRealTime() / 1e3;
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

// The other ranks run the same benchmarks silently.
class silent_reporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  sg::dist::mpi_environment mpi(argc, argv);
  // Rank 1 waits out rank 0's single-rank measurements inside an exchange: a long deadline.
  sg::dist::mpi_communicator comm({.timeout = std::chrono::minutes(30)});
  sg::dist::basic_mpi_communicator<sg::train::reduce_after_backward> after({.timeout = std::chrono::minutes(30)});
  world = &comm;
  world_after = &after;
  int iterations = 3;
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]).starts_with("--iterations=")) iterations = std::stoi(argv[i] + 13);
  if (comm.size() != 2) {
    if (comm.rank() == 0) std::fprintf(stderr, "bench_distributed: run it as 2 ranks (mpirun -np 2)\n");
    return 2;
  }
  for (const char* name : {"llm", "mlp", "mlp_gate_up", "sa_proj", "mlp_down"}) {
    sg::with_recipe(name, [&](auto recipe) {
      const std::string n = name;
      benchmark::RegisterBenchmark(("BM_one_rank_2_threads/" + n).c_str(),
                                   [recipe](benchmark::State& s) { BM_one_rank_2_threads(s, recipe); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->Iterations(iterations);
      benchmark::RegisterBenchmark(("BM_two_ranks_1_thread/" + n).c_str(),
                                   [recipe, n](benchmark::State& s) { BM_two_ranks_1_thread(s, recipe, n); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->Iterations(iterations);
      benchmark::RegisterBenchmark(("BM_two_ranks_1_thread_after_backward/" + n).c_str(),
                                   [recipe](benchmark::State& s) { BM_two_ranks_1_thread_after_backward(s, recipe); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->Iterations(iterations);
    });
  }
  std::vector<char*> args{argv[0]};
  for (int i = 1; i < argc; ++i)
    if (!std::string(argv[i]).starts_with("--iterations=")) args.push_back(argv[i]);
  int n = int(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  summary_reporter summary;
  silent_reporter silent;
  if (comm.rank() == 0) benchmark::RunSpecifiedBenchmarks(&summary);
  else benchmark::RunSpecifiedBenchmarks(&silent);
  benchmark::Shutdown();
  if (comm.rank() != 0) return 0;
  std::printf("\n| recipe | bytes per step (MiB) | of plan's gradient bytes | buckets | 1 rank x 2 threads ms "
              "| 2 ranks x 1 thread ms | 2x1 vs 1x2 | 2x1, buckets after backward ms | overlapped vs after "
              "|\n|---|---|---|---|---|---|---|---|---|\n");
  for (const char* name : {"llm", "mlp", "mlp_gate_up", "sa_proj", "mlp_down"}) {
    const auto& r = results[name];
    std::printf("| %s | %.2f | %.3f | %.0f | %.0f | %.0f | %.2f | %.0f | %.2f |\n", name, r.bytes / (1 << 20),
                r.plan_bytes ? r.bytes / r.plan_bytes : 0.0, r.buckets, r.one_rank * 1e3, r.two_ranks * 1e3,
                r.one_rank ? r.two_ranks / r.one_rank : 0.0, r.two_ranks_after * 1e3,
                r.two_ranks_after ? r.two_ranks / r.two_ranks_after : 0.0);
  }
}
