"""The cost model (pure): FLOPs and seconds of each job of a grid (writer, training cell,
evaluation), from throughput assumptions per device kind."""

from __future__ import annotations

from dataclasses import dataclass

from tbr_ray.config import RunConfig
from tbr_ray.models import model_shape
from tbr_ray.plan.sizing import BF16, known_shape, lora_params, model_params
from tbr_ray.plan.steps import accumulation_steps
from tbr_ray.vocab import BENCHMARK_KINDS, BENCHMARK_SIZES, CHOICE_BENCHMARKS, DEFAULT_SHOTS


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
# The training throughput CPU_COST was fitted at (tiny presets, 2 cores, 2026-11-29), to scale
# it to a day's measured throughput (bench/plan_calibration.py --run).
CPU_FITTED_TRAIN_TOKENS_PER_S = 16_000.0
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


# A model the registry has no shape for (a hub-id judge or reflector): WildGuard and Llama
# Guard 3 are 7-8B, so 7.5B parameters, attention left out.
UNKNOWN_PARAMS = 7.5e9


def _params(model: str) -> float:
    return model_params(model) if known_shape(model) else UNKNOWN_PARAMS


def _infer_flops(model: str, context: int) -> float:
    """FLOPs per token through the engine: 2N plus attention over `context` tokens."""
    s = known_shape(model)
    return 2 * _params(model) + (4 * s.layers * s.hidden * context if s else 0)


def load_s(cost: CostModel, model: str) -> float:
    return _params(model) * BF16 / cost.load_bytes_per_s


def eval_prompts(cfg: RunConfig, benchmark: str) -> int:
    """Prompts of `benchmark` in one evaluation pass: its size (the vocabulary's), or its
    sample size (eval.sample_sizes, else eval.sample_size) when smaller."""
    size = BENCHMARK_SIZES[benchmark]
    return min(size, cfg.eval.size_of(benchmark) or size)


def _bench_sizes(cfg: RunConfig) -> list[tuple[str, str, int, int]]:
    """(kind, mode, prompts, prompt tokens) per benchmark of one evaluation pass, from the
    vocabulary's benchmark facts (the planner loads no benchmark module or file)."""
    out = []
    for name in cfg.eval.benchmarks:
        mode = "choice" if name in CHOICE_BENCHMARKS else "generate"
        shots = cfg.eval.shots.get(name, DEFAULT_SHOTS.get(name, 0))
        ptok = (PROMPT_TOKENS if mode == "generate" else SHOT_TOKENS) + shots * SHOT_TOKENS
        out.append((BENCHMARK_KINDS[name], mode, eval_prompts(cfg, name), ptok))
    return out


def engine_pass_s(cfg: RunConfig, cost: CostModel, model: str, devices: int) -> float:
    """One evaluation pass (one adapter, or the base model) over every benchmark: prompts
    prefilled, generation benchmarks decoding their whole eval.max_new_tokens budget (an upper
    bound: answers that stop early take less), choice benchmarks scored by prefill alone."""
    peak, new = devices * cost.peak_flops, cfg.eval.max_new_tokens
    seconds = 0.0
    for _, mode, n, ptok in _bench_sizes(cfg):
        seconds += n * ptok * _infer_flops(model, ptok) / (peak * cost.prefill_mfu)
        if mode == "generate":
            seconds += n * new * _infer_flops(model, ptok + new // 2) / (peak * cost.decode_mfu)
    return seconds


def judge_s(cfg: RunConfig, cost: CostModel, devices: int, passes: int) -> float:
    """Each model judge reads its generations once (prompt, answer and its instructions,
    prefill), with its own engine start: the refusal judge every refusal/safety generation,
    the harm judge the safety ones."""
    seconds = 0.0
    for field, judge in cfg.eval.model_judges():
        kinds = ("safety",) if field == "harm_judge" else ("safety", "false_refusal")
        n = sum(n for kind, _, n, _ in _bench_sizes(cfg) if kind in kinds) * passes
        context = PROMPT_TOKENS * 2 + cfg.eval.max_new_tokens
        work = n * context * _infer_flops(judge.model, context)
        seconds += (
            cost.engine_start_s
            + load_s(cost, judge.model)
            + work / (devices * cost.peak_flops * cost.prefill_mfu)
        )
    return seconds


def writer_s(cfg: RunConfig, cost: CostModel, writer: str, devices: int) -> float:
    """One reflection set: an engine start, n_safety writer prompts, max_new_tokens each."""
    n, new = cfg.data.n_safety, cfg.reflection.max_new_tokens
    peak = devices * cost.peak_flops
    prefill = n * REFLECT_PROMPT_TOKENS * _infer_flops(writer, REFLECT_PROMPT_TOKENS)
    decode = n * new * _infer_flops(writer, REFLECT_PROMPT_TOKENS + new)
    work = prefill / (peak * cost.prefill_mfu) + decode / (peak * cost.decode_mfu)
    return cost.engine_start_s + load_s(cost, writer) + work


def train_s(cfg: RunConfig, cost: CostModel, model: str, devices: int, steps: int, workers: int):
    """One cell: fixed start-up, the base weights read, and every example of every optimizer
    step (micro x accumulation x workers) at example_tokens tokens."""
    t = cfg.train
    per_step = t.micro_batch_size * accumulation_steps(cfg, workers) * workers
    tokens = steps * per_step * cost.example_tokens
    flops = tokens * train_flops_per_token(model, t.lora_rank, cost.example_tokens)
    return (
        cost.cell_fixed_s
        + load_s(cost, model)
        + flops / (devices * cost.peak_flops * cost.train_mfu)
    )
