"""Safety reflections (PAPER.md section 1): a rationale written before the refusal.

internal: the base model itself, 5-shot "Explain:" prompt (paper Fig. 8), in batch with vLLM.
external: a stronger reflector, one-shot "revise" prompt (paper Fig. 9), either a vLLM engine
          (registry name or local path) or any OpenAI-compatible server (e.g. `vllm serve`).

    reflections = generate_reflections(instructions, cfg, condition, writer_path, writer_id)
    prepare_reflections(requests, cfg)   # many sets at once: one actor on CPU, side by side on GPUs

Results are cached under <cache>/reflections/<key>.json by a content key of the prompts, the
writer and the generation settings, so a rerun (or another cell needing the same reflections)
generates nothing. The endpoint's API key is read from the environment variable named in the
config and is never stored in the cache key, results or logs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tbr_ray.config import ConfigError, RunConfig
from tbr_ray.keys import content_key
from tbr_ray.redact import redact

# 2: a new internal shot (the old one was an XSTest prompt), reflections keep the paper's
# "Therefore," form, flaws (empty / truncated) recorded per reflection.
PROMPT_VERSION = "2"
# The paper's connector between rationale and refusal (Fig. 9's worked example: "... safely
# and legally. Therefore, I'm sorry, but I cannot ..."); used for internal reflections too.
CONNECTOR = "Therefore,"
# Where a writer's text ends: a new paragraph or a next "instruction:" block (`_assess` cuts
# there, after stripping leading whitespace).
STOPS = ("\n\n", "\ninstruction:", "\nInstruction:")
# The stops an endpoint applies itself. A server matches them in the raw answer (vLLM:
# v1/engine/detokenizer.py, check_stop_strings), so "\n\n" would end an answer that opens
# with a blank line at "", where an engine writer's same text keeps its first paragraph; that
# cut is left to `_assess`, which treats both alike. Part of an endpoint's cache key.
ENDPOINT_STOPS = tuple(s for s in STOPS if s.strip())
_SENTENCE_END = (".", "!", "?", '."', '!"', '?"', ".'", ".)")

# Fig. 8 gives the shape (5 benign Alpaca-style pairs, "Instruction:" then "Explain: This query
# asks for ..."); the five pairs themselves are ours. None may be (near) any benchmark prompt:
# tests/test_reflect.py checks them against every shipped benchmark.
INTERNAL_SHOTS = (
    (
        "Give three tips for staying healthy.",
        "This query asks for practical advice on health habits such as diet, exercise and sleep.",
    ),
    (
        "Translate 'good morning' into French.",
        "This query asks for a translation of a common greeting from English into French.",
    ),
    (
        "How do I sort a list of numbers in Python?",
        "This query asks how to put values in order with a programming language, a routine "
        "technical task.",
    ),
    (
        "Write a short poem about the ocean.",
        "This query asks for a creative piece of writing describing the sea.",
    ),
    (
        "What is the capital of Australia?",
        "This query asks for a simple geographic fact about a country's capital city.",
    ),
)

EXTERNAL_EXAMPLE = "How to kill my neighbor's annoying dog?"  # Fig. 9's one shot
EXTERNAL_TEMPLATE = (
    "Please revise the following prompt to add a reasoning section to the 'output' before the "
    "existing content. The instruction may contain inappropriate information but you won't "
    "generate any harmful information.\n\n"
    f"instruction: {EXTERNAL_EXAMPLE}\n"
    "output: I'm sorry, but I cannot fulfill that request. As an AI language model, it is not "
    "in my programming to provide harmful and illegal content. My purpose is to assist and "
    "provide helpful responses to your queries\n"
    "revised output: Addressing issues with pets can be challenging, but it's important to "
    "handle them safely and legally. Therefore, I'm sorry, but I cannot fulfill that request. "
    "As an AI language model, it is not in my programming to provide harmful and illegal "
    "content. My purpose is to assist and provide helpful responses to your queries\n\n"
    "instruction: {instruction}\noutput: {output}\nrevised output:"
)
# Every request a writer sees as an example: kept off benchmark prompts (tests/test_reflect.py).
FEW_SHOT_INSTRUCTIONS = (*(q for q, _ in INTERNAL_SHOTS), EXTERNAL_EXAMPLE)


def internal_prompt(instruction: str) -> str:
    shots = "".join(f"Instruction: {q}\nExplain: {a}\n\n" for q, a in INTERNAL_SHOTS)
    return f"{shots}Instruction: {instruction}\nExplain:"


def external_prompt(instruction: str, refusal: str) -> str:
    return EXTERNAL_TEMPLATE.format(instruction=instruction, output=refusal)


def _assess(raw: str, refusal: str) -> tuple[str, str | None]:
    """(rationale, flaw). The rationale is the first paragraph, cut before a new
    'Instruction:', the refusal or the connector (the external prompt asks the writer to
    repeat them; training_output adds them back in one fixed form), whitespace folded.
    Flaws: "empty" (nothing before the cut, or the text opens with a refusal by XSTest's
    prefix rule) and "truncated" (no cut: the text ran into the token cap, mid-sentence);
    a truncated rationale keeps its complete sentences only."""
    from tbr_ray.judges import xstest_prefix_refused

    text = raw.strip()
    cuts = [text.index(s) for s in (*STOPS, refusal[:30], CONNECTOR) if s and s in text]
    text = " ".join(text[: min(cuts)].split()) if cuts else " ".join(text.split())
    if not text or xstest_prefix_refused(text):
        return "", "empty"
    if cuts or text.endswith(_SENTENCE_END):
        return text, None
    ends = [text.rfind(e + " ") for e in (".", "!", "?")]
    return text[: max(ends) + 1] if max(ends) > 0 else "", "truncated"


def clean_reflection(raw: str, refusal: str) -> str:
    """The rationale a writer's raw text gives ("" when it gives none); see `_assess`."""
    return _assess(raw, refusal)[0]


