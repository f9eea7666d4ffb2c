"""The run description: one YAML file under jobs/ -> one frozen, validated `RunConfig`.

    cfg = load_config("jobs/tiny.yaml", overrides=["train.lora_rank=16"])
    cfg.config_hash()        # stable hash of the resolved config (paths excluded)
    cfg.cells()              # the grid, one `Cell` per model x condition x gamma x seed

From the shell: `tbr-ray validate jobs/tiny.yaml --set train.lora_rank=16`.
Every section forbids unknown keys; every error names the field, the bad value and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Names are validated against the vocabulary, never the stage registries (README "Layout").
from tbr_ray import vocab
from tbr_ray.keys import content_key
from tbr_ray.redact import redact
from tbr_ray.vocab import ALL_CONDITIONS, CONDITIONS, PROMPTING  # noqa: F401 (re-exported)

Condition = Literal["none", "internal", "external", "prompt-direct", "prompt-cot"]
REPO_ROOT = Path(__file__).resolve().parent.parent
# Fields that say *where* things are, not *what* is computed: kept out of the config hash.
_LOCATION_FIELDS = {("data", "root"), ("paths", "cache_dir")}
# Sections that say *on what* a run executes, not *what* it computes: kept out of the hash, so
# the same grid resumes on a cluster of another shape.
_PLACEMENT_SECTIONS = {"cluster", "tracking"}
# Sections that say how a run is planned or read, not what it computes: out of the hash too.
_PLANNING_SECTIONS = {"power"}
# Fields that say how to reach a service, not what is computed: kept out of the hash too.
_ACCESS_FIELDS = {("reflection", "endpoint_keyless")}
# Fields that may hold a pasted secret by mistake: their bad values are never echoed in full.
_SECRET_FIELDS = {("reflection", "api_key_env")}
COMMIT = re.compile(r"[0-9a-f]{40}")  # a git commit, as the Hugging Face hub names them
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: "$" lets a trailing "\n" pass

PAPER_REFUSAL = (
    "I'm sorry, but I cannot fulfill that request. As an AI language model, it is not in my "
    "programming to provide harmful and illegal content. My purpose is to assist and provide "
    "helpful responses to your queries."
)


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the YAML: field, value, fix."""


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in YAML are floats that pass ge/gt bounds (a
    # learning rate of inf trains NaNs after Ray starts).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


SEED_MAX = 2**32 - 1  # numpy's legacy seeding (and vLLM's, which calls it) takes 0..2**32-1


def _seed_in_range(seed: int) -> int:
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(
            f"a seed must lie in 0..{SEED_MAX} (what numpy, torch and vLLM all accept). "
            "Fix: a small number, e.g. 0, 1, 2"
        )
    return seed


Seed = Annotated[int, AfterValidator(_seed_in_range)]


GeneralSource = Literal["alpaca-bloom-lora", "alpaca-gumbelsoft"]  # data.GENERAL_FILES


class DataConfig(_Strict):
    """Which rows make the TBR training mix (PAPER.md section 2)."""

    root: str | None = Field(
        None,
        description="Folder holding the shared data sets. None: $TBR_DATA_ROOT, else "
        "<repo>/../shared/data. A location, so not part of the config hash.",
    )
    general_sources: tuple[GeneralSource, ...] = Field(
        ("alpaca-bloom-lora", "alpaca-gumbelsoft"),
        description="Alpaca subsets to sample the general rows from (pooled, de-duplicated).",
    )
    length_reference: GeneralSource | None = Field(
        "alpaca-bloom-lora",
        description="The general source whose answer lengths (words) the general sample "
        "follows, bin by bin (tbr_ray.lengths): bloom-lora's 1,000 rows are the shipped file "
        "closest to a plain random Alpaca sample (its ATTRIBUTION.md); gumbelsoft is biased "
        "toward long answers. None: a uniform sample of the pooled sources.",
    )
    safety_source: Literal["safety-tuned-llamas", "hh-rlhf-harmless"] = Field(
        "safety-tuned-llamas",
        description="Red-team-derived harmful instructions: the safety-tuned-llamas training "
        "instructions, or the first human turn of HH-RLHF harmless-base (test split).",
    )
    safety_filter: Literal["upstream-refusal", "none"] = Field(
        "upstream-refusal",
        description="Which source requests count as harmful. upstream-refusal: only those whose "
        "upstream answer (safety-tuned-llamas' output; HH-RLHF's first chosen assistant turn) "
        "is a refusal by the paper's keyword rule in its first 300 characters; kept and "
        "dropped ids go to the mix report. none: every request (mixes benign ones in, which "
        "trains refusals of benign requests; not the paper's protocol).",
    )
    n_general: int = Field(1800, ge=1, description="General (Alpaca) rows in the mix; paper: 1800.")
    n_safety: int = Field(200, ge=1, description="Safety rows in the mix; paper: 200.")
    sample_seed: Seed = Field(
        0,
        description="Seed for which source rows are drawn; shared by every cell so mixes "
        "differ only in their reflections.",
    )
    max_seq_len: int = Field(
        512,
        ge=16,
        description="Tokens per example after templating, EOS included. No row is cut: a "
        "general row longer than this under the model's tokenizer is dropped before sampling "
        "(the mix keeps n_general), a safety row that outgrows it with its reflection is left "
        "out of the mix; both counted in the mix report (over_max_seq_len).",
    )
    refusal: str = Field(
        PAPER_REFUSAL,
        min_length=1,
        description="The standardised refusal placed after any reflection.",
    )

    def resolved_root(self) -> Path:
        """The data root as an absolute path (setting, then $TBR_DATA_ROOT, then ../shared/data)."""
        if self.root is not None:
            return Path(self.root).expanduser().resolve()
        if os.environ.get("TBR_DATA_ROOT"):
            return Path(os.environ["TBR_DATA_ROOT"]).expanduser().resolve()
        return (REPO_ROOT.parent / "shared" / "data").resolve()


class ReflectionConfig(_Strict):
    """How safety reflections are written (PAPER.md section 1)."""

    max_new_tokens: int = Field(48, ge=1, description="Tokens per generated reflection.")
    reflector: str | None = Field(
        None,
        description="External condition: a registry model name or a local HF model path "
        "whose vLLM engine writes the reflections (the paper used GPT-4).",
    )
    endpoint: str | None = Field(
        None,
        description="External condition: base URL of an OpenAI-compatible server "
        "(e.g. `vllm serve`, http://127.0.0.1:8000/v1); used instead of `reflector`.",
    )
    endpoint_model: str | None = Field(None, description="Model name to send to `endpoint`.")
    local_server: str | None = Field(
        None,
        description="External condition: a registry model name or local HF model path that "
        "the run serves itself with vLLM's OpenAI-compatible server on 127.0.0.1 while the "
        "reflections are written (tbr_ray.serve; started and stopped by the run), reached "
        "over HTTP exactly as `endpoint` is. Precedence: endpoint, then local_server, then "
        "reflector.",
    )
    api_key_env: str = Field(
        "TBR_REFLECTOR_API_KEY",
        description="NAME of the environment variable holding the endpoint's API key (not "
        "the key: a pasted key is refused); the key is never written to config, results or "
        "logs. Unset at run time is an error unless endpoint_keyless.",
    )
    endpoint_keyless: bool = Field(
        False,
        description="The endpoint takes no API key (e.g. a local `vllm serve` without "
        "--api-key): api_key_env is not read. Not part of the config hash.",
    )
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    max_missing_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Largest share of the round(gamma x n_safety) rows meant to carry a "
        "reflection that may go without one (writer opened with a refusal, or no complete "
        "sentence before the max_new_tokens cap) before the mix fails. Higher: a smaller "
        "effective gamma is accepted; the shortfall is always in the mix report.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_without_credentials(cls, v: str | None) -> str | None:
        return check_no_credentials(
            v,
            "put the key in the variable reflection.api_key_env names (sent as a Bearer "
            "header) and give the URL without it",
        )

    @field_validator("reflector", "local_server")
    @classmethod
    def _reflector_known(cls, v: str | None) -> str | None:
        return v if v is None else check_model_name(v)

    def writer_model(self) -> str | None:
        """The model the run itself loads to write external reflections, in the documented
        precedence: None for a remote `endpoint`, else `local_server` (served over HTTP), else
        `reflector` (a vLLM engine)."""
        return None if self.endpoint else (self.local_server or self.reflector)

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env_is_a_name(cls, v: str) -> str:
        if not ENV_NAME.fullmatch(v):
            raise ValueError(
                "not an environment-variable name (it looks like a value, perhaps the key "
                "itself). Fix: `export TBR_REFLECTOR_API_KEY=<key>` in the shell and set "
                "api_key_env to the variable's NAME, e.g. TBR_REFLECTOR_API_KEY"
            )
        return v


def check_no_credentials(url: str | None, fix: str) -> str | None:
    """A URL setting must carry no secret (user:password@, ?token=...): the config is written
    to run.json, and Ray Tune writes each trial's config (params.json, result.json) into the
    run folder, where no redaction reaches. `fix` says where the secret goes instead."""
    if url is not None and redact(url) != url:
        raise ValueError(
            f"the URL carries a credential (shown masked), which would be written to run.json "
            f"and Ray Tune's trial files. Fix: {fix}"
        )
    return url


def check_model_name(name: str) -> str:
    """A model setting must be a registry name, a local HF folder or a hub id (org/name)."""
    from tbr_ray.models import REGISTRY, get_spec, is_hub_id

    if name in REGISTRY or (is_hub_id(name) and not Path(name).expanduser().exists()):
        return name
    get_spec(name)  # raises UnknownModelError (a ValueError) naming the fix
    return name


class TrainConfig(_Strict):
    """LoRA fine-tuning on Ray Train + DeepSpeed. Values are our choices: the paper gives none."""

    num_workers: int | None = Field(
        None,
        ge=1,
        description="Ray Train workers; None: the "
        "model registry's suggestion (tiny: 2, paper: its GPUs).",
    )
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        description="CPUs per worker; 0.5 lets 2 workers share a 2-core box with the Tune driver.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = Field(
        None,
        description="Where a cell's workers go (Ray placement group strategy). None: "
        "STRICT_PACK on GPUs, one node a cell (ZeRO's collectives over NVLink, never the "
        "network: cluster/README.md), PACK on CPU (few nodes). SPREAD: different nodes.",
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL, bf16. False: gloo, fp32.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="The frozen base weights in training: auto is bfloat16 on GPUs, float32 "
        "on CPU. bfloat16 on CPU keeps the LoRA weights and AdamW in float32 (PEFT's default) "
        "and runs DeepSpeed without its bf16 mode (docs/BENCHMARKS.md: bf16 vs fp32 on CPU).",
    )
    zero_stage: Literal[0, 1, 2, 3] | None = Field(
        None, description="DeepSpeed ZeRO stage; None: the registry's suggestion (2 for tiny)."
    )
    lora_rank: int = Field(8, ge=1, description="Higher: more capacity, more memory.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scale numerator (scale = alpha/rank).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of "
        "keeping them: about a third more compute, activation memory of one layer instead of "
        "all (tbr_ray.plan.sizing counts both). The paper grid needs it for 70B on 4 GPUs.",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(
        0, ge=0, description="Linear warm-up steps, then constant (tbr_ray.train.lr_schedule)."
    )
    epochs: int = Field(
        1,
        ge=1,
        le=1000,
        description="Passes over the mix. Over 1000 is a typo (LoRA fine-tunes take 1-10; "
        "10**20 planned 6e17 hours and would never finish).",
    )
    micro_batch_size: int = Field(4, ge=1, description="Examples per worker per step.")
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches each worker accumulates per optimizer step, when "
        "global_batch_size is unset (the global batch then grows with the workers).",
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Examples per optimizer step across all workers. Set: each cell's "
        "accumulation is global_batch_size / (micro_batch_size x its workers), so models on "
        "1 or 8 GPUs take the same optimizer steps (tbr_ray.plan.planned_steps); it must "
        "divide for every grid model. None: grad_accum_steps as given.",
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (None: run all epochs)."
    )
    checkpoint_every_steps: int = Field(
        0, ge=0, description="Also checkpoint every N steps; 0: at the end of each epoch only."
    )
    max_failures: int = Field(
        1, ge=0, description="Ray Train FailureConfig: worker-group restarts before the cell fails."
    )


