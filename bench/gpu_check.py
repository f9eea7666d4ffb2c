"""The one command for the day a GPU is lent: tbr_ray.train's own training path on one GPU, in
under 8 minutes, against what the planner predicts. Prints one line of JSON.

    python bench/gpu_check.py                    # one GPU (H100/H200 80-141 GiB), repo root
    python bench/gpu_check.py --cpu-dry-run      # the same code, tiny presets, fp32, on CPU
    python bench/gpu_check.py --gpu-type H100    # the peak the MFU divides by, if not detected

Needs torch, transformers, peft, deepspeed and tbr_ray's pure modules (pydantic, pyyaml,
pyarrow, pandas): no Ray, no vLLM, no download. How to carry what a bare GPU machine lacks:
docs/BENCHMARKS.md ("GPU check").

Three phases, each the trainer's own functions on models built here from the registry's
published shapes (tbr_ray.models.SHAPES), random weights, saved in bf16 and loaded back by
build_lora_model as a worker loads a model:
  zero2   llama-2-7b, ZeRO-2: 1 warm-up + 6 timed optimizer steps
  gemma2  gemma-2-9b, ZeRO-2, eager attention (its softcapping): 1 warm-up + 1 timed step
  zero3   llama-2-7b again, ZeRO-3 (weights partitioned at load, HfDeepSpeedConfig):
          1 warm-up + 3 timed steps
ZeRO-3 runs last: DeepSpeed then replaces torch.nn.functional.linear for the rest of the
process. Both models stay on disk in --workdir until the end (32 GB). One process: a
torch.distributed group of world size 1 (its MASTER_ADDR/PORT set here).

Every phase trains as jobs/paper.yaml says (bf16, LoRA rank 16 / alpha 32 / dropout 0.05 on
the registry's targets, activation checkpointing, micro-batches of 4 padded to their longest
row, 8 accumulated a step: global batch 32 on one GPU) through deepspeed_config,
build_lora_model, build_engine and _run_epoch, the workers' epoch loop (batches moved to the
engine's device; its checkpoint call saves the adapter and DeepSpeed's state as a worker does,
timed apart). The rows are random ids of the paper mix's lengths (32-322 tokens, mean ~177, 1
row in 50 at data.max_seq_len), the first 40% of each a masked prompt: micro-batches pad to
~1.5x their real tokens, as the planner assumes (GPU_PADDING_FACTOR 1.48).

Per phase: real and padded tokens/s over the timed steps; MFU counted as the planner counts
(tbr_ray.plan.train_flops_per_token at the mean padded width, recompute included, per padded
token, over the GPU type's dense bf16 peak, tbr_ray.plan.gpus.GPU_TYPES) beside the planner's
assumed train_mfu; peak GPU memory (max_memory_allocated / reserved) beside the planner's
train_gib_per_gpu for the same model, GPUs and ZeRO stage; load, warm-up and save seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tbr_ray from this checkout, installed or not

GIB = 2**30
# (phase, model, ZeRO stage, timed optimizer steps), in the order they run.
GPU_PHASES = (
    ("zero2", "llama-2-7b", 2, 6),
    ("gemma2", "gemma-2-9b", 2, 1),
    ("zero3", "llama-2-7b", 3, 3),
)
CPU_PHASES = (
    ("zero2", "tiny-llama", 2, 2),
    ("gemma2", "tiny-gemma2", 2, 1),
    ("zero3", "tiny-llama", 3, 1),
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny presets, fp32, gloo, CPU")
    ap.add_argument("--gpu-type", help="GPU_TYPES key for the peak (default: from the device)")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/tbr-gpu-check"),
        help="models and adapters while it runs (GPU: 32 GB free; removed at the end)",
    )
    return ap.parse_args(argv)


# The CPU dry run, to stay quick: fp32 and gloo, rows of at most 64 tokens, 2 micro-batches a
# step.
CPU_SETS = ["train.use_gpu=false", "data.max_seq_len=64", "train.global_batch_size=8"]


def run_config(cpu: bool):
    """jobs/paper.yaml's training settings (the CPU dry run: CPU_SETS)."""
    from tbr_ray.config import load_config

    return load_config(REPO / "jobs" / "paper.yaml", CPU_SETS if cpu else [])


