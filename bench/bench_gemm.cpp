// The GEMM candidates of the CPU backend on the reference configuration's shapes, each as a
// ratio to Eigen's own GEMM timed in the same run (how `SKILLGRAFT_BLAS=auto` was chosen; see
// docs/performance.md, "Choosing the CPU GEMM").
//
// The libraries export the same CBLAS symbols, so they cannot all be linked into one program:
// each is dlopen'ed privately (RTLD_LOCAL) from the path CMake found, and its cblas_sgemm is
// called through a pointer. A candidate that is not installed is skipped. Threads: every
// library is told omp_get_max_threads() (OMP_NUM_THREADS), as the backend does.
//
//   OMP_NUM_THREADS=2 build/bench/bench_gemm --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <dlfcn.h>
#include <omp.h>

#include <Eigen/Core>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {

// CBLAS's enum values (cblas.h): row-major 101, no transpose 111, transpose 112.
using sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

struct candidate {
  std::string name, path;
  sgemm_fn sgemm = nullptr;
  std::string core;  // what the library says it dispatched to, when it can say
};

std::vector<candidate>& candidates() {
  static std::vector<candidate> all = [] {
    std::vector<candidate> c;
    const int threads = omp_get_max_threads();
    auto open = [&](const char* name, const char* path) -> void* {
      if (!path || !*path) return nullptr;
      void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
      if (!h) std::fprintf(stderr, "bench_gemm: %s not loaded: %s\n", name, dlerror());
      return h;
    };
#ifdef SKILLGRAFT_BENCH_OPENBLAS
    if (void* h = open("openblas", SKILLGRAFT_BENCH_OPENBLAS)) {
      candidate x{"openblas", SKILLGRAFT_BENCH_OPENBLAS, nullptr, ""};
      x.sgemm = reinterpret_cast<sgemm_fn>(dlsym(h, "cblas_sgemm"));
      if (auto core = reinterpret_cast<char* (*)()>(dlsym(h, "openblas_get_corename"))) x.core = core();
      if (auto set = reinterpret_cast<void (*)(int)>(dlsym(h, "openblas_set_num_threads"))) set(threads);
      c.push_back(x);
    }
#endif
#ifdef SKILLGRAFT_BENCH_BLIS
    if (void* h = open("blis", SKILLGRAFT_BENCH_BLIS)) {
      candidate x{"blis", SKILLGRAFT_BENCH_BLIS, nullptr, ""};
      x.sgemm = reinterpret_cast<sgemm_fn>(dlsym(h, "cblas_sgemm"));
      auto id = reinterpret_cast<int (*)()>(dlsym(h, "bli_arch_query_id"));
      auto str = reinterpret_cast<char* (*)(int)>(dlsym(h, "bli_arch_string"));
      if (id && str) x.core = str(id());
      if (auto set = reinterpret_cast<void (*)(long)>(dlsym(h, "bli_thread_set_num_threads"))) set(threads);
      c.push_back(x);
    }
#endif
#ifdef SKILLGRAFT_BENCH_MKL
    if (void* h = open("mkl", SKILLGRAFT_BENCH_MKL)) {
      // GNU threading layer: MKL's threads are libgomp's, shared with the backend's OpenMP.
      if (auto layer = reinterpret_cast<int (*)(int)>(dlsym(h, "MKL_Set_Threading_Layer"))) layer(3);
      candidate x{"mkl", SKILLGRAFT_BENCH_MKL, nullptr, ""};
      x.sgemm = reinterpret_cast<sgemm_fn>(dlsym(h, "cblas_sgemm"));
      if (auto set = reinterpret_cast<void (*)(int)>(dlsym(h, "MKL_Set_Num_Threads"))) set(threads);
      c.push_back(x);
    }
#endif
    std::erase_if(c, [](const candidate& x) { return x.sgemm == nullptr; });
    return c;
  }();
  return all;
}

// One GEMM of the reference trunk: C[m,n] = op(A) op(B), row-major, as nn/linear.hpp calls it.
struct shape {
  const char* what;
  bool ta, tb;
  int m, n, k;
};
// Reference configuration: 1024 tokens, hidden 512, MLP 1536, KV 256 (4 heads of 64), seq 256.
const shape shapes[] = {
    {"mlp up fwd     x W^T", false, true, 1024, 1536, 512},
    {"mlp down dx    dy W", false, false, 1024, 512, 1536},
    {"mlp up dW      dy^T x", true, false, 1536, 512, 1024},
    {"q/o fwd        x W^T", false, true, 1024, 512, 512},
    {"q/o dW         dy^T x", true, false, 512, 512, 1024},
    {"k/v fwd        x W^T", false, true, 1024, 256, 512},
    {"scores/head    Q K^T", false, true, 256, 256, 64},
    {"P V/head       P V", false, false, 256, 64, 256},
};

