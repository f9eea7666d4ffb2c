"""Activation memory of LoRA training, measured on CPU against the planner's count
(tbr_ray.plan.sizing.layer_bytes_per_token / activation_bytes_per_token).

    .venv/bin/python bench/activation_memory.py                 # peak, 4 architectures, JSON
    .venv/bin/python bench/activation_memory.py --census        # + the saved tensors of a layer
    .venv/bin/python bench/activation_memory.py --layers 2 --seq 128   # smaller, faster

Models are built from configs with the real transformers classes (Llama-2 shaped: multi-head;
Llama-3 shaped: grouped-query; Gemma-2 with eager attention and its four norms; Falcon-40B
shaped: new decoder architecture, parallel attention, GQA), shrunk to hidden 512, in bf16,
with PEFT LoRA on the registry's target modules (rank 16, dropout 0.05, as jobs/paper.yaml),
in train mode; one micro-batch of random ids with a padded row (training pads every
micro-batch to its longest row), labels = ids.

Two measurements per model, forward + backward, without and with gradient checkpointing
(transformers' `gradient_checkpointing_enable(use_reentrant=False)`):
  saved      bytes of the distinct tensors autograd saves for backward in one layer
             (torch.autograd.graph.saved_tensors_hooks; the difference between the model at
             `--layers` and at 2 x `--layers` layers), against `layer_bytes_per_token`
  peak       the peak of live tensor memory during forward + backward, less the weights
             (torch.distributed._tools.mem_tracker.MemTracker: every tensor storage created,
             by category, tracked through a TorchDispatchMode), against
             `activation_bytes_per_token` x tokens
CPU differs from CUDA in one place the count knows: the dropout mask is the noise tensor in
bf16 (2 bytes an element; CUDA's fused dropout keeps bool masks), passed as mask_bytes=2.
Output: one JSON object per model on stdout.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from tbr_ray.models import FALCON_TARGETS, LLAMA_TARGETS, Shape
from tbr_ray.plan.sizing import activation_bytes_per_token, layer_bytes_per_token

CPU_MASK_BYTES = 2  # bf16 noise tensor of torch's CPU dropout
RANK, DROPOUT = 16, 0.05
# (family, HF config class, shape at hidden 512; attention) of each model measured.
MODELS = {
    "llama-2-shaped": ("llama", Shape(4, 512, 8, 8, 64, 1376, 4096)),
    "llama-3-shaped": ("llama", Shape(4, 512, 8, 2, 64, 1792, 4096)),
    "gemma-2-shaped": ("gemma2", Shape(4, 512, 4, 2, 128, 2048, 4096)),
    "falcon-40b-shaped": ("falcon", Shape(4, 512, 8, 2, 64, 2048, 4096, 2)),
}


def hf_config(family: str, s: Shape, layers: int):
    from transformers import FalconConfig, Gemma2Config, LlamaConfig

    common = dict(num_hidden_layers=layers, hidden_size=s.hidden, vocab_size=s.vocab)
    common.update(num_attention_heads=s.heads)
    if family == "falcon":
        return FalconConfig(
            **common, num_kv_heads=s.kv_heads, new_decoder_architecture=True, bias=False
        )
    cls = Gemma2Config if family == "gemma2" else LlamaConfig
    return cls(
        **common, num_key_value_heads=s.kv_heads, head_dim=s.head_dim, intermediate_size=s.ffn
    )


def build(family: str, shape: Shape, layers: int):
    """A bf16 PEFT LoRA model of this shape and family, in train mode (as tbr_ray.train)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    attn = "eager" if family == "gemma2" else "sdpa"
    base = AutoModelForCausalLM.from_config(
        hf_config(family, shape, layers), attn_implementation=attn, dtype=torch.bfloat16
    )
    targets = list(FALCON_TARGETS if family == "falcon" else LLAMA_TARGETS)
    lora = LoraConfig(r=RANK, lora_alpha=32, lora_dropout=DROPOUT, target_modules=targets)
    model = get_peft_model(base, lora).to(torch.bfloat16)  # DeepSpeed's bf16 casts LoRA too
    model.config.use_cache = False
    return model.train()


def checkpointed(model):
    """The same model with transformers' gradient checkpointing on (non-reentrant)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def batch(shape: Shape, micro: int, seq: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (micro, seq), generator=gen)
    mask = torch.ones(micro, seq, dtype=torch.long)
    mask[0, -seq // 4 :] = 0  # one padded row: transformers then builds a padding mask
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def saved_tensors(model, inputs) -> dict[int, tuple]:
    """Distinct storages autograd saves during one forward (weights left out)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen.setdefault(st.data_ptr(), (st.nbytes(), tuple(t.shape), str(t.dtype)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return seen


def per_layer_saved(model, family: str, shape: Shape, inputs: dict, census: bool) -> dict:
    """Saved bytes per token of one layer: (a model of 2L layers - `model`, of L) / L, and
    the census of the tensors that difference is made of."""
    layers = shape.layers
    a = saved_tensors(model, inputs)
    b = saved_tensors(build(family, shape, 2 * layers), inputs)
    tokens = inputs["input_ids"].numel()
    saved = sum(v[0] for v in b.values()) - sum(v[0] for v in a.values())
    out = {"saved_bytes_per_token": saved / layers / tokens}
    if census:
        diff = Counter(b.values()) - Counter(a.values())
        out["census_per_layer"] = [
            {
                "shape": list(k[1]),
                "dtype": k[2],
                "count": n / layers,
                "bytes_per_token": n / layers * k[0] / tokens,
            }
            for k, n in sorted(diff.items(), key=lambda kv: -kv[0][0] * kv[1])
        ]
    return out


def peak_bytes(model, inputs: dict) -> int:
    """Peak live tensor bytes of one forward + backward, weights and buffers left out."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenWeightsTracker(MemTracker):
        # torch 2.13's MemTracker hooks the gradient of every parameter, which a frozen base
        # weight refuses; gradients are still tracked as the backward's outputs.
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, False)

    model.zero_grad(set_to_none=True)
    tracker = FrozenWeightsTracker()
    with tracker:
        model(**inputs).loss.backward()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    return peak["Total"] - peak.get("Parameter", 0) - peak.get("Buffer", 0)


def measure(name: str, args) -> dict:
    family, full = MODELS[name]
    shape = Shape(args.layers, *list(vars(full).values())[1:])
    inputs = batch(shape, args.micro, args.seq)
    tokens = args.micro * args.seq
    layer = layer_bytes_per_token(shape, family, args.seq, RANK, DROPOUT, CPU_MASK_BYTES)
    out = {"model": name, "family": family, "layers": args.layers, "tokens": tokens}
    model = build(family, shape, args.layers)
    out.update(per_layer_saved(model, family, shape, inputs, args.census))
    out["planned_layer_bytes_per_token"] = layer
    out["layer_error"] = out["saved_bytes_per_token"] / layer - 1
    for ckpt in (False, True):
        key = "checkpointing" if ckpt else "no_checkpointing"
        peak = peak_bytes(checkpointed(model) if ckpt else model, inputs)
        plan = tokens * activation_bytes_per_token(
            shape, family, args.seq, RANK, DROPOUT, ckpt, CPU_MASK_BYTES
        )
        out[key] = {"peak_mib": peak / 2**20, "planned_mib": plan / 2**20, "error": peak / plan - 1}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (and twice that)")
    ap.add_argument("--micro", type=int, default=2, help="sequences in the micro-batch")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--census", action="store_true", help="list one layer's saved tensors")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args(argv)
    for name in args.models:
        print(json.dumps(measure(name, args)), flush=True)


if __name__ == "__main__":
    main()
