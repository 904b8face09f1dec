#!/usr/bin/env python3
"""Golden tensors for ONE pre-norm LLaMA / Qwen2 decoder block, from NumPy.

Produces two folders of small .npy files (float32, little-endian '<f4',
C order, written with numpy.save) plus a config.json each, which the C++
tests load with xt::load_npy<float>:

    tests/data/block_llama/   d=32, 4 heads, 2 KV heads, head_dim 8, MLP 48,
                              rope_theta 1e4, eps 1e-6, B=2, S=5, no biases
    tests/data/block_qwen2/   same sizes, q/k/v biases (none on o_proj/MLP),
                              rope_theta 1e6, eps 1e-6, B=2, S=6

Files per folder (Hugging Face names; weights are [out_features, in_features]
as in torch.nn.Linear, y = x @ W.T + b):
    input_layernorm.weight [d]           post_attention_layernorm.weight [d]
    q_proj.weight [H*hd, d]              k_proj.weight [KV*hd, d]
    v_proj.weight [KV*hd, d]             o_proj.weight [d, H*hd]
    q_proj.bias [H*hd], k_proj.bias [KV*hd], v_proj.bias [KV*hd]  (qwen2 only)
    gate_proj.weight [I, d]  up_proj.weight [I, d]  down_proj.weight [d, I]
    x [B,S,d] (block input)              y [B,S,d] (block output)
    attn_norm_out [B,S,d]   output of input_layernorm
    q_rot [B,H,S,hd]        q after RoPE
    k_rot [B,KV,S,hd]       k after RoPE
    attn_out [B,S,H*hd]     attention output before o_proj, heads in order
    h_mid [B,S,d]           x + o_proj(attn_out)
    mlp_out [B,S,d]         down_proj output
    config.json             all sizes / constants

Every generated tensor (weights, biases, x) is rounded to float32 first; all
math is then done in float64 from those float32 values, and results are
rounded to float32 only when stored. The math follows Hugging Face
transformers' LlamaDecoderLayer / Qwen2DecoderLayer (rotate_half RoPE,
grouped-query attention, causal softmax, SwiGLU MLP) and is written here
from scratch; nothing from skillgraft is imported. A self-check recomputes
attention with explicit loops for one batch row and asserts agreement to
1e-12.

Regenerate (from the repository root; only NumPy is needed, generated with
python 3.11.7, numpy 2.4.6):

    python3 tests/data/make_golden_block.py

The output is deterministic (fixed seeds). CI does not need Python: the
generated files are committed and read directly by the C++ tests.
"""

import json
import math
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = [
    dict(name="block_llama", seed=20240601, d=32, n_heads=4, n_kv_heads=2,
         head_dim=8, intermediate=48, rope_theta=10000.0, rms_norm_eps=1e-6,
         B=2, S=5, qkv_bias=False),
    dict(name="block_qwen2", seed=20240602, d=32, n_heads=4, n_kv_heads=2,
         head_dim=8, intermediate=48, rope_theta=1000000.0, rms_norm_eps=1e-6,
         B=2, S=6, qkv_bias=True),
]