struct operands {
  std::vector<float> a, b, c;
  explicit operands(const shape& s) : a(std::size_t(s.m) * s.k), b(std::size_t(s.k) * s.n), c(std::size_t(s.m) * s.n) {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd;
    for (auto& x : a) x = nd(rng);
    for (auto& x : b) x = nd(rng);
  }
};

void eigen_gemm(const shape& s, operands& o) {
  using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const matrix> a(o.a.data(), s.ta ? s.k : s.m, s.ta ? s.m : s.k);
  Eigen::Map<const matrix> b(o.b.data(), s.tb ? s.n : s.k, s.tb ? s.k : s.n);
  Eigen::Map<matrix> c(o.c.data(), s.m, s.n);
  if (!s.ta && !s.tb) c.noalias() = a * b;
  else if (!s.ta) c.noalias() = a * b.transpose();
  else if (!s.tb) c.noalias() = a.transpose() * b;
  else c.noalias() = a.transpose() * b.transpose();
}

void cblas_gemm(const candidate& l, const shape& s, operands& o) {
  l.sgemm(101, s.ta ? 112 : 111, s.tb ? 112 : 111, s.m, s.n, s.k, 1.f, o.a.data(), s.ta ? s.m : s.k, o.b.data(),
          s.tb ? s.k : s.n, 0.f, o.c.data(), s.n);
}

template <class F>
void run(benchmark::State& state, const shape& s, F gemm) {
  operands o(s);
  for (auto _ : state) {
    gemm(o);
    benchmark::DoNotOptimize(o.c.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * s.m * s.n * s.k;
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = omp_get_max_threads();
}

// Keeps each benchmark's time per GEMM (microseconds): the median aggregate under
// --benchmark_repetitions, the single run otherwise.
struct ratio_reporter : benchmark::ConsoleReporter {
  std::map<std::string, double> micros;
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      const bool median = r.run_type == Run::RT_Aggregate && r.aggregate_name == "median";
      if (median || (r.run_type == Run::RT_Iteration && r.repetitions <= 1))
        micros[r.run_name.function_name] = r.GetAdjustedRealTime();
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  std::vector<std::string> libs{"eigen"};
  for (const auto& l : candidates()) libs.push_back(l.name);
  // Interleaved per shape so that each ratio compares times taken minutes apart at most.
  for (const auto& s : shapes) {
    benchmark::RegisterBenchmark((std::string("eigen/") + s.what).c_str(), [&s](benchmark::State& st) {
      run(st, s, [&](operands& o) { eigen_gemm(s, o); });
    })->Unit(benchmark::kMicrosecond);
    for (const auto& l : candidates())
      benchmark::RegisterBenchmark((l.name + "/" + s.what).c_str(), [&s, &l](benchmark::State& st) {
        run(st, s, [&](operands& o) { cblas_gemm(l, s, o); });
      })->Unit(benchmark::kMicrosecond);
  }
  std::printf("threads (omp_get_max_threads): %d\n", omp_get_max_threads());
  for (const auto& l : candidates())
    std::printf("%s: %s%s%s\n", l.name.c_str(), l.path.c_str(), l.core.empty() ? "" : ", dispatched to ",
                l.core.c_str());
  ratio_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);

  // Time of Eigen / time of the library: above 1 means the library is faster.
  std::printf("\n| shape (m x n x k) |");
  for (std::size_t i = 1; i < libs.size(); ++i) std::printf(" %s vs Eigen |", libs[i].c_str());
  std::printf(" Eigen GFLOP/s |\n|---|");
  for (std::size_t i = 0; i < libs.size(); ++i) std::printf("---|");
  std::printf("\n");
  for (const auto& s : shapes) {
    const double eigen = reporter.micros["eigen/" + std::string(s.what)];
    std::printf("| %s %dx%dx%d |", s.what, s.m, s.n, s.k);
    for (std::size_t i = 1; i < libs.size(); ++i) {
      const double t = reporter.micros[libs[i] + "/" + s.what];
      std::printf(" %.2f |", t > 0 ? eigen / t : 0.0);
    }
    std::printf(" %.1f |\n", eigen > 0 ? 2.0 * s.m * s.n * s.k / eigen * 1e-3 : 0.0);
  }
  benchmark::Shutdown();
}
