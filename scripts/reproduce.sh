#!/usr/bin/env bash
# The main job: installs what it needs, builds for this CPU, and runs the recipe
# benchmark on the reference configuration (hidden 512, 8 heads, 4 KV heads, MLP 1536,
# 4 layers, batch 4, sequence 256). Prints Google Benchmark's output, then a Markdown
# table of each recipe's step against `llm` and against this machine's GEMM rate.
# Extra arguments go to the benchmark (e.g. --benchmark_repetitions=5).
# Usage: scripts/reproduce.sh [benchmark args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build-release"
"$root/scripts/install-deps.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSKILLGRAFT_NATIVE=ON \
  -DSKILLGRAFT_BUILD_TESTS=OFF -DSKILLGRAFT_BUILD_BENCHMARKS=ON -DSKILLGRAFT_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)" --target bench_recipes
args=("$@")
((${#args[@]})) || args=(--benchmark_repetitions=3 --benchmark_report_aggregates_only=true)
OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" "$build/bench/bench_recipes" "${args[@]}"
