"""The train stage on Ray Train: N workers, each DeepSpeed (ZeRO from config) on a PEFT LoRA model.

    adapter_dir = run_training(cfg, cell, model_path, mix_dir, output_dir)
    tbr-ray train --config jobs/tiny.yaml --output runs/x     # one cell, from the shell

gloo + fp32 on CPU, NCCL + bf16 on GPU. The tokenized mix (Parquet shards written by Ray Data)
reaches the workers as one Arrow table in the object store; each takes every world-th row.
Workers report loss and tokens/s, and checkpoint the LoRA adapter (safetensors), the resolved
config, the step counter and, under resume/, everything an exact continuation needs: DeepSpeed's
optimizer and LR-scheduler state (each rank its ZeRO partition, frozen base weights left out)
and every rank's RNG state. Rerunning with the same output resumes from the latest checkpoint
(Ray Train restores a run by name + storage path); `FailureConfig` restarts a dead worker
group, which resumes the same way. Every resume is recorded (train_state.json `resumes`, then
train_result.json). Rank 0 writes the cell's live progress (step, epoch, loss) to
cells/<cell_id>/progress.json for `tbr-ray ablate`'s progress view. The finished adapter is
copied to <output>/adapters/<cell_id>/ (without resume/) with train_result.json written last,
which is what marks the stage done.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tbr_ray import results
from tbr_ray.config import Cell, RunConfig
from tbr_ray.models import get_spec

STATE_FILE = "train_state.json"
RESUME_DIR = "resume"  # DeepSpeed optimizer/scheduler state + RNG state, per rank
DS_TAG = "ds"


def deepspeed_config(cfg: RunConfig, zero_stage: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for a run (pure). The optimizer is a torch AdamW passed to
    deepspeed.initialize, so no DeepSpeed optimizer op has to be compiled on CPU."""
    t = cfg.train
    accum = accumulation_steps(cfg, world_size)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches each worker accumulates per optimizer step (pure): derived from
    train.global_batch_size = micro_batch_size x accumulation x workers when it is set, so the
    global batch is the same on 1 or 8 workers; else train.grad_accum_steps."""
    t = cfg.train
    if t.global_batch_size is None:
        return t.grad_accum_steps
    per_round = t.micro_batch_size * world_size
    if t.global_batch_size % per_round:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"micro_batch_size x workers = {t.micro_batch_size} x {world_size} = {per_round}. "
            f"Fix: set train.global_batch_size to a multiple of {per_round}."
        )
    return t.global_batch_size // per_round


def resolved_train_settings(cfg: RunConfig, model: str) -> tuple[int, int]:
    """(num_workers, zero_stage): config values, else the planner's choice (tbr_ray.plan:
    the fewest GPUs that hold the cell at ZeRO-2, else ZeRO-3; on CPU 2 workers, ZeRO-2)."""
    from tbr_ray.plan import train_layout

    layout = train_layout(cfg, model)
    return layout.gpus, layout.zero_stage


def pad_collate(batch: dict, pad_id: int):
    """Pad a batch of variable-length rows (numpy object arrays) into torch tensors."""
    import torch

    ids, labels = list(batch["input_ids"]), list(batch["labels"])
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        input_ids[i, : len(x)] = torch.as_tensor(x)
        label_t[i, : len(y)] = torch.as_tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def _frozen_checksum(model) -> float:
    """Sum of |w| over frozen (base) parameters: equal before/after iff base is untouched
    (to float64 rounding, exact here since nothing writes them)."""
    import torch

    with torch.no_grad():
        return float(
            sum(p.detach().double().abs().sum() for p in model.parameters() if not p.requires_grad)
        )


def _build_model(config: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = RunConfig.model_validate(config["run"])
    spec = get_spec(config["model"])
    dtype = torch.bfloat16 if cfg.train.use_gpu else torch.float32
    base = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=dtype)
    lora = LoraConfig(
        r=cfg.train.lora_rank,
        lora_alpha=cfg.train.lora_alpha,
        lora_dropout=cfg.train.lora_dropout,
        target_modules=spec.peft_target_modules(),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def _save_adapter(engine, model, cfg_dict: dict, state: dict, out_dir: str) -> None:
    import deepspeed

    lora_params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):
        if engine.global_rank == 0:
            model.save_pretrained(out_dir, safe_serialization=True)
            Path(out_dir, "run_config.json").write_text(json.dumps(cfg_dict, indent=1))
            Path(out_dir, STATE_FILE).write_text(json.dumps(state))
    _save_resume_state(engine, Path(out_dir) / RESUME_DIR)


def _save_resume_state(engine, resume: Path) -> None:
    """Optimizer + LR scheduler (DeepSpeed, every rank its own files, which Ray Train merges
    into one checkpoint folder) and this rank's RNG state. Frozen base weights are left out:
    the adapter is all that trains."""
    import torch

    # DeepSpeed creates the folder on rank 0 only; each worker here writes into its own
    # temporary folder, so every rank makes its own.
    (resume / DS_TAG).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(
        str(resume), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True
    )
    torch.save(_rng_state(), resume / f"rng_rank{engine.global_rank}.pt")


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_adapter(model, ckpt_dir: str) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(ckpt_dir) / "adapter_model.safetensors")))
    return json.loads(Path(ckpt_dir, STATE_FILE).read_text())


def _restore_resume_state(engine, ckpt_dir: str, state: dict) -> dict:
    """Load optimizer, scheduler and RNG state saved by _save_resume_state, and record the
    resume in `state["resumes"]`. A checkpoint without them (written before they were
    saved) resumes from the weights alone, and says so."""
    import torch

    resume = Path(ckpt_dir) / RESUME_DIR
    rng = resume / f"rng_rank{engine.global_rank}.pt"
    full = rng.is_file() and (resume / DS_TAG).is_dir()
    if full:
        engine.load_checkpoint(
            str(resume),
            tag=DS_TAG,
            load_module_strict=False,  # frozen weights are not in it, by design
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        _set_rng_state(torch.load(rng, weights_only=False))
    else:
        for _ in range(state["step"]):  # the schedule is a function of the step alone
            engine.lr_scheduler.step()
    entry = {"from_step": state["step"], "time": time.time()}
    entry["restored"] = "optimizer, scheduler, rng" if full else "weights only"
    return {**state, "resumes": [*state.get("resumes", []), entry]}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: everything it needs comes in `config` (re-validated here)."""
    t_enter = time.time()
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoTokenizer

    cfg = RunConfig.model_validate(config["run"])
    clock = {"entered_at": t_enter, "import_s": time.time() - t_enter}
    torch.manual_seed(config["seed"])
    t = time.time()
    model = _build_model(config)
    clock["model_s"] = time.time() - t
    state = {"step": 0, "epoch": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = _load_adapter(model, d)
    frozen_before = _frozen_checksum(model)
    world = ray.train.get_context().get_world_size()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay,
    )
    t = time.time()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=lambda o: _lr_scheduler(o, cfg),
        config=deepspeed_config(cfg, config["zero_stage"], world),
    )
    if ckpt:
        with ckpt.as_directory() as d:
            state = _restore_resume_state(engine, d, state)
    clock["deepspeed_init_s"] = time.time() - t
    pad_id = AutoTokenizer.from_pretrained(config["model_path"]).pad_token_id or 0
    config = {**config, "worker_nodes": _worker_nodes(world), "clock": clock, "world": world}
    t = time.time()
    rows = _worker_rows(ray.get(config["mix"]), ray.train.get_context().get_world_rank(), world)
    clock["data_s"] = time.time() - t
    clock["checkpoint_s"] = 0.0
    if len(rows) < cfg.train.micro_batch_size:
        raise ValueError(
            f"this worker holds {len(rows)} rows, fewer than train.micro_batch_size="
            f"{cfg.train.micro_batch_size}, so it would train on nothing. Fix: lower "
            f"train.micro_batch_size or train.num_workers, or raise data.n_general/n_safety."
        )
    _train_epochs(engine, model, config, cfg, rows, pad_id, state, frozen_before)


