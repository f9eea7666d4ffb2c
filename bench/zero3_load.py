"""ZeRO-3 loading on 2 CPU workers: each worker's peak memory while tbr_ray.train builds its LoRA
model and DeepSpeed engine, sharded at load (the trainer's way) against a full copy per worker
(the trainer before issue 20), side by side in one run. Prints one line of JSON.

    .venv/bin/python bench/zero3_load.py                      # 145M parameters, both ways
    .venv/bin/python bench/zero3_load.py --load sharded --workers 4
    .venv/bin/python bench/zero3_load.py --layers 1 --hidden 128 --ffn 256 --vocab 1000  # tiny

A Llama-shaped model (hidden 1024, 10 layers, SwiGLU 2816, vocab 8,000: 145M parameters, 0.54
GiB in fp32; a vocabulary small beside its layers, as a 7-70B model's is) is built here from its
config (no download) and saved in bf16, as the paper's checkpoints are. Worker processes joined
by torch.distributed (gloo), as Ray Train joins its workers, each run what a training worker
runs (tbr_ray.train: deepspeed_config, build_lora_model, build_engine at ZeRO-3, fp32 on CPU,
with jobs/paper.yaml's activation checkpointing and LoRA dropout) and one micro-step
(train_micro_step) on a fixed batch, whose loss must equal the saved model's loss computed
here: the weights really loaded (LoRA B starts at 0, so the adapter adds nothing). `full` is the
same with the model loaded unaware of ZeRO-3 (a ZeRO-2 config at load), which is what
build_lora_model did before issue 20: every worker holds the whole model until
deepspeed.initialize partitions it (on a GPU: after moving all of it to its one device).

Each worker samples its own /proc/self/status every 2 ms while it loads (build_lora_model, then
build_engine): peak anonymous RSS (RssAnon, the memory it owns) and VmHWM (peak RSS, which also
counts the imports and the safetensors file's pages the loader maps: page cache, shared by every
worker of a node and dropped under pressure). `load_added_anon_gib` is the loading peak less the
worker's RssAnon just before loading: the figure to hold against the model's size. `held_share`:
the share of the base weights' elements the worker holds once build_lora_model returns.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
SEQ, MICRO = 64, 2  # the fixed batch: 2 sequences of 64 random tokens


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", choices=["both", "sharded", "full"], default="both")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one worker (JSON args)
    return ap.parse_args(argv)


def run_config():
    """jobs/tiny.yaml's training settings with jobs/paper.yaml's activation checkpointing and
    LoRA dropout (ZeRO-3's frozen partitioned weights inside a recompute, at 2 ranks)."""
    from tbr_ray.config import load_config

    sets = [f"train.micro_batch_size={MICRO}", "train.gradient_checkpointing=true"]
    return load_config(REPO / "jobs" / "tiny.yaml", [*sets, "train.lora_dropout=0.05"])


def fixed_batch(vocab: int) -> dict:
    import torch

    ids = torch.randint(0, vocab, (MICRO, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def save_model(args, folder: Path) -> tuple[int, float]:
    """A random Llama of the given shape saved in `folder` (fp32 safetensors); returns its
    parameter count and its loss on `fixed_batch`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        intermediate_size=args.ffn,
        vocab_size=args.vocab,
        max_position_embeddings=SEQ,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # stored as the paper's models are
    model.save_pretrained(folder, safe_serialization=True)
    with torch.no_grad():  # the trainer loads it in fp32 on CPU: the same values, upcast
        loss = float(model.float()(**fixed_batch(args.vocab)).loss)
    return sum(p.numel() for p in model.parameters()), loss


# ------------------------------------------------------------------ one worker


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class PeakSampler:
    """Samples this process's RssAnon every 2 ms in a thread; `phase(name)` closes the current
    phase and records its peak. (torch's kernels and file reads release the GIL, so the thread
    keeps sampling while the loader works.)"""

    def __init__(self):
        import threading

        self.peaks: dict[str, int] = {}
        self.current, self.peak, self.stop = "", 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, proc_status()["RssAnon"])
            time.sleep(0.002)

    def phase(self, name: str) -> None:
        if self.current:
            self.peaks[self.current] = max(self.peak, proc_status()["RssAnon"])
        self.current, self.peak = name, proc_status()["RssAnon"]


def held_elements(model) -> dict[str, int]:
    """Base-model weight elements this rank holds once the model is built (before DeepSpeed's
    engine): a ZeRO-3 partition (`ds_tensor`) where zero.Init partitioned a weight, else the
    whole tensor; and the elements of all of them."""
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in base)
    return {"held": held, "total": sum(getattr(p, "ds_numel", p.numel()) for p in base)}


def warm_imports() -> None:
    """Import what loading would import lazily, so that the baseline taken before loading
    already holds the modules' memory and the loading figure is the model's."""
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.partition_parameters  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    import transformers.integrations.deepspeed  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


def worker(spec: dict) -> dict:
    """One rank: what a Ray Train worker runs to get its engine, then one micro-step."""
    import deepspeed

    from tbr_ray.train import build_engine, build_lora_model, deepspeed_config, train_micro_step

    deepspeed.init_distributed(dist_backend="gloo")
    warm_imports()
    cfg, world, path = run_config(), int(os.environ["WORLD_SIZE"]), spec["path"]
    engine_config = deepspeed_config(cfg, 3, world)
    load_config = engine_config if spec["load"] == "sharded" else deepspeed_config(cfg, 2, world)
    sampler, t = PeakSampler(), time.time()
    before, sampler.current = proc_status()["RssAnon"], "model"
    model = build_lora_model(cfg, path, path, load_config)
    held = held_elements(model)
    sampler.phase("engine")
    engine = build_engine(cfg, model, engine_config)
    load_s, load_hwm = time.time() - t, proc_status()["VmHWM"]
    sampler.phase("step")
    loss = float(train_micro_step(engine, fixed_batch(spec["vocab"])).detach())
    sampler.phase("")
    return {"rank": engine.global_rank, "before_anon": before, "load_s": load_s, "loss": loss,
            "load_hwm": load_hwm, "held": held,
            **{f"{k}_anon": v for k, v in sampler.peaks.items()}}  # fmt: skip


# ------------------------------------------------------------------ the parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(args, path: Path, load: str) -> list[dict]:
    """Run the workers to the end; each one's figures."""
    spec = json.dumps({"path": str(path), "load": load, "vocab": args.vocab})
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(WORLD_SIZE=str(args.workers), OMP_NUM_THREADS="1")
    # glibc: every allocation from 1 MiB up gets its own mapping, returned to the system when
    # freed (no dynamic threshold), so RSS follows the tensors alive, not the heap's high mark.
    env.update(MALLOC_MMAP_THRESHOLD_=str(2**20))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", spec],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(args.workers)
    ]
    return [_worker_result(p) for p in procs]


def _worker_result(proc) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"a worker failed (exit {proc.returncode}):\n{err[-4000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    return {
        "rank": res["rank"],
        "load_peak_rss_gib": round(res["load_hwm"] / GIB, 3),  # imports included
        "load_peak_anon_gib": round(max(res["model_anon"], res["engine_anon"]) / GIB, 3),
        "load_added_anon_gib": round(
            (max(res["model_anon"], res["engine_anon"]) - res["before_anon"]) / GIB, 3
        ),
        "model_added_anon_gib": round((res["model_anon"] - res["before_anon"]) / GIB, 3),
        # ZeRO-3's forward gathers parameters up to stage3_max_live_parameters (default 1e9),
        # so one step of a model this small holds all of it gathered, whatever the load did.
        "step_peak_anon_gib": round(res["step_anon"] / GIB, 3),
        "held_share": round(res["held"]["held"] / res["held"]["total"], 4),
        "load_s": round(res["load_s"], 1),
        "loss": res["loss"],
    }


def measure(args) -> dict:
    ways = ["sharded", "full"] if args.load == "both" else [args.load]
    with tempfile.TemporaryDirectory(prefix="tbr-zero3-") as tmp:
        n_params, ref_loss = save_model(args, Path(tmp))
        out = {
            "params": n_params,
            "model_gib": round(n_params * 4 / GIB, 3),  # fp32, as on CPU
            "workers": args.workers,
            "reference_loss": ref_loss,
        }
        for way in ways:
            out[way] = run_workers(args, Path(tmp), way)
    out["load_avg_1m"] = os.getloadavg()[0]
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    out = measure(args)
    for way in ("sharded", "full"):
        for w in out.get(way, []):
            print(
                f"{way:7s} rank {w['rank']}: loading peak RSS {w['load_peak_rss_gib']:.2f} GiB, "
                f"anonymous {w['load_peak_anon_gib']:.2f} GiB (+{w['load_added_anon_gib']:.2f} "
                f"loading) for a {out['model_gib']:.2f} GiB model, holding {w['held_share']:.0%} "
                f"of it; loss {w['loss']:.5f} vs {out['reference_loss']:.5f}",
                file=sys.stderr,
            )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