def f32(a):
    """Round to float32, then widen back to float64 for the math."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def rms_norm(x, w, eps):
    var = np.mean(x * x, axis=-1, keepdims=True)
    return w * (x / np.sqrt(var + eps))


def rope_cos_sin(S, head_dim, theta):
    half = head_dim // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = 1.0 / (theta ** (2.0 * i / head_dim))
    pos = np.arange(S, dtype=np.float64)
    freqs = np.outer(pos, inv_freq)                    # [S, half]
    emb = np.concatenate([freqs, freqs], axis=-1)      # [S, head_dim]
    return np.cos(emb), np.sin(emb)


def rotate_half(t):
    half = t.shape[-1] // 2
    return np.concatenate([-t[..., half:], t[..., :half]], axis=-1)


def apply_rope(t, cos, sin):
    # t: [B, heads, S, hd]; cos/sin: [S, hd] broadcast over B and heads
    return t * cos + rotate_half(t) * sin


def attention(q_rot, k_rot, v, n_heads, n_kv_heads):
    """Vectorised causal GQA. q_rot [B,H,S,hd], k_rot/v [B,KV,S,hd] -> [B,H,S,hd]."""
    group = n_heads // n_kv_heads
    k_rep = np.repeat(k_rot, group, axis=1)            # head h -> kv head h // group
    v_rep = np.repeat(v, group, axis=1)
    hd = q_rot.shape[-1]
    S = q_rot.shape[2]
    scores = q_rot @ np.swapaxes(k_rep, -1, -2) / math.sqrt(hd)   # [B,H,S,S]
    mask = np.triu(np.ones((S, S), dtype=bool), k=1)   # j > i masked
    scores = np.where(mask, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    return p @ v_rep


def attention_loops(q_rot_b, k_rot_b, v_b, n_heads, n_kv_heads):
    """Reference: explicit loops for one batch row. Inputs [heads, S, hd]."""
    group = n_heads // n_kv_heads
    _, S, hd = q_rot_b.shape
    out = np.zeros((n_heads, S, hd))
    for h in range(n_heads):
        kvh = h // group
        for i in range(S):
            s = []
            for j in range(i + 1):                     # keys 0..i only (causal)
                acc = 0.0
                for c in range(hd):
                    acc += q_rot_b[h, i, c] * k_rot_b[kvh, j, c]
                s.append(acc / math.sqrt(hd))
            m = max(s)
            e = [math.exp(v - m) for v in s]
            z = sum(e)
            for c in range(hd):
                acc = 0.0
                for j in range(i + 1):
                    acc += (e[j] / z) * v_b[kvh, j, c]
                out[h, i, c] = acc
    return out


def silu(z):
    return z / (1.0 + np.exp(-z))


def make_case(cfg):
    rng = np.random.default_rng(cfg["seed"])
    d, H, KV, hd, I = (cfg["d"], cfg["n_heads"], cfg["n_kv_heads"],
                       cfg["head_dim"], cfg["intermediate"])
    B, S, eps, theta = cfg["B"], cfg["S"], cfg["rms_norm_eps"], cfg["rope_theta"]

    # ---- parameters and input (fixed draw order), rounded to float32 ----
    P = {}
    P["input_layernorm.weight"] = f32(1.0 + rng.normal(0.0, 0.1, size=(d,)))
    P["post_attention_layernorm.weight"] = f32(1.0 + rng.normal(0.0, 0.1, size=(d,)))
    P["q_proj.weight"] = f32(rng.normal(0.0, 0.2, size=(H * hd, d)))
    P["k_proj.weight"] = f32(rng.normal(0.0, 0.2, size=(KV * hd, d)))
    P["v_proj.weight"] = f32(rng.normal(0.0, 0.2, size=(KV * hd, d)))
    P["o_proj.weight"] = f32(rng.normal(0.0, 0.2, size=(d, H * hd)))
    if cfg["qkv_bias"]:
        P["q_proj.bias"] = f32(rng.normal(0.0, 0.1, size=(H * hd,)))
        P["k_proj.bias"] = f32(rng.normal(0.0, 0.1, size=(KV * hd,)))
        P["v_proj.bias"] = f32(rng.normal(0.0, 0.1, size=(KV * hd,)))
    P["gate_proj.weight"] = f32(rng.normal(0.0, 0.2, size=(I, d)))
    P["up_proj.weight"] = f32(rng.normal(0.0, 0.2, size=(I, d)))
    P["down_proj.weight"] = f32(rng.normal(0.0, 0.2, size=(d, I)))
    x = f32(rng.normal(0.0, 1.0, size=(B, S, d)))

    def linear(t, name):
        out = t @ P[name + ".weight"].T
        if name + ".bias" in P:
            out = out + P[name + ".bias"]
        return out

    # ---- attention half ----
    h1 = rms_norm(x, P["input_layernorm.weight"], eps)
    q = linear(h1, "q_proj").reshape(B, S, H, hd).transpose(0, 2, 1, 3)
    k = linear(h1, "k_proj").reshape(B, S, KV, hd).transpose(0, 2, 1, 3)
    v = linear(h1, "v_proj").reshape(B, S, KV, hd).transpose(0, 2, 1, 3)
    cos, sin = rope_cos_sin(S, hd, theta)
    q_rot = apply_rope(q, cos, sin)
    k_rot = apply_rope(k, cos, sin)
    o = attention(q_rot, k_rot, v, H, KV)                       # [B,H,S,hd]
    attn_out = o.transpose(0, 2, 1, 3).reshape(B, S, H * hd)    # heads concatenated

    # ---- self-checks ----
    for b in range(B):
        ref = attention_loops(q_rot[b], k_rot[b], v[b], H, KV)
        err = np.max(np.abs(ref - o[b]))
        assert err < 1e-12, f"{cfg['name']}: loop vs vectorised attention, batch {b}: {err}"
    # RoPE as complex rotation of pairs (c, c+half) by angle p*inv_freq[c].
    half = hd // 2
    inv_freq = 1.0 / (theta ** (np.arange(half) * 2.0 / hd))
    ang = np.arange(S)[:, None] * inv_freq[None, :]
    zc = (q[..., :half] + 1j * q[..., half:]) * np.exp(1j * ang)
    assert np.max(np.abs(np.concatenate([zc.real, zc.imag], -1) - q_rot)) < 1e-12
    # Position 0 is not rotated; row 0 of each head attends only to itself.
    assert np.max(np.abs(q_rot[:, :, 0] - q[:, :, 0])) < 1e-15
    assert np.max(np.abs(o[:, :, 0] - np.repeat(v, H // KV, axis=1)[:, :, 0])) < 1e-12

    h_mid = x + linear(attn_out, "o_proj")

    # ---- MLP half ----
    h2 = rms_norm(h_mid, P["post_attention_layernorm.weight"], eps)
    mlp_out = linear(silu(linear(h2, "gate_proj")) * linear(h2, "up_proj"), "down_proj")
    y = h_mid + mlp_out

    outputs = dict(P)
    outputs.update({
        "x": x, "y": y, "attn_norm_out": h1, "q_rot": q_rot, "k_rot": k_rot,
        "attn_out": attn_out, "h_mid": h_mid, "mlp_out": mlp_out,
    })
    for a in outputs.values():
        assert np.all(np.isfinite(a))

    out_dir = os.path.join(HERE, cfg["name"])
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, a in outputs.items():
        arr = np.ascontiguousarray(a.astype("<f4"))
        path = os.path.join(out_dir, name + ".npy")
        np.save(path, arr, allow_pickle=False)
        back = np.load(path)
        assert back.dtype == np.dtype("<f4") and back.flags.c_contiguous
        assert np.array_equal(back, arr)
        written.append((name + ".npy", arr.shape, os.path.getsize(path)))

    conf = {
        "hidden_size": d, "num_attention_heads": H, "num_key_value_heads": KV,
        "head_dim": hd, "intermediate_size": I, "rope_theta": theta,
        "rms_norm_eps": eps, "batch": B, "seq_len": S,
        "qkv_bias": cfg["qkv_bias"], "seed": cfg["seed"],
        "model_type": "qwen2" if cfg["qkv_bias"] else "llama",
    }
    cpath = os.path.join(out_dir, "config.json")
    with open(cpath, "w") as f:
        json.dump(conf, f, indent=2)
        f.write("\n")
    written.append(("config.json", None, os.path.getsize(cpath)))

    print(f"{cfg['name']}: max|y| = {np.max(np.abs(y)):.6f}, "
          f"max|x| = {np.max(np.abs(x)):.6f}, attention self-check OK")
    total = 0
    for fname, shape, size in sorted(written):
        total += size
        print(f"  {fname:40s} {str(list(shape)) if shape is not None else '':16s} {size:6d} B")
    print(f"  total {total} bytes")
    return total


def main():
    grand = sum(make_case(c) for c in CASES)
    print(f"all cases: {grand} bytes")
    assert grand < 200 * 1024


if __name__ == "__main__":
    main()