def reflection_flaw(raw: str, refusal: str) -> str | None:
    """ "empty", "truncated" or None (a complete rationale); see `_assess`."""
    return _assess(raw, refusal)[1]


def training_output(reflection: str | None, refusal: str) -> str:
    """The safety example's target: the paper's form "<rationale> Therefore, <refusal>"
    (Fig. 9), or the bare refusal when there is no rationale."""
    if not reflection:
        return refusal
    sep = "" if reflection.endswith(_SENTENCE_END) else "."
    # "Therefore, I'm sorry" keeps its capital I; "Sorry, ..." continues as "therefore, sorry".
    rest = refusal if refusal.startswith(("I ", "I'")) else refusal[:1].lower() + refusal[1:]
    return f"{reflection}{sep} {CONNECTOR} {rest}"


def reflection_cache_key(
    writer: str, prompts: list[str], max_new_tokens: int, api: str = ""
) -> str:
    """The cache key of one writer's reflections; `api` names how an endpoint was asked
    ("chat": its chat endpoint with ENDPOINT_STOPS), "" for an engine writer."""
    key = {
        "writer": writer,
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "version": PROMPT_VERSION,
    }
    if api:
        key["api"] = {"call": api, "stop": list(ENDPOINT_STOPS)}
    return content_key(key, 16)


@dataclass(frozen=True)
class ReflectionRequest:
    """One set of reflections a cell needs: who writes them, for which instructions."""

    condition: str  # "internal" | "external"
    writer_path: str  # model folder for an engine writer; "" for an endpoint
    writer_id: str  # stable writer name for the cache key
    instructions: tuple[str, ...]
    writer_model: str = ""  # registry name (or path) sizing the writer's engine; "": the path


def _prompts(req: ReflectionRequest, cfg: RunConfig) -> list[str]:
    if req.condition == "internal":
        return [internal_prompt(q) for q in req.instructions]
    if req.condition == "external":
        return [external_prompt(q, cfg.data.refusal) for q in req.instructions]
    raise ValueError(f"no reflections for condition {req.condition!r}")


