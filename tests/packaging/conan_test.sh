#!/usr/bin/env bash
# Packaging test 3: Conan 2, offline. Creates the skillgraft package from conanfile.py with
# the repository's Debian profile (Eigen, xtensor and Boost are [platform_requires], taken
# from apt), which also builds and runs test_package/ (a find_package consumer); then checks
# that every header is in the package.
#
# Usage: tests/packaging/conan_test.sh <source-dir> <work-dir> [conan create args...]
#   e.g. ... -o 'skillgraft/*:cuda=True'
# Conan: uses `conan` from PATH if it is 2.x, else $SKILLGRAFT_CONAN, else installs it from
# PyPI into <work-dir>/venv (kept between runs) or, failing that, the user site.
# The Conan cache (CONAN_HOME) is <work-dir>/home, deleted first: every run starts clean.
set -euo pipefail
src="$(cd "${1:?source dir}" && pwd)"
work="${2:?work dir}"
shift 2
mkdir -p "$work"
work="$(cd "$work" && pwd)"

say() { echo "[packaging] $*"; }
fail() { echo "[packaging] FAILED: $*" >&2; exit 1; }

is_conan2() { "$1" --version 2>/dev/null | grep -Eq 'Conan version 2\.'; }

conan_bin=""
if [[ -n "${SKILLGRAFT_CONAN:-}" ]] && is_conan2 "$SKILLGRAFT_CONAN"; then
  conan_bin="$SKILLGRAFT_CONAN"
elif command -v conan >/dev/null && is_conan2 conan; then
  conan_bin="$(command -v conan)"
elif [[ -x "$work/venv/bin/conan" ]] && is_conan2 "$work/venv/bin/conan"; then
  conan_bin="$work/venv/bin/conan"
else
  python="$(command -v python3 || true)"
  [[ -n "$python" ]] || fail "Conan 2 is not installed and there is no python3 to install it with"
  say "installing Conan 2 from PyPI into $work/venv"
  if "$python" -m venv "$work/venv" >/dev/null 2>&1 \
     && "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check 'conan>=2.0.9,<3'; then
    conan_bin="$work/venv/bin/conan"
  else
    say "venv failed; installing Conan 2 into the user site"
    rm -rf "$work/venv"
    "$python" -m pip install --quiet --user --disable-pip-version-check 'conan>=2.0.9,<3' \
      || "$python" -m pip install --quiet --user --break-system-packages --disable-pip-version-check 'conan>=2.0.9,<3' \
      || fail "could not install Conan 2 with pip"
    conan_bin="$("$python" -m site --user-base)/bin/conan"
  fi
  is_conan2 "$conan_bin" || fail "no working Conan 2 at $conan_bin"
fi
say "using $("$conan_bin" --version) ($conan_bin)"

export CONAN_HOME="$work/home"
rm -rf "$CONAN_HOME"
"$conan_bin" profile detect >/dev/null 2>&1 || fail "conan profile detect"
# Offline: nothing may come from a remote; dependencies are platform-provided.
"$conan_bin" remote disable conancenter >/dev/null 2>&1 || true

# test_package runs the same program as the other packaging consumers and docs/install.md.
cmp -s "$src/test_package/test_package.cpp" "$src/tests/packaging/consumer/main.cpp" \
  || fail "test_package/test_package.cpp differs from tests/packaging/consumer/main.cpp"

profile="$src/packaging/conan/debian-system"
[[ -f "$profile" ]] || fail "missing $profile"
# Build test_package out of the source tree: a copy in the work dir, passed with -tf.
rm -rf "$work/test_package"
mkdir -p "$work/test_package"
for f in "$src"/test_package/*; do
  [[ "$(basename "$f")" == build ]] || cp -r "$f" "$work/test_package/"
done
log="$work/create.log"
graph="$work/graph.json"
say "conan create $src -pr:h $profile -pr:b default -tf $work/test_package $*"
if ! "$conan_bin" create "$src" -pr:h "$profile" -pr:b default --build=missing -tf "$work/test_package" "$@" \
      --format=json >"$graph" 2>"$log"; then
  cat "$log" >&2
  fail "conan create (package build or test_package) failed; log above"
fi
grep -q "gradient bytes [1-9]" "$log" || { cat "$log" >&2; fail "test_package did not run the consumer"; }

# The created package must hold every header of the source tree.
pkg="$(python3 - "$graph" <<'PY'
import json, sys
nodes = json.load(open(sys.argv[1]))["graph"]["nodes"].values()
print(next(n["package_folder"] for n in nodes if (n.get("ref") or "").startswith("skillgraft/")))
PY
)"
[[ -d "$pkg/include" ]] || fail "package folder $pkg has no include/"
cmake -DSOURCE_DIR="$src" -DWORK_DIR="$work/check" -DINSTALLED_INCLUDE="$pkg/include" \
  -P "$src/tests/packaging/check_headers.cmake" || fail "headers missing from the Conan package"
[[ -f "$pkg/share/cmake/skillgraft/skillgraftConfig.cmake" ]] || fail "no CMake package config in $pkg"
cmp -s "$src/LICENSE" "$pkg/licenses/LICENSE" || fail "the package's licenses/LICENSE is not the repository's LICENSE"
grep -q 'license = "Apache-2.0"' "$src/conanfile.py" || fail "conanfile.py does not declare Apache-2.0"
sed -n '/Testing the package: Executing test/,$p' "$log"
say "Conan create + test_package: PASSED"
