#!/usr/bin/env python3
"""PyTorch eager + Hugging Face transformers doing what skillgraft's recipe benchmarks do.

The counterpart of bench/bench_recipes.cpp and bench/bench_train_step.cpp, for the
side-by-side table that scripts/bench.sh prints (bench/compare_torch.py joins the two):

  trunk  a stack of transformers LlamaDecoderLayer (SDPA attention, causal, rotary
         embeddings from LlamaRotaryEmbedding), input x ~ N(0, 1) of [batch, seq, hidden];
         forward, then backward of L = |y|^2 / 2 (upstream gradient dL/dy = y), which is
         what bench_recipes times.
  step   LlamaForCausalLM (vocabulary 8192, untied head, SDPA), labels on the second half
         of each sequence (the same targets as bench/reference_lm.hpp), loss.backward(),
         clip_grad_norm_(1.0), AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay:
         skillgraft's defaults) over the recipe's tensors, zero_grad(set_to_none=True);
         what bench_train_step times. The model is called the way a transformers user calls
         it (model(input_ids, labels=...)), so its head produces logits for every position,
         where skillgraft's fused loss multiplies only the rows that have a target.

Under each recipe only the recipe's tensors have requires_grad (the names and sets of
include/skillgraft/policy/recipes.hpp). Under `frozen` nothing trains, PyTorch cannot call
backward() and there is no optimizer: both parts time the forward (the step: forward and
loss), which is also all skillgraft does there.

Each (part, recipe) runs in a fresh Python process, so its peak resident set
(getrusage ru_maxrss) is its own; the process's resident set after imports and model
construction is reported too, since an imported torch accounts for a large part of it.
PyTorch keeps no counter of its CPU allocations, so tensor bytes are counted directly:
gradients and AdamW state (after a step) and the activations autograd saves for backward
(saved_tensors_hooks on one extra, untimed forward; parameters not counted).

Times: `--warmup` untimed iterations, then the median of `--repetitions` timed ones.

`--device cuda` runs the same model on the GPU (the counterpart of
bench/cuda/bench_cuda_train_step.cu): weights are drawn on the CPU from the same generator and
moved, each timed iteration ends with torch.cuda.synchronize(), fp32 matrix products stay
fp32 (PyTorch's default: TF32 off for matmul) unless `--tf32`, and the device's peak allocated
bytes over the timed iterations (torch.cuda.max_memory_allocated) are reported beside the
resident set.

  .venv-bench/bin/python bench/torch_reference.py --threads 2 --json torch.json
  .venv-bench/bin/python bench/torch_reference.py --tiny        # a quick run, ~2 min
  python3 bench/torch_reference.py --device cuda --parts step   # on a GPU machine
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

RECIPES = ["llm", "mlp", "mlp_gate_up", "sa_proj", "mlp_down", "frozen"]
# The decoder-block projections each recipe trains (include/skillgraft/policy/recipes.hpp);
# `llm` trains every parameter of the language model instead (see trains()).
RECIPE_PROJECTIONS = {
    "mlp": {"gate_proj", "up_proj", "down_proj"},
    "mlp_gate_up": {"gate_proj", "up_proj"},
    "sa_proj": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mlp_down": {"down_proj"},
    "frozen": set(),
}
PARTS = ["trunk", "step"]

# The reference configuration of docs/performance.md; --tiny shrinks every size.
REFERENCE = dict(hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1536, layers=4,
                 batch=4, seq=256, vocab=8192)
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=2,
            batch=2, seq=32, vocab=256)


def trains(recipe, name):
    """Whether `recipe` trains the parameter called `name` (a Hugging Face name)."""
    if recipe == "llm":
        return True
    return any(f".{p}." in name for p in RECIPE_PROJECTIONS[recipe])


def expected_trainable(recipe, c, part):
    """Trainable element count written out from the recipe's definition, independently of
    the module tree: a second way to the number, so a mapping error in trains() shows."""
    h, q, kv, m, L = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"], c["intermediate"], c["layers"]
    sizes = {"q_proj": h * q, "k_proj": h * kv, "v_proj": h * kv, "o_proj": q * h,
             "gate_proj": h * m, "up_proj": h * m, "down_proj": m * h}
    if recipe == "llm":
        per_layer = sum(sizes.values()) + 2 * h          # + input and post-attention norms
        extra = (2 * c["vocab"] * h + h) if part == "step" else 0   # embed, lm_head, final norm
        return L * per_layer + extra
    return L * sum(sizes[p] for p in RECIPE_PROJECTIONS[recipe])


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


# ----------------------------------------------------------------------------- worker


def worker(part, recipe, c, threads, warmup, reps, seed=1, keep_model=False, device="cpu", tf32=False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    rss_import = rss_mib()
    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                      num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], max_position_embeddings=2048,
                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
                      mlp_bias=False, hidden_act="silu", attention_dropout=0.0, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(seed)
    B, S = c["batch"], c["seq"]

    if part == "trunk":
        model = torch.nn.ModuleList([LlamaDecoderLayer(cfg, layer_idx=i) for i in range(c["layers"])])
        rotary = LlamaRotaryEmbedding(cfg)
    else:
        model = LlamaForCausalLM(cfg)
        assert model.lm_head.weight is not model.model.embed_tokens.weight, "the head must be untied"
        assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    # bench_recipes / reference_lm.hpp: projections and embeddings N(0, 0.02), norms 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    model.to(device)
    if part == "trunk":
        rotary.to(device)
    model.train()
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains(recipe, name))
        if p.requires_grad:
            params.append(p)
    trainable = sum(p.numel() for p in params)
    expected = expected_trainable(recipe, c, part)
    if trainable != expected:
        raise SystemExit(f"torch_reference: {part}/{recipe} trains {trainable} elements, "
                         f"the recipe's definition gives {expected}")

    positions = torch.arange(S).unsqueeze(0).expand(B, S).to(device)
    if part == "trunk":
        x = torch.randn(B, S, c["hidden"], generator=g).to(device)

        def forward(inp):
            h = inp
            cos_sin = rotary(h, positions)
            for layer in model:
                h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
                if isinstance(h, tuple):   # older transformers return (hidden_states, ...)
                    h = h[0]
            return h

        def iteration():
            for p in params:
                p.grad = None
            y = forward(x)
            if params:
                y.backward(y.detach())     # dL/dy = y, L = |y|^2 / 2
            return y

        def saved_forward():
            return forward(x)
    else:
        ids = torch.randint(0, c["vocab"], (B, S), generator=g)
        labels = ids.clone()
        # reference_lm.hpp: targets at positions S/2 .. S-2 (target t = token t + 1); Hugging
        # Face labels are shifted inside the model, so label j is the target of position j - 1.
        labels[:, : S // 2 + 1] = -100
        ids, labels = ids.to(device), labels.to(device)
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0) if params else None

        def iteration():
            out = model(input_ids=ids, labels=labels, use_cache=False)
            if opt is not None:
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return out.loss.detach()

        def saved_forward():
            return model(input_ids=ids, labels=labels, use_cache=False).loss

    rss_setup = rss_mib()
    if keep_model:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = float(iteration())
        return dict(trainable_elements=trainable, loss=loss, model=model, before=before)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        iteration()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        iteration()
        sync()
        times.append(time.perf_counter() - t0)
    rss_peak = rss_mib()
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None

    # Bytes autograd keeps for backward: unique storages of saved tensors, parameters excluded
    # (they are weights, not activations). Measured after the timing, so it cannot affect it.
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_storages:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = saved_forward()
    del out
    # The trunk runs no optimizer (as in bench_recipes): its AdamW column stays empty.
    adamw = None
    if part == "step":
        adamw = sum(t.numel() * t.element_size() for st in opt.state.values()
                    for k, t in st.items() if torch.is_tensor(t) and k != "step") if opt else 0
    return dict(part=part, recipe=recipe, ms=1e3 * statistics.median(times), ms_all=[1e3 * t for t in times],
                trainable_elements=trainable, saved_mib=sum(saved.values()) / 2**20, grads_mib=trainable * 4 / 2**20,
                adamw_mib=None if adamw is None else adamw / 2**20,
                rss_import_mib=rss_import, rss_setup_mib=rss_setup, rss_peak_mib=rss_peak,
                device=device, tf32=tf32, device_peak_mib=device_peak,
                gpu=torch.cuda.get_device_name() if device == "cuda" else None,
                torch=torch.__version__, threads=torch.get_num_threads())


def causality_check(c):
    """The trunk is called without a mask and relies on SDPA's causal default: changing the
    last position must leave every earlier output unchanged. Cheap insurance against a
    transformers version whose default differs (the comparison would then time a
    bidirectional stack)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                      num_hidden_layers=1, num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                      head_dim=c["head_dim"], attn_implementation="sdpa")
    layer, rotary = LlamaDecoderLayer(cfg, layer_idx=0), LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, 8, c["hidden"])
    pos = torch.arange(8).unsqueeze(0)

    def run(inp):
        with torch.no_grad():
            y = layer(inp, attention_mask=None, position_ids=pos, position_embeddings=rotary(inp, pos))
        return y[0] if isinstance(y, tuple) else y

    x2 = x.clone()
    x2[:, -1] += 1.0
    y, y2 = run(x), run(x2)
    if not torch.equal(y[:, :-1], y2[:, :-1]) or torch.equal(y[:, -1], y2[:, -1]):
        raise SystemExit("torch_reference: the decoder layer without a mask is not causal in this "
                         "transformers version; the trunk would not match bench_recipes")


