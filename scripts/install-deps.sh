#!/usr/bin/env bash
# Installs the Debian packages skillgraft builds against, only those missing.
# Safe to run repeatedly; needs root or sudo on a fresh machine.
set -euo pipefail
packages=(build-essential cmake libeigen3-dev xtensor-dev nlohmann-json3-dev libboost-dev catch2 libbenchmark-dev
  # the CPU backend's GEMM (SKILLGRAFT_BLAS=auto picks it; its OpenMP build shares the backend's threads)
  libopenblas-openmp-dev
  # the safetensors header fuzz test (clang's libFuzzer) and the Conan packaging test (Conan from PyPI)
  clang libclang-rt-14-dev python3-venv python3-pip
  # data-parallel training (include/skillgraft/dist/mpi.hpp) and its 2-rank tests under mpirun
  libopenmpi-dev openmpi-bin)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all dependencies present"
fi
