#pragma once
// The backend's GEMM interface, row-major like every tensor of the library:
//
//   C[m, n] = alpha op(A) op(B) + beta C,   op(A) is [m, k], op(B) is [k, n]
//   lda, ldb, ldc: the row stride (in elements) of A, B and C as they are stored, so a
//   head's rows inside a [batch, seq, heads * head_dim] tensor are a matrix with
//   ld = heads * head_dim.
//
// GPU build: cuBLAS (column-major, so C^T = op(B)^T op(A)^T is what it is asked for).
// Host build: Eigen on the same memory, so the host tests run the same calls.
// `what` names the product in error messages ("q_proj: y = x W^T").
#include <algorithm>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include "skillgraft/backend/cuda/memory.hpp"

#if !SKILLGRAFT_CUDA_DEVICE
#include <Eigen/Core>
#endif

namespace skillgraft::cuda {

enum class op { n, t };  // as stored, or transposed

namespace detail {
inline std::string gemm_shape(std::string_view what, op ta, op tb, int m, int n, int k, int lda, int ldb, int ldc) {
  return std::string(what) + ": op(A)=" + (ta == op::t ? "A^T" : "A") + ", op(B)=" + (tb == op::t ? "B^T" : "B") +
         ", m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) + " lda=" +
         std::to_string(lda) + " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc);
}

// Row strides must cover the stored rows (checked for both builds, so host tests catch misuse).
inline void check_gemm(std::string_view what, op ta, op tb, int m, int n, int k, int lda, int ldb, int ldc) {
  const int a_cols = ta == op::n ? k : m, b_cols = tb == op::n ? n : k;
  if (m < 0 || n < 0 || k < 0 || lda < std::max(1, a_cols) || ldb < std::max(1, b_cols) || ldc < std::max(1, n))
    throw std::invalid_argument("skillgraft: invalid GEMM " + gemm_shape(what, ta, tb, m, n, k, lda, ldb, ldc));
}

#if !SKILLGRAFT_CUDA_DEVICE
template <class T>
void host_gemm(op ta, op tb, int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
               int ldc) {
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
      c.noalias() = alpha * product;  // C is not read (it may hold anything), as in BLAS
    } else {
      if (beta != T(1)) c *= beta;
      c.noalias() += alpha * product;
    }
  };
  if (ta == op::n && tb == op::n) apply(a * b);
  else if (ta == op::n) apply(a * b.transpose());
  else if (tb == op::n) apply(a.transpose() * b);
  else apply(a.transpose() * b.transpose());
}
#else
inline cublasOperation_t to_cublas(op o) { return o == op::t ? CUBLAS_OP_T : CUBLAS_OP_N; }
#endif
}  // namespace detail

template <class T>
void gemm(std::string_view what, op ta, op tb, int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb,
          T beta, T* C, int ldc) {
  detail::check_gemm(what, ta, tb, m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0) return;
#if SKILLGRAFT_CUDA_DEVICE
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "skillgraft: cuBLAS GEMMs take float or double");
  cublasStatus_t s;
  if constexpr (std::is_same_v<T, float>)
    s = cublasSgemm(blas::handle(), detail::to_cublas(tb), detail::to_cublas(ta), n, m, k, &alpha, B, ldb, A, lda,
                    &beta, C, ldc);
  else
    s = cublasDgemm(blas::handle(), detail::to_cublas(tb), detail::to_cublas(ta), n, m, k, &alpha, B, ldb, A, lda,
                    &beta, C, ldc);
  if (s != CUBLAS_STATUS_SUCCESS)
    check(s, std::is_same_v<T, float> ? "cublasSgemm" : "cublasDgemm",
          detail::gemm_shape(what, ta, tb, m, n, k, lda, ldb, ldc));
#else
  detail::host_gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

// `batch` independent GEMMs; matrix i of A, B, C starts stride_a, stride_b, stride_c elements after matrix i - 1.
template <class T>
void gemm_strided_batched(std::string_view what, op ta, op tb, int m, int n, int k, T alpha, const T* A, int lda,
                          long long stride_a, const T* B, int ldb, long long stride_b, T beta, T* C, int ldc,
                          long long stride_c, int batch) {
  detail::check_gemm(what, ta, tb, m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0 || batch == 0) return;
#if SKILLGRAFT_CUDA_DEVICE
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "skillgraft: cuBLAS GEMMs take float or double");
  cublasStatus_t s;
  if constexpr (std::is_same_v<T, float>)
    s = cublasSgemmStridedBatched(blas::handle(), detail::to_cublas(tb), detail::to_cublas(ta), n, m, k, &alpha, B, ldb,
                                  stride_b, A, lda, stride_a, &beta, C, ldc, stride_c, batch);
  else
    s = cublasDgemmStridedBatched(blas::handle(), detail::to_cublas(tb), detail::to_cublas(ta), n, m, k, &alpha, B, ldb,
                                  stride_b, A, lda, stride_a, &beta, C, ldc, stride_c, batch);
  if (s != CUBLAS_STATUS_SUCCESS)
    check(s, std::is_same_v<T, float> ? "cublasSgemmStridedBatched" : "cublasDgemmStridedBatched",
          detail::gemm_shape(what, ta, tb, m, n, k, lda, ldb, ldc) + " batch=" + std::to_string(batch));
#else
  for (int i = 0; i < batch; ++i)
    detail::host_gemm(ta, tb, m, n, k, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, beta, C + i * stride_c, ldc);
#endif
}

}  // namespace skillgraft::cuda
