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

import math
from dataclasses import dataclass

from tbr_ray.config import PROMPTING, Cell, RunConfig
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
    """Parameters of a model: the registry's published count, else (tiny presets, local
    folders) counted from its shape."""
    spec = get_spec(model)
    if spec.params_b > 0 and not spec.tiny:
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


# ------------------------------------------------------------------ training


def lora_params(model: str, rank: int) -> int:
    """Trainable LoRA parameters: rank x (in + out) for every targeted projection of every layer
    (Llama / Gemma: q, k, v, o, gate, up, down; Falcon: fused qkv, dense, the two MLP matrices)."""
    s = model_shape(model)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    if get_spec(model).family == "falcon":
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
        return TrainLayout(model, t.num_workers or 2, zero, 0.0)
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


# ------------------------------------------------------------------ cost model


@dataclass(frozen=True)
class CostModel:
    """Throughput assumptions of the makespan simulation. Work is counted in FLOPs (see
    `train_flops_per_token`), devices deliver `peak_flops x mfu`; start-up costs are fixed."""

    device: str  # what one unit of `peak_flops` is
    peak_flops: float  # dense peak per device (GPU: bf16 tensor cores; CPU: fp32 FMA per core)
    train_mfu: float  # LoRA training (frozen base, bf16 on GPU)
    prefill_mfu: float  # vLLM prompt processing and choice scoring
    decode_mfu: float  # vLLM batched greedy decoding (memory-bound: far below prefill)
    example_tokens: int  # mean tokens of one training example (template + answer)
    cell_fixed_s: float  # per training cell: Ray Train start, imports, DeepSpeed init, checkpoint
    engine_start_s: float  # per vLLM engine: start-up before weights (graphs, profiling)
    load_bytes_per_s: float  # weights read from the shared volume, per engine or cell
    phase_fixed_s: float  # once per run: Ray start, manifest; once for the writers' actor


# GPU: H100/H200-SXM class (989 TFLOP/s dense bf16). Assumed, not measured here (no GPU was lent
# to this work): MFU figures typical of DeepSpeed LoRA and vLLM at 7-70B; 250 tokens an Alpaca
# example with a reflection; a minute of Ray Train + DeepSpeed start-up; 1.5 min of vLLM start
# with CUDA graphs; weights at 1 GB/s from a network volume. bench/gpu_lora_mfu.py measures the
# training MFU on a GPU when one is available.
GPU_COST = CostModel(
    device="GPU",
    peak_flops=989e12,
    train_mfu=0.30,
    prefill_mfu=0.40,
    decode_mfu=0.08,
    example_tokens=250,
    cell_fixed_s=60.0,
    engine_start_s=90.0,
    load_bytes_per_s=1e9,
    phase_fixed_s=60.0,
)
# CPU: the project's 2-core AVX2 box (96 GFLOP/s fp32 a core nominal), calibrated on the tiny
# grid's per-phase timings of 2026-11-29 (docs/BENCHMARKS.md "the tiny grid in 7 min 41 s"):
# 16k training tokens/s on 2 cores, ~1,500 new tokens/s decoding, 17 s fixed per cell, 3.2 s per
# in-process engine, 154 tokens an example with the tiny presets' 2,048-token vocabulary.
CPU_COST = CostModel(
    device="CPU core",
    peak_flops=96e9,
    train_mfu=0.33,
    prefill_mfu=0.05,
    decode_mfu=0.012,
    example_tokens=154,
    cell_fixed_s=17.0,
    engine_start_s=3.2,
    load_bytes_per_s=1e9,
    phase_fixed_s=20.0,
)
# Benchmarks given as user files: their published sizes (tbr_ray.benchmarks has None).
USER_FILE_SIZES = {"orbench_hard": 1319, "malicious_instruct": 100}
PROMPT_TOKENS = 80  # a generation prompt in the template (XSTest-like questions are short)
SHOT_TOKENS = 150  # one few-shot example of a general benchmark (MMLU / ARC / GSM8K question)
REFLECT_PROMPT_TOKENS = 300  # the internal 5-shot / external one-shot writer prompt