def init_process_group(cpu: bool) -> None:
    """torch.distributed of world size 1, as DeepSpeed needs (Ray Train does this on a
    cluster)."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.update({**env, "MASTER_PORT": str(port)})
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")


# ------------------------------------------------------------------ models and rows


def hf_config(model: str):
    """The HF config of a registry model: a tiny preset's build config, or a paper model's
    published shape (tbr_ray.models.SHAPES) in its family's config class."""
    from transformers import AutoConfig

    from tbr_ray.models import TINY_VOCAB, get_spec

    spec = get_spec(model)
    if spec.tiny:
        arch = dict(spec.arch)
        return AutoConfig.for_model(arch.pop("model_type"), vocab_size=TINY_VOCAB, **arch)
    s = spec.shape
    extra = {"query_pre_attn_scalar": s.head_dim} if spec.family.name == "gemma2" else {}
    return AutoConfig.for_model(
        spec.family.name,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        intermediate_size=s.ffn,
        vocab_size=s.vocab,
        max_position_embeddings=4096,
        **extra,
    )


def save_model(model: str, folder: Path, device: str) -> float:
    """`model` with random weights, initialised on `device` (a 7B model never passes through
    host memory) and saved in bf16 into `folder`; returns the seconds it took."""
    import torch
    from transformers import AutoModelForCausalLM

    t = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(hf_config(model), dtype=torch.bfloat16)
    base.save_pretrained(folder, safe_serialization=True)
    del base
    free_memory(device)
    return round(time.time() - t, 1)


def synthetic_rows(n: int, vocab: int, max_len: int, seed: int = 0) -> list[dict]:
    """`n` rows of random ids, 32-322 tokens (1 in 50 at max_len), the first 40% masked."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = max_len if i % 50 == 0 else rng.randint(min(32, max_len), min(322, max_len))
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        cut = int(0.4 * length)
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ one phase


def build(cfg, model: str, folder: Path, zero: int, device: str):
    """The worker's model and engine (deepspeed_config, build_lora_model, build_engine), with
    the peak memory counter reset first."""
    import torch

    from tbr_ray.train import build_engine, build_lora_model, deepspeed_config

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ds_config = deepspeed_config(cfg, zero, 1)
    lora_model = build_lora_model(cfg, model, str(folder), ds_config)
    return lora_model, build_engine(cfg, lora_model, ds_config)


def train(cfg, model: str, lora_model, engine, timed_steps: int, workdir: Path, sync):
    """One warm-up optimizer step, then `timed_steps`, through the workers' epoch loop; the
    checkpoint call saves the adapter and DeepSpeed's state as a worker does. Returns the
    figures of the timed steps."""
    from tbr_ray.models import model_shape
    from tbr_ray.train import Meter, Position, Worker, _epoch_batches, _run_epoch, _save_adapter

    micro = cfg.train.micro_batch_size
    accum = engine.gradient_accumulation_steps()
    rows = synthetic_rows((1 + timed_steps) * accum * micro, model_shape(model).vocab,
                          cfg.data.max_seq_len)  # fmt: skip
    w = Worker(cfg, cfg.model_dump(mode="json"), lora_model, engine, rows, 0, 0, 1, 1, "local",
               None, f"gpu-check-{model}", {})  # fmt: skip
    losses: list[float] = []

    def checkpoint(w_, position, loss, meter) -> None:
        t = time.time()
        losses.append(float(loss.detach()))
        _save_adapter(w_, position, str(workdir / f"adapter-step{position.step}"))
        meter.checkpoint_s += time.time() - t

    t = time.time()
    meter = Meter(started_at=t)
    warm, _ = _run_epoch(w, Position(), meter, checkpoint)
    sync()
    warm_s, real0, save0 = time.time() - t, meter.tokens, meter.checkpoint_s
    t = time.time()
    end, done = _run_epoch(replace(w, total_steps=1 + timed_steps), warm, meter, checkpoint)
    sync()
    loop_s = time.time() - t - (meter.checkpoint_s - save0)
    widths = [b["input_ids"].shape for b in _epoch_batches(rows, micro, 0, 0, 0)]
    timed = widths[warm.micro_in_epoch : end.micro_in_epoch]
    padded = sum(n * width for n, width in timed)
    return {
        "optimizer_steps": end.step - warm.step,
        "micro_steps": len(timed),
        "mean_padded_width": padded / (micro * len(timed)),
        "max_padded_width": max(width for _, width in widths[: end.micro_in_epoch]),
        "padding_factor": padded / (meter.tokens - real0),
        "real_tokens_per_s": (meter.tokens - real0) / loop_s,
        "padded_tokens_per_s": padded / loop_s,
        "warmup_s": round(warm_s, 1),
        "save_s": round(meter.checkpoint_s, 1),
        "loss_first_last": [losses[0], losses[-1]],
    }


def run_phase(cfg, args, phase: tuple, folder: Path, peak_flops: float) -> dict:
    """Build, train and measure one phase against the planner's figures for it."""
    import torch

    from tbr_ray.plan import CPU_COST, GPU_COST, train_flops_per_token, train_gib_per_gpu

    name, model, zero, timed_steps = phase
    device = "cpu" if args.cpu_dry_run else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = time.time()
    lora_model, engine = build(cfg, model, folder, zero, device)
    load_s = time.time() - t
    out = {"phase": name, "model": model, "zero_stage": zero, "load_s": round(load_s, 1)}
    out["attention"] = lora_model.get_base_model().config._attn_implementation
    out["checkpointing"] = lora_model.get_base_model().is_gradient_checkpointing
    out |= train(cfg, model, lora_model, engine, timed_steps, args.workdir / name, sync)
    t_ = cfg.train
    fpt = train_flops_per_token(
        model, t_.lora_rank, out["mean_padded_width"], t_.gradient_checkpointing
    )
    out["flops_per_padded_token"] = fpt
    out["mfu"] = fpt * out["padded_tokens_per_s"] / peak_flops
    out["planned_mfu"] = (CPU_COST if args.cpu_dry_run else GPU_COST).train_mfu
    out["planned_gib"] = round(train_gib_per_gpu(cfg, model, 1, zero), 2)
    if device == "cuda":
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    engine.destroy()
    del lora_model, engine
    free_memory(device)
    return out


