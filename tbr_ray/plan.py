"""The plan before the rent (pure): GPUs, ZeRO stage and memory fit per cell, engine GPUs per base
model, then GPU-hours and the makespan of the grid on a given cluster.

    engine_gpus(cfg, "llama-2-70b")          # tensor-parallel size of that model's vLLM engines
    train_layout(cfg, "llama-2-70b")         # (GPUs, ZeRO stage) of one training cell
    plan = plan_grid(cfg, devices=8)         # every cell and engine, problems, schedule
    print(format_plan(plan))
    tbr-ray ablate --config jobs/paper.yaml --dry-run --gpus 8 --gpu-memory 80

Memory is estimated from the model's published shape (tbr_ray.models.SHAPES) in bf16; the
constants below say what each estimate counts. Nothing here talks to a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from tbr_ray.config import RunConfig
from tbr_ray.models import UnknownModelError, get_spec, model_shape, shape_params

GIB = 2**30
SIZES = (1, 2, 4, 8)  # GPU counts tried, smallest first (tensor parallel needs a power of two)
BF16 = 2  # bytes per weight, activation and KV entry on GPUs
# vLLM beyond weights and KV cache, per GPU: activation peak of its profiling run, CUDA graphs,
# LoRA slots (measured by vLLM's own start-up log at 2-4 GiB on 7-70B models; upper end taken).
ENGINE_OVERHEAD_GIB = 4.0
# Training beyond weights, LoRA state and activations, per GPU: CUDA context, NCCL buffers,
# allocator fragmentation.
TRAIN_OVERHEAD_GIB = 3.0
# Bytes per trainable (LoRA) parameter: bf16 weight and gradient, fp32 master copy, Adam m and v.
LORA_STATE_BYTES = 16
# Activation bytes kept for backward per token per layer, no recomputation, SDPA attention (no
# seq^2 scores): block input, q/k/v/attention output, o_proj input, two norms (~9 x hidden) and
# the MLP's gate, up and activated widths (3 x ffn), bf16. Korthikanti et al. 2022 count 34 x
# hidden for a 4 x hidden MLP; this is the same count for a SwiGLU of width ffn.
ACT_ELEMS = (9, 3)  # (x hidden, x ffn) elements per token per layer
# Logits per token: bf16 logits, their fp32 copy for the loss and its fp32 gradient.
LOGIT_BYTES = 10


class PlanError(ValueError):
    """A config that cannot run on the cluster, worded with the fix."""


@dataclass(frozen=True)
class EngineLayout:
    model: str
    gpus: int  # tensor-parallel size
    gib_per_gpu: float  # weights + KV cache + overhead, per GPU
    budget_gib: float  # eval.gpu_memory_utilization x cluster.gpu_memory_gib
    problem: str | None = None  # set when no size fits (the plan refuses the model)


@dataclass(frozen=True)
class TrainLayout:
    model: str
    gpus: int  # Ray Train workers (GPUs on a GPU run)
    zero_stage: int
    gib_per_gpu: float
    problem: str | None = None


def model_params(model: str) -> float:
    """Parameters of a model: the registry's published count, else counted from its shape."""
    spec = get_spec(model)
    if spec.params_b > 0:
        return spec.params_b * 1e9
    shape = model_shape(model)
    return float(shape_params(shape)) if shape else 0.0


def _known_shape(model: str):
    try:
        return model_shape(model)
    except UnknownModelError:  # a hub id (judge, reflector) the registry does not describe
        return None


# ------------------------------------------------------------------ engines


def tp_divides(shape, tp: int) -> bool:
    """vLLM's rule: attention heads split evenly over the TP ranks; KV heads split evenly, or
    (fewer KV heads than ranks) are replicated a whole number of times."""
    kv_ok = shape.kv_heads % tp == 0 if tp <= shape.kv_heads else tp % shape.kv_heads == 0
    return shape.heads % tp == 0 and kv_ok


