"""The cost model (pure): FLOPs, bytes and seconds of each job of a grid (writer, training
cell; the evaluation's are in tbr_ray.plan.evalcost), from throughput assumptions per device.

    cost = cost_model(cfg)                 # CPU_COST, or gpu_cost(cfg.cluster.gpu_type)
    train_s(cfg, cost, "llama-2-70b", devices=4, steps=186, workers=4)

Every constant says where it comes from: a datasheet (tbr_ray.plan.gpus), a measurement on
this box (bench/plan_inputs.py: tokens; bench/activation_memory.py: memory), a documented
default of the library that runs the job, or, where none of those exists here (no GPU was
lent to this work), an assumption marked as one, which bench/gpu_check.py measures on a GPU.
docs/BENCHMARKS.md shows the arithmetic of the paper grid's plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tbr_ray.config import RunConfig
from tbr_ray.models import model_shape
from tbr_ray.plan.gpus import GPU_TYPES
from tbr_ray.plan.sizing import BF16, known_shape, kv_bytes_per_token, lora_params, model_params
from tbr_ray.plan.steps import accumulation_steps, resolved_train_settings
from tbr_ray.vocab import BENCHMARK_SIZES


@dataclass(frozen=True)
class CostModel:
    """Throughput assumptions of the makespan simulation. Work is counted in FLOPs (see
    `train_flops_per_token`), devices deliver `peak_flops x mfu`; on GPUs the bytes a job must
    move (weights read from HBM, ZeRO-3's gathers, decoding's weight and KV reads) bound it
    too; start-up costs are fixed."""

    device: str  # what one unit of `peak_flops` is
    peak_flops: float  # dense peak per device (GPU: bf16 tensor cores; CPU: fp32 FMA per core)
    train_mfu: float  # LoRA training (frozen base, bf16 on GPU)
    prefill_mfu: float  # vLLM prompt processing and choice scoring
    decode_mfu: float  # vLLM batched greedy decoding, where no bandwidth is known (CPU)
    example_tokens: float  # mean real tokens of one training example (template + answer)
    cell_fixed_s: float  # per training cell: Ray Train start, imports, DeepSpeed init, checkpoint
    engine_start_s: float  # per vLLM engine: start-up before weights (graphs, profiling)
    load_bytes_per_s: float  # weights read from the shared volume, per engine or cell
    phase_fixed_s: float  # once per run: Ray start, manifest; once for the writers' actor
    padding_factor: float = 1.0  # padded / real tokens of a training micro-batch
    hbm_bytes_per_s: float | None = None  # GPU memory bandwidth (None: not modelled, CPU)
    link_bytes_per_s: float | None = None  # GPU-to-GPU, one direction (ZeRO-3's gathers)
    decode_mbu: float = 0.0  # share of hbm_bytes_per_s that decoding reaches
    max_num_seqs: int = 256  # vLLM's concurrent sequences (its default on the device)
    decode_token_s: float = 0.0  # CPU: wall seconds an engine spends on each new token
    # besides its FLOPs (scheduling, sampling, detokenizing: not divided by cores)
    bf16_speedup: float = 1.0  # CPU: an engine's FLOP rate in bf16 over fp32 (eval.dtype)
    server_start_s: float | None = None  # a local OpenAI server, ready (None: an engine's)
    measured_prompts: bool = False  # prompt and answer tokens from bench/plan_inputs.py
    prefix_caching: bool = False  # vLLM reuses the KV of prompts' shared prefixes


# GPU: assumptions (no GPU was lent to this work; bench/gpu_check.py measures them):
#   train_mfu 0.30 and prefill_mfu 0.40 of the dense bf16 peak: typical of DeepSpeed LoRA
#     and vLLM prefill at 7-70B, not measured here;
#   decode_mbu 0.6: the model-bandwidth utilisation Databricks measured for vLLM-class
#     servers decoding Llama-2 7-70B ("LLM Inference Performance Engineering: Best
#     Practices", 2023: MBU around 60% on A100/H100);
#   60 s a cell of Ray Train + DeepSpeed start-up (15-23 s on the 2-core box,
#     docs/BENCHMARKS.md, plus the model build), 90 s of vLLM start with CUDA graphs,
#     weights at 1 GB/s from a network volume, 60 s of Ray start once.
# Measured (bench/plan_inputs.py, jobs/paper.yaml's mixes as tbr_ray.data samples them,
# Mistral's 32k tokenizer, the larger counts of the two shipped; docs/BENCHMARKS.md
# 2026-12-03): 177 tokens a training example with a 64-token reflection (171 without), its
# micro-batches of 4 padded to 1.48 x their real tokens (1.53 without).
# vLLM caches shared prompt prefixes by default (its EngineArgs enable_prefix_caching: the
# model's support, on for these decoders).
GPU_TRAIN_EXAMPLE_TOKENS = 177.3
GPU_PADDING_FACTOR = 1.48
GPU_COST = CostModel(
    device="GPU",
    peak_flops=GPU_TYPES["H100"].peak_flops,
    train_mfu=0.30,
    prefill_mfu=0.40,
    decode_mfu=0.08,
    example_tokens=GPU_TRAIN_EXAMPLE_TOKENS,
    cell_fixed_s=60.0,
    engine_start_s=90.0,
    load_bytes_per_s=1e9,
    phase_fixed_s=60.0,
    padding_factor=GPU_PADDING_FACTOR,
    hbm_bytes_per_s=GPU_TYPES["H100"].hbm_bytes_per_s,
    link_bytes_per_s=GPU_TYPES["H100"].link_bytes_per_s,
    decode_mbu=0.6,
    max_num_seqs=GPU_TYPES["H100"].max_num_seqs,
    measured_prompts=True,
    prefix_caching=True,
)
# CPU: the project's 2-core box (x86_64, AVX-512 with avx512_bf16 and AMX; 96 GFLOP/s fp32 a
# core nominal), calibrated on the tiny grid's per-phase timings of 2026-11-29
# (docs/BENCHMARKS.md "the tiny grid in 7 min 41 s"): 16k training tokens/s on 2 cores,
# ~1,500 new tokens/s decoding, 17 s fixed per cell, 3.2 s per in-process engine, 154 tokens
# an example with the tiny presets' 2,048-token vocabulary. Fitted to real tokens/s, so
# padding is inside its rates (padding_factor 1). Prompts: the measured ones of
# bench/plan_inputs.py, as on GPUs (XSTest's 45 tokens; the refit's bench prompts were ~50);
# until the refit, budgets of 80 tokens a prompt and 150 a shot (evalcost.CPU_PROMPT_TOKENS),
# which made a 3-shot ARC prompt 600 tokens against a measured 420. No prefix caching
# assumed on CPU (not measured there).
# The engines (refit 2026-12-03, docs/BENCHMARKS.md "The CPU cost model refit"): a new token
# costs decode_token_s of wall time plus its FLOPs at decode_mfu, and bf16 runs the FLOPs
# bf16_speedup times faster. Three measurements on this box fix the three: the tiny presets'
# ~1,500 new tokens/s (fp32, 2026-11-29), and bench/real_model.py on SmolLM2-135M-Instruct
# (idle, 2026-12-03, vLLM in-process, 2 threads, enforce_eager, 96 chat prompts of ~50 tokens
# x 64 new tokens in one call, prefill included): 169 new tokens/s fp32, 412 bf16. Solved:
# 0.65 ms a token, 0.48 of the nominal peak, bf16 2.96x (rounded to 3.0). The old
# decode_mfu 0.012 was the tiny models' overhead read as FLOPs: 4 tokens/s a core at 135M.
# Prefill (assumed, not measured apart): the same 0.48 as decoding. Its matmuls are at least
# as large as batched decoding's, and the old 0.05 cannot hold: the bench call's 4,800 prompt
# tokens alone would take 137 s of its measured 36 s.
# Engine start: 3.2 s (tiny presets) + the weights' bf16 bytes at load_bytes_per_s, fitted so
# SmolLM2's in-process engine starts in ~7 s (bench/real_model.py engine_start_s): 3.8 s for
# its 269 MB, a rate of loading (fp32 safetensors read, cast, placed), not of the disk. A
# local OpenAI server (reflection.local_server) started in 52 s (2026-12-03 make real,
# idle box: process, vLLM import, engine). Training is left as fitted on the tiny grid: a
# 74-step cell of jobs/real.yaml is planned at 14.7 min, measured ~12 min in fp32 on 2
# workers (docs/BENCHMARKS.md); train.dtype bf16 (1.1x there, bench/train_throughput.py) is
# not modelled.
# The training throughput CPU_COST was fitted at (tiny presets, 2 cores, 2026-11-29), to scale
# it to a day's measured throughput (bench/plan_calibration.py --run).
CPU_FITTED_TRAIN_TOKENS_PER_S = 16_000.0
CPU_COST = CostModel(
    device="CPU core",
    peak_flops=96e9,
    train_mfu=0.33,
    prefill_mfu=0.48,
    decode_mfu=0.48,
    example_tokens=154,
    cell_fixed_s=17.0,
    engine_start_s=3.2,
    load_bytes_per_s=7e7,
    phase_fixed_s=20.0,
    decode_token_s=6.5e-4,
    bf16_speedup=3.0,
    server_start_s=52.0,
    measured_prompts=True,
    # vLLM's CPU platform keeps prefix caching on (it turns it off for MLA models only:
    # vllm/platforms/cpu.py; the real run's engine logs say enable_prefix_caching=True): the
    # few-shot prefix all ARC prompts share is prefilled once. Without it the plan put
    # jobs/real.yaml's evaluation at 21.5 min against the 11.3 measured (docs/BENCHMARKS.md).
    prefix_caching=True,
)
REFLECT_PROMPT_TOKENS = 300  # the internal 5-shot / external one-shot writer prompt (assumed)


def gpu_cost(gpu_type: str) -> CostModel:
    """GPU_COST on `gpu_type`'s peak, bandwidths and vLLM default (tbr_ray.plan.gpus)."""
    g = GPU_TYPES[gpu_type]
    return replace(
        GPU_COST,
        device="GPU",
        peak_flops=g.peak_flops,
        hbm_bytes_per_s=g.hbm_bytes_per_s,
        link_bytes_per_s=g.link_bytes_per_s,
        max_num_seqs=g.max_num_seqs,
    )


