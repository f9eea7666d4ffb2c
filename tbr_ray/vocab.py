"""The platform's vocabulary: names of reflection conditions, judges, judge formats and
benchmarks, as pure data. It imports nothing of tbr_ray, so the core (config, registry, results
schema) validates names against it without loading a stage module (README "Layout").

The stage registries (tbr_ray.judges.RULE_JUDGES, tbr_ray.benchmarks.BENCHMARKS) are keyed by
these names; tests/test_layers.py asserts their keys equal the names here, so a name added in
one place and not the other fails a test. Run `pytest tests/test_layers.py`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


def did_you_mean(given: str, known: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for the closest known names (difflib), or "" when none is close:
    for the errors that name an unknown model, judge, benchmark or condition."""
    close = difflib.get_close_matches(str(given), list(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


# ---------------------------------------------------------------- conditions

# Fine-tuning conditions (paper Table 3) ...
CONDITIONS: tuple[str, ...] = ("none", "internal", "external")
# ... and the prompting experiment (paper section 3, Table 1): no training, the base (chat)
# model evaluated under the Direct or the CoT system prompt.
PROMPTING: tuple[str, ...] = ("prompt-direct", "prompt-cot")
ALL_CONDITIONS: tuple[str, ...] = CONDITIONS + PROMPTING
# The pseudo-condition of the untrained base model's cells (cell id <model>__base__g0.00__s0).
BASE = "base"
# Conditions whose reflections depend on gamma (the rest run at gamma 0).
GAMMA_CONDITIONS: tuple[str, ...] = ("internal", "external")

# ---------------------------------------------------------------- judges

HARM_JUDGE = "harm"  # judge name of the harm judge's rows in the results (eval.harm_judge)
REFUSAL_MODEL_JUDGE = "model"  # judge name of the refusal model judge (eval.refusal_judge)
# Rule judges (keys of tbr_ray.judges.RULE_JUDGES, which holds their functions).
RULE_JUDGE_NAMES: tuple[str, ...] = ("paper-keywords", "xstest-prefix")
JUDGES: tuple[str, ...] = (*RULE_JUDGE_NAMES, REFUSAL_MODEL_JUDGE)  # run at evaluation
# Judges made from human review (tbr_ray.review) when results are read: `human` is the
# reviewers' label; `paper-reviewed` is the paper's two steps (PAPER.md section 5): the keyword
# rule, overridden by the human label where one exists.
HUMAN = "human"
PAPER_REVIEWED = "paper-reviewed"
REVIEW_JUDGES = (HUMAN, PAPER_REVIEWED)
TASKS = ("refusal", "harm")


@dataclass(frozen=True)
class JudgeFormat:
    """How one kind of judge model is prompted and answers.

    tasks: what it can judge ("refusal": three-class or refusal yes/no, "harm": harmful or not).
    chat_template: "required" (rendered through the judge's own chat template; a model without
    one is refused), "if-present" (the template when the tokenizer has one, else plain text),
    "never" (a plain-text format with its own markers; the tokenizer adds BOS).
    max_new_tokens: the default answer budget (eval.*_judge.max_new_tokens overrides it)."""

    name: str
    tasks: tuple[str, ...]
    chat_template: str
    max_new_tokens: int


# Budgets: Llama Guard answers "unsafe\nS1,S10" (<= 10 tokens); WildGuard three lines
# "Harmful request: yes\nResponse refusal: no\nHarmful response: no" (about 20 tokens);
# the three-class judge one class name (<= 8).
FORMATS: dict[str, JudgeFormat] = {
    f.name: f
    for f in (
        JudgeFormat("llama-guard-3", ("harm",), "required", 16),
        JudgeFormat("wildguard", ("harm", "refusal"), "never", 32),
        JudgeFormat("three-class", ("refusal",), "if-present", 8),
    )
}
# Substrings of a model name (lower-cased) -> the only format that model understands.
KNOWN_JUDGE_MODELS = {"llama-guard-3": "llama-guard-3", "wildguard": "wildguard"}


def expected_format(model: str) -> str | None:
    """The format a known judge model needs (by its name), or None for an unknown model."""
    name = model.lower()
    return next((fmt for key, fmt in KNOWN_JUDGE_MODELS.items() if key in name), None)


# ---------------------------------------------------------------- benchmarks

# Name -> kind ("false_refusal", "safety", "general"); keys and kinds of
# tbr_ray.benchmarks.BENCHMARKS, which holds each one's loader and source.
BENCHMARK_KINDS: dict[str, str] = {
    "xstest_safe": "false_refusal",
    "stl_physical_safe": "false_refusal",
    "orbench_hard": "false_refusal",
    "xstest_unsafe": "safety",
    "advbench": "safety",
    "stl_malicious": "safety",
    "stl_cona": "safety",
    "stl_controversial": "safety",
    "stl_physical_unsafe": "safety",
    "stl_qharm": "safety",
    "malicious_instruct": "safety",
    "mmlu": "general",
    "arc_easy": "general",
    "arc_challenge": "general",
    "gsm8k": "general",
}
GSM8K_SHOT_POOL = 8  # first rows of gsm8k/test.jsonl: exemplars, never evaluated (no train split)
# General benchmarks -> size of their exemplar pool (the most eval.shots can ask for).
SHOT_POOLS: dict[str, int] = {
    "mmlu": 5,
    "arc_easy": 25,
    "arc_challenge": 25,
    "gsm8k": GSM8K_SHOT_POOL,
}
# Benchmarks whose file the user brings (eval.benchmark_files).
USER_FILE_BENCHMARKS: tuple[str, ...] = ("orbench_hard", "malicious_instruct")
# Evaluable prompts per benchmark: the shipped files' sizes (tbr_ray.benchmarks.BENCHMARKS'
# `size`), the user files' published sizes. The planner (tbr_ray.plan) counts work and pairs
# from these without loading a file.
BENCHMARK_SIZES: dict[str, int] = {
    "xstest_safe": 250,
    "stl_physical_safe": 100,
    "orbench_hard": 1319,  # user file: OR-Bench-Hard-1K's published size
    "xstest_unsafe": 200,
    "advbench": 520,
    "stl_malicious": 100,
    "stl_cona": 178,
    "stl_controversial": 40,
    "stl_physical_unsafe": 100,
    "stl_qharm": 100,
    "malicious_instruct": 100,  # user file: MaliciousInstruct's published size
    "mmlu": 14042,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "gsm8k": 1319 - GSM8K_SHOT_POOL,
}
# Benchmarks scored by the likelihood of each choice (prefill only); the rest generate.
CHOICE_BENCHMARKS: tuple[str, ...] = ("mmlu", "arc_easy", "arc_challenge")
# Shots of a general benchmark when eval.shots names none (the others: 0).
DEFAULT_SHOTS: dict[str, int] = {"arc_easy": 3, "arc_challenge": 3, "gsm8k": 2}