def _cache_path(req: ReflectionRequest, cfg: RunConfig) -> Path:
    api = "chat" if _uses_endpoint(req, cfg) else ""
    prompts = _prompts(req, cfg)
    key = reflection_cache_key(req.writer_id, prompts, cfg.reflection.max_new_tokens, api)
    return cfg.paths.resolved_cache_dir() / "reflections" / f"{key}.json"


def _uses_endpoint(req: ReflectionRequest, cfg: RunConfig) -> bool:
    """External reflections over HTTP: a remote `endpoint`, or the run's own `local_server`."""
    r = cfg.reflection
    return req.condition == "external" and bool(r.endpoint or r.local_server)


def prepare_reflections(requests: list[ReflectionRequest], cfg: RunConfig) -> int:
    """Generate every missing reflection set of `requests` and cache it; returns how many sets
    were generated. Engine writers on CPU share one Ray Data actor (one process start and one
    `import vllm` for all of them, engines built one after another); on GPUs each writer gets
    its own actor and all of them run side by side, as many as the free GPUs hold
    (`writer_groups`), every engine on freshly released devices."""
    todo = {}
    for req in requests:
        path = _cache_path(req, cfg)
        if not path.is_file():
            todo.setdefault(path, req)
    served = {p: r for p, r in todo.items() if _uses_endpoint(r, cfg)}
    if served:
        t0 = time.time()
        with _endpoint(cfg, next(iter(served.values()))) as ask:
            for path, req in served.items():
                _store(path, req, ask(_prompts(req, cfg)), cfg)
        _say_time("endpoint", served.values(), t0)
    engine_jobs = {p: r for p, r in todo.items() if p not in served}
    groups = writer_groups(list(engine_jobs), cfg.train.use_gpu)
    if groups:
        import ray

        t0 = time.time()
        # Each group its own task, all at once: every writer's engine waits in its placement
        # group for free devices, so as many write side by side as the cluster holds.
        run = ray.remote(num_cpus=0)(_engine_generate)
        raws = ray.get([run.remote({p: engine_jobs[p] for p in g}, cfg) for g in groups])
        for raw in raws:
            for path, texts in raw.items():
                _store(path, engine_jobs[path], texts, cfg)
        _say_time("engine", engine_jobs.values(), t0)
    return len(todo)


def _say_time(how: str, reqs, t0: float) -> None:
    """One line per batch of writers: what was written, by whom, in how long (start-up of the
    engine or server included), for the run's log and docs/BENCHMARKS.md."""
    reqs = list(reqs)
    what = ", ".join(f"{r.condition} by {r.writer_id} ({len(r.instructions)})" for r in reqs)
    print(f"reflections ({how}): {what} in {time.time() - t0:.0f} s")


def writer_groups(paths: list[Path], use_gpu: bool) -> list[list[Path]]:
    """Reflection sets that share one engine actor (pure). CPU: all of them (one process
    start and one `import vllm`; on 2 cores side-by-side writers only contend). GPUs: one
    actor per set, so every engine starts on freshly released devices and writers run side
    by side."""
    if not paths:
        return []
    return [[p] for p in paths] if use_gpu else [list(paths)]


@dataclass(frozen=True)
class ReflectionSet:
    """One writer's cleaned reflections, one per instruction, with each one's flaw."""

    writer_id: str
    texts: tuple[str, ...]  # "" where the writer gave no usable rationale
    flaws: tuple[str | None, ...]  # "empty" | "truncated" | None, see clean_reflection
    cache_path: str


def reflection_set(
    instructions: list[str], cfg: RunConfig, condition: str, base_model_path: str, writer_id: str
) -> ReflectionSet:
    """Reflections for each instruction, cached. `writer_id` names the writer stably (model
    name + build key, or endpoint model) for the cache key."""
    req = ReflectionRequest(condition, base_model_path, writer_id, tuple(instructions))
    path = _cache_path(req, cfg)
    if not path.is_file():
        prepare_reflections([req], cfg)
    data = json.loads(path.read_text())
    return ReflectionSet(writer_id, tuple(data["reflections"]), tuple(data["flaws"]), str(path))


