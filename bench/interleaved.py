#!/usr/bin/env python3
"""skillgraft against PyTorch in alternating rounds, for a machine whose speed drifts.

    interleaved.py --build build-release --python .venv-bench/bin/python [--rounds 5]
                   [--bench-dir DIR]  (the folder of bench_recipes and bench_train_step; default BUILD/bench)
                   [--recipes llm,sa_proj] [--parts step,trunk] [--threads 2] [--json out.json]

scripts/bench.sh runs all of skillgraft's benchmarks and then all of PyTorch's: on a shared
virtual machine whose speed changes by 20-50 % over minutes (docs/performance.md measured the
same step at 345 and 667 ms a few minutes apart), one side can get the fast minutes and the
other the slow ones. Here each round runs, for every (part, recipe), one skillgraft process
(bench_recipes for the trunk, bench_train_step for the step, filtered to that recipe) and one
PyTorch process (torch_reference.py's worker) back to back, the side that goes first swapped
every round, so that a slow minute lands on both sides of the same pair. Each pair gives a
ratio; the table reports the median of the per-round ratios, their range, and the ratio of
each side's fastest time over all rounds.

  skillgraft: the benchmark's untimed first step, then --sg-min-time seconds of steps (mean).
  PyTorch:    --pt-warmup untimed iterations, then the median of --pt-repetitions.

Exits non-zero when a step trains a different number of elements on the two sides.
Only the python standard library; the PyTorch side runs under --python.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from compare_torch import gbench
from torch_reference import RECIPES, recipes_and_parts  # names only: it imports torch inside its functions

HERE = os.path.dirname(os.path.abspath(__file__))
BINARY = {"trunk": ("bench_recipes", "BM_step/"), "step": ("bench_train_step", "BM_train_step/")}


def run_skillgraft(bench_dir, part, recipe, min_time, env):
    binary, prefix = BINARY[part]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        cmd = [os.path.join(bench_dir, binary), f"--benchmark_filter=^{prefix}{recipe}/",
               f"--benchmark_min_time={min_time}", f"--benchmark_out={path}", "--benchmark_out_format=json"]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        runs, _ = gbench(path, prefix)
    if list(runs) != [recipe]:
        raise SystemExit(f"interleaved: {binary} ran {sorted(runs)} for {recipe}")
    return dict(ms=runs[recipe]["ms"], trainable_elements=runs[recipe].get("trainable_elements"))


def run_torch(python, part, recipe, threads, warmup, reps, env):
    cmd = [python, os.path.join(HERE, "torch_reference.py"), "--worker", part, recipe, "--threads", str(threads),
           "--repetitions", str(reps), "--warmup", str(warmup)]
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    try:
        r = json.loads(out.splitlines()[-1])
        ms, n, version = float(r["ms"]), r["trainable_elements"], r["torch"]
    except (IndexError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"interleaved: the PyTorch worker for {part} {recipe} printed no result line "
                         f"({type(e).__name__}: {e}); its output: {out[-500:]!r}")
    if not ms > 0:
        raise SystemExit(f"interleaved: the PyTorch worker for {part} {recipe} reported {ms} ms")
    return dict(ms=ms, trainable_elements=n, torch=version)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(HERE, "..", "build-release"))
    ap.add_argument("--bench-dir", help="the folder of the bench programs (default: BUILD/bench); a multi-config "
                    "build keeps them in a folder per configuration")
    ap.add_argument("--python", default=os.path.join(HERE, "..", ".venv-bench", "bin", "python"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--parts", default="step")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--sg-min-time", type=float, default=1.0)
    ap.add_argument("--pt-warmup", type=int, default=1)
    ap.add_argument("--pt-repetitions", type=int, default=3)
    ap.add_argument("--goal", type=float, default=1.5, help="the speed-up asked of skillgraft (default 1.5)")
    ap.add_argument("--json")
    a = ap.parse_args()
    recipes, parts = recipes_and_parts(ap, a.recipes, a.parts)
    if a.rounds < 1 or a.threads < 1 or a.pt_repetitions < 1:
        ap.error("--rounds, --threads and --pt-repetitions must be at least 1")
    bench_dir = a.bench_dir or os.path.join(a.build, "bench")
    for part in parts:
        path = os.path.join(bench_dir, BINARY[part][0])
        if not os.access(path, os.X_OK):
            ap.error(f"{path} is not built (scripts/bench.sh builds it)")

    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    rows, torch_version, errors = [], "?", []
    start = time.time()
    for rnd in range(a.rounds):
        for part in parts:
            for rec in recipes:
                sides = ["skillgraft", "pytorch"] if rnd % 2 == 0 else ["pytorch", "skillgraft"]
                got = {}
                for side in sides:
                    got[side] = (run_skillgraft(bench_dir, part, rec, a.sg_min_time, env) if side == "skillgraft" else
                                 run_torch(a.python, part, rec, a.threads, a.pt_warmup, a.pt_repetitions, env))
                torch_version = got["pytorch"]["torch"]
                sg_n, pt_n = got["skillgraft"]["trainable_elements"], got["pytorch"]["trainable_elements"]
                if part == "step" and (sg_n is None or round(sg_n) != pt_n):
                    msg = (f"{rec}: the step trains {'?' if sg_n is None else round(sg_n)} elements in "
                           f"skillgraft, {pt_n} in PyTorch")
                    if msg not in errors:  # the same every round: said once
                        errors.append(msg)
                row = dict(round=rnd + 1, part=part, recipe=rec, first=sides[0], sg_ms=got["skillgraft"]["ms"],
                           pt_ms=got["pytorch"]["ms"], load_average=os.getloadavg()[0])
                rows.append(row)
                print(f"interleaved: round {rnd + 1} {part:5s} {rec:12s} skillgraft {row['sg_ms']:7.1f} ms  "
                      f"PyTorch {row['pt_ms']:7.1f} ms  ratio {row['sg_ms'] / row['pt_ms']:.2f}", file=sys.stderr, flush=True)

    lines = [f"skillgraft against PyTorch {torch_version} eager, {a.threads} thread{'s' if a.threads != 1 else ''}, "
             f"{a.rounds} alternating rounds ({time.time() - start:.0f} s); ratio = skillgraft time / PyTorch time "
             f"(below 1: skillgraft faster; the goal of {a.goal}x is a ratio of {1 / a.goal:.3f} or less)", "",
             "| part | recipe | skillgraft ms, median | PyTorch ms, median | ratio, median of rounds | ratio range | "
             "fastest / fastest | rounds meeting the goal |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for part in parts:
        for rec in recipes:
            rs = [r for r in rows if r["part"] == part and r["recipe"] == rec]
            ratios = [r["sg_ms"] / r["pt_ms"] for r in rs]
            sg, pt = [r["sg_ms"] for r in rs], [r["pt_ms"] for r in rs]
            met = sum(x <= 1 / a.goal for x in ratios)
            lines.append(f"| {part} | {rec} | {statistics.median(sg):.0f} | {statistics.median(pt):.0f} | "
                         f"{statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} | "
                         f"{min(sg) / min(pt):.2f} | {met} of {len(rs)} |")
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(threads=a.threads, rounds=a.rounds, torch=torch_version, rows=rows), f, indent=1)
    if errors:
        print("\ninterleaved: the two sides do not train the same tensors:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
