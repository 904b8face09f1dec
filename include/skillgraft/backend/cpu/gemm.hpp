#pragma once
// The CPU backend's GEMM (backend/gemm_op.hpp's interface): Eigen's GEMM on strided row-major
// maps of the callers' memory, threaded by OpenMP when enabled. The host build of the CUDA
// backend runs its GEMMs through this too.
#include <Eigen/Core>

#include <string_view>

#include "skillgraft/backend/gemm_op.hpp"

namespace skillgraft::cpu {

struct gemm_ops {
template <class T>
static void gemm(std::string_view what, op ta, op tb, int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb,
          T beta, T* C, int ldc) {
  gemm_check::arguments(what, ta, tb, m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0) return;
  using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using cmap = Eigen::Map<const matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  using map = Eigen::Map<matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  map c(C, m, n, Eigen::OuterStride<>(ldc));
  if (k == 0) {
    if (beta == T(0)) c.setZero();
    else c *= beta;
    return;
  }
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
