"""The data stage on Ray Data: sources -> TBR mix -> Alpaca template -> tokens -> Parquet.

    mix_dir = build_mix(cfg, cell, model_path)      # cached by content key
    tbr-ray data --config jobs/tiny.yaml            # the same, from the shell

General rows come from the Alpaca subsets, safety rows from red-team-derived instructions with
the standardised refusal. Safety requests are kept only when harmful by a stated rule
(`data.safety_filter`: the upstream answer refuses); no row whose text equals a benchmark
prompt (case, whitespace and punctuation folded) enters the mix. For `internal`/`external`, a
seeded share `gamma` of the safety rows carry a reflection before the refusal
(tbr_ray.reflect); a mix whose writer left too many of them without one fails
(`reflection.max_missing_share`). Labels are -100 on prompt tokens, so the loss covers the
response only. A malformed source row is set aside with its reason and counted in the mix's
report.json, never a crash; so are the rows the two filters drop.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tbr_ray.config import Cell, ReflectionConfig, RunConfig
from tbr_ray.judges import paper_keywords_refused
from tbr_ray.keys import content_key
from tbr_ray.lengths import answer_words, drop_over_max_len, sample_general, sampling_report
from tbr_ray.models import format_prompt, get_spec
from tbr_ray.prompts import chat_prompt, end_of_answer_id, prompt_token_ids_batch, user_text
from tbr_ray.rundir import building_dir, publish_dir, sweep_building_dirs, write_json

GENERAL_FILES = {
    "alpaca-bloom-lora": "alpaca-subsets/bloom-lora/alpaca_data_1k.json",
    "alpaca-gumbelsoft": "alpaca-subsets/gumbelsoft/alpaca_data.json",
}
SAFETY_FILES = {
    "safety-tuned-llamas": "safety-tuned-llamas/data/training/safety_only_data_Instructions.json",
    "hh-rlhf-harmless": "hh-rlhf/harmless-base/test.jsonl.gz",
}
# 2: prompt ids from tbr_ray.prompts.prompt_token_ids (one BOS); 3: harmful-only safety rows,
# benchmark-overlap filter, reflections in the paper's form; 4: general rows drawn to a plain
# Alpaca sample's answer lengths, rows over max_seq_len dropped (never cut).
MIX_VERSION = "4"
# The upstream answer must refuse within its opening (a keyword deep in a long answer, e.g. "I
# don't recommend" in a how-to, is no refusal of the request).
UPSTREAM_REFUSAL_CHARS = 300
# Neither safety source labels its requests with the paper's seven categories (Fig. 11), so the
# mix cannot balance them; said in every mix report and in docs/FIDELITY.md.
CATEGORY_NOTE = (
    "not balanced: neither safety source (safety-tuned-llamas, HH-RLHF harmless-base) labels "
    "its requests with the paper's seven categories"
)
IGNORE_INDEX = -100
# Logical CPUs per Ray Data task/actor of this stage. Small on purpose: the stage runs inside
# Tune trials next to Ray Train workers, and whole-CPU tasks starve each other on a small
# cluster (seen here: a 2-CPU box deadlocked with two trials each waiting for a write task).
DATA_TASK_CPUS = 0.25


class DataSourceError(FileNotFoundError):
    pass


class ReflectionShortfall(ValueError):
    """Fewer rows carry a reflection than gamma asks for, beyond reflection.max_missing_share."""


@dataclass
class SourceRows:
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {source, source_id, reason}
    dropped: list[str] = field(default_factory=list)  # source ids failing data.safety_filter


def _source_path(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise DataSourceError(
            f"data file {path} is missing. Fix: point data.root (or $TBR_DATA_ROOT) at a "
            f"folder holding the shared data sets; `tbr-ray data-check` lists what is missing."
        )
    return path


def read_general(root: Path, sources: tuple[str, ...]) -> SourceRows:
    """Alpaca rows {source, source_id, instruction, input, output}, de-duplicated by text."""
    out, seen = SourceRows(), set()
    for source in sources:
        for i, row in enumerate(json.loads(_source_path(root, GENERAL_FILES[source]).read_text())):
            sid = f"{source}:{i}"
            reason = _general_problem(row)
            if reason:
                out.skipped.append({"source": source, "source_id": sid, "reason": reason})
                continue
            key = (row["instruction"].strip(), (row.get("input") or "").strip())
            if key in seen:
                continue
            seen.add(key)
            out.rows.append(
                {
                    "source": source,
                    "source_id": sid,
                    "instruction": row["instruction"].strip(),
                    "input": (row.get("input") or "").strip(),
                    "output": row["output"].strip(),
                }
            )
    return out


def _general_problem(row) -> str | None:
    if not isinstance(row, dict):
        return f"row is {type(row).__name__}, not an object"
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return f"missing or empty '{key}'"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return "'input' is not a string"
    return None


def read_safety(root: Path, source: str, safety_filter: str = "upstream-refusal") -> SourceRows:
    """Harmful instructions {source, source_id, instruction}, de-duplicated. With
    safety_filter "upstream-refusal" a request counts as harmful only when its upstream answer
    is a refusal (`upstream_refused`); the ids of the others go to `dropped`."""
    out, seen = SourceRows(), set()
    for i, text, answer, problem in _safety_items(root, source):
        sid = f"{source}:{i}"
        if problem:
            out.skipped.append({"source": source, "source_id": sid, "reason": problem})
        elif safety_filter == "upstream-refusal" and not upstream_refused(answer):
            out.dropped.append(sid)
        elif text.strip() not in seen:
            seen.add(text.strip())
            out.rows.append({"source": source, "source_id": sid, "instruction": text.strip()})
    return out


def upstream_refused(answer: str | None) -> bool:
    """The harmful-request rule: the source's own answer refuses, by the paper's keyword rule
    (tbr_ray.judges.paper_keywords_refused) on its first UPSTREAM_REFUSAL_CHARS characters."""
    return isinstance(answer, str) and paper_keywords_refused(answer[:UPSTREAM_REFUSAL_CHARS])


SafetyItem = tuple[int, str | None, str | None, str | None]


def _safety_items(root: Path, source: str) -> list[SafetyItem]:
    """(row number, request, upstream answer, why the row is malformed: None if it is not)
    of a safety source."""
    path = _source_path(root, SAFETY_FILES[source])
    if source == "safety-tuned-llamas":
        return [_instruction_item(i, r) for i, r in enumerate(json.loads(path.read_text()))]
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return [(i, *_first_turns(line)) for i, line in enumerate(fh)]
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # EOFError: a truncated file
        raise ValueError(
            f"data file {path} is damaged ({type(exc).__name__}: {exc or 'it ends early'}): "
            "a truncated or corrupt gzip. Fix: delete it and run `tbr-ray fetch-data --root "
            f"{root}` (`tbr-ray data-check` compares every file with its sha256)."
        ) from None


def _text_problem(row, key: str) -> str | None:
    """Why row[key] is no usable text (naming the key), or None."""
    if not isinstance(row, dict):
        return f"row is {type(row).__name__}, not an object"
    if key not in row:
        return f"missing '{key}'"
    if not isinstance(row[key], str):
        return f"'{key}' is {type(row[key]).__name__}, not a string"
    return f"empty '{key}'" if not row[key].strip() else None


def _instruction_item(i: int, row) -> SafetyItem:
    problem = _text_problem(row, "instruction")
    return (i, None, None, problem) if problem else (i, row["instruction"], row.get("output"), None)


def _first_turns(line: str) -> tuple[str | None, str | None, str | None]:
    """HH-RLHF: the first human turn and the first assistant reply of the "chosen" dialogue,
    or why the line holds none."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, None, f"not valid JSON ({exc})"
    problem = _text_problem(row, "chosen")
    if problem or "Human:" not in row["chosen"]:
        return None, None, problem or "'chosen' has no 'Human:' turn"
    human, _, rest = row["chosen"].split("Human:", 1)[1].partition("Assistant:")
    if not human.strip():
        return None, None, "empty first 'Human:' turn"
    return human.strip(), rest.split("Human:", 1)[0].strip(), None


