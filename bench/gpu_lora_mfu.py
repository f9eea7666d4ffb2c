"""DeepSpeed + PEFT LoRA steps on a randomly initialised Llama-2-7B-shaped model in bf16 on one
GPU: prints tokens/s and MFU. Needs only torch, transformers, peft and deepspeed.

    python bench/gpu_lora_mfu.py                      # on a GPU: Llama-2-7B shape, bf16, ZeRO-2
    python bench/gpu_lora_mfu.py --micro 8 --seq 1024 # other batch shapes
    python bench/gpu_lora_mfu.py --tiny               # CPU dry run: 2 layers, fp32, gloo

The step is tbr_ray.train's: a PEFT LoRA model (rank 16 on q, k, v, o, gate, up, down) wrapped
by deepspeed.initialize with a torch AdamW over the LoRA weights, engine(**batch).loss,
engine.backward, engine.step; random token ids (the speed does not depend on their values).

FLOPs are counted per trained token, as tbr_ray.plan.train_flops_per_token does:
  4 x N_base       forward (2 N) and the input gradients (2 N) through the frozen linear
                   weights, lm_head included, the embedding lookup and norms not (no weight
                   gradients for frozen weights, so not the usual 6 N)
  6 x N_lora       forward (2), input gradients (2) and weight gradients (2) of the LoRA weights
  12 x L x h x s   attention scores and weighted sum, forward 4 x L x h x s, backward twice
                   that; s the sequence length, not halved for the causal mask (PaLM's count)
There is no activation recomputation, so model FLOPs = hardware FLOPs. MFU = FLOPs/token x
tokens/s / peak, peak from --peak-tflops (default 989: H100/H200 SXM dense bf16).
Output: one line of JSON (and a readable summary on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA2_7B = dict(layers=32, hidden=4096, heads=32, ffn=11008, vocab=32000)
TINY = dict(layers=2, hidden=256, heads=4, ffn=688, vocab=1024)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: 2 layers, fp32, gloo")
    ap.add_argument("--micro", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of the device")
    args = ap.parse_args(argv)
    args.shape = TINY if args.tiny else LLAMA2_7B
    return args


def flops_per_token(n_base: int, n_lora: int, layers: int, hidden: int, seq: int) -> int:
    return 4 * n_base + 6 * n_lora + 12 * layers * hidden * seq


def build(args, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    s = args.shape
    config = LlamaConfig(
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        intermediate_size=s["ffn"],
        vocab_size=s["vocab"],
        max_position_embeddings=max(4096, args.seq),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a 7B model never passes through the CPU
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
    return get_peft_model(base, lora)


def count(model) -> tuple[int, int]:
    """(frozen linear weights incl. lm_head, trainable LoRA weights)."""
    import torch

    n_base = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name and not m.weight.requires_grad
    )
    return n_base, sum(p.numel() for p in model.parameters() if p.requires_grad)


def init_dist(device: str) -> None:
    import deepspeed

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=os.environ.get("MASTER_PORT", "29533")).items():  # fmt: skip
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def run(args) -> dict:
    import deepspeed
    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU here: run with --tiny for the CPU dry run (figures mean nothing there)")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    init_dist(device)
    t0 = time.time()
    model = build(args, device, dtype)
    n_base, n_lora = count(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ds = {
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.micro,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    startup_s = time.time() - t0
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, args.shape["vocab"], (args.micro, args.seq), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    losses = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync()
            t_steps = time.time()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    sync()
    step_s = (time.time() - t_steps) / args.steps
    tokens_per_s = args.micro * args.seq / step_s
    fpt = flops_per_token(n_base, n_lora, args.shape["layers"], args.shape["hidden"], args.seq)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": args.shape,
        "dtype": str(dtype).removeprefix("torch."),
        "micro": args.micro,
        "seq": args.seq,
        "zero": args.zero,
        "rank": args.rank,
        "n_base": n_base,
        "n_lora": n_lora,
        "flops_per_token": fpt,
        "startup_s": round(startup_s, 2),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": fpt * tokens_per_s / (args.peak_tflops * 1e12),
        "peak_tflops": args.peak_tflops,
        "max_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if device == "cuda" else None,
        "loss_first_last": [losses[0], losses[-1]],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    out = run(args)
    print(
        f"{out['device']}: {out['tokens_per_s']:.0f} tokens/s, step {out['step_s'] * 1e3:.1f} ms, "
        f"MFU {out['mfu']:.1%} of {args.peak_tflops:g} TFLOP/s "
        f"({out['flops_per_token'] / 1e9:.2f} GFLOP/token), start-up {out['startup_s']} s",
        file=sys.stderr,
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
