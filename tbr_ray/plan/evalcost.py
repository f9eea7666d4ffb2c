"""The evaluation's cost (pure): prompt and answer tokens per benchmark, one engine pass, the
model judges, and one base model's evaluation job.

    engine_pass_s(cfg, cost, "llama-2-7b", tp=1, tuned=True)     # one adapter's pass
    answers = measured_answer_tokens(generations)                 # from a run's results

Answer lengths: measured where a run exists (`measured`: mean generated tokens per benchmark
and pass kind, from a run folder's generations); else, on GPUs, a measured proxy (a tuned
model's answer: the training mix's response lengths; GSM8K: its reference solutions, which a
few-shot answer imitates until the next "Question" stops it); the base model and prompting
passes decode their whole eval.max_new_tokens (an upper bound: a base model has not learnt
where an Alpaca answer ends). A cost model without measured_prompts uses budgets instead
(CPU_PROMPT_TOKENS, CPU_SHOT_TOKENS: CPU_COST's before its 2026-12-03 refit).
"""

from __future__ import annotations

from dataclasses import dataclass

from tbr_ray.config import RunConfig
from tbr_ray.models import get_spec, merges_adapters_for
from tbr_ray.plan.cost import (
    CostModel,
    decode_s,
    engine_speed,
    eval_prompts,
    infer_flops,
    load_s,
    prefill_s,
)
from tbr_ray.plan.sizing import kv_capacity_tokens
from tbr_ray.vocab import BENCHMARK_KINDS, CHOICE_BENCHMARKS, DEFAULT_SHOTS


@dataclass(frozen=True)
class Prompts:
    """Measured prompt tokens of a benchmark (bench/plan_inputs.py)."""

    zero_shot: float  # mean tokens of a 0-shot prompt (BOS, Alpaca template, question)
    per_shot: float  # tokens one more shot adds
    prefix: float  # tokens its prompts share at `shots`, whole 16-token cache blocks
    shots: int  # the shots `prefix` was measured at
    groups: int  # prompts sharing one prefix: per MMLU subject, else one


# Measured 2026-12-03 with Mistral's 32k tokenizer (the larger counts of the two shipped; Llama
# 3's 128k gives 0.75-0.85 of these), jobs/paper.yaml's shots (docs/BENCHMARKS.md).
PROMPTS = {
    "xstest_safe": Prompts(45.4, 0.0, 16, 0, 1),
    "stl_physical_safe": Prompts(56.0, 0.0, 16, 0, 1),
    "xstest_unsafe": Prompts(45.2, 0.0, 16, 0, 1),
    "advbench": Prompts(48.5, 0.0, 16, 0, 1),
    "stl_malicious": Prompts(45.0, 0.0, 16, 0, 1),
    "stl_cona": Prompts(51.3, 0.0, 16, 0, 1),
    "stl_controversial": Prompts(47.4, 0.0, 16, 0, 1),
    "stl_physical_unsafe": Prompts(59.3, 0.0, 16, 0, 1),
    "stl_qharm": Prompts(45.9, 0.0, 16, 0, 1),
    "mmlu": Prompts(175.1, 188.9, 235.8, 1, 57),
    "gsm8k": Prompts(99.4, 166.0, 848.0, 5, 1),
    "arc_easy": Prompts(109.1, 103.8, 560.0, 5, 1),
    "arc_challenge": Prompts(119.6, 115.2, 608.0, 5, 1),
}
# The user-file benchmarks (not shipped, not measurable here) hold one-question prompts like
# XSTest's: its figure.
USER_FILE_PROMPTS = PROMPTS["xstest_safe"]
# Measured the same day: a tuned cell's answer, the mix's responses capped at 256 tokens (the
# `internal` mix, reflections at their 64-token budget: the longer of the two); GSM8K's
# reference solutions (the 5 shots show that format).
TUNED_ANSWER_TOKENS = 118.4
GSM8K_ANSWER_TOKENS = 128.8
# A judge's prompt around the request and the answer: WildGuard's measured (118 tokens); Llama
# Guard 3's template (its 14 categories) ships with its tokenizer, not here: assumed 3x that.
JUDGE_TEMPLATE_TOKENS = {"wildguard": 118, "three-class": 118, "llama-guard-3": 354}
# The budgets of a cost model without measured_prompts: a generation prompt, one shot (assumed
# when CPU_COST was first fitted; it reads the measured prompts since its refit).
CPU_PROMPT_TOKENS, CPU_SHOT_TOKENS = 80, 150


