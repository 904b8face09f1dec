#pragma once
// The GEMM every backend provides, row-major like every tensor of the library:
//
//   C[m, n] = alpha op(A) op(B) + beta C,   op(A) is [m, k], op(B) is [k, n]
//   lda, ldb, ldc: the row stride (in elements) of A, B and C as they are stored, so a head's
//   rows inside a [batch, seq, heads * head_dim] tensor are a matrix with ld = heads * head_dim.
//   beta = 0: C is not read (it may hold anything), as in BLAS.
//
// `what` names the product in error messages ("q_proj: y = x W^T").
#include <algorithm>
#include <stdexcept>
#include <string>
#include <string_view>

namespace skillgraft {

enum class op { n, t };  // as stored, or transposed

namespace gemm_check {
inline std::string describe(std::string_view what, op ta, op tb, int m, int n, int k, int lda, int ldb, int ldc) {
  return std::string(what) + ": op(A)=" + (ta == op::t ? "A^T" : "A") + ", op(B)=" + (tb == op::t ? "B^T" : "B") +
         ", m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) + " lda=" +
         std::to_string(lda) + " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc);
}

// Every backend's GEMM entry, so host tests catch misuse: row strides must cover the stored
// rows. Returns whether C has any element (m, n > 0); a GEMM without one has nothing to do.
inline bool has_output(std::string_view what, op ta, op tb, int m, int n, int k, int lda, int ldb, int ldc) {
  const int a_cols = ta == op::n ? k : m, b_cols = tb == op::n ? n : k;
  if (m < 0 || n < 0 || k < 0 || lda < std::max(1, a_cols) || ldb < std::max(1, b_cols) || ldc < std::max(1, n))
    throw std::invalid_argument("skillgraft: invalid GEMM " + describe(what, ta, tb, m, n, k, lda, ldb, ldc));
  return m > 0 && n > 0;
}
}  // namespace gemm_check

}  // namespace skillgraft