def cost_model(cfg: RunConfig) -> CostModel:
    """The cost model of `cfg`'s devices: CPU_COST, or GPU_COST on cluster.gpu_type."""
    if not cfg.train.use_gpu:
        return CPU_COST
    return gpu_cost(cfg.cluster.gpu_type) if cfg.cluster.gpu_type in GPU_TYPES else GPU_COST


def train_flops_per_token(model: str, rank: int, seq: float, checkpointing: bool = False):
    """Forward + backward FLOPs per trained token with a frozen base: 2N forward and 2N for the
    input gradients (no weight gradients) of the N base weights, 6 per LoRA weight, and
    attention's 12 x layers x hidden x seq (PaLM's term; nothing to freeze in it). With
    gradient checkpointing the forward runs twice: + 2N, + 2 per LoRA weight, + 4 x layers x
    hidden x seq (hardware FLOPs; the model's own FLOPs are the count without it)."""
    s = model_shape(model)
    n, n_lora, attn = model_params(model), lora_params(model, rank), s.layers * s.hidden * seq
    flops = 4 * n + 6 * n_lora + 12 * attn
    return flops + (2 * n + 2 * n_lora + 4 * attn if checkpointing else 0)


# A model the registry has no shape for (a hub-id judge or reflector): WildGuard and Llama
# Guard 3 are 7-8B, so 7.5B parameters, attention left out.
UNKNOWN_PARAMS = 7.5e9