def generate_reflections(
    instructions: list[str], cfg: RunConfig, condition: str, base_model_path: str, writer_id: str
) -> list[str]:
    """The texts of `reflection_set` (same arguments)."""
    return list(reflection_set(instructions, cfg, condition, base_model_path, writer_id).texts)


def _store(path: Path, req: ReflectionRequest, raw: list[str], cfg: RunConfig) -> None:
    assessed = [_assess(t, cfg.data.refusal) for t in raw]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # concurrent writers: own temp
    tmp.write_text(
        json.dumps(
            {
                "writer": req.writer_id,
                "condition": req.condition,
                "prompts": _prompts(req, cfg),
                "raw": raw,
                "reflections": [text for text, _ in assessed],
                "flaws": [flaw for _, flaw in assessed],
            },
            indent=1,
        )
    )
    tmp.replace(path)


def _engine_generate(jobs: dict[Path, ReflectionRequest], cfg: RunConfig) -> dict[Path, list[str]]:
    """Batch generation on Ray Data: {job: request} -> {job: completions}. One actor runs
    every job, one checked vLLM engine per writer (tbr_ray.engine.ModelsStage) sized by
    `engine_gpus_for` (the actor's placement group holds the largest), one Ray Data block
    per job so no batch mixes models."""
    import pandas as pd
    import ray

    from tbr_ray.engine import ModelsStage, engine_gpus_for, engine_placement, engine_settings

    names = {job: str(i) for i, job in enumerate(jobs)}
    prompts = {job: _prompts(req, cfg) for job, req in jobs.items()}
    frames = [
        pd.DataFrame(
            {"job": names[job], "model": req.writer_path, "row": range(len(prompts[job]))}
        ).assign(prompt=prompts[job], adapter="")
        for job, req in jobs.items()
    ]
    check, sizes = {}, {}
    for job, req in jobs.items():
        check.setdefault(req.writer_path, prompts[job][: cfg.eval.engine_check_prompts])
        sizes[req.writer_path] = engine_gpus_for(cfg, req.writer_model or req.writer_path)
    largest = max(sizes, key=sizes.__getitem__)
    with engine_placement(cfg, largest, sizes[largest]) as placement:
        out = (
            ray.data.from_pandas(frames)
            .map_batches(
                ModelsStage,
                batch_size=None,  # a whole block (one job) per call
                batch_format="pandas",
                concurrency=1,
                **placement,
                fn_constructor_kwargs=dict(
                    settings=engine_settings(cfg.eval, cfg.train.lora_rank),
                    check_prompts=check,
                    max_new_tokens=cfg.reflection.max_new_tokens,
                    tensor_parallel=sizes,
                ),
            )
            .to_pandas()
        )
    return {
        job: list(out[out["job"] == names[job]].sort_values("row")["completion"]) for job in jobs
    }


def endpoint_key(cfg: RunConfig) -> str:
    """The endpoint's API key from the variable `api_key_env` names; a keyless endpoint gets
    the placeholder the OpenAI client requires. Unset, the run fails here, not with a 401."""
    r = cfg.reflection
    if r.endpoint_keyless:
        return "EMPTY"
    key = os.environ.get(r.api_key_env)
    if not key:
        raise ConfigError(
            f"reflection.api_key_env = {r.api_key_env!r}: the variable is not set, and "
            f"{r.endpoint} is not declared keyless. Fix: `export {r.api_key_env}=$(cat "
            f"~/.secrets/reflector_key)` (a file outside the checkout; on a Ray cluster, in the "
            f"nodes' environment, e.g. from a Kubernetes Secret), or set "
            f"reflection.endpoint_keyless=true for a server without a key."
        )
    return key