def normalise_text(text: str) -> str:
    """Text folded for comparison: Unicode NFKC, lower case, punctuation and symbols as spaces,
    whitespace runs as one space. "How can I kill a Python process?" -> "how can i kill a
    python process"."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def request_text(item) -> str:
    """What a benchmark item asks (a tbr_ray.benchmarks.EvalItem): its instruction; for a
    multiple-choice item the question alone, without the header and the lettered options."""
    if item.mode != "choice":
        return item.instruction
    return item.instruction.split("\n\n", 1)[-1].split("\nA. ", 1)[0]


def benchmark_prompts(root: Path, files: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """{normalised request: "benchmark:prompt_id"} over every benchmark whose file is at hand
    (all shipped ones; user files when given), and {benchmark: why it was not checked}."""
    from tbr_ray.benchmarks import BENCHMARKS, load_benchmark_with_report

    index, unchecked = {}, {}
    for name in BENCHMARKS:
        try:
            items, _ = load_benchmark_with_report(name, root, files=files)
        except FileNotFoundError as err:
            unchecked[name] = str(err).split(" Fix:")[0]
            continue
        for item in items:
            index.setdefault(normalise_text(request_text(item)), f"{name}:{item.prompt_id}")
    return index, unchecked


def drop_benchmark_overlap(rows: list[dict], index: dict[str, str]) -> tuple[list, list]:
    """(kept rows, [{source_id, benchmark_item}]): a row is dropped when its instruction, its
    input or both together equal a benchmark request after `normalise_text`."""
    kept, dropped = [], []
    for row in rows:
        texts = [row["instruction"]]
        if row.get("input"):
            texts += [row["input"], f"{row['instruction']} {row['input']}"]
        hit = next((index[k] for k in map(normalise_text, texts) if k in index), None)
        if hit is None:
            kept.append(row)
        else:
            dropped.append({"source_id": row["source_id"], "benchmark_item": hit})
    return kept, dropped


def sample_rows(rows: list[dict], n: int, seed: int, what: str, note: str = "") -> list[dict]:
    """A seeded uniform sample of n rows (the safety rows), or a clear error naming the fix."""
    check_enough(rows, n, what, note)
    return random.Random(seed).sample(rows, n)


def check_enough(rows: list, n: int, what: str, note: str = "") -> None:
    if n > len(rows):
        raise ValueError(
            f"asked for {n} {what} rows but the sources hold {len(rows)} usable "
            f"ones{note}. Fix: lower data.n_{what} or add sources."
        )


def reflected_indices(n_safety: int, gamma: float, seed: int) -> set[int]:
    """Which safety rows carry a reflection: a seeded share gamma (rounded)."""
    k = round(gamma * n_safety)
    return set(random.Random(seed + 1).sample(range(n_safety), k))


def assemble_mix(
    general: list[dict],
    safety: list[dict],
    reflections: list[str] | None,
    gamma: float,
    refusal: str,
    seed: int,
) -> list[dict]:
    """The TBR training rows (pure): general rows as they are; safety rows answered with the
    refusal, preceded by a reflection for the chosen share gamma."""
    from tbr_ray.reflect import training_output

    chosen = reflected_indices(len(safety), gamma, seed) if reflections else set()
    rows = [{**g, "kind": "general", "reflection": ""} for g in general]
    for i, s in enumerate(safety):
        refl = reflections[i] if i in chosen else ""
        rows.append(
            {
                **s,
                "kind": "safety",
                "input": "",
                "reflection": refl,
                "output": training_output(refl, refusal),
            }
        )
    order = random.Random(seed + 2).sample(range(len(rows)), len(rows))
    return [{**rows[j], "example_id": n} for n, j in enumerate(order)]


def row_prompt(row: dict, tokenizer, prompt_format: str = "alpaca") -> str:
    """The prompt text of a training row: the Alpaca template (base models), or the model's
    chat template around one user turn (chat models: tbr_ray.models.ModelSpec.prompt_format)."""
    if prompt_format == "chat":
        return chat_prompt(tokenizer, user_text(row["instruction"], row["input"]))
    return format_prompt(row["instruction"], row["input"])


def tokenize_rows(
    rows: list[dict], tokenizer, max_seq_len: int, prompt_format: str = "alpaca"
) -> list[dict]:
    """input_ids/labels for each row, in two batched tokenizer calls (prompts, responses);
    labels mask the prompt with -100. The prompt's ids are the ones the eval engine is fed for
    the same text (`prompt_token_ids`: one BOS); the answer ends with EOS, or for a chat model
    with the token that closes its turn (`end_of_answer_id`). Never cut: a row longer than
    max_seq_len is whole, flagged `over_max_len` (the mix leaves it out)."""
    prompts = [row_prompt(r, tokenizer, prompt_format) for r in rows]
    prompt_ids = prompt_token_ids_batch(tokenizer, prompts)
    outputs = [r["output"] for r in rows]
    resp_ids = tokenizer(outputs, add_special_tokens=False)["input_ids"] if rows else []
    end = [end_of_answer_id(tokenizer, prompt_format)]
    return [_example(p, r + end, max_seq_len) for p, r in zip(prompt_ids, resp_ids, strict=True)]


def tokenize_row(row: dict, tokenizer, max_seq_len: int, prompt_format: str = "alpaca") -> dict:
    """`tokenize_rows` of one row."""
    return tokenize_rows([row], tokenizer, max_seq_len, prompt_format)[0]


def _example(prompt_ids: list[int], resp_ids: list[int], max_seq_len: int) -> dict:
    return {
        "input_ids": prompt_ids + resp_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + resp_ids,
        "over_max_len": len(prompt_ids) + len(resp_ids) > max_seq_len,
    }


class Tokenize:
    """Ray Data callable class: loads the tokenizer once per actor, tokenizes a batch at once;
    rows longer than max_seq_len leave the batch whole (never cut; the mix report counts
    them)."""

    def __init__(self, model_path: str, max_seq_len: int, prompt_format: str = "alpaca"):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.max_seq_len = max_seq_len
        self.prompt_format = prompt_format

    def __call__(self, batch: dict) -> dict:
        keys = list(batch)
        rows = [dict(zip(keys, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
        toks = tokenize_rows(rows, self.tok, self.max_seq_len, self.prompt_format)
        keep = np.array([not t["over_max_len"] for t in toks], dtype=bool)
        out = {k: np.asarray(v)[keep] for k, v in batch.items()} if len(toks) else dict(batch)
        for k in ("input_ids", "labels"):
            out[k] = [t[k] for t, kept in zip(toks, keep, strict=True) if kept]
        return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_fingerprint(model_path: str) -> str:
    """A content hash of the model's tokenizer: of its files when it has a tokenizer.json
    (no transformers import in the Tune trial: ~4.5 s a cell on CPU), else of the loaded
    tokenizer (sentencepiece-only models)."""
    folder = Path(model_path)
    if (folder / "tokenizer.json").is_file():
        h = hashlib.sha256()
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                h.update(name.encode() + (folder / name).read_bytes())
        return h.hexdigest()[:12]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:12]


def mix_key(
    cfg: RunConfig,
    cell: Cell,
    tokenizer_fp: str,
    reflections: list[str] | None,
    source_hashes: dict[str, str],
    selection: str = "",
    prompt_format: str = "alpaca",
) -> str:
    return content_key(
        {
            "selection": selection,
            "prompt_format": prompt_format,
            "data": cfg.data.model_dump(exclude={"root"}),
            "condition": cell.condition,
            "gamma": cell.gamma,
            "tokenizer": tokenizer_fp,
            "sources": source_hashes,
            "reflections": reflections,
            "version": MIX_VERSION,
        },
        16,
    )


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def source_rows(
    cfg: RunConfig, model_path: str | None = None, prompt_format: str = "alpaca"
) -> tuple[list[dict], list[dict], dict]:
    """The sampled general and safety rows and a source report: rows set aside as malformed,
    as not harmful (data.safety_filter), as benchmark overlap and, given the model (its
    tokenizer), as longer than data.max_seq_len; the general sample's length distribution
    (tbr_ray.lengths). The safety rows are shared by every cell, the general rows by every
    cell of a model (models differ only in the rows too long for their own tokenizer and
    prompt format)."""
    root = cfg.data.resolved_root()
    gen = read_general(root, cfg.data.general_sources)
    saf = read_safety(root, cfg.data.safety_source, cfg.data.safety_filter)
    index, unchecked = benchmark_prompts(root, cfg.eval.benchmark_files)
    gen_rows, gen_overlap = drop_benchmark_overlap(gen.rows, index)
    saf_rows, saf_overlap = drop_benchmark_overlap(saf.rows, index)
    lengths = (
        general_token_lengths(cfg, gen_rows, model_path, prompt_format) if model_path else None
    )
    general, sampling, too_long = _general_sample(cfg, gen_rows, lengths)
    safety = sample_rows(saf_rows, cfg.data.n_safety, cfg.data.sample_seed, "safety")
    files = [GENERAL_FILES[s] for s in cfg.data.general_sources]
    files.append(SAFETY_FILES[cfg.data.safety_source])
    chosen = [r["source_id"] for r in general + safety]
    report = {
        "skipped": gen.skipped + saf.skipped,
        "n_skipped": len(gen.skipped) + len(saf.skipped),
        "source_hashes": {f: _file_hash(root / f) for f in files},
        "selection": content_key(chosen, 16),
        "safety_filter": _filter_report(cfg.data.safety_filter, saf),
        "safety_categories": CATEGORY_NOTE,
        "benchmark_overlap": {
            "n_dropped": len(gen_overlap) + len(saf_overlap),
            "dropped": gen_overlap + saf_overlap,
            "not_checked": unchecked,
        },
        "general_sampling": sampling,
        "over_max_seq_len": {
            "max_seq_len": cfg.data.max_seq_len,
            "rule": "a row is never cut: general rows longer than max_seq_len (templated, EOS "
            "included) under the model's tokenizer are dropped before sampling; safety rows "
            "that outgrow it with their reflection are left out of the mix (in_mix)",
            "checked": model_path is not None,
            "n_general_dropped": len(too_long),
            "general_dropped_ids": too_long,
        },
    }
    return general, safety, report


def _general_sample(
    cfg: RunConfig, rows: list[dict], lengths: dict[str, tuple[int, int]] | None
) -> tuple[list[dict], dict, list[str]]:
    """(the general rows, their sampling report, ids dropped as longer than max_seq_len)."""
    totals = {k: v[0] for k, v in lengths.items()} if lengths else None
    kept, too_long = drop_over_max_len(rows, totals, cfg.data.max_seq_len)
    note = f" ({len(too_long)} longer than data.max_seq_len set aside)" if too_long else ""
    check_enough(kept, cfg.data.n_general, "general", note)
    name = cfg.data.length_reference
    reference = None
    if name is not None:
        reference = [answer_words(r) for r in read_general(cfg.data.resolved_root(), (name,)).rows]
    general, bins = sample_general(kept, cfg.data.n_general, cfg.data.sample_seed, reference)
    answers = {k: v[1] for k, v in lengths.items()} if lengths else None
    return general, sampling_report(general, reference, name, bins, answers), too_long


def general_token_lengths(
    cfg: RunConfig, rows: list[dict], model_path: str, prompt_format: str = "alpaca"
) -> dict[str, tuple[int, int]]:
    """{source_id: (templated tokens, answer tokens), EOS in both} of the general rows under
    the model's tokenizer and prompt format, cached per tokenizer, format and rows
    (cache_dir/lengths): cells after the first of a model neither load a tokenizer nor
    tokenize."""
    texts = [[r["source_id"], r["instruction"], r["input"], r["output"]] for r in rows]
    fp = tokenizer_fingerprint(model_path)
    what = {"tokenizer": fp, "rows": texts, "version": MIX_VERSION}
    key = content_key({**what, "format": prompt_format} if prompt_format != "alpaca" else what, 16)
    path = cfg.paths.resolved_cache_dir() / "lengths" / f"{key}.json"
    if path.is_file():
        return {k: (v[0], v[1]) for k, v in json.loads(path.read_text()).items()}
    from transformers import AutoTokenizer

    examples = tokenize_rows(rows, AutoTokenizer.from_pretrained(model_path), 0, prompt_format)
    lengths = {
        r["source_id"]: (len(e["input_ids"]), sum(x != IGNORE_INDEX for x in e["labels"]))
        for r, e in zip(rows, examples, strict=True)
    }
    write_json(path, lengths)  # atomic: cells of one model may compute it at once
    return lengths


def _filter_report(rule: str, saf: SourceRows) -> dict:
    criterion = (
        f"upstream answer refuses: paper keyword rule on its first {UPSTREAM_REFUSAL_CHARS} "
        "characters"
        if rule == "upstream-refusal"
        else "none: every request kept"
    )
    return {
        "rule": rule,
        "criterion": criterion,
        "n_kept": len(saf.rows),
        "n_dropped": len(saf.dropped),
        "kept_ids": [r["source_id"] for r in saf.rows],
        "dropped_ids": saf.dropped,
    }


def reflection_share(
    texts: list[str], flaws: list[str | None], gamma: float, seed: int
) -> dict[str, int]:
    """Counts for one writer's reflection set (pure): its empty and truncated reflections, and
    how many of the round(gamma x n) rows chosen to carry one really do."""
    chosen = reflected_indices(len(texts), gamma, seed)
    return {
        "n_prompts": len(texts),
        "n_empty": sum(f == "empty" for f in flaws),
        "n_truncated": sum(f == "truncated" for f in flaws),
        "n_target": len(chosen),
        "n_reflected": sum(bool(texts[i]) for i in chosen),
    }


def check_reflection_share(counts: dict, writer: str, rcfg: ReflectionConfig) -> None:
    """Raise ReflectionShortfall when the reflected rows fall short of the target by more than
    reflection.max_missing_share (of the target)."""
    missing = counts["n_target"] - counts["n_reflected"]
    if counts["n_target"] and missing / counts["n_target"] > rcfg.max_missing_share:
        raise ReflectionShortfall(
            f"writer {writer}: {counts['n_reflected']} of the {counts['n_target']} safety rows "
            f"meant to carry a reflection have one ({missing / counts['n_target']:.0%} missing, "
            f"more than reflection.max_missing_share={rcfg.max_missing_share}). Of its "
            f"{counts['n_prompts']} reflections {counts['n_empty']} are empty (it opened with "
            f"a refusal) and {counts['n_truncated']} ran into the token cap mid-sentence "
            f"(reflection.max_new_tokens={rcfg.max_new_tokens}). Fix: raise "
            "reflection.max_new_tokens, use a stronger writer, or raise "
            "reflection.max_missing_share to accept a smaller effective gamma. The "
            "reflections stay cached; nothing else was lost."
        )


def reflection_request(
    cfg: RunConfig,
    cell: Cell,
    model_path: str,
    reflector_path: str | None = None,
    reflector_id: str | None = None,
    safety: list[dict] | None = None,
):
    """The reflections `cell`'s mix needs (a tbr_ray.reflect.ReflectionRequest), or None."""
    from tbr_ray.reflect import ReflectionRequest, writer_identity

    if cell.condition not in ("internal", "external") or cell.gamma <= 0:
        return None
    if safety is None:
        safety = source_rows(cfg)[1]
    writer_path = model_path if cell.condition == "internal" else (reflector_path or "")
    writer = reflector_id or writer_identity(writer_path)
    if cell.condition == "external" and cfg.reflection.endpoint:
        writer = f"endpoint:{cfg.reflection.endpoint_model}"  # the model, not the URL
    elif cell.condition == "external" and cfg.reflection.local_server:
        writer = f"endpoint:{writer}"  # the served folder's identity: its build, not a port
    writer_model = cell.model if cell.condition == "internal" else cfg.reflection.writer_model()
    return ReflectionRequest(
        cell.condition,
        writer_path,
        writer,
        tuple(s["instruction"] for s in safety),
        writer_model=writer_model or "",
    )


