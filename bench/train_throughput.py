"""Training throughput: tbr_ray.train (Ray Train + DeepSpeed) against a bare single-process PEFT
loop, same model, data, batch and thread count. Steady-state tokens/s and start-up, apart.

    .venv/bin/python bench/train_throughput.py                 # tiny-llama, 150 steps of 8
    .venv/bin/python bench/train_throughput.py --steps 300 --model tiny-gemma
    .venv/bin/python bench/train_throughput.py --config jobs/real.yaml \
        --model smollm2-135m-instruct --steps 20 --dtypes float32 bfloat16   # the real model

Both sides train the same cell's tokenized mix (jobs/tiny.yaml, `none` condition, built by
Ray Data once) with the same seeded micro-batches (tbr_ray.train._epoch_batches), the same
LoRA model (tbr_ray.train.build_lora_model), AdamW and gradient clipping 1.0, on 2 threads:
Ray Train runs 1 worker holding both CPUs; the bare loop calls torch.set_num_threads(2).
tokens/s on both sides is tbr_ray.train's figure: real (unpadded) tokens over the wall time from
the first step to the last, start-up (process/worker start, imports, model build, DeepSpeed or
optimizer init) counted apart. Target: Ray Train + DeepSpeed >= 0.9x the bare loop. A third
run, the bare loop with tbr_ray.train's DeepSpeed engine (world size 1, no Ray), splits a gap
between DeepSpeed and Ray Train.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def config(model: str, steps: int, workers: int, job: str = "jobs/tiny.yaml", dtype="auto"):
    from tbr_ray.config import load_config

    sets = [
        f"train.dtype={dtype}",
        f"grid.models=[{model}]",
        "grid.conditions=[none]",
        "train.epochs=50",  # more than enough rows; max_steps ends the run
        f"train.max_steps={steps}",
        f"train.num_workers={workers}",
        f"train.cpus_per_worker={2 // workers}",
    ]
    if job.endswith("real.yaml"):
        sets.append("reflection.local_server=null")  # the `none` cell writes no reflections
    return load_config(REPO / job, sets)


def ray_side(cfg, model_path: str, mix: Path, out: Path) -> dict:
    from tbr_ray.train import run_training

    cell = cfg.cells()[0]
    t0 = time.time()
    adapter = run_training(cfg, cell, model_path, mix, out)
    info = json.loads((adapter / "train_result.json").read_text())
    info["wall_s"] = round(time.time() - t0, 1)
    return info


def bare_side(cfg, model_path: str, mix: Path, steps: int, deepspeed: bool = False) -> dict:
    """The same steps in this process: no Ray; no DeepSpeed either unless `deepspeed` (then
    tbr_ray.train's DeepSpeed config at world size 1, to tell its cost from Ray Train's)."""
    t0 = time.time()
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from tbr_ray.plan import resolved_train_settings
    from tbr_ray.train import _epoch_batches, _worker_rows, build_lora_model, deepspeed_config

    torch.set_num_threads(2)
    import_s = time.time() - t0
    cell = cfg.cells()[0]
    torch.manual_seed(cell.seed)
    ds_config = deepspeed_config(cfg, resolved_train_settings(cfg, cell.model)[1], 1)
    model = build_lora_model(cfg, cell.model, model_path, ds_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate)
    plain = _plain_step(model, opt, trainable)
    step_fn = _deepspeed_step(cfg, model, ds_config) if deepspeed else plain
    pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id or 0
    table = pq.read_table(mix / "shards", columns=["input_ids", "labels"])
    rows = _worker_rows(table, 0, 1)
    startup_s = time.time() - t0
    step, tokens, t_loop = 0, 0, time.time()
    for epoch in range(cfg.train.epochs):
        for batch in _epoch_batches(rows, cfg.train.micro_batch_size, pad_id, cell.seed, epoch):
            loss = step_fn(batch)
            tokens += int(batch["attention_mask"].sum())
            step += 1
            if step >= steps:
                elapsed = time.time() - t_loop
                return {
                    "step": step,
                    "loss": float(loss.detach()),
                    "train_tokens_per_s": tokens / elapsed,
                    "import_s": round(import_s, 2),
                    "startup_s": round(startup_s, 2),
                    "loop_s": round(elapsed, 2),
                }
    raise SystemExit("the mix ran out before --steps: raise train.epochs in config()")


def _plain_step(model, opt, trainable):
    import torch

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _deepspeed_step(cfg, model, ds_config):
    import deepspeed

    from tbr_ray.train import build_engine, train_micro_step

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29547").items():  # fmt: skip
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")
    engine = build_engine(cfg, model, ds_config)  # the workers' optimizer and schedule
    return lambda batch: train_micro_step(engine, batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--config", default="jobs/tiny.yaml", help="job whose mix and LoRA settings")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps on each side")
    ap.add_argument("--dtypes", nargs="+", default=["auto"], help="train.dtype values, in turn")
    ap.add_argument("--output", type=Path, default=Path("/tmp/tbr-bench-train"))
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    load = os.getloadavg()
    out = {d: one_dtype(args, d) for d in args.dtypes}
    print(f"load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}")
    for dtype, r in out.items():
        report(args, dtype, r)
    print(json.dumps({"load": load, **out}))
    sys.stdout.flush()
    os._exit(0)  # Ray's atexit hooks can hang a finished benchmark on a busy box


def one_dtype(args, dtype: str) -> dict:
    """Ray Train + DeepSpeed, the bare loop, and the bare loop with DeepSpeed, at one dtype."""
    import shutil

    from tbr_ray.data import build_mix
    from tbr_ray.tiny import resolve_model

    cfg = config(args.model, args.steps, 1, args.config, dtype)
    shutil.rmtree(args.output, ignore_errors=True)
    model_path = resolve_model(
        args.model,
        cfg.paths.resolved_cache_dir(),
        cfg.data.resolved_root(),
        revisions=cfg.grid.hub_revisions,
    )
    mix = build_mix(cfg, cfg.cells()[0], model_path)
    ray_info = ray_side(cfg, model_path, mix, args.output)
    bare = bare_side(cfg, model_path, mix, args.steps)
    ds = bare_side(cfg, model_path, mix, args.steps, deepspeed=True)
    keys = ("startup_s", "import_s", "model_s", "deepspeed_init_s", "data_s", "train_seconds")
    ray_part = {k: ray_info.get(k) for k in keys}
    ray_part["train_tokens_per_s"] = ray_info["train_tokens_per_s"]
    ray_part["loss"] = ray_info.get("loss")
    return {"ray": ray_part, "bare": bare, "deepspeed": ds}


def report(args, dtype: str, r: dict) -> None:
    ray_info, bare, ds = r["ray"], r["bare"], r["deepspeed"]
    ratio = ray_info["train_tokens_per_s"] / bare["train_tokens_per_s"]
    what = f"steps {args.steps}, {args.model}, {dtype}"
    print(f"{'':28} {'tokens/s':>9} {'start-up s':>10}  ({what})")
    ray_start = sum(ray_info[k] for k in ("startup_s", "import_s", "model_s", "deepspeed_init_s"))
    print(f"{'Ray Train + DeepSpeed':28} {ray_info['train_tokens_per_s']:9.0f} {ray_start:10.1f}")
    print(f"{'bare PEFT loop':28} {bare['train_tokens_per_s']:9.0f} {bare['startup_s']:10.1f}")
    print(
        f"{'same + DeepSpeed, no Ray':28} {ds['train_tokens_per_s']:9.0f} {ds['startup_s']:10.1f}"
    )
    print(
        f"ratio {ratio:.2f}x (target >= 0.9x); DeepSpeed alone "
        f"{ds['train_tokens_per_s'] / bare['train_tokens_per_s']:.2f}x, Ray Train over it "
        f"{ray_info['train_tokens_per_s'] / ds['train_tokens_per_s']:.2f}x; final loss "
        f"Ray {ray_info['loss']:.3f}, bare {bare['loss']:.3f}"
    )


if __name__ == "__main__":
    main()
