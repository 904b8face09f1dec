#pragma once
// The CPU backend's GEMM (backend/gemm_op.hpp's interface). float and double products go to the
// BLAS library CMake chose (SKILLGRAFT_BLAS, cmake/skillgraftBlas.cmake): OpenBLAS or BLIS, both
// of which pick their kernels for the running CPU themselves; anything else, and every product
// when no library was chosen, is Eigen's GEMM on strided row-major maps of the callers' memory.
// The host build of the CUDA backend runs its GEMMs through this too.
//
// Threads: the library runs on omp_get_max_threads() threads (OMP_NUM_THREADS), and on one
// inside an OpenMP parallel region, so it never oversubscribes the cores the backend's own
// loops use. For a fixed thread count the libraries split C, never the k sum, so a product is
// bit-identical from run to run.
#include <Eigen/Core>

#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>
#include <type_traits>

#include "skillgraft/backend/gemm_op.hpp"

#if defined(SKILLGRAFT_BLAS_OPENBLAS) || defined(SKILLGRAFT_BLAS_BLIS)
#include <cblas.h>
#endif
#if defined(SKILLGRAFT_BLAS_OPENBLAS) && defined(__linux__)
#include <stdlib.h>  // setenv, unsetenv
// OpenBLAS's dynamic-arch builds only; weak, so that other builds link and see null.
extern "C" void gotoblas_dynamic_init(void) __attribute__((weak));
extern "C" void gotoblas_dynamic_quit(void) __attribute__((weak));
#endif
#if defined(SKILLGRAFT_BLAS_BLIS)
#include <blis.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace skillgraft::cpu {

// Which GEMM this process multiplies float and double with, for benchmarks and tests.
struct gemm_library {
  // "openblas", "blis" or "eigen": the library compiled in (SKILLGRAFT_BLAS).
  static constexpr std::string_view compiled() {
#if defined(SKILLGRAFT_BLAS_OPENBLAS)
    return "openblas";
#elif defined(SKILLGRAFT_BLAS_BLIS)
    return "blis";
#else
    return "eigen";
#endif
  }

  // The kernel set the library dispatched to on this CPU ("" for Eigen).
  static std::string_view core() {
#if defined(SKILLGRAFT_BLAS_OPENBLAS)
    return openblas_get_corename();
#elif defined(SKILLGRAFT_BLAS_BLIS)
    return bli_arch_string(bli_arch_query_id());
#else
    return "";
#endif
  }

  // OpenBLAS's core for the running CPU's vector ISA: "SkylakeX" where AVX-512 (F, BW, DQ, VL)
  // runs, "Haswell" where AVX2 and FMA do, else "" (nothing better than the generic core).
  static std::string_view core_for_this_cpu() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return "SkylakeX";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
    return "";
  }

  // Makes OpenBLAS dispatch to `name` (one of its OPENBLAS_CORETYPE names) from now on, as the
  // variable would have at load time; true if it then runs that core. Only OpenBLAS's
  // dynamic-arch builds (Debian's) can: they export gotoblas_dynamic_quit/init, which choose the
  // core again from OPENBLAS_CORETYPE; in other builds the symbols are null and nothing changes.
  // Not while another thread multiplies with OpenBLAS.
  static bool openblas_core_selectable() {
#if defined(SKILLGRAFT_BLAS_OPENBLAS) && defined(__linux__)
    return gotoblas_dynamic_quit && gotoblas_dynamic_init;
#else
    return false;
#endif
  }
  static bool select_openblas_core(std::string_view name) {
#if defined(SKILLGRAFT_BLAS_OPENBLAS) && defined(__linux__)
    if (!openblas_core_selectable() || name.empty()) return false;
    const std::string want(name);
    const char* before = std::getenv("OPENBLAS_CORETYPE");
    const std::string saved = before ? before : "";
    ::setenv("OPENBLAS_CORETYPE", want.c_str(), 1);
    gotoblas_dynamic_quit();
    gotoblas_dynamic_init();
    if (before) ::setenv("OPENBLAS_CORETYPE", saved.c_str(), 1);
    else ::unsetenv("OPENBLAS_CORETYPE");
    return core() == name;
#else
    (void)name;
    return false;
#endif
  }

  // False when the compiled-in library would run a generic kernel on this CPU. OpenBLAS 0.3.21
  // does not recognise some newer CPUs (a 2-core Emerald Rapids Xeon among them) and dispatches
  // to its generic x86-64 core, "Prescott" (SSE3): 36-65 GFLOP/s there, against 185 for its
  // SkylakeX core and 52 for Eigen in a build without -march (docs/performance.md). Unless the
  // user chose a core (OPENBLAS_CORETYPE), the backend then asks OpenBLAS for the core of the
  // CPU's ISA (select_openblas_core); where that is not possible it multiplies with Eigen.
  // Decided once per process, before the first product, so results stay repeatable.
  static bool in_use() {
#if defined(SKILLGRAFT_BLAS_OPENBLAS)
    static const bool knows_cpu = [] {
      const auto generic = [] {
        const std::string_view c = core();
        return c.empty() || c == "Prescott" || c == "unknown";
      };
      if (generic() && !std::getenv("OPENBLAS_CORETYPE")) select_openblas_core(core_for_this_cpu());
      return !generic();
    }();
    return knows_cpu;
#elif defined(SKILLGRAFT_BLAS_BLIS)
    return true;
#else
    return false;
#endif
  }

  // "openblas", "blis" or "eigen": what really multiplies float and double here.
  static std::string_view active() { return in_use() ? compiled() : "eigen"; }
};