def params(model: str) -> float:
    return model_params(model) if known_shape(model) else UNKNOWN_PARAMS


def infer_flops(model: str, context: float) -> float:
    """FLOPs per token through the engine: 2N plus attention over `context` tokens."""
    s = known_shape(model)
    return 2 * params(model) + (4 * s.layers * s.hidden * context if s else 0)


def eval_prompts(cfg: RunConfig, benchmark: str) -> int:
    """Prompts of `benchmark` in one evaluation pass: its size (the vocabulary's), or its
    sample size (eval.sample_sizes, else eval.sample_size) when smaller."""
    size = BENCHMARK_SIZES[benchmark]
    return min(size, cfg.eval.size_of(benchmark) or size)


def load_s(cost: CostModel, model: str) -> float:
    return params(model) * BF16 / cost.load_bytes_per_s


def engine_dtype(cfg: RunConfig) -> str:
    """The engines' dtype as tbr_ray.engine.resolved_dtype resolves eval.dtype (auto: bf16 on
    GPUs, fp32 on CPU), the plan's device standing for the runtime's (train.use_gpu)."""
    if cfg.eval.dtype != "auto":
        return cfg.eval.dtype
    return "bfloat16" if cfg.train.use_gpu else "float32"


def engine_speed(cfg: RunConfig, cost: CostModel) -> float:
    """How much faster the engines' FLOPs run in `cfg`'s dtype than the cost model's rates
    say: bf16_speedup in bf16 (1 on GPUs, whose rates are bf16 already), else 1."""
    return cost.bf16_speedup if engine_dtype(cfg) == "bfloat16" else 1.0


