#!/usr/bin/env python3
"""Several reproduction runs (one per base model) side by side, as docs/reproduction.md's tables.

    scripts/compare_runs.py DIR [DIR ...] [--baseline llm]
    scripts/compare_runs.py DIR [DIR ...] --recovery

Each DIR is a `reproduce --out` directory (its summary.csv: one row per method and fine-tuning
seed). Per run and method: learning / held-out Δ (mean over stages), each the mean over the
fine-tuning seeds ± the half-width of its 95 % Student-t interval, as report.md gives them, and
whether the forgetting interval lies apart from the baseline's. Over the runs: each method's
forgetting and learning as a fraction of the baseline's (ratio of the seed means, per run), their
mean over the runs ± the 95 % t half-width over the runs, and the range.

With --recovery, the recovery phenomenon instead, from each run's accuracy_<method>[_seedN].csv:
per run and method, the change of the mean held-out accuracy made by the counting stage and by
the stage after it, each taken per fine-tuning seed and then averaged (± 95 %), marked ↑ where
the next stage's interval lies above zero (a recovery): the first two columns of report.md's
recovery table, for runs made before it was added. Standard library only.
"""
import argparse
import csv
import math
import re
import statistics
import sys
from pathlib import Path

# Two-sided 95 % Student-t quantiles t_{0.975, df}.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


def t975(df):
    if df in T975:
        return T975[df]
    if df > 30:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]  # conservative between tabulated values


def interval(values):
    """Mean and 95 % half-width (0 for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def read_run(directory):
    path = Path(directory) / "summary.csv"
    if not path.is_file():
        sys.exit(f"compare_runs: {path} does not exist (is {directory} a reproduce --out directory?)")
    rows = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"method", "learning", "heldout_delta_mean", "lr"} - set(reader.fieldnames or [])
        if missing:
            sys.exit(f"compare_runs: {path} lacks the column(s) {', '.join(sorted(missing))}")
        for r in reader:
            m = rows.setdefault(r["method"], {"learning": [], "forgetting": [], "lr": set()})
            m["learning"].append(float(r["learning"]))
            m["forgetting"].append(float(r["heldout_delta_mean"]))
            m["lr"].add(f"{float(r['lr']):g}")
    return rows


def fmt(mean, half):
    return f"{mean:+.1f} ± {half:.1f}".replace("-", "−")


def heldout_curves(directory, method):
    """Per fine-tuning seed of `method`: the trained task of each stage and the mean held-out
    accuracy (%) after each stage (row 0: the base model). The held-out tasks are the columns
    no stage trains."""
    curves = []
    for path in sorted(Path(directory).glob(f"accuracy_{method}*.csv")):
        if not re.fullmatch(rf"accuracy_{re.escape(method)}(_seed\d+)?\.csv", path.name):
            continue  # accuracy_mlp_gate_up.csv is not one of mlp's
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "trained" not in rows[0]:
            sys.exit(f"compare_runs: {path} is not an accuracy matrix (no 'trained' column)")
        trained = [r["trained"] for r in rows[1:]]
        held = [c for c in rows[0] if c not in ("stage", "trained") and c not in trained]
        if not held:
            sys.exit(f"compare_runs: {path} has no held-out task")
        curves.append((trained, [100 * statistics.fmean(float(r[c]) for c in held) for r in rows]))
    return curves


def recovery(run_dirs, runs):
    methods = [m for m in runs[0] if all(m in r for r in runs)]
    nexts, lines = set(), []  # printed once every run has been read, so an error leaves no half table
    for m in methods:
        cells = []
        for d in run_dirs:
            curves = heldout_curves(d, m)
            if not curves:
                sys.exit(f"compare_runs: {d} has no accuracy_{m}*.csv")
            trained = curves[0][0]
            if "count" not in trained or trained[-1] == "count":
                sys.exit(f"compare_runs: {d}: no counting stage followed by another")
            c = trained.index("count") + 1  # the curve's row right after counting
            nexts.add(trained[c])
            drop = interval([h[c] - h[c - 1] for _, h in curves])
            back = interval([h[c + 1] - h[c] for _, h in curves])
            n = len(curves)
            mark = " ↑" if n > 1 and back[0] - back[1] > 0 else " ↓" if n > 1 and back[0] + back[1] < 0 else ""
            cells.append(f"{fmt(*drop)} / {fmt(*back)}{mark}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    print("| method | " + " | ".join(Path(d).name for d in run_dirs) + " |")
    print("|---" * (len(run_dirs) + 1) + "|")
    print("\n".join(lines))
    print()
    print("Each cell: the change of the mean held-out accuracy (points) made by the counting stage / by the stage "
          f"after it ({', '.join(sorted(nexts))}), each per fine-tuning seed, then the mean ± 95 % half-width; "
          "↑: the second lies above zero (a recovery), ↓: below.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="reproduce --out directories, one per base model")
    ap.add_argument("--baseline", default="llm", help="the method the ratios divide by (default llm)")
    ap.add_argument("--recovery", action="store_true",
                    help="the held-out change made by the counting stage and by the next stage, per run and method")
    a = ap.parse_args()
    runs = [read_run(d) for d in a.runs]
    if a.recovery:
        recovery(a.runs, runs)
        return
    for d, r in zip(a.runs, runs):
        if a.baseline not in r:
            sys.exit(f"compare_runs: {d} has no '{a.baseline}' rows")
    methods = [m for m in runs[0] if all(m in r for r in runs)]
    # The baseline's (learning mean, forgetting mean, forgetting half-width) per run, computed once.
    base = [(interval(r[a.baseline]["learning"])[0], *interval(r[a.baseline]["forgetting"])) for r in runs]

    head = "| method | " + " | ".join(Path(d).name for d in a.runs) + " | forgetting vs " + a.baseline + \
        ", mean over runs ± 95 % (range) | learning vs " + a.baseline + " (range) |"
    print(head)
    print("|---" * (len(a.runs) + 1) + "|---:|---:|")
    for m in methods:
        cells, f_ratio, l_ratio = [], [], []
        for r, (bl, bm, bh) in zip(runs, base):
            lm, lh = interval(r[m]["learning"])
            fm, fh = interval(r[m]["forgetting"])
            mark = ""
            if m != a.baseline:
                if fm - fh > bm + bh:
                    mark = " ◆"  # apart, forgetting less (held-out Δ is negative)
                elif fm + fh < bm - bh:
                    mark = " (more)"
                f_ratio.append(fm / bm)
                l_ratio.append(lm / bl)
            cells.append(f"{fmt(lm, lh)} / {fmt(fm, fh)}{mark} ({'/'.join(sorted(r[m]['lr']))})")
        if m == a.baseline:
            ratios = "1 | 1"
        else:
            fr, frh = interval(f_ratio)
            lr_, _ = interval(l_ratio)
            ratios = (f"{fr:.2f} ± {frh:.2f} ({min(f_ratio):.2f}–{max(f_ratio):.2f}) | "
                      f"{lr_:.2f} ({min(l_ratio):.2f}–{max(l_ratio):.2f})")
        print(f"| {m} | " + " | ".join(cells) + f" | {ratios} |")
    print()
    print("Each cell: learning / held-out Δ (mean over stages), means over the fine-tuning seeds ± 95 % "
          "half-width, then the rate; ◆: forgetting interval apart from " + a.baseline +
          "'s, forgetting less; (more): apart, forgetting more.")


if __name__ == "__main__":
    main()
