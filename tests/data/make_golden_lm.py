#!/usr/bin/env python3
"""Golden reference data for the decoder LM, produced by Hugging Face transformers.

Writes two tiny, randomly initialised float32 models and the outputs the C++
tests compare against, so that CI checks skillgraft against transformers
without needing Python:

    tests/data/lm_llama/   LlamaForCausalLM, untied head, no biases, head_dim 8,
                           rope_theta 1e4
    tests/data/lm_qwen2/   Qwen2ForCausalLM, tied head (no lm_head.weight in
                           model.safetensors), q/k/v biases, rope_theta 1e6

Each folder holds model.safetensors + config.json + generation_config.json (as
save_pretrained writes them) and golden.safetensors; see tests/data/README.md
for what each tensor is.

Generated with (CPU only, float32, one thread):
    python 3.11.7, torch 2.15.0 (PyPI wheel, +cu132 build run on CPU),
    transformers 5.23.0, safetensors 0.8.0, numpy 2.4.6

Regenerate (from the repository root):
    python3 -m venv /tmp/goldenenv
    /tmp/goldenenv/bin/pip install torch==2.15.0 transformers==5.23.0 safetensors==0.8.0 numpy==2.4.6
    /tmp/goldenenv/bin/python tests/data/make_golden_lm.py

Note: transformers 5.x writes rope_theta inside config.json's
"rope_parameters" object ({"rope_theta": ..., "rope_type": "default"}), not at
the top level as transformers 4.x checkpoints do; a config reader should accept
both.
"""

import json
import os
import sys

import numpy as np
import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))

B, S, V, D = 2, 7, 64, 32
PROMPT_MASK = 3      # labels[:, :3] = -100 (the "prompt")
PREFIX = 3           # soft-token prefix length
NEW_TOKENS = 5       # greedy tokens generated
SCORE_PROMPT = 4     # continuation_logprob = log p(ids[:, 4:7] | ids[:, :4])

MIN_GREEDY_MARGIN = 0.05

GRAD_NAMES = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
    "model.embed_tokens.weight",
    "lm_head.weight",
]
# Extra, Qwen2 only: a bias gradient.
QWEN2_EXTRA_GRADS = ["model.layers.0.self_attn.q_proj.bias"]


def llama_config():
    return LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                       tie_word_embeddings=False, attention_bias=False, hidden_act="silu",
                       attn_implementation="eager")


def qwen2_config():
    return Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                       use_sliding_window=False, attn_implementation="eager")