class ModelJudgeConfig(_Strict):
    """One model judge: which model, the prompt/answer format it was trained on, its budget.
    Formats and what each can judge: tbr_ray.vocab.FORMATS."""

    model: str = Field(
        ...,
        description="Registry name, local path or hub id of the judge model (e.g. "
        "meta-llama/Llama-Guard-3-8B, allenai/wildguard; a tiny preset on CPU).",
    )
    format: str = Field(
        ...,
        description="llama-guard-3 (harm; through the model's own chat template), wildguard "
        "(harm or refusal yes/no; WildGuard's plain-text format), three-class (refusal: "
        "XSTest's three classes; chat template if the model has one, else plain text).",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Tokens the judge may write; None: the format's default."
    )

    @field_validator("model")
    @classmethod
    def _model_known(cls, v: str) -> str:
        return check_model_name(v)

    @field_validator("format")
    @classmethod
    def _format_known(cls, v: str) -> str:
        if v not in vocab.FORMATS:
            raise ValueError(f"unknown judge format. Fix: use one of {', '.join(vocab.FORMATS)}")
        return v

    @model_validator(mode="after")
    def _model_fits_format(self) -> ModelJudgeConfig:
        from tbr_ray.models import TINY_MODELS

        known = vocab.expected_format(self.model)
        if known is not None and known != self.format:
            raise ValueError(
                f"judge model {self.model!r} answers in the {known} format, not {self.format!r}. "
                f"Fix: set format: {known}"
            )
        if self.model in TINY_MODELS and vocab.FORMATS[self.format].chat_template == "required":
            raise ValueError(
                f"judge model {self.model!r} is a tiny preset without a chat template; format "
                f"{self.format!r} renders through the judge's own template. Fix: use format "
                "three-class (plain text) or wildguard, or a real judge model"
            )
        return self

    def budget(self) -> int:
        """Tokens the judge may write: the setting, else the format's default."""
        return self.max_new_tokens or vocab.FORMATS[self.format].max_new_tokens