def training_check(c, threads):
    """One training step per recipe, in this process, on the given configuration: the
    recipe's tensors get a gradient and change, every other tensor has no gradient and
    keeps its value bit for bit, the loss is finite. With causality_check and the element
    counts checked in worker(), it is what `--check` (a CTest test) runs."""
    import torch
    torch.set_num_threads(threads)
    for recipe in RECIPES:
        res = worker("step", recipe, c, threads, warmup=0, reps=0, keep_model=True)
        model, before = res.pop("model"), res.pop("before")
        for name, p in model.named_parameters():
            changed = not torch.equal(p.detach(), before[name])
            if changed != trains(recipe, name):
                raise SystemExit(f"torch_reference: under {recipe}, {name} "
                                 f"{'changed' if changed else 'did not change'} after a step")
            if p.grad is not None:
                raise SystemExit(f"torch_reference: under {recipe}, {name} kept a gradient after zero_grad")
        if not res["loss"] == res["loss"] or res["loss"] in (float("inf"), float("-inf")):
            raise SystemExit(f"torch_reference: under {recipe} the loss is {res['loss']}")
        print(f"torch_reference: {recipe:12s} trains {res['trainable_elements']:8d} elements, loss {res['loss']:.6f}")


# ----------------------------------------------------------------------------- driver


