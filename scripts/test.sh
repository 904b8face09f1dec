#!/usr/bin/env bash
# Builds and runs the whole test suite on a fresh machine: installs the Debian
# dependencies when missing, configures, builds, runs CTest.
# Usage: scripts/test.sh [build-dir]     (default: build-test)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build-test}"
"$root/scripts/install-deps.sh"
jobs="$(nproc 2>/dev/null || echo 2)"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DSKILLGRAFT_BUILD_TESTS=ON -DSKILLGRAFT_BUILD_BENCHMARKS=ON -DSKILLGRAFT_BUILD_EXAMPLES=ON \
  -DSKILLGRAFT_CUDA_ARCHITECTURES="${SKILLGRAFT_CUDA_ARCHITECTURES:-90}"  # CI compiles CUDA for one architecture
cmake --build "$build" -j "$jobs"
cd "$build"
# ctest -j runs as many programs as there are cores, each on OMP_NUM_THREADS threads: OpenMP's
# threads wait asleep, or each waits out the others' time slices (tests/CMakeLists.txt).
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}" \
  ctest --output-on-failure -j "$jobs"
