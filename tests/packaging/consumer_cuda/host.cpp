// Host side: a plain C++ translation unit (g++) that sees the Thrust and cuBLAS headers
// through skillgraft::cuda and uses the CPU library as usual.
#include <skillgraft/policy/dispatch.hpp>

#include <cublas_v2.h>
#include <thrust/version.h>

#include <cstdio>

int host_checks() {
  bool dispatched = false;
  skillgraft::with_recipe("mlp_gate_up", [&](auto) { dispatched = true; });
  std::printf("thrust %d.%d, cuBLAS headers %d, recipe %s\n", THRUST_MAJOR_VERSION, THRUST_MINOR_VERSION,
              CUBLAS_VER_MAJOR, dispatched ? "ok" : "FAILED");
  return dispatched ? 0 : 1;
}