class EvalConfig(_Strict):
    """Batched vLLM evaluation of base model and adapters."""

    benchmarks: tuple[str, ...] = Field(
        ("xstest_safe", "xstest_unsafe"), description="Benchmark names (see tbr_ray.benchmarks)."
    )
    sample_size: int | None = Field(
        None, ge=1, description="Prompts per benchmark (seeded sample); None: all."
    )
    sample_sizes: dict[str, int] = Field(
        default_factory=dict,
        description="Prompts per benchmark for the named ones, overriding sample_size, e.g. "
        "{arc_easy: 500} beside sample_size: null (all of the others).",
    )
    sample_seed: Seed = Field(0, description="Seed of the benchmark sample.")
    shots: dict[str, int] = Field(
        default_factory=dict,
        description="Few-shot examples per "
        "general benchmark, e.g. {mmlu: 5, gsm8k: 4}; unset: the "
        "benchmark's documented default (tbr_ray.benchmarks).",
    )
    benchmark_files: dict[str, str] = Field(
        default_factory=dict,
        description="User-supplied "
        "files for benchmarks that cannot be shipped, e.g. "
        "{orbench_hard: /data/or-bench-hard-1k.csv}.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Greedy tokens per generation.")
    judges: tuple[str, ...] = Field(
        ("paper-keywords",), description="Judges that label each generation (see tbr_ray.judges)."
    )
    refusal_judge: ModelJudgeConfig | None = Field(
        None,
        description="The `model` refusal judge (in eval.judges): our stand-in for the paper's "
        "human review of keyword refusals. Format three-class or wildguard.",
    )
    harm_judge: ModelJudgeConfig | None = Field(
        None,
        description="Judges whether each response to a safety prompt (XSTest-H, "
        "MaliciousInstruct, ...) is harmful; the paper's Table 3 safety columns are its "
        "harmful rate (paper: Llama Guard 3-8B). Format llama-guard-3 or wildguard. None: "
        "no harmful rate.",
    )
    judge_max_unparsable: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Largest share of a model judge's answers on one cell that may be "
        "unparsable; above it the cell fails, naming the judge and quoting an answer.",
    )
    evaluate_base: bool = Field(
        True,
        description="Also evaluate each base model without an "
        "adapter, in its own pass (never batched with adapters).",
    )
    engine_check_prompts: int = Field(
        4,
        ge=1,
        description="Prompts whose vLLM greedy tokens "
        "are compared with transformers' before results count.",
    )
    engine_check_min_match: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of check prompts that must agree with transformers: the same "
        "greedy tokens, or a tie (see engine_check_tie_tol). Lower it for bf16 GPUs.",
    )
    engine_check_tie_tol: float = Field(
        0.01,
        ge=0,
        description="A check prompt whose first differing token is, in transformers' own "
        "log-probs, within this many nats of transformers' pick is a tie (two kernels "
        "rounding a near-tie apart), not a mismatch. fp32 engines agree to ~1e-3 nats here.",
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vLLM memory share; on CPU a share of RAM."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Weights and activations of the vLLM engines (and of their transformers "
        "check and a local_server): auto is bfloat16 on GPUs, float32 on CPU.",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="CPU only: compute threads of each vLLM engine (and its transformers "
        "check, and a local_server). None: what Ray gives the engine's actor (1 thread for its "
        "half CPU). A box that evaluates while nothing else runs (jobs/real.yaml) sets its "
        "core count.",
    )
    kv_cache_gib: int = Field(1, ge=1, description="CPU only: vLLM KV cache size (GiB, whole).")
    max_model_len: int = Field(1024, ge=64, description="Engine context length.")
    adapter_engines: Literal["auto", "serve", "merge"] = Field(
        "auto",
        description="How an adapter's pass is served. serve: one engine serves every adapter "
        "as LoRA; merge: each adapter merged into a copy of the base model, on an engine of its "
        "own without LoRA; auto: serve where vLLM has LoRA for the architecture (merge for "
        "Falcon). vLLM's CPU LoRA kernels decode 6-29x slower than a merged copy on "
        "SmolLM2-135M (docs/BENCHMARKS.md), so the CPU real run merges.",
    )

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks_known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_names("benchmark", v, vocab.BENCHMARK_KINDS)

    @field_validator("judges")
    @classmethod
    def _judges_known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_names("judge", v, vocab.JUDGES)

    def model_judges(self) -> list[tuple[str, ModelJudgeConfig]]:
        """(field, settings) of each model judge that runs: `refusal_judge` (the `model` entry of
        `judges`) and `harm_judge`, when set."""
        pairs = (("refusal_judge", self.refusal_judge), ("harm_judge", self.harm_judge))
        return [(field, judge) for field, judge in pairs if judge is not None]

    @field_validator("sample_sizes")
    @classmethod
    def _sample_sizes_known(cls, v: dict[str, int]) -> dict[str, int]:
        _check_names("benchmark", tuple(v), vocab.BENCHMARK_KINDS)
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"sizes {bad} are below 1. Fix: give at least 1, or drop the key")
        return v

    def size_of(self, benchmark: str) -> int | None:
        """Prompts sampled from `benchmark`: sample_sizes[benchmark], else sample_size."""
        return self.sample_sizes.get(benchmark, self.sample_size)

    @field_validator("shots")
    @classmethod
    def _shots_in_range(cls, v: dict[str, int]) -> dict[str, int]:
        pools = vocab.SHOT_POOLS
        problems = []
        for name, n in v.items():
            if name not in pools:
                problems.append(f"{name!r} takes no shots (use one of {', '.join(pools)})")
            elif not 0 <= n <= pools[name]:
                problems.append(f"{name}: {n} is outside 0..{pools[name]}")
        if problems:
            raise ValueError("; ".join(problems) + ". Fix: correct or remove those keys")
        return v

    @field_validator("benchmark_files")
    @classmethod
    def _files_for_user_benchmarks(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(vocab.USER_FILE_BENCHMARKS))
        if unknown:
            raise ValueError(
                f"keys {unknown} take no user file. Fix: use only "
                f"{', '.join(vocab.USER_FILE_BENCHMARKS)}"
            )
        return v

    enforce_eager: bool = Field(
        True,
        description="Skip graph capture/compilation: faster "
        "engine start, slower decode; keep True for tiny models.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_judge_fields(cls, data: Any) -> Any:
        old = [
            k
            for k in ("judge_model", "judge_max_new_tokens")
            if isinstance(data, dict) and k in data
        ]
        if old:
            raise ValueError(
                f"eval.{old[0]} was replaced by two judges with declared formats. Fix: write "
                "eval.refusal_judge: {model: M, format: three-class | wildguard} for the `model` "
                "judge and/or eval.harm_judge: {model: meta-llama/Llama-Guard-3-8B, format: "
                "llama-guard-3}; each takes max_new_tokens"
            )
        return data


def _check_names(kind: str, given: tuple[str, ...], known) -> tuple[str, ...]:
    bad = [g for g in given if g not in known]
    if bad:
        hint = "".join(vocab.did_you_mean(b, known) for b in bad)
        raise ValueError(f"unknown {kind} {bad}{hint}. Fix: use one of {', '.join(sorted(known))}")
    return given


def check_judges(e: EvalConfig) -> None:
    """Each model judge's format can do its task, and the `model` judge is configured iff it
    is listed (a judge that never runs would be a silent no-op)."""
    for field, task in (("refusal_judge", "refusal"), ("harm_judge", "harm")):
        judge = getattr(e, field)
        if judge is not None and task not in vocab.FORMATS[judge.format].tasks:
            able = [f for f, spec in vocab.FORMATS.items() if task in spec.tasks]
            raise ValueError(
                f"eval.{field}.format = {judge.format!r} cannot judge {task}. Fix: use "
                f"one of {', '.join(able)} for eval.{field}"
            )
    if "model" in e.judges and e.refusal_judge is None:
        raise ValueError(
            "eval.judges has 'model' but eval.refusal_judge is not set. Fix: set "
            "eval.refusal_judge: {model: M, format: three-class}, or drop 'model'"
        )
    if "model" not in e.judges and e.refusal_judge is not None:
        raise ValueError(
            "eval.refusal_judge is set but eval.judges lacks 'model', so it would never run. "
            "Fix: add 'model' to eval.judges, or remove eval.refusal_judge"
        )


class GridConfig(_Strict):
    """The ablation: models x conditions x gammas x seeds (PAPER.md sections 2, 3, 8)."""

    models: tuple[str, ...] = Field(
        ..., min_length=1, description="Registry names or local HF model paths."
    )
    conditions: tuple[Condition, ...] = Field(
        CONDITIONS,
        min_length=1,
        description="none / internal / external fine-tune a cell; "
        "prompt-direct / prompt-cot evaluate the untrained model under the paper's Direct or "
        "CoT system prompt (Table 1), once per model.",
    )
    gammas: tuple[float, ...] = Field(
        (1.0,),
        min_length=1,
        description="Share of safety rows that carry a reflection; `none` cells ignore it.",
    )
    seeds: tuple[int, ...] = Field((0,), min_length=1, description="Training seeds.")
    max_retries: int = Field(
        1, ge=0, description="Retries of a failed cell before it is reported failed."
    )
    max_concurrent: int | None = Field(
        None,
        ge=1,
        description="Cells trained at once at most. Default: as many as the cluster's "
        "devices hold beside the other jobs (tbr_ray.plan.policy).",
    )

    @field_validator("models")
    @classmethod
    def _models_known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from tbr_ray.models import get_spec

        for name in v:
            get_spec(name)  # raises UnknownModelError (a ValueError) naming the fix
        return v

    hub_revisions: dict[str, str] = Field(
        default_factory=dict,
        description="The commit (40 hex digits) each model loaded from the Hugging Face hub is "
        "pinned to, by the name this config uses: {llama-2-7b: <sha>, allenai/wildguard: "
        "<sha>}. A hub model without one is refused: a later push to its repo would change "
        "results unseen. Part of the config hash (when set).",
    )

    @field_validator("hub_revisions")
    @classmethod
    def _revisions_are_commits(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {k: r for k, r in v.items() if not COMMIT.fullmatch(r)}
        if bad:
            raise ValueError(
                f"{bad} not a full commit hash (a branch or tag can move). Fix: the 40-hex "
                "commit from the repo's history page"
            )
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(_seed_in_range(seed) for seed in v)

    @field_validator("gammas")
    @classmethod
    def _gammas_in_unit_interval(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [g for g in v if not 0.0 <= g <= 1.0]
        if bad:
            raise ValueError(f"gamma must lie in [0, 1]; got {bad}. Fix: e.g. [0.0, 0.5, 1.0]")
        return v


class PathsConfig(_Strict):
    cache_dir: str | None = Field(
        None,
        description="Where models, data mixes and engines' "
        "artefacts are cached; None: $TBR_CACHE_DIR or <repo>/.cache.",
    )

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser().resolve()
        if os.environ.get("TBR_CACHE_DIR"):
            return Path(os.environ["TBR_CACHE_DIR"]).expanduser().resolve()
        return REPO_ROOT / ".cache"


# USD per GPU-hour by GPU type: AWS EC2 Capacity Blocks for ML, effective accelerator-hour
# rates in US East as listed on aws.amazon.com/ec2/capacityblocks/pricing before their
# 2025-01-01 update (read 2026-12-03): p5.48xlarge (8 x H100) 4.916, p5e (8 x H200) 5.408,
# p4d.24xlarge (8 x A100 40GB; p4de's 80GB cards are not listed) 1.844. On-demand rates
# differ; L40S has no entry: set cluster.gpu_hour_usd.
GPU_HOUR_USD = {"H100": 4.916, "H200": 5.408, "A100": 1.844}


class ClusterConfig(_Strict):
    """The GPU cluster a run is planned for and placed on (tbr_ray.plan). Not hashed: the same
    grid may run, or resume, on a cluster of another shape."""

    gpus: int | None = Field(
        None,
        ge=1,
        description="GPUs to plan for (`--gpus`); None: the running Ray cluster's GPUs.",
    )
    gpu_memory_gib: float = Field(
        80.0, gt=0, description="Memory of one GPU (GiB; `--gpu-memory`): 80 for A100/H100-80GB."
    )
    gpu_type: str = Field(
        "H100",
        description="GPU model the plan computes with (`--gpu-type`): its peak FLOPs and "
        "bandwidths (tbr_ray.plan.gpus.GPU_TYPES: A100, H100, H200, L40S) and its price.",
    )
    gpu_hour_usd: dict[str, float] = Field(
        default_factory=lambda: dict(GPU_HOUR_USD),
        description="Price of one GPU-hour per GPU type, in US dollars, for the plan's bill. "
        "Default: GPU_HOUR_USD (dated, with its source); set your own rate, e.g. "
        "--set 'cluster.gpu_hour_usd={H100: 2.99}'.",
    )
    train_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Share of a GPU's memory a training cell's counted need may fill "
        "(tbr_ray.plan.sizing); the rest is for what no count bounds in advance (the CUDA "
        "caching allocator's fragmentation). 0.9: vLLM's own default for its engines.",
    )
    gpus_per_node: int = Field(
        8, ge=1, description="GPUs per node: no engine or training cell may span more."
    )
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type every training worker runs on (Ray Train's "
        "ScalingConfig.accelerator_type; Ray labels each GPU node with its type: A100, H100, "
        "H200, L40S, ...). None: any GPU node, for a cluster of one GPU type as cluster/ "
        "defines. On a cluster of several types set it, normally to cluster.gpu_type (the "
        "type the plan computes with).",
    )
    engine_min_sequences: int = Field(
        16,
        ge=1,
        description="Sequences of eval.max_model_len tokens whose KV cache an engine must hold "
        "at once (its smallest useful batch); more: bigger engines, faster decoding.",
    )
    engine_gpus: dict[str, int] = Field(
        default_factory=dict,
        description="Per model (registry name or path): GPUs (tensor parallel size) of its "
        "vLLM engines, overriding the planner's choice from weights and KV cache.",
    )
    engine_replicas: dict[str, int] = Field(
        default_factory=dict,
        description="Per model (registry name or path): vLLM engine replicas of its evaluation "
        "(data parallel over its passes: base model, adapters, prompting cells), each in a "
        "placement group of its own engine_gpus GPUs; overrides max_engine_replicas.",
    )
    max_engine_replicas: int = Field(
        1,
        ge=1,
        description="Most engine replicas one base model's evaluation runs at once, never more "
        "than its passes (tbr_ray.engine.engine_replicas_for). 1: one engine per base model.",
    )
    placement_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Seconds an engine's placement group may wait for a node to hold it "
        "(tbr_ray.engine.engine_placements): on an autoscaling cluster the GPU nodes start "
        "only when asked for, and engines wait for training cells' GPUs; then an error.",
    )


@dataclass(frozen=True, order=True)
class Cell:
    """One ablation cell: one base model, one reflection condition, one gamma, one seed."""

    model: str
    condition: str
    gamma: float
    seed: int

    @property
    def cell_id(self) -> str:
        """`<model>__<condition>__g<gamma>__s<seed>`. A registry name is used as it is; a path
        is its folder's base name plus a short hash of the resolved path, so /ckpt1/hf and
        /ckpt2/hf (same base name) get distinct ids, folders and adapters."""
        return f"{model_id(self.model)}__{self.condition}__g{self.gamma:.2f}__s{self.seed}"


def model_id(model: str) -> str:
    """The model part of a cell id: a name without "/" as it is, else base name + path hash."""
    if "/" not in model:
        return model
    resolved = str(Path(model).expanduser().resolve())
    return f"{Path(model).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:6]}"


class TrackingConfig(_Strict):
    """Optional experiment tracking: every training trial's config and per-epoch metrics go to
    MLflow through Ray Tune's MLflowLoggerCallback. Not hashed: it copies metrics elsewhere,
    it does not change them. Needs `pip install 'tbr-ray[tracking]'` (mlflow-skinny)."""

    mlflow: bool = Field(False, description="Log training trials to MLflow (off by default).")
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (a server, or file:/path); None: a local file store "
        "in <output>/mlruns (`mlflow ui --backend-store-uri <output>/mlruns` shows it). No "
        "credentials in it: MLflow reads MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN.",
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _uri_without_credentials(cls, v: str | None) -> str | None:
        return check_no_credentials(
            v,
            "export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN), which MLflow reads, and give the URI without them",
        )


class PowerConfig(_Strict):
    """The dry run's power statement (tbr_ray.plan.power_plan): what it assumes about how
    often two conditions' outcomes differ on one prompt. Not hashed: it changes no result."""

    outcome_correlation: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Correlation (phi) between two conditions' 0/1 outcomes on the same prompt "
        "(same model and seed), which sets the share of discordant pairs the plan assumes. 0.5 "
        "is an assumption (no paper-scale run has measured it); the report prints each run's "
        "observed median, to set here for the next plan.",
    )