# ------------------------------------------------------------------ the run


def peak_flops_of(args) -> tuple[str, float]:
    """The device and the dense peak its MFU divides by: the GPU type's (GPU_TYPES), or on
    the CPU dry run CPU_COST's per core x the cores."""
    import torch

    from tbr_ray.plan import CPU_COST
    from tbr_ray.plan.gpus import GPU_TYPES

    if args.cpu_dry_run:
        return "cpu", CPU_COST.peak_flops * (os.cpu_count() or 1)
    if not torch.cuda.is_available():
        sys.exit(
            "no CUDA GPU here. Fix: run it on a GPU, or pass --cpu-dry-run (its figures mean "
            "nothing but that the code runs)."
        )
    name = torch.cuda.get_device_name()
    gpu = args.gpu_type or next((k for k in GPU_TYPES if k in name), None)
    if gpu not in GPU_TYPES:
        sys.exit(f"{name}: no peak known. Fix: --gpu-type one of {sorted(GPU_TYPES)}.")
    return f"{name} ({gpu})", GPU_TYPES[gpu].peak_flops


def run(args) -> dict:
    import deepspeed
    import peft
    import torch
    import transformers

    t0 = time.time()
    device, peak = peak_flops_of(args)
    cfg = run_config(args.cpu_dry_run)
    init_process_group(args.cpu_dry_run)
    shutil.rmtree(args.workdir, ignore_errors=True)
    phases, save_s = [], {}
    for phase in CPU_PHASES if args.cpu_dry_run else GPU_PHASES:
        folder = args.workdir / f"model-{phase[1]}"  # kept for the phases after
        if phase[1] not in save_s:
            save_s[phase[1]] = save_model(phase[1], folder, "cpu" if args.cpu_dry_run else "cuda")
        phases.append(
            {**run_phase(cfg, args, phase, folder, peak), "save_model_s": save_s[phase[1]]}
        )
    shutil.rmtree(args.workdir, ignore_errors=True)
    return {
        "device": device,
        "peak_flops": peak,
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, peft, deepspeed)},
        "phases": phases,
        "imported": {m: m in sys.modules for m in ("ray", "vllm")},
        "wall_s": round(time.time() - t0, 1),
    }


def main(argv=None) -> None:
    out = run(parse_args(argv))
    for p in out["phases"]:
        mem = (
            f", peak {p['peak_allocated_gib']} GiB vs planned {p['planned_gib']}"
            if "peak_allocated_gib" in p
            else ""
        )
        print(
            f"{p['phase']:6s} {p['model']}: {p['real_tokens_per_s']:.0f} tokens/s "
            f"({p['padded_tokens_per_s']:.0f} padded), MFU {p['mfu']:.1%} (planned "
            f"{p['planned_mfu']:.0%}){mem}, {p['attention']} attention",
            file=sys.stderr,
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
