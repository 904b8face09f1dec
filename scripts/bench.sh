#!/usr/bin/env bash
# The recipe benchmarks behind docs/performance.md: installs what it needs, builds for
# this CPU, and runs, on the reference configuration (hidden 512, 8 heads, 4 KV heads,
# MLP 1536, 4 layers, batch 4, sequence 256):
#   bench_recipes     the trunk's forward+backward per recipe, against this machine's GEMM
#                     rate and the FLOP model, and against `llm`
#   bench_train_step  the whole LM training step (model, masked loss, AdamW) per recipe,
#                     with the ledger's peak bytes and the process's peak resident memory
#   bench_distributed (where MPI is found; 2 ranks under mpirun) bytes sent per step per recipe
#                     against the plan's gradient bytes, 2 ranks x 1 thread against 1 x 2
#                     (docs/distributed.md); it takes --iterations=N, not the other arguments
# Extra arguments go to both benchmarks (e.g. --benchmark_repetitions=5).
# Usage: scripts/bench.sh [benchmark args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build-release"
"$root/scripts/install-deps.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSKILLGRAFT_NATIVE=ON \
  -DSKILLGRAFT_BUILD_TESTS=OFF -DSKILLGRAFT_BUILD_BENCHMARKS=ON -DSKILLGRAFT_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)" --target bench_recipes bench_train_step
if cmake --build "$build" --target help | grep -c bench_distributed >/dev/null; then
  cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)" --target bench_distributed
fi
args=("$@")
((${#args[@]})) || args=(--benchmark_repetitions=3 --benchmark_report_aggregates_only=true)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
"$build/bench/bench_recipes" "${args[@]}"
"$build/bench/bench_train_step" "${args[@]}"
if [[ -x "$build/bench/bench_distributed" ]]; then
  mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 "$build/bench/bench_distributed" --iterations=3
fi