def _checked_reflections(cfg: RunConfig, cell: Cell, req) -> tuple[list[str], dict]:
    """The writer's reflections for `req` and their counts; ReflectionShortfall when too few of
    the gamma share carry one (checked on every call, cached mix or not)."""
    from tbr_ray.reflect import reflection_set

    rset = reflection_set(
        list(req.instructions), cfg, req.condition, req.writer_path, req.writer_id
    )
    counts = reflection_share(list(rset.texts), list(rset.flaws), cell.gamma, cfg.data.sample_seed)
    check_reflection_share(counts, req.writer_id, cfg.reflection)
    return list(rset.texts), {"writer": req.writer_id, **counts}


def build_mix(
    cfg: RunConfig,
    cell: Cell,
    model_path: str,
    reflector_path: str | None = None,
    reflector_id: str | None = None,
) -> Path:
    """Build (or find cached) the cell's tokenized mix as Parquet; returns its folder."""
    prompt_format = get_spec(cell.model).prompt_format
    general, safety, report = source_rows(cfg, model_path, prompt_format)
    reflections = None
    req = reflection_request(cfg, cell, model_path, reflector_path, reflector_id, safety)
    if req is not None:
        reflections, report["reflections"] = _checked_reflections(cfg, cell, req)
    key = mix_key(
        cfg,
        cell,
        tokenizer_fingerprint(model_path),
        reflections,
        report["source_hashes"],
        report["selection"],
        prompt_format,
    )
    out = cfg.paths.resolved_cache_dir() / "mixes" / key
    report["key"] = key
    if (out / "report.json").is_file():
        return out
    # Built under a private name and renamed into place when complete: cells sharing this
    # mix (same data settings and tokenizer) may build it at once, and none may read a
    # partial folder or have its shards overwritten while it trains on them. A failed build
    # removes its folder; one killed is removed by the next build (its owner lock is free).
    sweep_building_dirs(out.parent)
    with building_dir(out) as tmp:
        _write_mix(cfg, cell, model_path, general, safety, reflections, report, tmp)
        publish_dir(tmp, out, keep="report.json")
    return out


