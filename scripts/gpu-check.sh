#!/usr/bin/env bash
# The GPU session's prepared checks (docs/gpu.md, "Measuring on a GPU"), in two steps, because
# the lent GPU machine has nvcc but none of the Debian packages and cannot fetch any:
#
#   scripts/gpu-check.sh build [arch]   here: builds the CUDA programs for `arch` (default 90,
#                                       the H200) and packs them, stripped, with the Debian
#                                       libraries they link, into gpu-check-bin/programs.tgz
#                                       (git-ignored, ~26 MiB; `package` alone repacks)
#   scripts/gpu-check.sh run            there (device tool: carry ["gpu-check-bin"]): runs each
#                                       check under its own time limit, output in $OUT
#
# The checks, in order:
#   test_cuda_device        every layer, model and continual-learning method against the CPU
#   bench_cuda_train_step   step time, TFLOP/s against cuBLAS, device memory per recipe
#   torch_cuda              PyTorch eager's step on the same GPU (bench/torch_reference.py)
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
    "$0" package
    ;;
  package)
    # Stripped programs and the Debian libraries they link (OpenBLAS with its Fortran runtime,
    # OpenMP): the GPU machine's image has CUDA's libraries but not these. Compressed, since
    # what travels to the device machine is limited to 64 MiB (OpenBLAS alone is 36 MiB).
    set -e
    build="$root/build-gpu-check"
    stage="$(mktemp -d)"
    for p in tests/cuda/test_cuda_device bench/cuda/bench_cuda_train_step examples/reproduce/reproduce; do
      strip -o "$stage/$(basename "$p")" "$build/$p"
    done
    ldd "$stage"/* | awk '/=> \// && !/cuda|cublas|libc\.so|libm\.so|libstdc|libgcc_s|librt|libpthread|libdl|ld-linux/ {print $3}' |
      sort -u | xargs -r -I{} cp -L {} "$stage/"
    rm -rf "$bin" && mkdir -p "$bin"
    tar czf "$bin/programs.tgz" -C "$stage" .
    rm -rf "$stage"
    tar tzf "$bin/programs.tgz" | sed 's|^\./||' | grep -v '^$' | tr '\n' ' '
    du -sh "$bin"
    ;;
  run)
    out="${OUT:-$root/gpu-check-out}"
    mkdir -p "$out"
    packed="$bin"
    bin="$(mktemp -d)"
    tar xzf "$packed/programs.tgz" -C "$bin"
    # CUDA's libraries: the machine's toolkit, else the ones PyTorch's wheels carry.
    cuda_libs="/usr/local/cuda/lib64:$(python3 -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/*/lib/lib*.so*")})))' 2>/dev/null)"
    export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:$cuda_libs"
    { nvidia-smi; ldd --version | head -1; python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; ldd "$bin/test_cuda_device" "$bin/reproduce"; nproc; } > "$out/env.log" 2>&1
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
    check test_cuda_device 120 "$bin/test_cuda_device" --durations yes
    check bench_cuda_train_step 60 "$bin/bench_cuda_train_step" --steps 50 --warmup 5
    check bench_cuda_train_step_tf32 40 "$bin/bench_cuda_train_step" --steps 50 --warmup 5 --tf32
    # PyTorch eager on the same GPU, model and recipes: the peer the step time is a ratio to.
    check torch_cuda 120 python3 "$root/bench/torch_reference.py" --device cuda --parts step \
      --recipes llm,mlp,mlp_gate_up,sa_proj,mlp_down --repetitions 20 --warmup 5
    # At most 8 files come back: the run's report alone, not its directory.
    check reproduce 200 "$bin/reproduce" --device cuda --out /tmp/reproduce-cuda --seeds 1 --quiet \
      --methods llm,mlp,mlp_gate_up,sa_proj,vision_projector,full,lwf,wise_ft,lora,moe \
      --vision-pretrain-steps 200 --pretrain-steps 200 --stage-steps 40 --jobs 8
    cp /tmp/reproduce-cuda/report.md "$out/reproduce-report.md" 2>/dev/null
    exit "$failed"
    ;;
  *)
    echo "usage: scripts/gpu-check.sh build [arch] | package | run" >&2
    exit 2
    ;;
esac