def _train_epochs(engine, model, config, cfg, rows, pad_id, state, frozen_before) -> None:
    """The epochs from `state` on: micro-steps, checkpoints every N steps and per epoch."""
    world = config["world"]
    total, resumes = config["total_steps"], state.get("resumes", [])
    step, t0, tokens = state["step"], time.time(), 0
    for epoch in range(state["epoch"], cfg.train.epochs):
        seen = 0
        for batch in _epoch_batches(
            rows, cfg.train.micro_batch_size, pad_id, seed=config["seed"] * 1000 + epoch
        ):
            seen += 1
            if epoch == state["epoch"] and seen <= state.get("micro_in_epoch", 0):
                continue  # resumed: skip micro-batches this epoch already trained on
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # at a gradient-accumulation boundary it also steps the LR schedule
            tokens += int(batch["attention_mask"].sum())
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            done = step >= total
            _write_progress(engine, config, step, total, epoch, loss)
            every = cfg.train.checkpoint_every_steps
            if done or (every and step % every == 0):
                here = {"step": step, "epoch": epoch, "micro_in_epoch": seen, "resumes": resumes}
                _report(engine, model, config, loss, here, tokens * world, t0, frozen_before)
            if done:
                return
        here = {"step": step, "epoch": epoch + 1, "micro_in_epoch": 0, "resumes": resumes}
        _report(engine, model, config, loss, here, tokens * world, t0, frozen_before)


