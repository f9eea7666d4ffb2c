"""Sizing (pure): GPUs, ZeRO stage and memory per GPU of a training cell and of a vLLM engine,
from the model's published shape (tbr_ray.models.SHAPES) in bf16, against the cluster's GPUs.
The constants say what each estimate counts."""

from __future__ import annotations

from dataclasses import dataclass

from tbr_ray.config import RunConfig
from tbr_ray.models import UnknownModelError, get_spec, model_shape, shape_params

GIB = 2**30
SIZES = (1, 2, 4, 8)  # GPU counts tried, smallest first (tensor parallel needs a power of two)
BF16 = 2  # bytes per weight, activation and KV entry on GPUs
# vLLM beyond weights and KV cache, per GPU: activation peak of its profiling run, CUDA graphs,
# LoRA slots. Assumed, not measured here (no GPU): a generous figure for 7-70B models.
ENGINE_OVERHEAD_GIB = 4.0
# Training beyond weights, LoRA state and activations, per GPU: CUDA context, NCCL buffers,
# allocator fragmentation. Assumed; bench/gpu_lora_mfu.py prints the peak to check it against.
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
# CPU runs, as the grid's scheduler counts them (tbr_ray.grid.train_need, resource_capacity):
# a cell's Tune driver task holds a sliver beside its workers, and a sliver of the cluster
# stays free for Ray Data tasks.
TRIAL_DRIVER_CPU = 0.01
CPU_RESERVE = 0.1


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
    """Parameters of a model: the registry's published count, else (tiny presets, local
    folders) counted from its shape."""
    spec = get_spec(model)
    if spec.params_b > 0 and not spec.tiny:
        return spec.params_b * 1e9
    shape = model_shape(model)
    return float(shape_params(shape)) if shape else 0.0


def known_shape(model: str):
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
    if known_shape(model) is None:  # no shape to size by: one GPU unless the config says
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
    where = f"{model}: cluster.engine_gpus[{model}]={tp}"
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


def eval_engine_gpus(cfg: RunConfig, model: str) -> int:
    """GPUs a base model's evaluation reserves: it holds one engine at a time, its own, then
    each model judge's, so the largest of them (the runtime's reservation, tbr_ray.grid)."""
    judges = [judge.model for _, judge in cfg.eval.model_judges()]
    return max(engine_gpus(cfg, m) for m in [model, *judges])


# ------------------------------------------------------------------ training


def lora_params(model: str, rank: int) -> int:
    """Trainable LoRA parameters: rank x (in + out) for every targeted projection of every layer
    (Llama / Gemma: q, k, v, o, gate, up, down; Falcon: fused qkv, dense, the two MLP matrices)."""
    s = model_shape(model)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    if get_spec(model).family.name == "falcon":
        dims = [(s.hidden, q + 2 * kv), (q, s.hidden), (s.hidden, s.ffn), (s.ffn, s.hidden)]
    else:
        dims = [(s.hidden, q), (s.hidden, kv), (s.hidden, kv), (q, s.hidden)]
        dims += [(s.hidden, s.ffn), (s.hidden, s.ffn), (s.ffn, s.hidden)]
    return s.layers * rank * sum(i + o for i, o in dims)


def train_gib_per_gpu(cfg: RunConfig, model: str, gpus: int, zero: int) -> float:
    """One GPU of a training cell: bf16 base weights (sharded over the cell's GPUs at ZeRO-3),
    LoRA state (LORA_STATE_BYTES; optimizer states sharded from ZeRO-1, gradients from ZeRO-2),
    activations and logits of one micro-batch of data.max_seq_len tokens (never sharded: each
    GPU runs its own micro-batch), TRAIN_OVERHEAD_GIB."""
    s = model_shape(model)
    weights = model_params(model) * BF16 / (gpus if zero == 3 else 1)
    n_lora = lora_params(model, cfg.train.lora_rank)
    state = n_lora * (2 * BF16 + (LORA_STATE_BYTES - 2 * BF16) / (gpus if zero >= 1 else 1))
    tokens = cfg.train.micro_batch_size * cfg.data.max_seq_len
    per_token_layer = (ACT_ELEMS[0] * s.hidden + ACT_ELEMS[1] * s.ffn) * BF16
    acts = tokens * (s.layers * per_token_layer + s.vocab * LOGIT_BYTES)
    return (weights + state + acts) / GIB + TRAIN_OVERHEAD_GIB