def table(rows, config, threads):
    by = {(r["part"], r["recipe"]): r for r in rows}
    recipes = [r for r in RECIPES if any(k[1] == r for k in by)]
    where = (f"on {rows[0]['gpu']}{' (TF32)' if rows[0]['tf32'] else ' (FP32)'}, " if rows and rows[0].get("gpu") else "")
    lines = [f"PyTorch {rows[0]['torch'] if rows else '?'}, {where}{threads} thread{'s' if threads != 1 else ''}, "
             f"hidden {config['hidden']}, layers {config['layers']}, batch {config['batch']} x {config['seq']}, "
             f"vocab {config['vocab']}", "",
             "| recipe | trunk ms | trunk saved MiB | trunk peak RSS MiB (growth) | step ms | step trainable | "
             "step grads MiB | step AdamW MiB | step saved MiB | step peak RSS MiB (growth) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in recipes:
        t, s = by.get(("trunk", rec)), by.get(("step", rec))
        f = lambda r, k, fmt: (fmt % r[k]) if r else "-"
        rss = lambda r: f"{r['rss_peak_mib']:.0f} ({r['rss_peak_mib'] - r['rss_setup_mib']:.0f})" if r else "-"
        lines.append(f"| {rec} | {f(t, 'ms', '%.1f')} | {f(t, 'saved_mib', '%.1f')} | {rss(t)} | "
                     f"{f(s, 'ms', '%.0f')} | {f(s, 'trainable_elements', '%d')} | {f(s, 'grads_mib', '%.1f')} | "
                     f"{f(s, 'adamw_mib', '%.1f')} | {f(s, 'saved_mib', '%.1f')} | {rss(s)} |")
    if any(r.get("device_peak_mib") is not None for r in rows):
        lines.append("\nDevice peak allocated over the timed iterations (MiB): " + ", ".join(
            f"{r['part']} {r['recipe']} {r['device_peak_mib']:.0f}" for r in rows if r.get("device_peak_mib") is not None))
    base = [r["rss_setup_mib"] for r in rows]
    if base:
        lines.append(f"\nResident set after import and model construction, before the first iteration: "
                     f"{min(base):.0f}-{max(base):.0f} MiB (included in the peaks; the growth is the peak above it).")
    return "\n".join(lines)


def recipes_and_parts(ap, recipes, parts):
    """The comma-separated --recipes and --parts as lists; an unknown name is a usage error."""
    recipes, parts = recipes.split(","), parts.split(",")
    for r in recipes:
        if r not in RECIPES:
            ap.error(f"unknown recipe '{r}' (known: {', '.join(RECIPES)})")
    for p in parts:
        if p not in PARTS:
            ap.error(f"unknown part '{p}' (known: {', '.join(PARTS)})")
    return recipes, parts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, of " + ", ".join(RECIPES))
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of trunk, step")
    ap.add_argument("--tiny", action="store_true", help="a small configuration, for a quick check")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs (default cpu)")
    ap.add_argument("--tf32", action="store_true", help="with --device cuda: TF32 tensor cores for fp32 products")
    ap.add_argument("--check", action="store_true",
                    help="no timing: check that the PyTorch side trains exactly each recipe's tensors "
                         "(exit 77 where torch or transformers cannot be imported)")
    ap.add_argument("--worker", nargs=2, metavar=("PART", "RECIPE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    config = TINY if a.tiny else REFERENCE
    recipes, parts = recipes_and_parts(ap, a.recipes, a.parts)
    if a.repetitions < 1 or a.warmup < 0 or a.threads < 1:
        ap.error("--repetitions and --threads must be at least 1, --warmup at least 0")

    if a.check:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            print(f"SKIP: {e} (scripts/torch-venv.sh installs torch and transformers)")
            sys.exit(77)
        causality_check(config)
        training_check(config, a.threads)
        print("torch_reference: every recipe trains exactly its tensors")
        return
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], config, a.threads, a.warmup, a.repetitions,
                                device=a.device, tf32=a.tf32)))
        return

    causality_check(config)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    rows = []
    for rec in recipes:
        for part in parts:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", part, rec, "--threads", str(a.threads),
                   "--repetitions", str(a.repetitions), "--warmup", str(a.warmup), "--device", a.device] + \
                (["--tiny"] if a.tiny else []) + (["--tf32"] if a.tf32 else [])
            out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"torch_reference: {part:5s} {rec:12s} {r['ms']:9.1f} ms  peak RSS {r['rss_peak_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    print(table(rows, config, a.threads))
    if a.json:
        doc = dict(config=config, tiny=a.tiny, threads=a.threads, device=a.device, tf32=a.tf32, repetitions=a.repetitions, warmup=a.warmup,
                   load_average=os.getloadavg(), results=rows)
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