def prompt_tokens(cfg: RunConfig, cost: CostModel, benchmark: str) -> tuple[float, float, int]:
    """(tokens of a prompt, tokens of it the prefix cache serves, prompts sharing a prefix)."""
    shots = cfg.eval.shots.get(benchmark, DEFAULT_SHOTS.get(benchmark, 0))
    if not cost.measured_prompts:
        base = CPU_SHOT_TOKENS if benchmark in CHOICE_BENCHMARKS else CPU_PROMPT_TOKENS
        return base + shots * CPU_SHOT_TOKENS, 0.0, 1
    p = PROMPTS.get(benchmark, USER_FILE_PROMPTS)
    tokens = p.zero_shot + shots * p.per_shot
    prefix = p.prefix + (shots - p.shots) * p.per_shot if cost.prefix_caching else 0.0
    return tokens, min(max(prefix, 0.0), tokens), p.groups


def answer_tokens(
    cfg: RunConfig, cost: CostModel, benchmark: str, tuned: bool, measured: dict | None = None
) -> float:
    """New tokens of one answer (see the module doc); at most eval.max_new_tokens."""
    budget = cfg.eval.max_new_tokens
    kind = "tuned" if tuned else "base"
    if measured and kind in measured.get(benchmark, {}):
        return min(budget, measured[benchmark][kind])
    if not cost.measured_prompts:
        return budget
    if benchmark == "gsm8k":
        return min(budget, GSM8K_ANSWER_TOKENS)
    return min(budget, TUNED_ANSWER_TOKENS) if tuned else budget