def _write_progress(engine, config: dict, step: int, total: int, epoch: int, loss) -> None:
    """Rank 0 writes the cell's live progress, at most about once a second (and at the end):
    the progress view and the dashboard gauges read it."""
    now = time.time()
    if engine.global_rank != 0 or not config.get("output"):
        return
    if step < total and now - config["clock"].get("progress_at", 0.0) < 1.0:
        return
    config["clock"]["progress_at"] = now
    progress = {"step": step, "total_steps": total, "epoch": epoch, "loss": float(loss.detach())}
    results.write_progress(config["output"], config["cell_id"], progress)


def _worker_rows(table, rank: int, world: int) -> list[dict]:
    """This worker's rows of the mix: every world-th row from `rank`, so the workers split it
    evenly and the same way on a rerun (a resumed epoch skips the same micro-batches)."""
    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(rank, table.num_rows, world)]


def _epoch_batches(rows: list[dict], micro: int, pad_id: int, seed: int):
    """Seeded shuffle per epoch, padded micro-batches, last partial batch dropped.
    (Length-grouped batches padded 26% less here but, with Adam, bunched the few safety rows
    into fewer steps and the tiny models stopped learning to refuse: kept random.)"""
    import random

    order = random.Random(seed).sample(range(len(rows)), len(rows))
    for i in range(0, len(order) - micro + 1, micro):
        chunk = [rows[j] for j in order[i : i + micro]]
        yield pad_collate(
            {"input_ids": [r["input_ids"] for r in chunk], "labels": [r["labels"] for r in chunk]},
            pad_id,
        )


def _worker_nodes(world: int) -> str:
    """Comma-separated Ray node ids of all workers (evidence of where a cell trained)."""
    import ray
    import torch.distributed as dist

    nodes: list = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return ",".join(sorted(set(nodes)))


def _lr_scheduler(optimizer, cfg: RunConfig):
    """Linear warm-up over train.warmup_steps, then constant: a torch LambdaLR that DeepSpeed
    steps at every optimizer step and saves in each checkpoint."""
    import torch

    warm = cfg.train.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0
    )


def _report(engine, model, config, loss, state, tokens, t0, frozen_before) -> None:
    import ray.train

    metrics = {
        "loss": float(loss.detach()),
        "step": state["step"],
        "epoch": state["epoch"],
        "resumed": len(state["resumes"]),
        "train_tokens_per_s": tokens / max(time.time() - t0, 1e-9),
        "base_checksum_before": frozen_before,
        "base_checksum_after": _frozen_checksum(model),
        "worker_nodes": config["worker_nodes"],
    }
    clock = config["clock"]
    metrics.update({k: round(v, 2) for k, v in clock.items() if k != "progress_at"})
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        _save_adapter(engine, model, config["run"], state, tmp)
        # Every rank reports its folder (its optimizer partition and RNG state); Ray Train
        # merges them into one checkpoint.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    clock["checkpoint_s"] += time.time() - t


