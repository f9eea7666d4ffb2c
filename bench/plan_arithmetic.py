"""The arithmetic behind a GPU plan's figures (tbr_ray.plan), one model at a time, as
docs/BENCHMARKS.md shows it: training tokens, FLOPs and seconds of a cell; an evaluation's
passes, prefill and decode; the totals.

    .venv/bin/python bench/plan_arithmetic.py                         # jobs/paper.yaml, 8 x H100
    .venv/bin/python bench/plan_arithmetic.py --gpus 8 --set cluster.gpu_type=A100

Prints a Markdown table per part, then the plan's totals line (the dry run's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tabulate import tabulate

from tbr_ray.config import load_config
from tbr_ray.plan import eval_engine_gpus, plan_grid, planned_steps, train_layout
from tbr_ray.plan.cost import cost_model, load_s, train_flops_per_token, train_traffic_s
from tbr_ray.plan.evalcost import (
    decode_concurrency,
    engine_pass_s,
    eval_job_s,
    merged_pass_s,
)
from tbr_ray.plan.schedule import format_totals
from tbr_ray.plan.sizing import engine_gpus, eval_passes, eval_replicas
from tbr_ray.plan.steps import accumulation_steps

REPO = Path(__file__).resolve().parent.parent


def training_rows(cfg, cost) -> list[dict]:
    rows = []
    for model in cfg.grid.models:
        lay, steps, t = train_layout(cfg, model), planned_steps(cfg, model), cfg.train
        seq = cost.example_tokens * cost.padding_factor
        accum = accumulation_steps(cfg, lay.gpus)
        tokens = steps * t.micro_batch_size * accum * lay.gpus * seq
        per_token = train_flops_per_token(model, t.lora_rank, seq, t.gradient_checkpointing)
        compute = tokens * per_token / (lay.gpus * cost.peak_flops * cost.train_mfu)
        traffic = train_traffic_s(cfg, cost, model, lay.gpus, steps * accum)
        fixed = cost.cell_fixed_s + load_s(cost, model)
        rows.append(
            {
                "model": model,
                "GPUs/ZeRO": f"{lay.gpus}/{lay.zero_stage}",
                "GiB/GPU": f"{lay.gib_per_gpu:.1f}",
                "padded tokens": f"{tokens / 1e6:.2f}M",
                "GFLOP/token": f"{per_token / 1e9:.0f}",
                "compute s": f"{compute:.0f}",
                "weights s": f"{traffic:.0f}",
                "fixed+load s": f"{fixed:.0f}",
                "cell min": f"{(fixed + max(compute, traffic)) / 60:.1f}",
            }
        )
    return rows


def eval_rows(cfg, cost) -> list[dict]:
    rows = []
    for model in cfg.grid.models:
        tp, passes = engine_gpus(cfg, model), eval_passes(cfg, model)
        tuned = engine_pass_s(cfg, cost, model, tp, True)
        base = engine_pass_s(cfg, cost, model, tp, False)
        seqs = decode_concurrency(cfg, cost, model, tp, 10**9, 300)
        job = eval_job_s(cfg, cost, model, tp, passes, eval_replicas(cfg, model))
        rows.append(
            {
                "model": model,
                "GPUs (tp x replicas)": f"{eval_engine_gpus(cfg, model)}",
                "passes tuned/base": f"{passes[True]}/{passes[False]}",
                "tuned pass s": f"{tuned:.0f}",
                "base pass s": f"{base:.0f}",
                "seqs at once": f"{seqs:.0f}",
                "merge s/pass": f"{merged_pass_s(cost, model):.0f}",
                "job min": f"{job / 60:.1f}",
            }
        )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "jobs" / "paper.yaml")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    cost = cost_model(cfg)
    print(tabulate(training_rows(cfg, cost), "keys", "github"))
    print()
    print(tabulate(eval_rows(cfg, cost), "keys", "github"))
    print()
    print("\n".join(format_totals(plan_grid(cfg, args.gpus))))


if __name__ == "__main__":
    main()
