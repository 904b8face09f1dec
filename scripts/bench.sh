#!/usr/bin/env bash
# The recipe benchmarks behind docs/performance.md: installs what it needs, builds for
# this CPU, and runs, on the reference configuration (hidden 512, 8 heads, 4 KV heads,
# MLP 1536, 4 layers, batch 4, sequence 256):
#   bench_recipes     the trunk's forward+backward per recipe, against this machine's GEMM
#                     rate and the FLOP model, and against `llm`
#   bench_train_step  the whole LM training step (model, masked loss, AdamW) per recipe,
#                     with the ledger's peak bytes and the process's peak resident memory
#   bench_gateskip    GateSkip's token skipping at inference: prefill and generation at skip
#                     budgets 100/90/75/50 %, time against FLOPs saved, the gated model at
#                     100 % and the ungated one (docs/gateskip.md, "Time at the reference size")
#   bench_distributed (where MPI is found; 2 ranks under mpirun) bytes sent per step per recipe
#                     against the plan's gradient bytes, 2 ranks x 1 thread against 1 x 2
#                     (docs/distributed.md); it takes --iterations=N, not the other arguments
#   bench/torch_reference.py  where a python that imports torch and transformers is found
#                     (.venv-bench from scripts/torch-venv.sh first, then python3): the same
#                     trunk and training step in PyTorch eager, and bench/compare_torch.py's
#                     table of skillgraft/PyTorch time ratios and peak memory per recipe
#                     (docs/performance.md, "PyTorch side by side")
#   bench/interleaved.py  with SKILLGRAFT_BENCH_ROUNDS=N (and torch found): N alternating rounds,
#                     each running skillgraft and PyTorch back to back per recipe, the side that
#                     goes first swapped every round; the median of the per-round ratios is the
#                     figure to quote on a machine whose speed drifts (docs/performance.md,
#                     "Alternating rounds"). SKILLGRAFT_BENCH_PARTS: step (default), trunk or both.
# Extra arguments go to the three C++ benchmarks (e.g. --benchmark_repetitions=5);
# SKILLGRAFT_TORCH_ARGS to torch_reference.py (e.g. "--repetitions 7 --recipes llm,sa_proj").
# SKILLGRAFT_BENCH_BUILD (default build-release) and SKILLGRAFT_BENCH_JOBS (default nproc)
# choose the build folder and the parallel build jobs. The JSON results are kept in
# <build>/bench-results/.
# Usage: scripts/bench.sh [benchmark args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${SKILLGRAFT_BENCH_BUILD:-$root/build-release}"
jobs="${SKILLGRAFT_BENCH_JOBS:-$(nproc 2>/dev/null || echo 2)}"
"$root/scripts/install-deps.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSKILLGRAFT_NATIVE=ON \
  -DSKILLGRAFT_BUILD_TESTS=OFF -DSKILLGRAFT_BUILD_BENCHMARKS=ON -DSKILLGRAFT_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j "$jobs" --target bench_recipes bench_train_step bench_gateskip
if cmake --build "$build" --target help | grep -c bench_distributed >/dev/null; then
  cmake --build "$build" -j "$jobs" --target bench_distributed
fi
args=("$@")
((${#args[@]})) || args=(--benchmark_repetitions=3 --benchmark_report_aggregates_only=true)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
results="$build/bench-results"
mkdir -p "$results"
"$build/bench/bench_recipes" "${args[@]}" --benchmark_out="$results/bench_recipes.json" --benchmark_out_format=json
"$build/bench/bench_train_step" "${args[@]}" --benchmark_out="$results/bench_train_step.json" --benchmark_out_format=json
"$build/bench/bench_gateskip" "${args[@]}" --benchmark_out="$results/bench_gateskip.json" --benchmark_out_format=json
torch_python=""
for py in "$root/.venv-bench/bin/python" python3; do
  if command -v "$py" >/dev/null && "$py" -c 'import torch, transformers' 2>/dev/null; then
    torch_python="$py"
    break
  fi
done
if [[ -n "$torch_python" ]]; then
  # Right after skillgraft's runs, with the same thread count, so that the ratios compare
  # like with like on this machine as it is now.
  # shellcheck disable=SC2086  # SKILLGRAFT_TORCH_ARGS is a list of arguments
  "$torch_python" "$root/bench/torch_reference.py" --threads "$OMP_NUM_THREADS" \
    --json "$results/torch_reference.json" ${SKILLGRAFT_TORCH_ARGS:-}
  echo
  "$torch_python" "$root/bench/compare_torch.py" "$results/bench_recipes.json" \
    "$results/bench_train_step.json" "$results/torch_reference.json"
  if [[ -n "${SKILLGRAFT_BENCH_ROUNDS:-}" ]]; then
    echo
    "$torch_python" "$root/bench/interleaved.py" --build "$build" --python "$torch_python" \
      --rounds "$SKILLGRAFT_BENCH_ROUNDS" --parts "${SKILLGRAFT_BENCH_PARTS:-step}" --threads "$OMP_NUM_THREADS" \
      --json "$results/interleaved.json"
  fi
else
  echo "bench.sh: no python here imports torch and transformers; scripts/torch-venv.sh installs them" \
    "(into .venv-bench) for the PyTorch side-by-side table"
fi
if [[ -x "$build/bench/bench_distributed" ]]; then
  mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 "$build/bench/bench_distributed" --iterations=3
fi