def train_layout(cfg: RunConfig, model: str, max_gpus: int | None = None) -> TrainLayout:
    """GPUs and ZeRO stage of a cell of `model` on a GPU run: the smallest of 1, 2, 4, 8 GPUs
    (at most `max_gpus`, default cluster.gpus, else a node) that holds it at ZeRO-2, else at
    ZeRO-3; train.num_workers / train.zero_stage fix either choice (and are still checked).
    CPU runs: the config's workers (2 by default) and ZeRO stage (the registry's, 2), unchecked."""
    t, c, spec = cfg.train, cfg.cluster, get_spec(model)
    if not t.use_gpu:
        zero = t.zero_stage if t.zero_stage is not None else spec.zero_stage
        workers = t.num_workers or 2
        return TrainLayout(model, workers, zero, 0.0, _cpu_problem(cfg, model, workers, max_gpus))
    limit = max_gpus or c.gpus or c.gpus_per_node
    counts = [t.num_workers] if t.num_workers else [n for n in SIZES if n <= limit] or [1]
    zeros = [t.zero_stage] if t.zero_stage is not None else [2, 3]
    for n in counts:
        for z in zeros:
            need = train_gib_per_gpu(cfg, model, n, z)
            if need <= c.gpu_memory_gib:
                return TrainLayout(model, n, z, need)
    n, z = counts[-1], zeros[-1]
    need = train_gib_per_gpu(cfg, model, n, z)
    return TrainLayout(model, n, z, need, _train_problem(cfg, model, n, z, need, limit))


def _cpu_problem(cfg: RunConfig, model: str, workers: int, cores: int | None) -> str | None:
    """A CPU cell whose workers ask more CPUs than the cluster has never starts: Ray waits."""
    need = TRIAL_DRIVER_CPU + workers * cfg.train.cpus_per_worker
    if cores is None or need <= cores - CPU_RESERVE:
        return None
    room = cores - CPU_RESERVE - TRIAL_DRIVER_CPU
    fit = int(room // cfg.train.cpus_per_worker)
    fix = (
        f"train.num_workers at most {fit}, or fewer train.cpus_per_worker"
        if fit >= 1
        else f"train.cpus_per_worker at most {room / workers:.2f}"
    )
    return (
        f"{model}: train.num_workers x train.cpus_per_worker = {workers} x "
        f"{cfg.train.cpus_per_worker:g} CPUs (+ {TRIAL_DRIVER_CPU} for its driver), the "
        f"cluster has {cores} CPUs ({CPU_RESERVE} kept free), so Ray would wait for them "
        f"forever. Fix: {fix}."
    )


def _train_problem(cfg: RunConfig, model: str, n: int, zero: int, need: float, limit: int) -> str:
    t = cfg.train
    fixed = (" (train.num_workers)" if t.num_workers else "") + (
        " (train.zero_stage)" if t.zero_stage is not None else ""
    )
    return (
        f"{model}: training needs {need:.1f} GiB per GPU even at {n} GPU(s), ZeRO-{zero}{fixed}"
        f", over cluster.gpu_memory_gib={cfg.cluster.gpu_memory_gib:g} (at most {limit} GPUs "
        f"allowed). Fix: more GPUs (--gpus, up to 8 a cell), larger GPUs (--gpu-memory), a "
        f"smaller train.micro_batch_size or data.max_seq_len, unset train.num_workers / "
        f"train.zero_stage, or drop {model} from grid.models."
    )
