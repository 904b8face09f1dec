#!/usr/bin/env bash
# The main job: reproduces, on a small multimodal model, the learning-vs-forgetting table
# of "How to Teach Large Multimodal Models New Skills". Installs what it needs, builds the
# reproduction for this CPU, pretrains the base model (cached as base.safetensors in the
# output directory, so a rerun skips it), teaches five target skills in sequence with each
# tuning method, and writes report.md, CSV files and SVG pictures.
# The default run (four recipes, three seeds each, 300 steps per stage) takes about 9 to 15 minutes on
# 2 cores, plus about 2 to build (docs/reproduction.md, "Machine and time"); --full runs all ten methods with 1000 steps per stage, closer to
# the paper: about 72 minutes with the default three-seed rate search (68 with the default run's
# base model cached, which --full shares; 2-vCPU Intel Xeon; 76 on a 2-vCPU AMD EPYC), about 49 with --lr-search-seeds 1.
# Extra arguments go to the program (see --help), e.g. --methods sa_proj,mlp_gate_up,llm.
# --gateskip-sweep runs the GateSkip demonstration instead (docs/gateskip.md), on the same cached base model.
# With --device cuda the program is built with its GPU path (SKILLGRAFT_REPRODUCE_CUDA, nvcc
# from the CUDA toolkit; GPU architecture: CUDAARCHS, default the local GPU's, "native").
# Usage: scripts/reproduce.sh [--out DIR] [--full] [--device cpu|cuda] [reproduce options...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build-release"
"$root/scripts/install-deps.sh"
cuda=OFF
prev=""
for a in "$@"; do
  if [[ "$prev" == "--device" && "$a" == "cuda" ]]; then cuda=ON; fi
  prev="$a"
done
# Once on, the build keeps its GPU path (it runs --device cpu too): no rebuild when switching.
cuda_flags=()
if [[ $cuda == ON ]]; then
  cuda_flags+=(-DSKILLGRAFT_REPRODUCE_CUDA=ON -DSKILLGRAFT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDAARCHS:-native}")
fi
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSKILLGRAFT_NATIVE=ON \
  -DSKILLGRAFT_BUILD_TESTS=OFF -DSKILLGRAFT_BUILD_BENCHMARKS=OFF -DSKILLGRAFT_BUILD_EXAMPLES=ON "${cuda_flags[@]}" >/dev/null
cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)" --target reproduce
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 2)}"
exec "$build/examples/reproduce/reproduce" "$@"