def engine_pass_s(
    cfg: RunConfig, cost: CostModel, model: str, tp: int, tuned: bool, measured=None
) -> float:
    """One evaluation pass (one adapter, or the base model) over every benchmark: prompts
    prefilled (a shared prefix once per group where vLLM caches it), choice benchmarks scored
    by prefill alone, generation benchmarks decoded together (`decode_s`, as many at once as
    vLLM runs), in eval.dtype (`engine_speed`)."""
    prefill = decoded = weighted_context = prompts = 0.0
    for bench in cfg.eval.benchmarks:
        n = eval_prompts(cfg, bench)
        tokens, prefix, groups = prompt_tokens(cfg, cost, bench)
        fresh = n * (tokens - prefix) + groups * prefix
        prefill += fresh * infer_flops(model, tokens)
        if bench not in CHOICE_BENCHMARKS:
            new = answer_tokens(cfg, cost, bench, tuned, measured)
            decoded, prompts = decoded + n * new, prompts + n
            weighted_context += n * new * (tokens + new // 2)
    speed = engine_speed(cfg, cost)
    seconds = prefill_s(cost, prefill, tp, speed)
    if decoded:
        context = weighted_context / decoded
        seqs = decode_concurrency(cfg, cost, model, tp, prompts, context)
        seconds += decode_s(cost, model, decoded, seqs, context, tp, speed)
    return seconds


def decode_concurrency(cfg, cost: CostModel, model: str, tp: int, prompts: float, context):
    """Sequences an engine decodes at once: vLLM's max_num_seqs, the prompts there are, and
    (GPU) as many as its KV cache holds at `context` tokens each (`kv_capacity_tokens`; vLLM
    preempts the rest until blocks free up)."""
    seqs = min(prompts, cost.max_num_seqs)
    if cost.hbm_bytes_per_s is None:
        return seqs
    return max(1.0, min(seqs, kv_capacity_tokens(cfg, model, tp) / max(context, 1.0)))


def judged(cfg: RunConfig, field: str) -> list[str]:
    """Benchmarks a model judge reads: the harm judge the safety sets, the refusal judge the
    safety and false-refusal sets."""
    kinds = ("safety",) if field == "harm_judge" else ("safety", "false_refusal")
    return [b for b in cfg.eval.benchmarks if BENCHMARK_KINDS[b] in kinds]


def judge_s(
    cfg: RunConfig, cost: CostModel, tp: int, passes: dict[bool, int], measured=None
) -> float:
    """Each model judge reads its generations once (its instructions, the prompt and the
    answer: prefill; GPU: its short verdict decoded too), with its own engine start and
    weights, on `tp` devices, in eval.dtype. `passes`: {tuned: passes} of the base model's
    evaluation."""
    seconds, speed = 0.0, engine_speed(cfg, cost)
    for field, judge in cfg.eval.model_judges():
        work = decoded = 0.0
        for bench in judged(cfg, field):
            n, tokens = eval_prompts(cfg, bench), prompt_tokens(cfg, cost, bench)[0]
            for tuned, count in passes.items():
                context = _judge_context(cfg, cost, judge.format, bench, tokens, tuned, measured)
                work += count * n * context * infer_flops(judge.model, context)
                decoded += count * n * judge.budget()
        seconds += cost.engine_start_s + load_s(cost, judge.model)
        seconds += prefill_s(cost, work, tp, speed)
        if cost.measured_prompts and decoded:
            seconds += decode_s(cost, judge.model, decoded, cost.max_num_seqs, 512.0, tp, speed)
    return seconds


def _judge_context(cfg, cost, fmt: str, bench: str, tokens: float, tuned: bool, measured):
    if not cost.measured_prompts:  # the fitted budget: twice a prompt and the whole answer
        return CPU_PROMPT_TOKENS * 2 + cfg.eval.max_new_tokens
    answer = answer_tokens(cfg, cost, bench, tuned, measured)
    return JUDGE_TEMPLATE_TOKENS.get(fmt, JUDGE_TEMPLATE_TOKENS["wildguard"]) + tokens + answer


def eval_job_s(
    cfg: RunConfig,
    cost: CostModel,
    model: str,
    tp: int,
    passes: dict[bool, int],
    replicas: int = 1,
    measured=None,
) -> float:
    """One base model's generations: an engine start and its weights per replica (side by
    side), then its units spread over the replicas, largest first (a unit never splits: each
    adapter's pass, one merged engine each where vLLM cannot serve the family's LoRA; the
    base model's and the prompting passes together), the busiest replica's time."""
    tuned = engine_pass_s(cfg, cost, model, tp, True, measured) + merged_pass_s(cfg, cost, model)
    units = [tuned] * passes.get(True, 0)
    if passes.get(False, 0):
        units.append(passes[False] * engine_pass_s(cfg, cost, model, tp, False, measured))
    loads = [0.0] * max(1, replicas)
    for unit in sorted(units, reverse=True):
        loads[loads.index(min(loads))] += unit
    return cost.engine_start_s + load_s(cost, model) + max(loads)


def judge_job_s(cfg: RunConfig, cost: CostModel, tp: int, passes: dict[bool, int], measured=None):
    """One base model's judging (its own job once its generations are done): each model
    judge's engine in turn (`judge_s`), on `tp` devices; 0 with rule judges only."""
    return judge_s(cfg, cost, tp, passes, measured) if cfg.eval.model_judges() else 0.0


def merged_pass_s(cfg: RunConfig, cost: CostModel, model: str) -> float:
    """Extra seconds of an adapter's pass where it is merged (eval.adapter_engines merge, or a
    family vLLM cannot serve LoRA for, Falcon: tbr_ray.models.Family.vllm_lora False): the
    adapter is merged into a saved copy of the base model (base weights read, merged weights
    written) and served by an engine of its own (a start, its weights read), each at
    load_bytes_per_s."""
    spec = get_spec(model)
    if not merges_adapters_for(cfg.eval.adapter_engines, spec, spec.vllm_lora is not False):
        return 0.0
    return cost.engine_start_s + 3 * load_s(cost, model)


def measured_answer_tokens(generations) -> dict[str, dict[str, float]]:
    """{benchmark: {"base" | "tuned": mean new tokens}} from a run's generations (a frame
    with benchmark, condition and n_new_tokens; condition base and prompt-* are base passes)."""
    out: dict[str, dict[str, float]] = {}
    if generations is None or not len(generations):
        return out
    base = generations["condition"].isin(["base", "prompt-direct", "prompt-cot"])
    for (bench, is_base), frame in generations.groupby([generations["benchmark"], base]):
        out.setdefault(bench, {})["base" if is_base else "tuned"] = float(
            frame["n_new_tokens"].mean()
        )
    return out


def answers_note(cfg: RunConfig, cost: CostModel, measured: dict | None) -> str:
    """One line on where the plan's answer lengths come from."""
    budget = cfg.eval.max_new_tokens
    if measured:
        return f"measured by a run ({len(measured)} benchmarks), else as below; budget {budget}"
    if not cost.measured_prompts:
        return f"every answer at its budget ({budget} tokens; the cost model's fit)"
    return (
        f"no run measured them: a tuned cell's {min(budget, TUNED_ANSWER_TOKENS):.0f} tokens "
        f"(the training mix's answers), GSM8K's {min(budget, GSM8K_ANSWER_TOKENS):.0f} (its "
        f"reference solutions), base and prompting passes the whole budget ({budget})"
    )