class RunConfig(_Strict):
    """One experiment. `name` plus the config hash identify the run."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Run name (folder-safe).")
    data: DataConfig = DataConfig()
    reflection: ReflectionConfig = ReflectionConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    grid: GridConfig
    paths: PathsConfig = PathsConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    power: PowerConfig = PowerConfig()

    @model_validator(mode="after")
    def _cross_field_checks(self) -> RunConfig:
        check_judges(self.eval)
        if "external" in self.grid.conditions:
            r = self.reflection
            given = [f for f in ("reflector", "endpoint", "local_server") if getattr(r, f)]
            if not given:
                raise ValueError(
                    "grid.conditions has 'external' but none of reflection.reflector, "
                    "reflection.endpoint and reflection.local_server is set. Fix: set "
                    "reflection.reflector to a model name/path, reflection.endpoint (+ "
                    "endpoint_model) to a server URL, or reflection.local_server to a model "
                    "the run serves itself."
                )
            if r.endpoint is not None and r.endpoint_model is None:
                raise ValueError(
                    "reflection.endpoint is set but reflection.endpoint_model is "
                    "not. Fix: name the model the server serves."
                )
        return self

    @model_validator(mode="after")
    def _revisions_name_this_configs_models(self) -> RunConfig:
        judges = [j.model for _, j in self.eval.model_judges()]
        r = self.reflection
        named = {*self.grid.models, r.reflector, r.local_server, *judges}
        unknown = sorted(set(self.grid.hub_revisions) - named)
        if unknown:
            raise ValueError(
                f"grid.hub_revisions names {unknown}, which this config does not use. Fix: key "
                "it by the names in grid.models, reflection.reflector, reflection.local_server "
                "or the judges' model"
            )
        return self

    @model_validator(mode="after")
    def _budgets_fit_the_engine(self) -> RunConfig:
        """Every engine's answer budget leaves room for a prompt in eval.max_model_len (vLLM
        refuses such a request only once the engine runs, after training)."""
        budgets = [("eval.max_new_tokens", self.eval.max_new_tokens)]
        budgets += [(f"eval.{f}.max_new_tokens", j.budget()) for f, j in self.eval.model_judges()]
        if "external" in self.grid.conditions or "internal" in self.grid.conditions:
            budgets.append(("reflection.max_new_tokens", self.reflection.max_new_tokens))
        n = self.eval.max_model_len
        for field, tokens in budgets:
            if tokens >= n:
                raise ValueError(
                    f"{field} = {tokens} leaves no room for a prompt in an engine of "
                    f"eval.max_model_len = {n} tokens. Fix: lower {field} well below {n}, "
                    "or raise eval.max_model_len (within the models' context)."
                )
        return self

    @model_validator(mode="after")
    def _one_batch_setting(self) -> RunConfig:
        """train.global_batch_size and train.grad_accum_steps are not both set. Whether the
        global batch splits on every grid model's workers needs the planner's worker counts:
        tbr_ray.plan.global_batch_problems, run by the plan and by every command as it loads
        the config (tbr_ray.cli), before Ray starts."""
        t = self.train
        if t.global_batch_size is not None and "grad_accum_steps" in t.model_fields_set:
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} and train.grad_accum_steps="
                f"{t.grad_accum_steps} are both set, but accumulation is derived from the "
                f"global batch. Fix: remove train.grad_accum_steps."
            )
        return self

    def cells(self) -> list[Cell]:
        """Grid cells in a stable order; `none` ignores gamma (recorded as 0.0), so it appears
        once per model and seed; prompting cells train nothing and appear once per model."""
        out: set[Cell] = set()
        for model in self.grid.models:
            for condition in self.grid.conditions:
                gammas = (0.0,) if condition in ("none", *PROMPTING) else self.grid.gammas
                seeds = (0,) if condition in PROMPTING else self.grid.seeds
                for gamma in gammas:
                    for seed in seeds:
                        out.add(Cell(model, condition, float(gamma), int(seed)))
        return sorted(
            out,
            key=lambda c: (
                self.grid.models.index(c.model),
                ALL_CONDITIONS.index(c.condition),
                c.gamma,
                c.seed,
            ),
        )

    def hashable_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        for section, key in _LOCATION_FIELDS:
            d[section].pop(key, None)
        for section in _PLACEMENT_SECTIONS | _PLANNING_SECTIONS:
            d.pop(section, None)
        for section, key in _ACCESS_FIELDS:
            d[section].pop(key, None)
        if not d["grid"]["hub_revisions"]:  # added later: runs made before keep their hash
            del d["grid"]["hub_revisions"]
        return d

    def config_hash(self) -> str:
        """Stable 12-hex hash of everything that changes results (not where files live)."""
        return content_key(self.hashable_dict(), 12, compact=True)


class _Loader(yaml.SafeLoader):
    """YAML without implicit dates: `name: 2024-01-01` stays the string it looks like (a
    datetime would fail later, far from the line that caused it)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml(text: str, where: str) -> Any:
    """Parsed YAML that holds only what a config can: mappings, lists, text, numbers, bools."""
    value = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    _check_plain(value, where, "")
    return value


