// The CPU GEMM library (backend/cpu/gemm.hpp, chosen by SKILLGRAFT_BLAS): the one CMake chose
// is the one compiled in and, unless it reported a generic kernel for this CPU, the one that
// multiplies; every transpose, stride, alpha and beta agrees with a plain triple loop; and a
// product or a whole training step repeated with the same thread count is bit-identical.
#include <catch2/catch.hpp>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "support/random_lm.hpp"

#include "skillgraft/backend/cpu/backend.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;
using sg::op;

TEST_CASE("The GEMM library CMake chose is the one compiled in") {
  CHECK(sg::cpu::gemm_library::compiled() == std::string_view(SKILLGRAFT_TEST_BLAS));
  INFO("dispatched core: " << sg::cpu::gemm_library::core());
  if (sg::cpu::gemm_library::compiled() == "eigen") CHECK_FALSE(sg::cpu::gemm_library::in_use());
}

// CTest also runs this under OPENBLAS_CORETYPE=Prescott, OpenBLAS's generic x86-64 core: a core
// the user chose is kept, and the generic one falls back to Eigen. Without the variable, a
// generic core that a CPU OpenBLAS does not recognise got is replaced by the CPU's ISA's core.
TEST_CASE("The GEMM library multiplies unless it runs a generic kernel on this CPU") {
  const auto active = sg::cpu::gemm_library::active();  // decides first: it may choose the core
  const auto core = sg::cpu::gemm_library::core();
  const char* forced = std::getenv("OPENBLAS_CORETYPE");
  INFO("compiled: " << sg::cpu::gemm_library::compiled() << ", core: " << core << ", OPENBLAS_CORETYPE: "
                    << (forced ? forced : "(unset)") << ", this CPU's core: " << sg::cpu::gemm_library::core_for_this_cpu());
  if (forced && sg::cpu::gemm_library::compiled() == "openblas") CHECK(core == std::string_view(forced));
  if (sg::cpu::gemm_library::compiled() == "openblas" && core == "Prescott")
    CHECK(active == "eigen");
  else
    CHECK(active == sg::cpu::gemm_library::compiled());
  // Debian's OpenBLAS can choose its core again: on a CPU with AVX2 or AVX-512 no run without the
  // variable is left on the generic core.
  if (!forced && sg::cpu::gemm_library::openblas_core_selectable() && !sg::cpu::gemm_library::core_for_this_cpu().empty())
    CHECK(core != "Prescott");
}

namespace {
template <class T>
std::vector<T> random_vector(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  std::vector<T> v(n);
  for (auto& x : v) x = T(nd(rng));
  return v;
}
}  // namespace

// The step in_use() takes on a CPU OpenBLAS does not recognise, taken here on any CPU: to the
// generic core, as at load time on such a CPU, then to the ISA's core, and back to the core the
// process started with; each core's product agrees with a triple loop in double.
#if defined(SKILLGRAFT_BLAS_OPENBLAS)
TEST_CASE("OpenBLAS's core is chosen again: generic, this CPU's, and back") {
  if (sg::cpu::gemm_library::compiled() != "openblas" || sg::cpu::gemm_library::core_for_this_cpu().empty())
    return;  // Eigen, BLIS, or a CPU without AVX2: nothing to choose
  const std::string start(sg::cpu::gemm_library::core());
  const char* forced = std::getenv("OPENBLAS_CORETYPE");
  const std::string forced_before = forced ? forced : "";
  if (!sg::cpu::gemm_library::openblas_core_selectable()) {
    WARN("this OpenBLAS cannot choose its core again (not a dynamic-arch build)");
    return;
  }
  CHECK(sg::cpu::gemm_library::select_openblas_core("Prescott"));
  const int m = 67, n = 45, k = 131;
  const auto A = random_vector<float>(std::size_t(m) * k, 1), B = random_vector<float>(std::size_t(k) * n, 2);
  const auto agrees = [&] {
    std::vector<float> C(std::size_t(m) * n, 0.f);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.f, A.data(), k, B.data(), n, 0.f, C.data(), n);
    double worst = 0;
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        double c = 0;
        for (int p = 0; p < k; ++p) c += double(A[std::size_t(i) * k + p]) * B[std::size_t(p) * n + j];
        worst = std::max(worst, std::abs(c - C[std::size_t(i) * n + j]) / (1 + std::abs(c)));
      }
    return worst < 1e-5;
  };
  CHECK(sg::cpu::gemm_library::core() == "Prescott");
  CHECK(agrees());
  const auto isa = sg::cpu::gemm_library::core_for_this_cpu();
  CHECK(sg::cpu::gemm_library::select_openblas_core(isa));
  CHECK(sg::cpu::gemm_library::core() == isa);
  CHECK(agrees());
  CHECK(sg::cpu::gemm_library::select_openblas_core(start));
  CHECK(sg::cpu::gemm_library::core() == start);
  // The user's environment is left as it was.
  const char* after = std::getenv("OPENBLAS_CORETYPE");
  CHECK((after ? std::string(after) : std::string()) == forced_before);
  CHECK(bool(after) == bool(forced));
}
#endif