def engine_gib_per_gpu(cfg: RunConfig, model: str, tp: int) -> float:
    """bf16 weights / tp + KV cache of `cluster.engine_min_sequences` sequences of
    `eval.max_model_len` tokens (its share of KV heads; replicated heads count whole) +
    ENGINE_OVERHEAD_GIB."""
    shape = model_shape(model)
    kv_heads = max(1, shape.kv_heads // tp) if tp <= shape.kv_heads else 1
    kv_per_token = 2 * shape.layers * kv_heads * shape.head_dim * BF16
    tokens = cfg.eval.max_model_len * cfg.cluster.engine_min_sequences
    weights = model_params(model) * BF16 / tp
    return (weights + kv_per_token * tokens) / GIB + ENGINE_OVERHEAD_GIB


def engine_layout(cfg: RunConfig, model: str) -> EngineLayout:
    """The smallest of 1, 2, 4, 8 GPUs (at most a node) that divides the model's heads and whose
    shards hold weights + KV cache within eval.gpu_memory_utilization of a GPU;
    `cluster.engine_gpus[model]` overrides the choice (and is still checked)."""
    c = cfg.cluster
    budget = cfg.eval.gpu_memory_utilization * c.gpu_memory_gib
    override = c.engine_gpus.get(model)
    if _known_shape(model) is None:  # no shape to size by: one GPU unless the config says
        return EngineLayout(model, override or 1, float("nan"), budget)
    if override is not None:
        need = engine_gib_per_gpu(cfg, model, override)
        bad = _engine_override_problem(cfg, model, override, need, budget)
        return EngineLayout(model, override, need, budget, bad)
    shape = model_shape(model)
    tried = [s for s in SIZES if s <= c.gpus_per_node and tp_divides(shape, s)]
    for tp in tried:
        need = engine_gib_per_gpu(cfg, model, tp)
        if need <= budget:
            return EngineLayout(model, tp, need, budget)
    need = engine_gib_per_gpu(cfg, model, tried[-1])
    return EngineLayout(
        model,
        tried[-1],
        need,
        budget,
        f"{model}: its vLLM engine needs {need:.1f} GiB per GPU even at {tried[-1]} GPU(s) "
        f"(the most a node of cluster.gpus_per_node={c.gpus_per_node} allows with "
        f"{shape.heads} heads), over {budget:.1f} GiB (eval.gpu_memory_utilization="
        f"{cfg.eval.gpu_memory_utilization} x cluster.gpu_memory_gib={c.gpu_memory_gib:g}). "
        f"Fix: larger GPUs (--gpu-memory), more GPUs per node (cluster.gpus_per_node), a shorter "
        f"eval.max_model_len or fewer cluster.engine_min_sequences, or drop {model} from "
        f"grid.models.",
    )


def _engine_override_problem(cfg, model, tp, need, budget) -> str | None:
    shape = model_shape(model)
    where = f"cluster.engine_gpus[{model}]={tp}"
    if tp > cfg.cluster.gpus_per_node:
        return (
            f"{where}: an engine larger than a node (cluster.gpus_per_node="
            f"{cfg.cluster.gpus_per_node}). Fix: at most {cfg.cluster.gpus_per_node}."
        )
    if not tp_divides(shape, tp):
        ok = [s for s in SIZES if tp_divides(shape, s)]
        return (
            f"{where}: does not divide its {shape.heads} attention heads / {shape.kv_heads} KV "
            f"heads. Fix: one of {ok}."
        )
    if need > budget:
        return f"{where}: {need:.1f} GiB per GPU, over {budget:.1f} GiB. Fix: more GPUs."
    return None


def engine_gpus(cfg: RunConfig, model: str) -> int:
    """GPUs (= vLLM tensor_parallel_size) of every engine that serves `model` (evaluation,
    reflection writer, judge). Raises PlanError, with the fix, when no size fits a node."""
    layout = engine_layout(cfg, model)
    if layout.problem:
        raise PlanError(layout.problem)
    return layout.gpus