def _write_mix(cfg, cell, model_path, general, safety, reflections, report, tmp: Path) -> None:
    """The mix's shards and report.json into `tmp` (Ray Data tokenizes)."""
    import ray

    rows = assemble_mix(
        general, safety, reflections, cell.gamma, cfg.data.refusal, cfg.data.sample_seed
    )
    prompt_format = get_spec(cell.model).prompt_format
    ds = ray.data.from_items(rows).map_batches(
        Tokenize,
        fn_constructor_kwargs=dict(
            model_path=model_path, max_seq_len=cfg.data.max_seq_len, prompt_format=prompt_format
        ),
        batch_size=256,
        concurrency=1,
        num_cpus=DATA_TASK_CPUS,
    )
    ds.write_parquet(str(tmp / "shards"), ray_remote_args={"num_cpus": DATA_TASK_CPUS})
    table = pq.read_table(tmp / "shards", columns=["kind", "reflection", "labels"]).to_pandas()
    kinds = {"general": len(general), "safety": len(safety)}
    written = {k: int((table.kind == k).sum()) for k in kinds}
    loss = {k: _loss_tokens(table[table.kind == k].labels) for k in kinds}
    report["over_max_seq_len"]["in_mix"] = {k: kinds[k] - written[k] for k in kinds}
    report.update(
        condition=cell.condition,
        gamma=cell.gamma,
        n_rows=len(table),
        n_general=written["general"],
        n_safety=written["safety"],
        n_reflected=int(((table.kind == "safety") & (table.reflection != "")).sum()),
        loss_tokens={**loss, "safety_share": round(loss["safety"] / max(1, sum(loss.values())), 4)},
        prompt_format=prompt_format,
    )
    write_json(tmp / "report.json", report, indent=2)


def _loss_tokens(labels) -> int:
    """Tokens the loss covers (labels other than IGNORE_INDEX) over a column of label lists."""
    return int(sum((np.asarray(x) != IGNORE_INDEX).sum() for x in labels))
