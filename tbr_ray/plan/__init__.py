"""The plan before the rent (pure): GPUs, ZeRO stage and memory fit per cell, engine GPUs per base
model, then GPU-hours and the makespan of the grid on a given cluster.

    engine_gpus(cfg, "llama-2-70b")          # tensor-parallel size of that model's vLLM engines
    train_layout(cfg, "llama-2-70b")         # (GPUs, ZeRO stage) of one training cell
    plan = plan_grid(cfg, 8)                 # every cell and engine, problems, schedule
    print(format_plan(plan))
    tbr-ray ablate --config jobs/paper.yaml --dry-run --gpus 8 --gpu-memory 80

Memory is estimated from the model's published shape (tbr_ray.models.SHAPES) in bf16; the
constants of `sizing` say what each estimate counts. Nothing here talks to a cluster.

The package: `sizing` (memory and layouts), `steps` (workers, accumulation and optimizer
steps of a cell, the trainer's too), `cost` (throughput assumptions and job seconds),
`policy` (the scheduling policy: the runtime, tbr_ray.grid, calls the same `pick`),
`schedule` (the policy's simulation, GridPlan and the dry-run report), `power` (the paired
design's power arithmetic, a leaf the report shares) and `power_plan` (the dry run's power
section per Table 3 column).
"""

from tbr_ray.plan.cost import CPU_COST, GPU_COST, CostModel, train_flops_per_token
from tbr_ray.plan.schedule import (
    GridPlan,
    Job,
    Slot,
    format_plan,
    plan_grid,
    refused_models,
    simulate,
)
from tbr_ray.plan.sizing import (
    EngineLayout,
    PlanError,
    TrainLayout,
    engine_gpus,
    engine_layout,
    eval_engine_gpus,
    lora_params,
    model_params,
    tp_divides,
    train_gib_per_gpu,
    train_layout,
)
from tbr_ray.plan.steps import (
    accumulation_steps,
    batch_fit_problems,
    global_batch_problems,
    planned_steps,
    resolved_train_settings,
    total_steps,
)

__all__ = [
    "CPU_COST",
    "GPU_COST",
    "CostModel",
    "EngineLayout",
    "GridPlan",
    "Job",
    "PlanError",
    "Slot",
    "TrainLayout",
    "accumulation_steps",
    "batch_fit_problems",
    "engine_gpus",
    "engine_layout",
    "eval_engine_gpus",
    "format_plan",
    "global_batch_problems",
    "lora_params",
    "model_params",
    "plan_grid",
    "planned_steps",
    "refused_models",
    "resolved_train_settings",
    "simulate",
    "total_steps",
    "tp_divides",
    "train_flops_per_token",
    "train_gib_per_gpu",
    "train_layout",
]
