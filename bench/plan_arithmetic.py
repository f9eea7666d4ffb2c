"""The arithmetic behind a GPU plan's figures (tbr_ray.plan), one model at a time, as
docs/BENCHMARKS.md shows it: training tokens, FLOPs and seconds of a cell; an evaluation's
passes, prefill and decode; the totals.

    .venv/bin/python bench/plan_arithmetic.py                         # jobs/paper.yaml, 8 x H100
    .venv/bin/python bench/plan_arithmetic.py --gpus 8 --set cluster.gpu_type=A100
    .venv/bin/python bench/plan_arithmetic.py --sensitivity     # + the unmeasured constants

Prints a Markdown table per part, then the plan's totals line (the dry run's); with
--sensitivity, the totals with each assumed constant halved, and the value of each below
which the targets (<= 35 GPU-hours, <= 5 h) fail.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from tbr_ray.config import load_config
from tbr_ray.plan import eval_engine_gpus, plan_grid, planned_steps, train_layout
from tbr_ray.plan.cost import cost_model, load_s, train_flops_per_token, train_traffic_s
from tbr_ray.plan.evalcost import (
    decode_concurrency,
    engine_pass_s,
    eval_job_s,
    judge_job_s,
    merged_pass_s,
)
from tbr_ray.plan.schedule import format_totals
from tbr_ray.plan.sizing import engine_gpus, eval_passes, eval_replicas, judge_engine_gpus
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
        judging = judge_job_s(cfg, cost, max(judge_engine_gpus(cfg), 1), passes)
        rows.append(
            {
                "model": model,
                "GPUs (tp x replicas)": f"{eval_engine_gpus(cfg, model)}",
                "passes tuned/base": f"{passes[True]}/{passes[False]}",
                "tuned pass s": f"{tuned:.0f}",
                "base pass s": f"{base:.0f}",
                "seqs at once": f"{seqs:.0f}",
                "merge s/pass": f"{merged_pass_s(cfg, cost, model):.0f}",
                "generations min": f"{job / 60:.1f}",
                "judging min": f"{judging / 60:.1f}",
            }
        )
    return rows


def totals(cfg, cost, gpus: int, measured=None) -> str:
    p = plan_grid(cfg, gpus, cost, measured)
    kinds = ("write", "judge", "eval", "train")
    h = {k: sum(s.job.devices * s.job.seconds for s in p.slots if s.job.kind == k) for k in kinds}
    split = " / ".join(f"{h[k] / 3600:.1f}" for k in kinds)
    return f"{p.device_hours:.1f} ({split}) | {p.makespan_s / 3600:.2f} h"


ASSUMED = ("train_mfu", "prefill_mfu", "decode_mbu")


def sensitivity(cfg, cost, gpus: int) -> list[str]:
    """The totals as planned and with each assumed constant changed; then each constant's
    lowest value that keeps both targets (bisected)."""
    cases = [("as planned", cost, None)]
    cases += [(f"{f} halved", replace(cost, **{f: getattr(cost, f) / 2}), None) for f in ASSUMED]
    halved = {f: getattr(cost, f) / 2 for f in ASSUMED}
    cases += [("all three halved", replace(cost, **halved), None)]
    cases += [("no prefix caching", replace(cost, prefix_caching=False), None)]
    cases += [("no padding", replace(cost, padding_factor=1.0), None)]
    full = {b: {"tuned": 1e9, "base": 1e9} for b in cfg.eval.benchmarks}
    cases += [("every answer at its budget", cost, full)]
    fixed = replace(
        cost, engine_start_s=2 * cost.engine_start_s, cell_fixed_s=2 * cost.cell_fixed_s
    )
    cases += [("engine and cell start-up doubled", fixed, None)]
    lines = [
        "| cost model | GPU-hours (write / judge / eval / train) | makespan |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {totals(cfg, c, gpus, m)} |" for label, c, m in cases]
    for f in ASSUMED:
        lines.append(f"targets hold down to {f} = {_threshold(cfg, cost, gpus, f):.3f}")
    return lines


def _threshold(cfg, cost, gpus: int, field: str) -> float:
    lo, hi = 0.0, getattr(cost, field)
    for _ in range(25):
        mid = (lo + hi) / 2
        p = plan_grid(cfg, gpus, replace(cost, **{field: mid}))
        lo, hi = (lo, mid) if p.device_hours <= 35 and p.makespan_s <= 5 * 3600 else (mid, hi)
    return hi


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "jobs" / "paper.yaml")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--sensitivity", action="store_true", help="the assumed constants varied")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    cost = cost_model(cfg)
    print(tabulate(training_rows(cfg, cost), "keys", "github"))
    print()
    print(tabulate(eval_rows(cfg, cost), "keys", "github"))
    print()
    print("\n".join(format_totals(plan_grid(cfg, args.gpus))))
    if args.sensitivity:
        print()
        print("\n".join(sensitivity(cfg, cost, args.gpus)))


if __name__ == "__main__":
    main()
