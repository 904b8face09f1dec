#!/usr/bin/env python3
"""Joins skillgraft's recipe benchmarks with bench/torch_reference.py into one table.

    compare_torch.py RECIPES.json TRAIN_STEP.json TORCH.json

RECIPES.json and TRAIN_STEP.json are Google Benchmark's --benchmark_out (JSON) of
bench_recipes and bench_train_step; TORCH.json is torch_reference.py --json, run in the
same session with the same thread count (scripts/bench.sh does all three). Prints, per
recipe, skillgraft's time over PyTorch's for the trunk (forward + backward) and for the
whole training step, and the memory of both sides. Exits non-zero when a recipe trains a
different number of elements on the two sides (a recipe mapped wrongly to PyTorch), or
when the two sides did not run the same configuration or thread count.

Only the python standard library: it runs with whatever python scripts/bench.sh finds.
"""

import json
import os
import statistics
import sys

ORDER = ["llm", "mlp", "mlp_gate_up", "sa_proj", "mlp_down", "frozen"]


def gbench(path, prefix):
    """{recipe: {"ms": median real time, counters...}} from a Google Benchmark JSON file.
    With repetitions the median aggregate is taken; without, the median of the runs."""
    doc = json.load(open(path))
    runs, medians, fastest = {}, {}, {}
    for b in doc["benchmarks"]:
        name = b.get("run_name", b["name"]).replace("/real_time", "")
        if not name.startswith(prefix):
            continue
        recipe = name[len(prefix):]
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
        row = dict(b, ms=b["real_time"] * scale)
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[recipe] = row
            elif b.get("aggregate_name") == "min":
                fastest[recipe] = row["ms"]
        else:
            runs.setdefault(recipe, []).append(row)
    out = dict(medians)
    for recipe, rs in runs.items():
        fastest.setdefault(recipe, min(r["ms"] for r in rs))
        if recipe not in out:
            ms = statistics.median(r["ms"] for r in rs)
            out[recipe] = dict(rs[-1], ms=ms)
    for recipe, row in out.items():
        row["ms_min"] = fastest.get(recipe)  # None: an older benchmark with aggregates only
    return out, doc.get("context", {})


def main(argv):
    if len(argv) != 4:
        sys.exit(__doc__)
    sg_trunk, ctx = gbench(argv[1], "BM_step/")
    sg_step, _ = gbench(argv[2], "BM_train_step/")
    pt = json.load(open(argv[3]))
    if pt.get("tiny"):
        sys.exit("compare_torch: the PyTorch run used --tiny; skillgraft's benchmarks run the reference configuration")
    sg_threads = os.environ.get("OMP_NUM_THREADS")
    if sg_threads and int(sg_threads) != pt["threads"]:
        sys.exit(f"compare_torch: skillgraft ran with {sg_threads} threads, PyTorch with {pt['threads']}")
    py = {(r["part"], r["recipe"]): r for r in pt["results"]}

    errors = []
    lines = [
        f"skillgraft against PyTorch {pt['results'][0]['torch'] if pt['results'] else '?'} eager "
        f"(transformers, SDPA attention), {pt['threads']} thread{'s' if pt['threads'] != 1 else ''}; ratio = skillgraft time / PyTorch time "
        f"(below 1: skillgraft faster). Load average at the end of the PyTorch run: "
        + ", ".join(f"{x:.2f}" for x in pt.get("load_average", [])),
        "",
        "| recipe | trunk ms skillgraft | trunk ms PyTorch | trunk ratio | step ms skillgraft | step ms PyTorch | "
        "step ratio | ratios of the fastest runs, trunk / step | trunk saved MiB sg / PT | step peak RSS MiB sg / PT | "
        "PT step RSS growth MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in ORDER:
        st, ss, pt_t, pt_s = sg_trunk.get(rec), sg_step.get(rec), py.get(("trunk", rec)), py.get(("step", rec))
        if not any((st, ss, pt_t, pt_s)):
            continue
        # Same trained tensors on both sides: skillgraft's gradient bytes (fp32) and element counts.
        if st and pt_t and round(st["grads_MiB"] * 2**20 / 4) != pt_t["trainable_elements"]:
            errors.append(f"{rec}: the trunk trains {round(st['grads_MiB'] * 2**20 / 4)} elements in skillgraft, "
                          f"{pt_t['trainable_elements']} in PyTorch")
        if ss and pt_s and "trainable_elements" not in ss:
            # A bench_train_step built before it reported the counter: the check cannot be
            # made, and a comparison that skipped it silently would look checked.
            errors.append(f"{rec}: {argv[2]} has no trainable_elements counter (rebuild bench_train_step)")
        elif ss and pt_s and round(ss["trainable_elements"]) != pt_s["trainable_elements"]:
            errors.append(f"{rec}: the step trains {round(ss['trainable_elements'])} elements in skillgraft, "
                          f"{pt_s['trainable_elements']} in PyTorch")
        ms = lambda r: f"{r['ms']:.0f}" if r else "-"
        ratio = lambda a, b: f"{a['ms'] / b['ms']:.2f}" if a and b else "-"
        saved = f"{st['saved_MiB']:.0f} / {pt_t['saved_mib']:.0f}" if st and pt_t else "-"
        rss = f"{ss['rss_peak_MiB']:.0f} / {pt_s['rss_peak_mib']:.0f}" if ss and pt_s else "-"
        growth = f"{pt_s['rss_peak_mib'] - pt_s['rss_setup_mib']:.0f}" if pt_s else "-"
        # Medians first; then the fastest iteration of each side, the least disturbed on a shared machine.
        def fastest(a, b):
            if not (a and b and a.get("ms_min") and b.get("ms_all")):
                return "-"
            return f"{a['ms_min'] / min(b['ms_all']):.2f}"
        lines.append(f"| {rec} | {ms(st)} | {ms(pt_t)} | {ratio(st, pt_t)} | {ms(ss)} | {ms(pt_s)} | {ratio(ss, pt_s)} "
                     f"| {fastest(st, pt_t)} / {fastest(ss, pt_s)} | {saved} | {rss} | {growth} |")
    if pt["results"]:
        base = [r["rss_setup_mib"] for r in pt["results"]]
        lines.append(f"\nPyTorch's resident set after import and model construction: {min(base):.0f}-{max(base):.0f} MiB "
                     f"(part of its peak RSS; 'RSS growth' is the peak above it). skillgraft's peak RSS is the whole "
                     f"process's (VmHWM, reset per recipe). Load average at skillgraft's start: "
                     f"{', '.join(f'{x:.2f}' for x in ctx.get('load_avg', []))}.")
    print("\n".join(lines))
    if errors:
        print("\ncompare_torch: the two sides cannot be shown to train the same tensors:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