TEMPLATE_TEST_CASE("GEMM agrees with a triple loop for every transpose, stride, alpha and beta", "", float, double) {
  using T = TestType;
  const int m = 37, n = 29, k = 45, pad = 3;
  for (op ta : {op::n, op::t})
    for (op tb : {op::n, op::t})
      for (auto [alpha, beta] : {std::pair{T(1), T(0)}, {T(0.5), T(1)}, {T(-2), T(0.25)}}) {
        const int a_cols = ta == op::n ? k : m, b_cols = tb == op::n ? n : k;
        const int lda = a_cols + pad, ldb = b_cols + pad, ldc = n + pad;
        const auto A = random_vector<T>(std::size_t(ta == op::n ? m : k) * lda, 1);
        const auto B = random_vector<T>(std::size_t(tb == op::n ? k : n) * ldb, 2);
        auto C = random_vector<T>(std::size_t(m) * ldc, 3);
        auto expect = C;
        for (int i = 0; i < m; ++i)
          for (int j = 0; j < n; ++j) {
            double s = 0;
            for (int p = 0; p < k; ++p)
              s += double(ta == op::n ? A[i * lda + p] : A[p * lda + i]) * double(tb == op::n ? B[p * ldb + j] : B[j * ldb + p]);
            expect[i * ldc + j] = T(double(alpha) * s + (beta == T(0) ? 0.0 : double(beta) * double(C[i * ldc + j])));
          }
        if (beta == T(0)) C.assign(C.size(), std::numeric_limits<T>::quiet_NaN());  // beta = 0 ignores C
        for (int i = 0; i < m; ++i)  // the padding is not written
          for (int j = n; j < ldc; ++j) C[i * ldc + j] = expect[i * ldc + j] = T(7);
        sg::cpu::gemm_ops::gemm("test", ta, tb, m, n, k, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
        const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
        INFO("ta=" << int(ta) << " tb=" << int(tb) << " alpha=" << alpha << " beta=" << beta);
        for (std::size_t i = 0; i < C.size(); ++i) REQUIRE(C[i] == Approx(expect[i]).epsilon(tol).margin(tol * 10));
      }
}

namespace {
// One AdamW step of a decoder LM large enough that the library's GEMMs use every thread
// (hidden 128, MLP 384, 4 x 64 tokens); returns the trained weights.
std::vector<float> train_once() {
  auto c = sg::test::tiny_lm_config(2);
  c.hidden = 128;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 32;
  c.intermediate = 384;
  c.vocab_size = 256;
  c.max_seq = 64;
  auto w = sg::test::random_lm<float>(c, 11);
  sg::model::decoder_lm<float, decltype(sg::recipe::llm)> lm(c, sg::recipe::llm);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.lr = 1e-2});
  sg::token_ids ids = xt::zeros<int>({4, 64});
  std::mt19937 rng(5);
  for (auto& t : ids) t = int(rng() % 256);
  const sg::train::micro_batch<float> mb{ids, sg::hf_labels{ids}};
  sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-2}, std::span(&mb, 1));
  std::vector<float> out;
  lm.for_each_trainable(w, g, [&](const std::string&, auto& t, auto&) { out.insert(out.end(), t.data(), t.data() + t.size()); });
  return out;
}
}  // namespace

TEST_CASE("The same step with the same thread count gives bit-identical weights") {
  const int before = omp_get_max_threads();
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    INFO(threads << " threads, GEMM " << sg::cpu::gemm_library::active());
    const auto a = train_once();
    const auto b = train_once();
    REQUIRE(a.size() == b.size());
    CHECK(a == b);  // exact: no tolerance
  }
  omp_set_num_threads(before);
}