def cost_model(cfg: RunConfig) -> CostModel:
    return GPU_COST if cfg.train.use_gpu else CPU_COST


def train_flops_per_token(model: str, rank: int, seq: int) -> float:
    """Forward + backward FLOPs per trained token with a frozen base: 2N forward and 2N for the
    input gradients (no weight gradients) of the N base weights, 6 per LoRA weight, and
    attention's 12 x layers x hidden x seq (PaLM's term; nothing to freeze in it)."""
    s = model_shape(model)
    return 4 * model_params(model) + 6 * lora_params(model, rank) + 12 * s.layers * s.hidden * seq


def _infer_flops(model: str, context: int) -> float:
    """FLOPs per token through the engine: 2N plus attention over `context` tokens."""
    s = model_shape(model)
    return 2 * model_params(model) + 4 * s.layers * s.hidden * context


def _load_s(cost: CostModel, model: str) -> float:
    return model_params(model) * BF16 / cost.load_bytes_per_s


def _bench_sizes(cfg: RunConfig) -> list[tuple[str, int, int]]:
    """(mode, prompts, prompt tokens) per benchmark of one evaluation pass."""
    from tbr_ray.benchmarks import BENCHMARKS

    out = []
    for name in cfg.eval.benchmarks:
        spec = BENCHMARKS[name]
        size = spec.size or USER_FILE_SIZES[name]
        n = min(size, cfg.eval.sample_size or size)
        shots = cfg.eval.shots.get(name, spec.default_shots)
        ptok = (PROMPT_TOKENS if spec.mode == "generate" else SHOT_TOKENS) + shots * SHOT_TOKENS
        out.append((spec.mode, n, ptok))
    return out


