#pragma once
// The CPU backend tag: Eigen for GEMMs (parallel through OpenMP when enabled),
// plain loops for element-wise work. Implementation lives in namespace skillgraft::cpu.
#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::backend {

struct cpu {
  template <class T>
  using tensor = skillgraft::cpu::tensor<T>;
  static constexpr const char* name = "cpu";
};

}  // namespace skillgraft::backend