def total_steps(cfg: RunConfig, n_rows: int, world: int) -> int:
    """Optimizer steps over a mix of `n_rows` on `world` workers (pure): whole micro-batches
    per worker and epoch, over the accumulation, times epochs, capped by train.max_steps."""
    micro_per_worker = n_rows // world // cfg.train.micro_batch_size
    per_epoch = micro_per_worker // accumulation_steps(cfg, world)
    steps = max(1, per_epoch) * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def planned_steps(cfg: RunConfig, model: str) -> int:
    """Optimizer steps a cell of `model` takes (pure): its mix of data.n_general + n_safety
    rows on the model's workers (`resolved_train_settings`). With train.global_batch_size set
    it is the same for every model; `tbr-ray ablate --dry-run` shows it per cell."""
    workers, _ = resolved_train_settings(cfg, model)
    return total_steps(cfg, cfg.data.n_general + cfg.data.n_safety, workers)


def adapter_dir(output: Path, cell: Cell) -> Path:
    return Path(output) / "adapters" / cell.cell_id


def run_training(
    cfg: RunConfig,
    cell: Cell,
    model_path: str,
    mix_dir: Path,
    output: Path,
    callbacks: list | None = None,
) -> Path:
    """Fine-tune one cell; returns the adapter folder. Finished cells return at once."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    done = adapter_dir(output, cell)
    if (done / "train_result.json").is_file():
        return done
    workers, zero = resolved_train_settings(cfg, cell.model)
    # The mix Ray Data wrote is small (2,000 rows at the paper's scale): it travels to the
    # workers as one Arrow table in the object store (any node), each worker taking its rows.
    # Feeding it through Ray Train's dataset ingest instead started a split-coordinator actor
    # and a streaming executor per cell: 6-9 s a cell on the 2-core box (docs/BENCHMARKS.md).
    mix = ray.put(pq.read_table(Path(mix_dir) / "shards", columns=["input_ids", "labels"]))
    n_rows = json.loads((Path(mix_dir) / "report.json").read_text())["n_rows"]
    loop_config = {
        "run": cfg.model_dump(mode="json"),
        "model": cell.model,
        "model_path": model_path,
        "seed": cell.seed,
        "zero_stage": zero,
        "total_steps": total_steps(cfg, n_rows, workers),
        "mix": mix,
        "output": str(Path(output).resolve()),  # where rank 0 writes the cell's progress
        "cell_id": cell.cell_id,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=None if cfg.train.use_gpu else {"CPU": cfg.train.cpus_per_worker},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RayRunConfig(
            name=f"train-{cell.cell_id}",
            storage_path=str(Path(output).resolve() / "ray_train"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    return _publish_adapter(result, done, workers, zero, t0, accumulation_steps(cfg, workers))


def _publish_adapter(
    result, done: Path, workers: int, zero: int, fit_start: float, accum: int
) -> Path:
    tmp = done.with_name(done.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        # resume/ (optimizer, scheduler, RNG) is for continuing training, not for serving.
        shutil.copytree(d, tmp, ignore=shutil.ignore_patterns(RESUME_DIR))
    metrics = dict(result.metrics or {})
    metrics.update(
        # provenance: every resume of this cell (worker-group restart or rerun), from which
        # step and with what state
        resumes=json.loads((tmp / STATE_FILE).read_text()).get("resumes", []),
        workers=workers,
        zero_stage=zero,
        grad_accum_steps=accum,
        train_seconds=round(time.time() - fit_start, 1),
        # Ray Train start-up: fit() called -> worker function entered (last report's worker)
        startup_s=round(metrics.pop("entered_at", fit_start) - fit_start, 1),
        base_unchanged=math.isclose(
            metrics.get("base_checksum_before", 0.0),
            metrics.get("base_checksum_after", 1.0),
            rel_tol=0,
            abs_tol=0,
        ),
    )
    (tmp / "train_result.json").write_text(json.dumps(metrics, indent=1, default=str))
    shutil.rmtree(done, ignore_errors=True)
    tmp.rename(done)
    return done