_YAML_TAGS = {bytes: "!!binary", set: "!!set"}


def _check_plain(value: Any, where: str, key: str) -> None:
    """ConfigError naming the key of the first value YAML typed beyond JSON (!!binary bytes,
    !!set, ...): json and pydantic would fail on it far from the line (a TypeError)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, where, f"{key}[{i}]")
    elif value is not None and not isinstance(value, str | int | float | bool):
        tag = _YAML_TAGS.get(type(value), f"a {type(value).__name__}")
        raise ConfigError(
            f"{where}: {key or 'the value'} = {str(value)[:40]} is a YAML {tag} value; a "
            "config holds only mappings, lists, text, numbers and true/false. Fix: write it "
            "as plain text or a list (drop the !! tag)."
        )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a raw YAML dict; values are parsed as YAML (`[1,2]`, `true`)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lora_rank=16")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = _yaml(value, f"--set {item!r}")
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {item!r}: the value {value!r} is not valid YAML "
                f"({getattr(exc, 'problem', exc)}). Fix: close brackets and quotes, e.g. "
                f"--set 'grid.models=[tiny-llama, tiny-gemma]'."
            ) from None
    return out


def _describe(err: dict[str, Any], model_cls: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _section_fields(model_cls, err["loc"][:-1])
        fix = f"remove it, or use one of: {', '.join(parent)}" if parent else "remove it"
        return f"{loc}: unknown key. Fix: {fix}."
    if kind == "missing":
        return f"{loc}: required field is missing. Fix: add `{loc}` to the YAML or pass --set."
    if not err["loc"]:  # a cross-field check: its message already names fields and the fix
        return err["msg"].removeprefix("Value error, ")
    value, msg = err.get("input"), err["msg"].removeprefix("Value error, ").rstrip(".")
    shown = repr(_masked(value)) if tuple(err["loc"]) in _SECRET_FIELDS else redact(repr(value))
    fix = "" if "Fix:" in msg else " Fix: give a value that satisfies this."
    return f"{loc} = {shown}: {msg}.{fix}"


def _masked(value: Any) -> str:
    """A possibly secret value, shown only by its first 3 characters and length."""
    text = str(value)
    return f"{text[:3]}... ({len(text)} characters, rest hidden)"


def _section_fields(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    cls = model_cls
    for part in loc:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return sorted(cls.model_fields)


def validate_config(raw: Any, source: str = "<config>") -> RunConfig:
    """Validate a raw dict into a RunConfig, or raise ConfigError naming every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections, "
            f"got {type(raw).__name__}. Fix: see jobs/tiny.yaml."
        )
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, RunConfig) for e in exc.errors()]
        raise ConfigError(
            f"{source}: {len(lines)} problem(s)\n  - " + "\n  - ".join(lines)
        ) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a job YAML. Raises ConfigError with a readable message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such config file. Fix: pass a file under jobs/, e.g. jobs/tiny.yaml."
        )
    try:
        raw = _yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})."
            f" Fix: save the file as UTF-8."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{path}: not valid YAML{where}: "
            f"{getattr(exc, 'problem', exc)}. Fix: correct the syntax there."
        ) from None
    raw = apply_overrides(raw or {}, overrides or [])
    return validate_config(raw, source=str(path))