namespace gemm_detail {

// The thread count the library should use for a product started here.
inline int library_threads() {
#if defined(_OPENMP)
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

// OpenBLAS's OpenMP build reads omp_get_max_threads() and omp_in_parallel() itself; its
// pthreads build and BLIS keep a global count, set here only when it changes.
inline void set_library_threads() {
#if defined(SKILLGRAFT_BLAS_OPENBLAS) || defined(SKILLGRAFT_BLAS_BLIS)
  static std::atomic<int> current{0};
  const int want = library_threads();
  if (current.exchange(want, std::memory_order_relaxed) == want) return;
#if defined(SKILLGRAFT_BLAS_OPENBLAS)
  if (openblas_get_parallel() != OPENBLAS_OPENMP) openblas_set_num_threads(want);
#else
  bli_thread_set_num_threads(want);
#endif
#endif
}

#if defined(SKILLGRAFT_BLAS_OPENBLAS) || defined(SKILLGRAFT_BLAS_BLIS)
template <class T>
constexpr bool blas_type = std::is_same_v<T, float> || std::is_same_v<T, double>;

// C = alpha op(A) op(B) + beta C through CBLAS, row-major.
template <class T>
void blas_gemm(op ta, op tb, int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
               int ldc) {
  set_library_threads();
  const auto trans = [](op o) { return o == op::t ? CblasTrans : CblasNoTrans; };
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasRowMajor, trans(ta), trans(tb), m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    cblas_dgemm(CblasRowMajor, trans(ta), trans(tb), m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}
#endif

template <class T>
void eigen_gemm(op ta, op tb, int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
                int ldc) {
  using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using cmap = Eigen::Map<const matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  using map = Eigen::Map<matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  map c(C, m, n, Eigen::OuterStride<>(ldc));
  const cmap a(A, ta == op::n ? m : k, ta == op::n ? k : m, Eigen::OuterStride<>(lda));
  const cmap b(B, tb == op::n ? k : n, tb == op::n ? n : k, Eigen::OuterStride<>(ldb));
  auto apply = [&](const auto& product) {
    if (beta == T(0)) {
      if (alpha == T(1)) c.noalias() = product;
      else c.noalias() = alpha * product;
    } else {
      if (beta != T(1)) c *= beta;
      if (alpha == T(1)) c.noalias() += product;
      else c.noalias() += alpha * product;
    }
  };
  if (ta == op::n && tb == op::n) apply(a * b);
  else if (ta == op::n) apply(a * b.transpose());
  else if (tb == op::n) apply(a.transpose() * b);
  else apply(a.transpose() * b.transpose());
}

}  // namespace gemm_detail

struct gemm_ops {
template <class T>
static void gemm(std::string_view what, op ta, op tb, int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb,
          T beta, T* C, int ldc) {
  if (!gemm_check::has_output(what, ta, tb, m, n, k, lda, ldb, ldc)) return;
  if (k == 0) {
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, Eigen::Unaligned,
               Eigen::OuterStride<>>
        c(C, m, n, Eigen::OuterStride<>(ldc));
    if (beta == T(0)) c.setZero();
    else c *= beta;
    return;
  }
#if defined(SKILLGRAFT_BLAS_OPENBLAS) || defined(SKILLGRAFT_BLAS_BLIS)
  if constexpr (gemm_detail::blas_type<T>)
    if (gemm_library::in_use()) return gemm_detail::blas_gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
  gemm_detail::eigen_gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

// `batch` independent GEMMs; matrix i of A, B, C starts stride_a, stride_b, stride_c elements after matrix i - 1.
template <class T>
static void gemm_strided_batched(std::string_view what, op ta, op tb, int m, int n, int k, T alpha, const T* A, int lda,
                          long long stride_a, const T* B, int ldb, long long stride_b, T beta, T* C, int ldc,
                          long long stride_c, int batch) {
  for (int i = 0; i < batch; ++i)
    gemm(what, ta, tb, m, n, k, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, beta, C + i * stride_c, ldc);
}

};

}  // namespace skillgraft::cpu
