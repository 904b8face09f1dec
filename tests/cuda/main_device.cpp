// main() of the GPU parity tests: without a CUDA device they are skipped (CTest's
// SKIP_RETURN_CODE 77) with a message, instead of failing on the first allocation.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

bool skillgraft_test_device_available();  // parity.cpp, compiled by nvcc

int main(int argc, char** argv) {
  if (!skillgraft_test_device_available()) {
    std::printf("skillgraft: no CUDA device (or no driver) on this machine: the GPU parity tests are skipped; "
                "test_cuda_host runs the same tests with Thrust on the host\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