def engine_pass_s(cfg: RunConfig, cost: CostModel, model: str, devices: int) -> float:
    """One evaluation pass (one adapter, or the base model) over every benchmark: prompts
    prefilled, generation benchmarks decoding their whole eval.max_new_tokens budget (an upper
    bound: answers that stop early take less), choice benchmarks scored by prefill alone."""
    peak, new = devices * cost.peak_flops, cfg.eval.max_new_tokens
    seconds = 0.0
    for mode, n, ptok in _bench_sizes(cfg):
        seconds += n * ptok * _infer_flops(model, ptok) / (peak * cost.prefill_mfu)
        if mode == "generate":
            seconds += n * new * _infer_flops(model, ptok + new // 2) / (peak * cost.decode_mfu)
    return seconds


def judge_s(cfg: RunConfig, cost: CostModel, devices: int, passes: int) -> float:
    """The model judge reads every refusal/safety generation once (a 7-8B judge assumed:
    WildGuard, Llama Guard 3-8B), with its own engine start."""
    if "model" not in cfg.eval.judges:
        return 0.0
    n = sum(n for mode, n, _ in _bench_sizes(cfg) if mode == "generate") * passes
    tokens = n * (PROMPT_TOKENS * 2 + cfg.eval.max_new_tokens)
    return (
        cost.engine_start_s
        + 16e9 / cost.load_bytes_per_s
        + tokens * 2 * JUDGE_PARAMS / (devices * cost.peak_flops * cost.prefill_mfu)
    )


JUDGE_PARAMS = 7.5e9


def writer_s(cfg: RunConfig, cost: CostModel, writer: str, devices: int) -> float:
    """One reflection set: an engine start, n_safety writer prompts, max_new_tokens each."""
    n, new = cfg.data.n_safety, cfg.reflection.max_new_tokens
    peak = devices * cost.peak_flops
    prefill = n * REFLECT_PROMPT_TOKENS * _infer_flops(writer, REFLECT_PROMPT_TOKENS)
    decode = n * new * _infer_flops(writer, REFLECT_PROMPT_TOKENS + new)
    work = prefill / (peak * cost.prefill_mfu) + decode / (peak * cost.decode_mfu)
    return cost.engine_start_s + _load_s(cost, writer) + work


def train_s(cfg: RunConfig, cost: CostModel, model: str, devices: int, steps: int, workers: int):
    """One cell: fixed start-up, the base weights read, and every example of every optimizer
    step (micro x accumulation x workers) at example_tokens tokens."""
    t = cfg.train
    tokens = steps * t.micro_batch_size * t.grad_accum_steps * workers * cost.example_tokens
    flops = tokens * train_flops_per_token(model, t.lora_rank, cost.example_tokens)
    return (
        cost.cell_fixed_s
        + _load_s(cost, model)
        + flops / (devices * cost.peak_flops * cost.train_mfu)
    )


# ------------------------------------------------------------------ simulation


@dataclass(frozen=True)
class Job:
    name: str  # "write <model>", "train <cell id>", "eval <model>"
    kind: str  # write | eval | train (also the priority order)
    devices: int  # GPUs (GPU runs) or busy CPU cores (CPU runs)
    seconds: float
    after: tuple[str, ...] = ()  # jobs that must end first


@dataclass(frozen=True)
class Slot:
    job: Job
    start_s: float
    end_s: float


PRIORITY = {"write": 0, "eval": 1, "train": 2}


def simulate(jobs: list[Job], capacity: int, start_s: float = 0.0, max_train: int | None = None):
    """The grid's scheduling policy as a discrete-event simulation: at the start and whenever a
    job ends, ready jobs (every `after` ended) start in priority order (writers, then
    evaluations, then training cells in grid order) while free devices hold them. The first
    ready job that does not fit stops the round (no overtaking), so a waiting evaluation takes
    the next freed GPUs before any new training cell. `max_train`: grid.max_concurrent."""
    pending = sorted(jobs, key=lambda j: PRIORITY[j.kind])  # stable: grid order within a kind
    ended: dict[str, float] = {}
    running: list[Slot] = []
    slots: list[Slot] = []
    t, free = start_s, capacity
    while pending or running:
        for job in list(pending):
            if not all(a in ended for a in job.after):
                continue
            n_train = sum(s.job.kind == "train" for s in running)
            if job.devices > free or (job.kind == "train" and max_train and n_train >= max_train):
                break
            slot = Slot(job, t, t + job.seconds)
            running.append(slot)
            slots.append(slot)
            pending.remove(job)
            free -= job.devices
        if not running:
            raise PlanError(f"{pending[0].name} can never start (capacity {capacity}).")
        first = min(running, key=lambda s: s.end_s)
        running.remove(first)
        t, free = first.end_s, free + first.job.devices
        ended[first.job.name] = t
    return slots


# ------------------------------------------------------------------ the grid's plan


@dataclass(frozen=True)
class CellPlan:
    cell: Cell
    layout: TrainLayout | None  # None: a prompting cell (evaluated, never trained)
    steps: int
    seconds: float  # training wall time on its devices


@dataclass(frozen=True)
class GridPlan:
    device: str  # "GPU" or "CPU core"
    capacity: int | None  # devices planned for; None: unknown (no makespan)
    cells: list[CellPlan]
    engines: list[EngineLayout]  # one per grid model, then writers and the judge
    problems: list[str]  # non-empty: the config is refused
    slots: list[Slot]

    @property
    def makespan_s(self) -> float:
        return max((s.end_s for s in self.slots), default=0.0)

    @property
    def device_hours(self) -> float:
        return sum(s.job.devices * s.job.seconds for s in self.slots) / 3600


def _writers(cfg: RunConfig) -> list[str]:
    """Models whose engines write reflections: each internal cell's base model, and the
    external reflector when it is an engine (an endpoint is somebody else's GPUs)."""
    models = [c.model for c in cfg.cells() if c.condition == "internal"]
    if "external" in cfg.grid.conditions and cfg.reflection.reflector:
        models.append(cfg.reflection.reflector)
    return list(dict.fromkeys(models))


def _cell_plans(cfg: RunConfig, cost: CostModel, capacity: int | None) -> list[CellPlan]:
    from tbr_ray.train import total_steps

    out, rows = [], cfg.data.n_general + cfg.data.n_safety
    for cell in cfg.cells():
        if cell.condition in PROMPTING:
            out.append(CellPlan(cell, None, 0, 0.0))
            continue
        lay = train_layout(cfg, cell.model, capacity)
        steps = total_steps(cfg, rows, lay.gpus)
        busy = lay.gpus if cfg.train.use_gpu else _cpu_train_cores(cfg, lay.gpus, capacity)
        out.append(
            CellPlan(cell, lay, steps, train_s(cfg, cost, cell.model, busy, steps, lay.gpus))
        )
    return out


def _cpu_train_cores(cfg: RunConfig, workers: int, capacity: int | None) -> int:
    """Cores a CPU cell keeps busy: each worker runs max(1, its whole CPUs) torch threads."""
    busy = workers * max(1, int(cfg.train.cpus_per_worker))
    return min(busy, capacity) if capacity else busy


def _problems(cfg: RunConfig, cells: list[CellPlan], engines: list[EngineLayout], capacity):
    out = [e.problem for e in engines if e.problem]
    out += list(dict.fromkeys(p.layout.problem for p in cells if p.layout and p.layout.problem))
    if capacity and cfg.train.use_gpu:
        for e in engines:
            if not e.problem and e.gpus > capacity:
                out.append(
                    f"{e.model}: its vLLM engine needs {e.gpus} GPUs ({e.gib_per_gpu:.1f} GiB "
                    f"each), the cluster has {capacity}. Fix: --gpus {e.gpus} or more, or drop "
                    f"{e.model} from grid.models."
                )
    return out


def _jobs(cfg: RunConfig, cost: CostModel, cells: list[CellPlan], capacity: int) -> list[Job]:
    gpu = cfg.train.use_gpu

    def devices(model: str) -> int:  # an engine: its GPUs, or every core of a CPU box
        return engine_gpus(cfg, model) if gpu else capacity

    writers = [
        Job(f"write {w}", "write", devices(w), writer_s(cfg, cost, w, devices(w)))
        for w in _writers(cfg)
    ]
    after_writers = tuple(j.name for j in writers)
    jobs = list(writers)
    for p in cells:
        if p.layout is not None:
            busy = p.layout.gpus if gpu else _cpu_train_cores(cfg, p.layout.gpus, capacity)
            jobs.append(Job(f"train {p.cell.cell_id}", "train", busy, p.seconds, after_writers))
    for model in cfg.grid.models:
        mine = [p for p in cells if p.cell.model == model]
        passes = len(mine) + int(cfg.eval.evaluate_base)
        d = devices(model)
        seconds = cost.engine_start_s + _load_s(cost, model)
        seconds += passes * engine_pass_s(cfg, cost, model, d) + judge_s(cfg, cost, d, passes)
        after = after_writers + tuple(f"train {p.cell.cell_id}" for p in mine if p.layout)
        jobs.append(Job(f"eval {model}", "eval", d, seconds, after))
    return jobs


def plan_grid(cfg: RunConfig, capacity: int | None) -> GridPlan:
    """Size every cell and engine of `cfg` for `capacity` devices (GPUs on a GPU run, CPU cores
    on a CPU run; None: sizes only), list every problem, and simulate the schedule when none."""
    cost = cost_model(cfg)
    cells = _cell_plans(cfg, cost, capacity)
    names = list(cfg.grid.models) + _writers(cfg)
    if "model" in cfg.eval.judges and cfg.eval.judge_model:
        names.append(cfg.eval.judge_model)
    engines = [engine_layout(cfg, m) for m in dict.fromkeys(names)] if cfg.train.use_gpu else []
    problems = _problems(cfg, cells, engines, capacity)
    slots = []
    if capacity and not problems:
        jobs = _jobs(cfg, cost, cells, capacity)
        slots = simulate(jobs, capacity, cost.phase_fixed_s, cfg.grid.max_concurrent)
    return GridPlan(cost.device, capacity, cells, engines, problems, slots)


# ------------------------------------------------------------------ report


def _hms(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{int(seconds % 60):02d}s"


def format_cells(plan: GridPlan) -> list[str]:
    unit = "GPUs" if plan.device == "GPU" else "wkrs"
    head = f"{'cell':44} {unit:>4} {'ZeRO':>4} {'GiB/GPU':>7} {'fit':>3} {'steps':>5} {'train':>9}"
    lines = [head, "-" * len(head)]
    for p in plan.cells:
        lay = p.layout
        if lay is None:
            lines.append(f"{p.cell.cell_id:44} {'prompting: evaluated only':>36}")
            continue
        gib = f"{lay.gib_per_gpu:7.1f}" if plan.device == "GPU" else f"{'-':>7}"
        fit = "no" if lay.problem else "yes"
        lines.append(
            f"{p.cell.cell_id:44} {lay.gpus:4d} {lay.zero_stage:4d} {gib} {fit:>3} "
            f"{p.steps:5d} {_hms(p.seconds):>9}"
        )
    return lines


def format_engines(plan: GridPlan) -> list[str]:
    head = f"{'engine (base model, writer, judge)':44} {'GPUs':>4} {'GiB/GPU':>7} {'budget':>6} fit"
    lines = [head, "-" * len(head)]
    for e in plan.engines:
        gib = f"{'?':>7}" if math.isnan(e.gib_per_gpu) else f"{e.gib_per_gpu:7.1f}"
        fit = "no" if e.problem else "yes"
        lines.append(f"{e.model[:44]:44} {e.gpus:4d} {gib} {e.budget_gib:6.1f} {fit}")
    if any(math.isnan(e.gib_per_gpu) for e in plan.engines):
        lines.append("?: no published shape here; 1 GPU unless cluster.engine_gpus names it")
    return lines


def refused_models(plan: GridPlan) -> list[str]:
    """Grid models (and writers, judge) named by a problem, in grid order."""
    names = [p.cell.model for p in plan.cells] + [e.model for e in plan.engines]
    named = {p.split(": ", 1)[0] for p in plan.problems}  # every problem starts "<model>: "
    return [m for m in dict.fromkeys(names) if m in named]


def format_plan(plan: GridPlan) -> str:
    """The dry-run report: cells, engines, then GPU-hours and makespan (or the problems)."""
    lines = format_cells(plan)
    n = len(plan.cells)
    lines.append(f"{n} cells; {sum(p.layout is not None for p in plan.cells)} trained")
    if plan.engines:
        lines += [""] + format_engines(plan)
    if plan.problems:
        lines += ["", f"REFUSED: {len(plan.problems)} problem(s) on this cluster:"]
        lines += [f"  - {p}" for p in plan.problems]
        lines.append(f"models that cannot run here: {', '.join(refused_models(plan))}")
        return "\n".join(lines)
    if not plan.capacity:
        lines.append(
            "no makespan: the cluster's size is unknown. Fix: pass --gpus N (and --gpu-memory "
            "GiB), set cluster.gpus, or run where RAY_ADDRESS names a running Ray cluster."
        )
        return "\n".join(lines)
    busy = plan.device_hours / (plan.capacity * plan.makespan_s / 3600)
    unit = "GPU" if plan.device == "GPU" else "core"
    hours = {
        k: sum(s.job.devices * s.job.seconds for s in plan.slots if s.job.kind == k)
        for k in PRIORITY
    }
    split = ", ".join(f"{kind} {h / 3600:.1f}" for kind, h in hours.items())
    lines.append(
        f"estimated {plan.device_hours:.1f} {unit}-hours ({split}); makespan "
        f"{_hms(plan.makespan_s)} on {plan.capacity} {plan.device}s ({busy:.0%} busy; cost "
        f"model tbr_ray.plan.{'GPU' if plan.device == 'GPU' else 'CPU'}_COST)"
    )
    return "\n".join(lines)