def prefill_s(cost: CostModel, flops: float, tp: int, speed: float = 1.0) -> float:
    """Seconds of an engine's prompt processing (`flops` of it) on `tp` devices."""
    return flops / (tp * cost.peak_flops * cost.prefill_mfu * speed)


def decode_s(
    cost: CostModel,
    model: str,
    tokens: float,
    seqs: float,
    context: float,
    tp: int,
    speed: float = 1.0,
):
    """Seconds to decode `tokens` new tokens, `seqs` sequences at a time over `context` tokens
    each, on `tp` devices, FLOPs `speed` times the cost model's rate (`engine_speed`). CPU:
    decode_token_s a token plus its FLOPs at decode_mfu of the peak. GPU, a roofline per step
    (one token for each of `seqs` sequences): each GPU reads its weights' shard and the
    sequences' KV cache at decode_mbu of its memory bandwidth, or computes the step's FLOPs at
    prefill_mfu, whichever is slower."""
    flops = tokens * infer_flops(model, context)
    if cost.hbm_bytes_per_s is None:
        rate = tp * cost.peak_flops * cost.decode_mfu * speed
        return tokens * cost.decode_token_s + flops / rate
    steps = tokens / max(seqs, 1.0)
    s = known_shape(model)
    kv = kv_bytes_per_token(s, tp) if s else 0.0
    per_gpu_step = params(model) * BF16 / tp + max(seqs, 1.0) * context * kv
    memory = steps * per_gpu_step / (cost.hbm_bytes_per_s * cost.decode_mbu)
    return max(memory, prefill_s(cost, flops, tp, speed))


def writer_s(
    cfg: RunConfig, cost: CostModel, writer: str, devices: int, server: bool = False
) -> float:
    """One reflection set: an engine start (`server`: a local OpenAI server's start), n_safety
    writer prompts, max_new_tokens each, in eval.dtype."""
    n, new = cfg.data.n_safety, cfg.reflection.max_new_tokens
    speed = engine_speed(cfg, cost)
    prefill = n * REFLECT_PROMPT_TOKENS * infer_flops(writer, REFLECT_PROMPT_TOKENS)
    work = prefill_s(cost, prefill, devices, speed)
    seqs = min(n, cost.max_num_seqs)
    work += decode_s(cost, writer, n * new, seqs, REFLECT_PROMPT_TOKENS + new, devices, speed)
    if server and cost.server_start_s is not None:
        return cost.server_start_s + work  # its start includes reading the weights
    return cost.engine_start_s + load_s(cost, writer) + work


def train_s(cfg: RunConfig, cost: CostModel, model: str, devices: int, steps: int, workers: int):
    """One cell: fixed start-up, the base weights read from the volume, and every micro-batch
    of every optimizer step (micro x accumulation x workers examples of example_tokens,
    padded by padding_factor): FLOPs at train_mfu, or on GPUs the weight traffic of
    `train_traffic_s` when that is slower (DeepSpeed overlaps the two)."""
    t = cfg.train
    accum = accumulation_steps(cfg, workers)
    seq = cost.example_tokens * cost.padding_factor  # a padded row's length
    tokens = steps * t.micro_batch_size * accum * workers * seq
    per_token = train_flops_per_token(model, t.lora_rank, seq, t.gradient_checkpointing)
    compute = tokens * per_token / (devices * cost.peak_flops * cost.train_mfu)
    traffic = train_traffic_s(cfg, cost, model, workers, steps * accum)
    return cost.cell_fixed_s + load_s(cost, model) + max(compute, traffic)


def train_traffic_s(cfg: RunConfig, cost: CostModel, model: str, workers: int, micro: int):
    """Seconds each rank spends moving the base weights over `micro` micro-batches: every
    forward and backward pass (a third with checkpointing's recomputed forward) reads all bf16
    weights from HBM, and at ZeRO-3 first gathers the other ranks' shards over the GPU link
    ((workers - 1) / workers of them). 0 where no bandwidth is known (CPU)."""
    if cost.hbm_bytes_per_s is None or cost.link_bytes_per_s is None:
        return 0.0
    passes = 3 if cfg.train.gradient_checkpointing else 2
    weights = model_params(model) * BF16
    zero3 = resolved_train_settings(cfg, model)[1] == 3
    gather = weights * (workers - 1) / workers / cost.link_bytes_per_s if zero3 else 0.0
    return micro * passes * max(weights / cost.hbm_bytes_per_s, gather)
