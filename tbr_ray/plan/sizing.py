"""Sizing (pure): GPUs, ZeRO stage and memory per GPU of a training cell and of a vLLM engine,
from the model's published shape (tbr_ray.models.SHAPES) in bf16, against the cluster's GPUs.
The constants say what each estimate counts."""

from __future__ import annotations

from dataclasses import dataclass

from tbr_ray.config import PROMPTING, RunConfig
from tbr_ray.models import UnknownModelError, get_spec, model_shape, shape_params

GIB = 2**30
SIZES = (1, 2, 4, 8)  # GPU counts tried, smallest first (tensor parallel needs a power of two)
BF16 = 2  # bytes per weight, activation and KV entry on GPUs
# vLLM beyond weights and KV cache, per GPU: activation peak of its profiling run, CUDA graphs,
# LoRA slots. Assumed, not measured here (no GPU): a generous figure for 7-70B models.
ENGINE_OVERHEAD_GIB = 4.0
# Training beyond weights, LoRA state and activations, per GPU: CUDA context, NCCL buffers,
# allocator fragmentation. Assumed; bench/gpu_check.py prints the peak to check it against.
TRAIN_OVERHEAD_GIB = 3.0
# Bytes per trainable (LoRA) parameter: bf16 weight and gradient, fp32 master copy, Adam m and v.
LORA_STATE_BYTES = 16
FP32 = 4
# Activations kept for backward, counted from the real modules (transformers 5.19 Llama /
# Gemma / Gemma-2 / Falcon decoder layers, PEFT 0.21 lora.Linear; the saved tensors of one
# layer are listed by bench/activation_memory.py --census, which this count reproduces within
# 0.2% on CPU): see `layer_bytes_per_token`. The dropout mask of a LoRA input: CUDA's fused
# native_dropout keeps a bool mask (1 byte an element); CPU's dropout keeps its noise tensor
# in the input's dtype (2 in bf16), which the CPU measurement passes as mask_bytes=2.
GPU_MASK_BYTES = 1
# Logits per token at their peak, the start of backward: log_softmax's fp32 output (kept for
# its backward), the fp32 gradient coming from the loss and the fp32 gradient it makes
# (transformers' ForCausalLMLoss upcasts the bf16 logits; the forward's own peak, bf16 logits +
# fp32 copy + fp32 output, is 10). Gemma-2 adds its final logit softcapping's tanh (2 more).
# Measured: 12.0 and 14.0 bytes per vocab entry (bench/activation_memory.py, two vocab sizes).
LOGIT_BYTES = 12
SOFTCAP_LOGIT_BYTES = 2
# Checkpointing's backward: one layer's activations recomputed, plus the gradients flowing
# through it while it runs: 16-18.5 x hidden bytes a token more, measured on Llama- and
# Falcon-shaped layers (bench/activation_memory.py, a vocabulary small enough that the layer,
# not the logits, sets the peak).
RECOMPUTE_WORKSPACE_H = 18
# ZeRO-3 gathers each module's full bf16 weights just before it runs (and releases them after),
# prefetching the next up to stage3_prefetch_bucket_size = 5e7 parameters (DeepSpeed 0.19.8
# defaults, deepspeed/runtime/zero/config.py): one layer, or the embedding / output head.
ZERO3_PREFETCH_PARAMS = 5e7
# Families whose training attention is eager, not SDPA: Gemma-2's logit softcapping is ignored
# by SDPA (issue 20 point 9), so it trains with eager attention, which keeps the seq x seq
# scores (`layer_bytes_per_token`).
EAGER_TRAINING = frozenset({"gemma2"})
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


