"""Optimizer-step arithmetic of a training cell (pure): workers, accumulation, steps.

    workers, zero = resolved_train_settings(cfg, "llama-2-70b")   # (8, 3) on 80 GiB cards
    accumulation_steps(cfg, workers)                               # micro-batches per step
    planned_steps(cfg, "llama-2-70b")                              # 186 with jobs/paper.yaml
    global_batch_problems(cfg)                                     # [] when the batch splits

The trainer (tbr_ray.train) and the planner's costs and schedule both take their numbers from
here, so what the dry run prints is what the workers do.
"""

from __future__ import annotations

import math

from tbr_ray.config import RunConfig
from tbr_ray.plan.sizing import train_layout


def resolved_train_settings(cfg: RunConfig, model: str) -> tuple[int, int]:
    """(num_workers, zero_stage): config values, else the planner's choice (`train_layout`:
    the fewest GPUs that hold the cell at ZeRO-2, else ZeRO-3; on CPU 2 workers, ZeRO-2)."""
    layout = train_layout(cfg, model)
    return layout.gpus, layout.zero_stage


def accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches each worker accumulates per optimizer step: derived from
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


def total_steps(cfg: RunConfig, n_rows: int, world: int) -> int:
    """Optimizer steps over a mix of `n_rows` on `world` workers: whole micro-batches per
    worker and epoch, over the accumulation, times epochs, capped by train.max_steps."""
    micro_per_worker = n_rows // world // cfg.train.micro_batch_size
    per_epoch = micro_per_worker // accumulation_steps(cfg, world)
    steps = max(1, per_epoch) * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def planned_steps(cfg: RunConfig, model: str) -> int:
    """Optimizer steps a cell of `model` takes: its mix of data.n_general + n_safety rows on
    the model's workers (`resolved_train_settings`). With train.global_batch_size set it is
    the same for every model; `tbr-ray ablate --dry-run` shows it per cell."""
    workers, _ = resolved_train_settings(cfg, model)
    return total_steps(cfg, cfg.data.n_general + cfg.data.n_safety, workers)


def global_batch_problems(cfg: RunConfig) -> list[str]:
    """train.global_batch_size must split into whole micro-batches on every grid model's
    workers: one line naming the value, the models it fails and the fix, else []. The plan
    (`plan_grid`) refuses it, and every command stops on it as it loads the config
    (tbr_ray.cli), --config-only too, before Ray starts."""
    t = cfg.train
    if t.global_batch_size is None:
        return []
    rounds = {m: t.micro_batch_size * resolved_train_settings(cfg, m)[0] for m in cfg.grid.models}
    bad = {m: r for m, r in rounds.items() if t.global_batch_size % r}
    if not bad:
        return []
    return [
        f"train.global_batch_size={t.global_batch_size} does not split into whole "
        "micro-batches for "
        + ", ".join(f"{m} ({r} = micro_batch_size x workers)" for m, r in bad.items())
        + f". Fix: a multiple of {math.lcm(*rounds.values())} (every grid model), or change "
        "train.micro_batch_size / train.num_workers."
    ]


def batch_fit_problems(cfg: RunConfig) -> list[str]:
    """One optimizer step (micro_batch_size x accumulation x workers rows) must fit in the mix
    of data.n_general + n_safety rows: else a worker holds fewer rows than one micro-batch and
    the trainer stops after Ray started (tbr_ray.train). One line per worker count that does
    not fit, naming its grid models, else []. Needs `global_batch_problems` passed first."""
    t, rows = cfg.train, cfg.data.n_general + cfg.data.n_safety
    misfits: dict[int, list[str]] = {}
    for model in cfg.grid.models:
        workers, _ = resolved_train_settings(cfg, model)
        if t.micro_batch_size * accumulation_steps(cfg, workers) * workers > rows:
            misfits.setdefault(workers, []).append(model)
    out = []
    for workers, models in misfits.items():
        accum = accumulation_steps(cfg, workers)
        out.append(
            f"{', '.join(models)}: one optimizer step takes train.micro_batch_size x "
            f"accumulation x workers = {t.micro_batch_size} x {accum} x {workers} = "
            f"{t.micro_batch_size * accum * workers} rows, but the mix holds {rows} "
            f"(data.n_general + data.n_safety). Fix: {_smaller_step(rows, workers, accum)}."
        )
    return out


def _smaller_step(rows: int, workers: int, accum: int) -> str:
    if rows >= workers * accum:
        most = rows // (workers * accum)
        return f"train.micro_batch_size at most {most}, less accumulation, or a larger mix"
    return f"fewer train.num_workers (each needs a micro-batch of the {rows} rows)"
