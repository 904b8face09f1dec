#!/usr/bin/env bash
# Packaging tests without a configured build tree: install skillgraft with CMake, through the
# vcpkg overlay port (portfile run under a shim of vcpkg's helpers) and with Conan 2 (offline,
# Debian-provided dependencies), each into a fresh prefix, then build and run a separate
# consumer project against it. The same drivers run as CTests (label `packaging`).
#
# Usage: scripts/test-packaging.sh [what...] [--work DIR]
#   what: cmake | cmake-cuda | vcpkg | vcpkg-cuda | conan | conan-cuda | all (default)
#         `all` = cmake vcpkg conan, plus cmake-cuda when nvcc is found.
#   --work DIR: scratch directory (default: build-packaging/ in the repository; ignored by git)
# Needs the Debian dependencies (scripts/install-deps.sh); conan* installs Conan 2 from PyPI
# into DIR/conan/venv when no Conan 2 is on PATH. The *-cuda variants need nvcc, not a GPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$root/build-packaging"
what=()
while (($#)); do
  case "$1" in
    --work) work="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) what+=("$1"); shift ;;
  esac
done
((${#what[@]})) || what=(all)
have_nvcc() { command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; }
if [[ " ${what[*]} " == *" all "* ]]; then
  what=(cmake vcpkg conan)
  if have_nvcc; then what+=(cmake-cuda); else echo "[packaging] nvcc not found: skipping cmake-cuda"; fi
fi
if have_nvcc && ! command -v nvcc >/dev/null; then export PATH="/usr/local/cuda/bin:$PATH"; fi
mkdir -p "$work"
gen=()
command -v ninja >/dev/null && gen=(-DGENERATOR=Ninja)

failed=()
for w in "${what[@]}"; do
  echo "=== packaging: $w ==="
  start=$SECONDS
  case "$w" in
    cmake)      cmd=(cmake "${gen[@]}" -DSOURCE_DIR="$root" -DWORK_DIR="$work/cmake" -P "$root/tests/packaging/cmake_install_test.cmake") ;;
    cmake-cuda) cmd=(cmake "${gen[@]}" -DSOURCE_DIR="$root" -DWORK_DIR="$work/cmake-cuda" -DCUDA=ON -P "$root/tests/packaging/cmake_install_test.cmake") ;;
    vcpkg)      cmd=(cmake "${gen[@]}" -DSOURCE_DIR="$root" -DWORK_DIR="$work/vcpkg" -P "$root/tests/packaging/vcpkg_port_test.cmake") ;;
    vcpkg-cuda) cmd=(cmake "${gen[@]}" -DSOURCE_DIR="$root" -DWORK_DIR="$work/vcpkg-cuda" -DVCPKG_FEATURES=cuda -P "$root/tests/packaging/vcpkg_port_test.cmake") ;;
    conan)      cmd=(bash "$root/tests/packaging/conan_test.sh" "$root" "$work/conan") ;;
    conan-cuda) cmd=(bash "$root/tests/packaging/conan_test.sh" "$root" "$work/conan" -o 'skillgraft/*:cuda=True') ;;
    *) echo "unknown test '$w' (cmake, cmake-cuda, vcpkg, vcpkg-cuda, conan, conan-cuda, all)" >&2; exit 2 ;;
  esac
  if "${cmd[@]}"; then
    echo "=== packaging: $w passed ($((SECONDS - start)) s) ==="
  else
    echo "=== packaging: $w FAILED ($((SECONDS - start)) s) ===" >&2
    failed+=("$w")
  fi
done
if ((${#failed[@]})); then
  echo "packaging tests failed: ${failed[*]}" >&2
  exit 1
fi
echo "packaging tests passed: ${what[*]}"