def kv_bytes_per_token(shape, tp: int) -> float:
    """KV cache bytes of one token on one of `tp` GPUs (its share of KV heads; replicated
    heads count whole)."""
    kv_heads = max(1, shape.kv_heads // tp) if tp <= shape.kv_heads else 1
    return 2 * shape.layers * kv_heads * shape.head_dim * BF16


def engine_gib_per_gpu(cfg: RunConfig, model: str, tp: int) -> float:
    """bf16 weights / tp + KV cache of `cluster.engine_min_sequences` sequences of
    `eval.max_model_len` tokens (`kv_bytes_per_token`) + ENGINE_OVERHEAD_GIB."""
    shape = model_shape(model)
    tokens = cfg.eval.max_model_len * cfg.cluster.engine_min_sequences
    weights = model_params(model) * BF16 / tp
    return (weights + kv_bytes_per_token(shape, tp) * tokens) / GIB + ENGINE_OVERHEAD_GIB


def kv_capacity_tokens(cfg: RunConfig, model: str, tp: int) -> float:
    """Tokens of KV cache an engine of `tp` GPUs holds: what eval.gpu_memory_utilization of a
    GPU leaves after the weights' shard and ENGINE_OVERHEAD_GIB (vLLM gives the rest to its
    KV cache). inf for a model without a known shape."""
    shape = known_shape(model)
    if shape is None:
        return float("inf")
    budget = cfg.eval.gpu_memory_utilization * cfg.cluster.gpu_memory_gib - ENGINE_OVERHEAD_GIB
    free = budget * GIB - model_params(model) * BF16 / tp
    return max(free, 0.0) / kv_bytes_per_token(shape, tp)


def engine_layout(cfg: RunConfig, model: str) -> EngineLayout:
    """The smallest of 1, 2, 4, 8 GPUs (at most a node) that divides the model's heads and whose
    shards hold weights + KV cache within eval.gpu_memory_utilization of a GPU;
    `cluster.engine_gpus[model]` overrides the choice (and is still checked)."""
    c = cfg.cluster
    budget = cfg.eval.gpu_memory_utilization * c.gpu_memory_gib
    override = c.engine_gpus.get(model)
    if known_shape(model) is None:  # no shape to size by: one GPU unless the config says
        tp = override or 1
        return EngineLayout(model, tp, float("nan"), budget, engine_node_problem(cfg, model, tp))
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
    if too_big := engine_node_problem(cfg, model, tp):
        return too_big
    if not tp_divides(shape, tp):
        ok = [s for s in SIZES if tp_divides(shape, s)]
        return (
            f"{where}: does not divide its {shape.heads} attention heads / {shape.kv_heads} KV "
            f"heads. Fix: one of {ok}."
        )
    if need > budget:
        return f"{where}: {need:.1f} GiB per GPU, over {budget:.1f} GiB. Fix: more GPUs."
    return None


def engine_node_problem(cfg: RunConfig, model: str, tp: int) -> str | None:
    """Why an engine of `tp` GPUs for `model` fits no node of the configured cluster (pure;
    by configuration, not by the nodes alive now: an autoscaling cluster starts with no GPU
    node), or None."""
    n = cfg.cluster.gpus_per_node
    if tp <= n:
        return None
    return (
        f"{model}: cluster.engine_gpus[{model}]={tp}: an engine larger than a node "
        f"(cluster.gpus_per_node={n}). Fix: at most {n}."
    )


def engine_gpus(cfg: RunConfig, model: str) -> int:
    """GPUs (= vLLM tensor_parallel_size) of every engine that serves `model` (evaluation,
    reflection writer, judge). Raises PlanError, with the fix, when no size fits a node."""
    layout = engine_layout(cfg, model)
    if layout.problem:
        raise PlanError(layout.problem)
    return layout.gpus


def eval_passes(cfg: RunConfig, model: str) -> dict[bool, int]:
    """{tuned: passes} of a base model's evaluation: one per trained cell (True), one per
    prompting cell and one for the base model itself with eval.evaluate_base (False)."""
    mine = [c for c in cfg.cells() if c.model == model]
    prompting = sum(c.condition in PROMPTING for c in mine)
    return {True: len(mine) - prompting, False: prompting + int(cfg.eval.evaluate_base)}


def eval_units(passes: dict[bool, int]) -> int:
    """Engine units of an evaluation: one per adapter, and one for the base model's own pass
    and the prompting passes together (tbr_ray.evaluate._units, tbr_ray.grid.eval_units)."""
    return passes[True] + int(passes[False] > 0)


def eval_replicas(cfg: RunConfig, model: str) -> int:
    """Engine replicas of `model`'s generations: cluster.engine_replicas[model], else
    cluster.max_engine_replicas, never more than its units (a unit never splits), at least 1
    (the rule of tbr_ray.engine.engine_replicas_for)."""
    wanted = cfg.cluster.engine_replicas.get(model, cfg.cluster.max_engine_replicas)
    return max(1, min(wanted, eval_units(eval_passes(cfg, model))))


def eval_engine_gpus(cfg: RunConfig, model: str) -> int:
    """GPUs a base model's generations reserve: its replicas, each of its engine's size (the
    runtime's reservation, tbr_ray.grid.eval_need). Its judging is a job of its own
    (`judge_engine_gpus`)."""
    return engine_gpus(cfg, model) * eval_replicas(cfg, model)


def judge_engine_gpus(cfg: RunConfig) -> int:
    """GPUs a base model's judging reserves: one model judge's engine at a time, the largest
    (tbr_ray.grid.judge_need); 0 when only rule judges run."""
    return max((engine_gpus(cfg, j.model) for _, j in cfg.eval.model_judges()), default=0)


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


def _lora_inputs(shape, family: str) -> list[tuple[int, str]]:
    """(width, which tensor) of the input of every LoRA module of a layer: Llama / Gemma /
    Gemma-2 q, k, v (the attention norm's output), o (the attention output), gate, up (the
    MLP norm's output), down (the gated product); Falcon's fused qkv, dense, the two MLP
    matrices (PEFT targets as in tbr_ray.models)."""
    q = shape.heads * shape.head_dim
    if family == "falcon":
        return [
            (shape.hidden, "ln_attn"),
            (q, "attn"),
            (shape.hidden, "ln_mlp"),
            (shape.ffn, "act"),
        ]
    attn, mlp = [(shape.hidden, "ln_attn")] * 3, [(shape.hidden, "ln_mlp")] * 2
    return [*attn, (q, "attn"), *mlp, (shape.ffn, "act")]


def layer_bytes_per_token(
    shape,
    family: str,
    seq: int,
    rank: int,
    dropout: float,
    mask_bytes: int = GPU_MASK_BYTES,
) -> float:
    """Bytes one decoder layer keeps for backward per token: bf16 training of a frozen base
    with LoRA (only what the LoRA gradients and the input gradients need: a frozen linear
    keeps no input). Counted from the modules (bench/activation_memory.py lists them):

      norms      RMSNorm upcasts its input: an fp32 copy (4 h) per norm, 2 a layer (Gemma-2: 4);
                 Falcon's LayerNorm keeps its bf16 input (2 h; its two norms read one tensor)
      LoRA       per module, with dropout: its own dropped copy of the input (bf16, lora_A's
                 input) and the dropout mask (mask_bytes); without dropout the input itself,
                 shared by modules that read one tensor; and lora_A's output (rank wide)
      MLP        SwiGLU / GeGLU: gate, up and the activation (3 ffn, bf16); Falcon: GELU's input
      attention  SDPA (flash / memory-efficient): q, k, v and the output (bf16; a padding mask
                 makes transformers repeat the KV heads, so k and v are q-wide), log-sum-exp
                 (fp32 per head) and the padding mask made a bf16 bias (seq per token); eager
                 (EAGER_TRAINING): q, k, v and 8 bytes per head and key (the scores' softcap
                 tanh and the probabilities in bf16, the softmax's fp32 output)

    With LoRA on every projection and dropout this is 30 h + 4 kv + 9 ffn bytes for Llama
    without a padding mask (kv = h with one); the 18 h + 6 ffn counted before left out the
    fp32 norm inputs, the dropout copies and one SwiGLU tensor."""
    q = shape.heads * shape.head_dim
    if family == "falcon":
        norms, mlp = BF16 * shape.hidden, BF16 * shape.ffn
    else:
        norms = (4 if family == "gemma2" else 2) * FP32 * shape.hidden
        mlp = 3 * BF16 * shape.ffn
    inputs = _lora_inputs(shape, family)
    if dropout > 0:
        lora = sum((BF16 + mask_bytes) * w for w, _ in inputs)
    else:
        lora = sum(BF16 * w for w, _ in dict((name, (w, name)) for w, name in inputs).values())
    lora += len(inputs) * rank * BF16
    if family in EAGER_TRAINING:
        attn = 3 * BF16 * q + 8 * shape.heads * seq
    else:
        attn = 4 * BF16 * q + FP32 * shape.heads + BF16 * seq
    return norms + lora + mlp + attn


def activation_bytes_per_token(
    shape, family: str, seq: int, rank: int, dropout: float, checkpointing: bool, mask_bytes=1
) -> float:
    """Peak activation bytes per token of a micro-batch through the whole model. Without
    checkpointing: every layer's `layer_bytes_per_token` plus the final norm and the logits
    (LOGIT_BYTES x vocab). With it (transformers' gradient checkpointing: each decoder
    layer's forward runs under torch.utils.checkpoint and is recomputed in backward): each
    layer keeps only its bf16 input (2 h), and on top the larger of the logits (the forward's
    end) and one layer's recomputed activations with its backward's workspace."""
    layer = layer_bytes_per_token(shape, family, seq, rank, dropout, mask_bytes)
    logits = LOGIT_BYTES + (SOFTCAP_LOGIT_BYTES if family == "gemma2" else 0)
    head = logits * shape.vocab + FP32 * shape.hidden
    if checkpointing:
        recompute = layer + RECOMPUTE_WORKSPACE_H * shape.hidden
        return shape.layers * BF16 * shape.hidden + max(head, recompute)
    return shape.layers * layer + head


def zero3_gathered_bytes(shape) -> float:
    """What ZeRO-3 holds gathered at once on every rank: the largest module's bf16 weights
    (a decoder layer, or the vocab x hidden embedding / output head) and the prefetch."""
    per_layer = (shape_params(shape) - shape.vocab * shape.hidden) / shape.layers
    return BF16 * (max(per_layer, shape.vocab * shape.hidden) + ZERO3_PREFETCH_PARAMS)


def train_gib_per_gpu(cfg: RunConfig, model: str, gpus: int, zero: int) -> float:
    """One GPU of a training cell: bf16 base weights (sharded over the cell's GPUs at ZeRO-3,
    plus what ZeRO-3 gathers at once, `zero3_gathered_bytes`),
    LoRA state (LORA_STATE_BYTES; optimizer states sharded from ZeRO-1, gradients from ZeRO-2),
    activations of one micro-batch of data.max_seq_len tokens (`activation_bytes_per_token`,
    with train.gradient_checkpointing; never sharded: each GPU runs its own micro-batch),
    TRAIN_OVERHEAD_GIB."""
    s, t = model_shape(model), cfg.train
    weights = model_params(model) * BF16 / (gpus if zero == 3 else 1)
    weights += zero3_gathered_bytes(s) if zero == 3 else 0
    n_lora = lora_params(model, t.lora_rank)
    state = n_lora * (2 * BF16 + (LORA_STATE_BYTES - 2 * BF16) / (gpus if zero >= 1 else 1))
    tokens = t.micro_batch_size * cfg.data.max_seq_len
    per_token = activation_bytes_per_token(
        s,
        get_spec(model).family.name,
        cfg.data.max_seq_len,
        t.lora_rank,
        t.lora_dropout,
        t.gradient_checkpointing,
    )
    return (weights + state + tokens * per_token) / GIB + TRAIN_OVERHEAD_GIB


def train_layout(cfg: RunConfig, model: str, max_gpus: int | None = None) -> TrainLayout:
    """GPUs and ZeRO stage of a cell of `model` on a GPU run: the smallest of 1, 2, 4, 8 GPUs
    (at most `max_gpus`, default cluster.gpus, else a node) that holds it (`train_budget_gib`)
    at ZeRO-2, else at ZeRO-3; train.num_workers / train.zero_stage fix either choice (and
    are still checked). CPU runs: the config's workers (2 by default) and ZeRO stage (the
    registry's, 2), unchecked."""
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
            if need <= train_budget_gib(cfg):
                return TrainLayout(model, n, z, need)
    n, z = counts[-1], zeros[-1]
    need = train_gib_per_gpu(cfg, model, n, z)
    return TrainLayout(model, n, z, need, _train_problem(cfg, model, n, z, need, limit))


def train_budget_gib(cfg: RunConfig) -> float:
    """What a training cell's counted need may fill of one GPU: cluster.gpu_memory_gib x
    cluster.train_memory_utilization."""
    return cfg.cluster.gpu_memory_gib * cfg.cluster.train_memory_utilization


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
        f", over {train_budget_gib(cfg):.1f} GiB (cluster.train_memory_utilization="
        f"{cfg.cluster.train_memory_utilization:g} x cluster.gpu_memory_gib="
        f"{cfg.cluster.gpu_memory_gib:g}; at most {limit} GPUs "
        f"allowed). Fix: more GPUs (--gpus, up to 8 a cell), larger GPUs (--gpu-memory), a "
        f"smaller train.micro_batch_size or data.max_seq_len, unset train.num_workers / "
        f"train.zero_stage, or drop {model} from grid.models."
    )
