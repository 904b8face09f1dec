#!/usr/bin/env python3
"""Checks that checkpoints and adapters saved by skillgraft load into Hugging Face
transformers and PEFT and compute the logits skillgraft computed for them.

The C++ side writes them with a hidden test case of test_hf_checkpoint:

    SKILLGRAFT_EXPORT_DIR=/tmp/sg-export build/tests/test_hf_checkpoint "[.export]"

which leaves, under /tmp/sg-export:

    llama_f32/    LlamaForCausalLM saved by save_hf_checkpoint (F32, untied head)
    qwen2_f32/    Qwen2ForCausalLM (tied head, q/k/v biases), F32
    qwen2_bf16/   the same model saved as BF16
    llama_lora/   a PEFT LoRA adapter for llama_f32 (q, v, down on layer 1 only,
                  r 4, lora_alpha 12) saved by cl::save_lora_adapter
    expected/<name>.safetensors   input_ids and the logits skillgraft computed

Then (not needed by CI; versions as for make_golden_lm.py, plus peft):

    python3 -m venv /tmp/hfenv
    /tmp/hfenv/bin/pip install torch==2.15.0 transformers==5.23.0 safetensors==0.8.0 numpy==2.4.6 peft==0.21.2
    /tmp/hfenv/bin/python tests/data/check_transformers_roundtrip.py /tmp/sg-export

Each model is loaded with from_pretrained in float32 (BF16 weights widen exactly),
without any missing, unexpected or mismatched key; the adapter with
PeftModel.from_pretrained. Exits 1 if any logits differ by more than 1e-4.
"""

import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TOL = 1e-4


def load_model(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"{path}: transformers reports {problems}")
    return model.eval()


def compare(name, model, root):
    expected = load_file(os.path.join(root, "expected", name + ".safetensors"))
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    err = (logits - expected["logits"]).abs().max().item()
    ok = err <= TOL
    print(f"{name:12s} {type(model).__name__:24s} max |logits difference| = {err:.3g}  {'ok' if ok else 'FAILED'}")
    return ok


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    root = sys.argv[1]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ok = True
    for name in ["llama_f32", "qwen2_f32", "qwen2_bf16"]:
        ok &= compare(name, load_model(os.path.join(root, name)), root)

    from peft import PeftConfig, PeftModel
    adapter = os.path.join(root, "llama_lora")
    config = PeftConfig.from_pretrained(adapter)
    base = load_model(os.path.join(root, "llama_f32"))
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    loaded = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    if len(loaded) != 6:
        raise SystemExit(f"{adapter}: PEFT attached {len(loaded)} adapter tensors, expected 6: {loaded}")
    print(f"{'':12s} PEFT: r={config.r} lora_alpha={config.lora_alpha} "
          f"targets={sorted(config.target_modules)} layers={config.layers_to_transform}")
    ok &= compare("llama_lora", peft_model, root)
    # The adapter must matter, or the comparison above would prove nothing about it.
    expected = load_file(os.path.join(root, "expected", "llama_lora.safetensors"))
    with torch.no_grad(), peft_model.disable_adapter():
        without = (peft_model(expected["input_ids"]).logits - expected["logits"]).abs().max().item()
    print(f"{'':12s} without the adapter: max |logits difference| = {without:.3g} (must exceed 1e-2)")
    ok &= without > 1e-2
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
