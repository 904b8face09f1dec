#pragma once
// The CUDA backend's GEMM (backend/gemm_op.hpp's interface, row-major).
//
// GPU build: cuBLAS (column-major, so C^T = op(B)^T op(A)^T is what it is asked for).
// Host build: the CPU backend's GEMM on the same memory, so the host tests run the same calls.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include "skillgraft/backend/cuda/memory.hpp"

#include "skillgraft/backend/gemm_op.hpp"
#if !SKILLGRAFT_CUDA_DEVICE
#include "skillgraft/backend/cpu/gemm.hpp"
#endif

namespace skillgraft::cuda {

using skillgraft::op;

#if SKILLGRAFT_CUDA_DEVICE
namespace detail {
inline cublasOperation_t to_cublas(op o) { return o == op::t ? CUBLAS_OP_T : CUBLAS_OP_N; }
}  // namespace detail
#endif

struct gemm_ops {
template <class T>
static void gemm(std::string_view what, op ta, op tb, int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb,
          T beta, T* C, int ldc) {
  if (!gemm_check::has_output(what, ta, tb, m, n, k, lda, ldb, ldc)) return;
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
          gemm_check::describe(what, ta, tb, m, n, k, lda, ldb, ldc));
#else
  cpu::gemm_ops::gemm(what, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

// `batch` independent GEMMs; matrix i of A, B, C starts stride_a, stride_b, stride_c elements after matrix i - 1.
template <class T>
static void gemm_strided_batched(std::string_view what, op ta, op tb, int m, int n, int k, T alpha, const T* A, int lda,
                          long long stride_a, const T* B, int ldb, long long stride_b, T beta, T* C, int ldc,
                          long long stride_c, int batch) {
  if (!gemm_check::has_output(what, ta, tb, m, n, k, lda, ldb, ldc) || batch == 0) return;
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
          gemm_check::describe(what, ta, tb, m, n, k, lda, ldb, ldc) + " batch=" + std::to_string(batch));
#else
  cpu::gemm_ops::gemm_strided_batched(what, ta, tb, m, n, k, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc, stride_c,
                            batch);
#endif
}

};

}  // namespace skillgraft::cuda