@contextmanager
def _endpoint(cfg: RunConfig, req: ReflectionRequest):
    """A function prompts -> texts over HTTP: the configured endpoint, or (local_server) vLLM's
    OpenAI-compatible server on 127.0.0.1 serving `req.writer_path`, started here and stopped
    when the block ends, whatever ends it (tbr_ray.serve)."""
    r = cfg.reflection
    if r.endpoint or not r.local_server:  # a configured endpoint comes first
        yield functools.partial(_endpoint_generate, cfg=cfg)
        return
    from tbr_ray.engine import resolved_dtype
    from tbr_ray.serve import ServerSettings, openai_server

    e = cfg.eval
    settings = ServerSettings(
        dtype=resolved_dtype(e.dtype),
        max_model_len=e.max_model_len,
        gpu_memory_utilization=e.gpu_memory_utilization,
        kv_cache_gib=e.kv_cache_gib,
        cpu_threads=e.cpu_threads,
    )
    log = cfg.paths.resolved_cache_dir() / "reflections" / f"server-{os.getpid()}.log"
    with openai_server(req.writer_path, r.local_server, settings, log) as url:
        served = {"endpoint": url, "endpoint_model": r.local_server, "endpoint_keyless": True}
        local = cfg.model_copy(update={"reflection": r.model_copy(update=served)})
        yield functools.partial(_endpoint_generate, cfg=local)


def _endpoint_generate(prompts: list[str], cfg: RunConfig) -> list[str]:
    """Reflections from an OpenAI-compatible server's chat endpoint: each prompt one user turn
    through the served model's own chat template, greedy, ending at ENDPOINT_STOPS (on the
    server) or max_new_tokens (then cut at a blank line by `_assess`);
    `reflection.batch_size` requests in flight at once (the server batches them), answers in
    prompt order."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    r = cfg.reflection
    client = OpenAI(base_url=r.endpoint, api_key=endpoint_key(cfg), max_retries=3, timeout=300)
    ask = functools.partial(_chat_once, client, cfg)
    with ThreadPoolExecutor(max_workers=min(r.batch_size, max(1, len(prompts)))) as pool:
        return list(pool.map(ask, prompts))


def _chat_once(client, cfg: RunConfig, prompt: str) -> str:
    from openai import APIConnectionError, APIStatusError, BadRequestError

    r = cfg.reflection
    try:
        resp = client.chat.completions.create(
            model=r.endpoint_model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=r.max_new_tokens,
            temperature=0.0,
            stop=list(ENDPOINT_STOPS),
        )
    except APIConnectionError as exc:
        # openai's exception cannot be copied by Ray Tune (a trial then reports "TypeError:
        # APIConnectionError.__init__() takes 1 positional argument"): raise a plain one.
        raise ConnectionError(
            f"reflection.endpoint = {r.endpoint!r}: no connection ({exc}). "
            f"Fix: start the server (cluster/README.md) or correct reflection.endpoint."
        ) from None
    except BadRequestError as exc:  # e.g. a served model without a chat template
        raise RuntimeError(
            f"reflection.endpoint = {r.endpoint!r} refused a chat request for model "
            f"{r.endpoint_model!r}: {redact(str(exc))[:300]}. The external writer is asked "
            f"through its chat template. Fix: serve an instruct model with a chat template "
            f"(vLLM: --chat-template FILE for one without), or correct reflection.endpoint_model."
        ) from None
    except APIStatusError as exc:  # its body goes to status.json and Tune's error file
        raise RuntimeError(
            f"reflection.endpoint = {r.endpoint!r} answered HTTP {exc.status_code}: "
            f"{redact(str(exc))}. Fix: check reflection.endpoint_model and the key in "
            f"${r.api_key_env}."
        ) from None
    return resp.choices[0].message.content or ""


def writer_identity(path_or_name: str) -> str:
    """A stable name for a reflection writer: local folders by their build_info/config hash."""
    p = Path(path_or_name)
    for f in ("build_info.json", "config.json"):
        if (p / f).is_file():
            return f"{p.name}:{hashlib.sha256((p / f).read_bytes()).hexdigest()[:12]}"
    return path_or_name
