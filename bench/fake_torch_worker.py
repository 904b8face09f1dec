#!/usr/bin/env python3
"""Stands in for `python bench/torch_reference.py --worker PART RECIPE ...` in the CTest of
bench/interleaved.py, where torch is not installed: prints one worker result line.
FAKE_TORCH_MS (default 1000) is the time it reports, FAKE_TORCH_ELEMENTS (default: the
recipe's count under the reference configuration) the elements it claims to train."""
import json
import os
import sys

ELEMENTS = {"llm": 20976128, "mlp": 9437184, "mlp_gate_up": 6291456, "sa_proj": 3145728, "mlp_down": 3145728,
            "frozen": 0}
args = sys.argv[1:]
i = args.index("--worker")
part, recipe = args[i + 1], args[i + 2]
print(json.dumps(dict(part=part, recipe=recipe, ms=float(os.environ.get("FAKE_TORCH_MS", "1000")),
                      trainable_elements=int(os.environ.get("FAKE_TORCH_ELEMENTS", ELEMENTS[recipe])),
                      torch="fake")))
