// Device side of the cuda-component consumer: Thrust with a __device__ lambda
// (needs --extended-lambda, which skillgraft::cuda adds), cuBLAS, and a skillgraft
// header compiled by nvcc in C++20. Without a GPU it stops after the host checks.
#include <skillgraft/policy/recipes.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <thrust/device_vector.h>
#include <thrust/reduce.h>
#include <thrust/transform.h>

#include <cstdio>

static_assert(SKILLGRAFT_HAS_CUDA == 1, "skillgraft::cuda defines SKILLGRAFT_HAS_CUDA");
static_assert(__cplusplus >= 202002L, "skillgraft::cuda compiles CUDA sources as C++20");

int host_checks();  // host.cpp

int main() {
  if (host_checks() != 0) return 1;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: built and linked only\n");
    return 0;
  }
  thrust::device_vector<float> v(64, 1.5f);
  thrust::transform(v.begin(), v.end(), v.begin(), [] __device__(float x) { return 2.f * x; });
  float via_thrust = thrust::reduce(v.begin(), v.end());
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return 1;
  float via_cublas = 0.f;
  cublasSasum(h, 64, thrust::raw_pointer_cast(v.data()), 1, &via_cublas);
  cublasDestroy(h);
  const bool ok = via_thrust == 192.f && via_cublas == 192.f;
  std::printf("thrust %g cublas %g: %s\n", via_thrust, via_cublas, ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
