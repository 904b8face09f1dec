#!/usr/bin/env bash
# Creates the Python environment for the PyTorch side-by-side benchmark
# (bench/torch_reference.py, run by scripts/bench.sh): a venv at .venv-bench (or $1)
# with torch and transformers from PyPI, pinned to the versions that generated
# tests/data/*/golden.safetensors so that both sides of the comparison are the ones
# the golden tests were checked against.
#
# PyPI's Linux x86_64 torch wheel is the CUDA build and pulls the NVIDIA runtime
# wheels with it (several GB in all, see docs/performance.md); it runs on the CPU
# without a GPU, and PyPI is the index this project's machines reach, so that is
# the wheel used. Idempotent: an existing venv that imports both is left as it is.
# Usage: scripts/torch-venv.sh [venv-dir]; prints the venv's python on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv-bench}"
torch_version="${SKILLGRAFT_TORCH_VERSION:-2.15.0}"
transformers_version="${SKILLGRAFT_TRANSFORMERS_VERSION:-5.23.0}"

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  # Debian splits venv's pip bootstrap into python3-venv.
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends python3-venv
fi

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  echo "torch-venv: $venv already has torch and transformers" >&2
else
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "torch==$torch_version" "transformers==$transformers_version"
  echo "torch-venv: installed torch $torch_version and transformers $transformers_version into $venv ($(du -sh "$venv" | cut -f1))" >&2
fi
echo "$venv/bin/python"
