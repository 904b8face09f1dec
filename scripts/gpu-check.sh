#!/usr/bin/env bash
# The GPU session's prepared checks (docs/gpu.md, "Measuring on a GPU"), in two steps, because
# the lent GPU machine has nvcc but none of the Debian packages and cannot fetch any:
#
#   scripts/gpu-check.sh build [arch]   here: builds the CUDA programs for `arch` (default 90,
#                                       the H200) and copies them, with the OpenMP runtime they
#                                       link, into gpu-check-bin/ (git-ignored, ~40 MiB)
#   scripts/gpu-check.sh run            there (device tool: carry ["gpu-check-bin"]): runs each
#                                       check under its own time limit, output in $OUT
#
# The checks, in order:
#   test_cuda_device        every layer, model and continual-learning method against the CPU
#   bench_cuda_train_step   step time, TFLOP/s against cuBLAS, device memory per recipe
#   reproduce               a reduced --device cuda run of all ten methods (report.md in $OUT)
# A failing check does not stop the others; `run` exits with the number that failed and
# prints one summary line per check.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/gpu-check-bin"

case "${1:-}" in
  build)
    set -e
    arch="${2:-90}"
    build="$root/build-gpu-check"
    "$root/scripts/install-deps.sh"
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSKILLGRAFT_CUDA=ON \
      -DSKILLGRAFT_CUDA_ARCHITECTURES="$arch" -DSKILLGRAFT_REPRODUCE_CUDA=ON -DSKILLGRAFT_FUZZ=OFF \
      -DSKILLGRAFT_BUILD_TESTS=ON -DSKILLGRAFT_BUILD_BENCHMARKS=ON -DSKILLGRAFT_BUILD_EXAMPLES=ON >/dev/null
    cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)" --target test_cuda_device bench_cuda_train_step reproduce
    rm -rf "$bin" && mkdir -p "$bin"
    cp "$build/tests/cuda/test_cuda_device" "$build/bench/cuda/bench_cuda_train_step" \
      "$build/examples/reproduce/reproduce" "$bin/"
    # The OpenMP runtime is Debian's (the GPU machine's image need not have it); CUDA's
    # libraries are the machine's own.
    cp "$(ldd "$bin/reproduce" | awk '/libgomp/ {print $3}')" "$bin/"
    du -sh "$bin"
    ;;
  run)
    out="${OUT:-$root/gpu-check-out}"
    mkdir -p "$out"
    export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi > "$out/nvidia-smi.log" 2>&1
    failed=0
    check() {  # check <name> <seconds> <command...>
      local name="$1" limit="$2"
      shift 2
      local t0=$SECONDS rc
      timeout "$limit" "$@" > "$out/$name.log" 2>&1
      rc=$?
      echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/summary.log"
      ((rc == 0)) || failed=$((failed + 1))
    }
    check test_cuda_device 180 "$bin/test_cuda_device"
    check bench_cuda_train_step 180 "$bin/bench_cuda_train_step" --benchmark_repetitions=3 \
      --benchmark_report_aggregates_only=true
    check reproduce 180 "$bin/reproduce" --device cuda --out "$out/reproduce" --pretrain-steps 200 --stage-steps 40
    exit "$failed"
    ;;
  *)
    echo "usage: scripts/gpu-check.sh build [arch] | run" >&2
    exit 2
    ;;
esac