def reinit_(model, seed):
    """Larger-than-default init so that mistakes are visible in the outputs:
    projections/embeddings N(0, 0.2), norm weights 1 + N(0, 0.1), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):   # tied weights appear once
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def manual_loss(logits, labels):
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    picked = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked[keep]).sum() / keep.sum()


def greedy_loop(model, ids, n, use_cache):
    out, past, cur = [], None, ids
    with torch.no_grad():
        for _ in range(n):
            if use_cache:
                r = model(input_ids=cur, past_key_values=past, use_cache=True)
                past = r.past_key_values
            else:
                r = model(input_ids=torch.cat([ids] + out, dim=1), use_cache=False)
            nxt = r.logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            cur = nxt
    return torch.cat(out, dim=1)


def greedy_margin(model, ids, n):
    """Smallest top-1 minus top-2 logit over n greedy steps (no cache)."""
    worst = float("inf")
    with torch.no_grad():
        for _ in range(n):
            top = model(input_ids=ids, use_cache=False).logits[:, -1].topk(2, dim=-1)
            worst = min(worst, (top.values[:, 0] - top.values[:, 1]).min().item())
            ids = torch.cat([ids, top.indices[:, :1]], dim=1)
    return worst


def build(name, cls, config, seed):
    folder = os.path.join(HERE, name)
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = cls(config)
    reinit_(model, seed + 1)
    model.eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    tied = config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied

    # --- inputs ---------------------------------------------------------------
    # Draw input ids until greedy decoding has no near-tie (top-1 minus top-2
    # logit >= MIN_GREEDY_MARGIN at every step), so that float32 rounding in
    # another implementation cannot flip an argmax.
    for attempt in range(100):
        g = torch.Generator().manual_seed(seed + 2 + 1000 * attempt)
        input_ids = torch.randint(0, V, (B, S), generator=g, dtype=torch.int64)
        margin = greedy_margin(model, input_ids, NEW_TOKENS)
        if margin >= MIN_GREEDY_MARGIN:
            break
    else:
        raise RuntimeError("no input ids with a clear greedy margin")
    labels = input_ids.clone()
    labels[:, :PROMPT_MASK] = -100
    prefix_embeds = torch.randn(B, PREFIX, D, generator=g, dtype=torch.float32)

    # --- logits, loss, gradients ------------------------------------------------
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels)
    logits = out.logits.detach().clone()
    loss = out.loss
    loss.backward()
    ml = manual_loss(logits, labels)
    assert abs(ml.item() - loss.item()) < 1e-6, (ml.item(), loss.item())

    params = dict(model.named_parameters(remove_duplicate=False))
    grad_names = list(GRAD_NAMES) + (QWEN2_EXTRA_GRADS if cls is Qwen2ForCausalLM else [])
    if tied:
        # The shared matrix's gradient (embedding use + head use) is stored once.
        grad_names.remove("lm_head.weight")
    grads = {f"grad.{n}": params[n].grad.detach().clone() for n in grad_names}
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        logits2 = model(input_ids=input_ids).logits
        assert torch.equal(logits2, logits)

        # --- soft-token prefix ------------------------------------------------
        embeds = torch.cat([prefix_embeds, model.model.embed_tokens(input_ids)], dim=1)
        prefix_logits = model(inputs_embeds=embeds).logits.clone()
        assert prefix_logits.shape == (B, PREFIX + S, V)

        # --- scoring: log p(ids[:, 4:7] | ids[:, :4]) ---------------------------
        lp = torch.log_softmax(logits.double(), dim=-1)
        tgt = input_ids[:, SCORE_PROMPT:]
        cont = lp[:, SCORE_PROMPT - 1:S - 1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1).sum(-1)
        # same through a cached pass: prompt first, then the answer tokens
        r = model(input_ids=input_ids[:, :SCORE_PROMPT], use_cache=True)
        r2 = model(input_ids=input_ids[:, SCORE_PROMPT:], past_key_values=r.past_key_values, use_cache=True)
        stepped = torch.cat([r.logits[:, -1:], r2.logits[:, :-1]], dim=1)
        cont2 = torch.log_softmax(stepped.double(), -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1).sum(-1)
        assert torch.allclose(cont, cont2, atol=1e-5), (cont, cont2)
        continuation_logprob = cont.float()

    # --- greedy generation -------------------------------------------------------
    # No end-of-sequence stop: a random model may well emit eos_token_id (2 for
    # Llama) and generate() would then pad the rest. generate() merges the
    # model's generation_config back in for None fields, so clear it there
    # (temporarily; the saved generation_config.json keeps the defaults).
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    gen = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    model.generation_config.eos_token_id = saved_eos
    greedy_tokens = gen[:, S:].clone()
    assert greedy_tokens.shape == (B, NEW_TOKENS)
    assert torch.equal(greedy_tokens, greedy_loop(model, input_ids, NEW_TOKENS, use_cache=True))
    assert torch.equal(greedy_tokens, greedy_loop(model, input_ids, NEW_TOKENS, use_cache=False))

    # --- write -----------------------------------------------------------------------
    for f in os.listdir(folder):
        os.remove(os.path.join(folder, f))
    model.save_pretrained(folder, safe_serialization=True)
    keep = {"model.safetensors", "config.json", "generation_config.json"}
    for f in os.listdir(folder):
        if f not in keep:
            os.remove(os.path.join(folder, f))
    golden = {
        "input_ids": input_ids,
        "labels": labels,
        "logits": logits,
        "loss": loss.detach().reshape(1).float(),
        "prefix_embeds": prefix_embeds,
        "prefix_logits": prefix_logits,
        "greedy_tokens": greedy_tokens,
        "continuation_logprob": continuation_logprob,
        **grads,
    }
    golden = {k: v.detach().contiguous() for k, v in golden.items()}
    # One metadata key: safetensors writes a map's keys in hash order, so
    # several keys would make the bytes differ from run to run.
    meta = {"generator": f"tests/data/make_golden_lm.py {cls.__name__} torch {torch.__version__} "
                         f"transformers {transformers.__version__}"}
    save_file(golden, os.path.join(folder, "golden.safetensors"), metadata=meta)

    # --- re-check what was written ------------------------------------------------------
    saved = load_file(os.path.join(folder, "model.safetensors"))
    assert ("lm_head.weight" in saved) == (not tied), sorted(saved)
    assert all(t.dtype == torch.float32 for t in saved.values())
    fresh = cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=input_ids).logits, logits)
        assert torch.equal(fresh(inputs_embeds=embeds).logits, prefix_logits)
    back = load_file(os.path.join(folder, "golden.safetensors"))
    assert set(back) == set(golden) and all(torch.equal(back[k], golden[k]) for k in golden)

    print(f"{name}: loss {loss.item():.9g}  (manual {ml.item():.9g})")
    print(f"  continuation_logprob {continuation_logprob.tolist()}")
    print(f"  greedy_tokens {greedy_tokens.tolist()}  (input draw {attempt}, "
          f"min top1-top2 logit gap {margin:.4g})")
    print(f"  model.safetensors: {len(saved)} tensors, "
          f"{sum(t.numel() for t in saved.values())} values")
    for k in sorted(golden):
        print(f"  {k:48s} {str(golden[k].dtype).replace('torch.', ''):8s} {list(golden[k].shape)}")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    print(f"  config rope: {cfg.get('rope_parameters')} top-level rope_theta: {cfg.get('rope_theta')}")


def main():
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, safetensors {safetensors.__version__}, numpy {np.__version__}")
    build("lm_llama", LlamaForCausalLM, llama_config(), seed=1234)
    build("lm_qwen2", Qwen2ForCausalLM, qwen2_config(), seed=5678)


if __name__ == "__main__":
    main()
