// Catch2's main for tests that run as every rank of an MPI job (mpirun -np 2 test_distributed):
// MPI lives for the whole session, each rank runs every test case, and the job fails when any
// rank fails.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "skillgraft/dist/mpi.hpp"

int main(int argc, char** argv) {
  skillgraft::dist::mpi_environment mpi(argc, argv);
  return Catch::Session().run(argc, argv);
}
