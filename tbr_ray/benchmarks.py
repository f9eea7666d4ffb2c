"""Evaluation benchmarks (PAPER.md section 5): one registry, one loader, items ready to generate.

    from tbr_ray.benchmarks import BENCHMARKS, load_benchmark_with_report
    items, report = load_benchmark_with_report("xstest_safe", DataConfig().resolved_root(),
                                               sample_size=50, seed=0)
    report.skipped          # [(row_id, reason), ...] for malformed rows, never a crash

A benchmark is one `BenchmarkSpec` entry in `BENCHMARKS` (end of the loaders): its loader, its
source file and its version. Every item carries `<name>/<version>`; bump that entry's `version`
whenever its loader or prompt format changes. Files are read from the data root
(`DataConfig.resolved_root()`); OR-Bench-Hard-1K and MaliciousInstruct are not shipped and
come from the user (`files=`, i.e. `eval.benchmark_files` in the YAML; relative paths are
relative to the working directory).

Prompts. Refusal and safety items: `prompt = models.format_prompt(instruction)`. General items
repeat that Alpaca block once per shot: `format_prompt(q_1) + answer_1 + "\\n\\n" + ... +
format_prompt(q)`, so 0 shots is the plain template. Multiple choice (MMLU, ARC) shows the
options lettered A, B, C... (ARC's digit labels "1".."4" are shown as letters too), the prompt
ends with "Answer:" and `choices` are the letters " A", " B", ...: one short continuation per
option, so no length normalisation is needed (lm-eval's ARC scores the option texts instead).
A chat model (prompt_format "chat") gets the same request through its own template instead:
the shots as user/assistant turns, the answer prefix after the generation prompt
(`EvalItem.shots`, `answer_prefix`; tbr_ray.evaluate renders them).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from tbr_ray.models import format_prompt
from tbr_ray.vocab import GSM8K_SHOT_POOL, SHOT_POOLS, did_you_mean

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: one entry in BENCHMARKS (the README's "Extending" shows how to add one).
    `source` is relative to the data root; a `user_file` is not shipped and `source` is only
    its default place (the user brings it: eval.benchmark_files)."""

    name: str
    kind: str  # false_refusal | safety | general
    loader: Callable  # (spec, path, shots) -> (items, [(row id, reason skipped), ...])
    source: str
    description: str
    size: int | None  # evaluable items in the shipped file; None for user files
    version: int = 1  # bump when this loader or this prompt format changes; items carry it
    mode: str = "generate"  # generate | choice
    default_shots: int = 0  # general sets only; chosen so prompts stay near 1000 tokens or less
    max_shots: int = 0  # size of the exemplar pool (0: not a few-shot set)
    user_file: bool = False

    @property
    def version_id(self) -> str:
        """`<name>/<version>`, as results record it (benchmark_version)."""
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class EvalItem:
    """One prompt to generate (or score choices) for; see the module docstring for formats."""

    benchmark: str
    version: str
    kind: str  # false_refusal | safety | general
    prompt_id: str  # stable within the benchmark
    category: str  # XSTest type, safety-set tag, MMLU subject; "" if none
    instruction: str  # the user request; for general sets the test question block
    prompt: str  # the full model input
    mode: str = "generate"  # generate | choice
    choices: tuple[str, ...] = ()  # choice mode: " A", " B", ... scored after `prompt`
    reference: str | None = None  # choice index as str, or the GSM8K final number
    # The same request for a chat model (tbr_ray.prompts.chat_prompt): the shots as turns
    # (question, answer), and what the answer starts with ("Answer:" for multiple choice).
    shots: tuple[tuple[str, str], ...] = ()
    answer_prefix: str = ""


@dataclass(frozen=True)
class LoadReport:
    """What a load read and dropped; `skipped` holds (row id, reason) per malformed row."""

    benchmark: str
    version: str
    source: str
    n_valid: int  # well-formed items before sampling
    n_returned: int
    shots: int
    skipped: tuple[tuple[str, str], ...] = ()


Skips = list[tuple[str, str]]


def load_benchmark(
    name: str,
    data_root: Path,
    sample_size: int | None = None,
    seed: int = 0,
    shots: int | None = None,
    files: dict[str, str] | None = None,
) -> list[EvalItem]:
    """Items of one benchmark (seeded sample if `sample_size`); malformed rows are logged."""
    items, report = load_benchmark_with_report(name, data_root, sample_size, seed, shots, files)
    if report.skipped:
        log.warning(
            "%s: skipped %d malformed rows, e.g. %s", name, len(report.skipped), report.skipped[:3]
        )
    return items


def load_benchmark_with_report(
    name: str,
    data_root: Path,
    sample_size: int | None = None,
    seed: int = 0,
    shots: int | None = None,
    files: dict[str, str] | None = None,
) -> tuple[list[EvalItem], LoadReport]:
    """Like `load_benchmark`, plus a `LoadReport` listing every skipped row and why."""
    if name not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {name!r}{did_you_mean(name, BENCHMARKS)}. "
            f"Fix: use one of {', '.join(BENCHMARKS)}."
        )
    spec = BENCHMARKS[name]
    n_shots = _check_args(spec, sample_size, shots, files or {})
    source = _source_path(spec, Path(data_root), files or {})
    items, skipped = spec.loader(spec, source, n_shots)
    sample = sample_items(items, sample_size, seed)
    report = LoadReport(
        name, spec.version_id, str(source), len(items), len(sample), n_shots, tuple(skipped)
    )
    return sample, report


def _check_args(spec: BenchmarkSpec, sample_size, shots, files) -> int:
    if sample_size is not None and sample_size < 1:
        raise ValueError(f"{spec.name}: sample_size={sample_size}; use None (all) or >= 1.")
    unknown = set(files) - set(USER_FILES)
    if unknown:
        raise ValueError(
            f"benchmark_files has keys {sorted(unknown)}; only {sorted(USER_FILES)} "
            "take a user file. Fix: remove or rename them."
        )
    n = spec.default_shots if shots is None else shots
    if spec.kind != "general" and n:
        raise ValueError(f"{spec.name}: shots={n}, but only general benchmarks take shots.")
    if not 0 <= n <= spec.max_shots:
        raise ValueError(f"{spec.name}: shots={n}; use 0..{spec.max_shots} (the exemplar pool).")
    return n


def _source_path(spec: BenchmarkSpec, data_root: Path, files: dict[str, str]) -> Path:
    if not spec.user_file:
        path = data_root / spec.source
        if not path.exists():
            raise FileNotFoundError(
                f"{spec.name}: {path} does not exist. Fix: point data.root "
                "(or $TBR_DATA_ROOT) at the shared data folder."
            )
        return path
    default = data_root / spec.source
    path = Path(files[spec.name]).expanduser().resolve() if spec.name in files else default
    if not path.is_file():
        raise FileNotFoundError(
            f"{spec.name}: no file at {path}. It is not shipped with the shared data. Fix: put "
            f"{spec.description} at {default}, or set "
            f"eval.benchmark_files.{spec.name} to its path."
        )
    return path


def sample_items(items: list[EvalItem], sample_size: int | None, seed: int) -> list[EvalItem]:
    """A seeded, category-stratified, nested sample, returned in file order.

    Items get a fixed order from sha256(seed, benchmark, prompt_id): ranked within their category
    and spread evenly across categories (systematic sampling), and the first `sample_size` are
    kept. So the same seed gives the same items in any process, a smaller sample is a subset of
    a larger one, and categories keep their shares. `None` or a size >= len(items): everything.
    """
    ids = [it.prompt_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate prompt_id in benchmark items; ids must be unique to sample.")
    if sample_size is None or sample_size >= len(items):
        return list(items)
    by_category: dict[str, list[EvalItem]] = defaultdict(list)
    for it in items:
        by_category[it.category].append(it)
    keys: dict[str, tuple[float, float]] = {}
    for category, group in by_category.items():
        offset = _unit_hash(seed, group[0].benchmark, "category", category)
        ranked = sorted(group, key=lambda it: _unit_hash(seed, it.benchmark, it.prompt_id))
        for rank, it in enumerate(ranked):
            keys[it.prompt_id] = ((rank + offset) / len(group), _unit_hash(seed, it.prompt_id))
    chosen = set(sorted(keys, key=keys.__getitem__)[:sample_size])
    return [it for it in items if it.prompt_id in chosen]


def _unit_hash(*parts: object) -> float:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:15], 16) / 16**15


# ---------------------------------------------------------------- refusal and safety sets


def _item(spec: BenchmarkSpec, *fields: str, **choice_fields) -> EvalItem:
    """An item of `spec`; `fields` are prompt_id, category, instruction, prompt."""
    return EvalItem(spec.name, spec.version_id, spec.kind, *fields, **choice_fields)


def _plain_item(spec: BenchmarkSpec, prompt_id: str, category: str, text: str) -> EvalItem:
    return _item(spec, prompt_id, category, text, format_prompt(text))


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str | None]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            missing = set(required) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(
                    f"{path}: header {reader.fieldnames} lacks {sorted(missing)}. Fix: "
                    f"use the published file, whose header has {list(required)}."
                )
            return list(reader)
        except csv.Error as exc:  # e.g. "field larger than field limit (131072)"
            raise ValueError(
                f"{path}, line {reader.line_num + 1}: not a readable CSV ({exc}); no benchmark "
                "prompt is that long, so a quote is likely left open there and swallows the "
                "rows after it. Fix: use the published file, or close the quote."
            ) from None


def _text(value: str | None) -> str:
    return (value or "").strip()


def _load_xstest(want: str):
    """XSTest's prompts labelled `want` (safe | unsafe)."""

    def load(spec: BenchmarkSpec, path: Path, shots: int):
        items, skipped = [], []
        for i, row in enumerate(_read_csv(path, ("id", "prompt", "type", "label"))):
            row_id = _text(row["id"]) or f"row{i + 1}"
            label = _text(row["label"])
            if label not in ("safe", "unsafe"):
                skipped.append((row_id, f"label {label!r} is neither safe nor unsafe"))
            elif not _text(row["prompt"]):
                skipped.append((row_id, "empty prompt"))
            elif label == want:
                items.append(_plain_item(spec, row_id, _text(row["type"]), _text(row["prompt"])))
        return items, skipped

    return load


def _load_csv_column(column: str, category_column: str | None = None):
    def load(spec: BenchmarkSpec, path: Path, shots: int):
        items, skipped = [], []
        required = (column, category_column) if category_column else (column,)
        for i, row in enumerate(_read_csv(path, required)):
            category = _text(row[category_column]) if category_column else ""
            if not _text(row[column]):
                skipped.append((str(i), f"empty {column}"))
            else:
                items.append(_plain_item(spec, str(i), category, _text(row[column])))
        return items, skipped

    return load


def _load_stl(spec: BenchmarkSpec, path: Path, shots: int):
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("instructions"), list):
        raise ValueError(f"{path}: expected a JSON object with an 'instructions' list.")
    tags = data.get("tags") or []
    items, skipped = [], []
    for i, text in enumerate(data["instructions"]):
        if not isinstance(text, str) or not text.strip():
            skipped.append((str(i), "empty or non-text instruction"))
            continue
        category = str(tags[i]) if i < len(tags) else ""
        items.append(_plain_item(spec, str(i), category, text.strip()))
    return items, skipped


def _load_lines(spec: BenchmarkSpec, path: Path, shots: int):
    lines = path.read_text(encoding="utf-8").rstrip().splitlines()
    items, skipped = [], []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            items.append(_plain_item(spec, str(number), "", line.strip()))
        else:
            skipped.append((str(number), "empty line"))
    return items, skipped


# ---------------------------------------------------------------- general sets


def _few_shot(shots: list[tuple[str, str]], instruction: str, answer_prefix: str = "") -> str:
    blocks = [format_prompt(q) + a + "\n\n" for q, a in shots]
    return "".join(blocks) + format_prompt(instruction) + answer_prefix


def _mc_instruction(header: str, question: str, options: list[str]) -> str:
    lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return f"{header}\n\n{question}\n" + "\n".join(lines)


def _choice_item(spec, prompt_id, category, instruction, n_options, answer, shots) -> EvalItem:
    choices = tuple(f" {LETTERS[i]}" for i in range(n_options))
    prompt = _few_shot(shots, instruction, "Answer:")
    return _item(
        spec,
        prompt_id,
        category,
        instruction,
        prompt,
        mode="choice",
        choices=choices,
        reference=str(answer),
        shots=tuple(shots),
        answer_prefix="Answer:",
    )


def _mmlu_rows(path: Path, subject: str, skipped: Skips) -> list[tuple[str, str, list[str], int]]:
    """(row_id, question, options, answer index) for the valid rows of one MMLU CSV."""
    cols = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
    out = []
    for i, row in enumerate(_read_csv(path, cols)):
        row_id, options = f"{subject}/{i}", [_text(row[f"choice{k}"]) for k in range(4)]
        if not _text(row["question"]) or any(row[f"choice{k}"] is None for k in range(4)):
            skipped.append((row_id, "empty question or missing choice"))
        elif _text(row["answer"]) not in ("0", "1", "2", "3"):
            skipped.append((row_id, f"answer {row['answer']!r} is not an index 0-3"))
        else:
            out.append((row_id, _text(row["question"]), options, int(_text(row["answer"]))))
    return out


def _load_mmlu(spec: BenchmarkSpec, test_dir: Path, shots: int):
    items, skipped = [], []
    for test_file in sorted(test_dir.glob("*_test.csv")):
        subject = test_file.name.removesuffix("_test.csv")
        header = (
            f"The following is a multiple choice question about "
            f"{subject.replace('_', ' ')}. Answer with the letter of the correct option."
        )
        dev_file = test_dir.parent / "dev" / f"{subject}_dev.csv"
        dev = _mmlu_rows(dev_file, "dev/" + subject, skipped) if dev_file.is_file() else []
        if len(dev) < shots:
            raise ValueError(
                f"mmlu: {dev_file} has {len(dev)} valid rows, fewer than shots="
                f"{shots}. Fix: lower eval.shots.mmlu."
            )
        exemplars = [
            (_mc_instruction(header, q, o), f"Answer: {LETTERS[a]}") for _, q, o, a in dev[:shots]
        ]
        for row_id, question, options, answer in _mmlu_rows(test_file, subject, skipped):
            instruction = _mc_instruction(header, question, options)
            items.append(_choice_item(spec, row_id, subject, instruction, 4, answer, exemplars))
    return items, skipped


def _jsonl(path: Path) -> list[dict | str]:
    """Each line parsed as a JSON object, or a string saying why it could not be."""
    out: list[dict | str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            out.append(row if isinstance(row, dict) else "not a JSON object")
        except json.JSONDecodeError as err:
            out.append(f"invalid JSON ({err})")
    return out


def _arc_row(row: dict | str) -> tuple[str, str, list[str], int] | str:
    """(id, question, options, answer index), or the reason the row is malformed."""
    try:
        texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
        question, key, row_id = row["question"].strip(), str(row["answerKey"]), str(row["id"])
    except (KeyError, TypeError, AttributeError) as err:
        return row if isinstance(row, str) else f"missing or bad field {err}"
    if not question or len(texts) != len(labels) or not 2 <= len(texts) <= len(LETTERS):
        return "empty question or bad choices"
    if key not in labels:
        return f"answerKey {key!r} not among labels {labels}"
    return row_id, question, [str(t).strip() for t in texts], labels.index(key)


def _load_arc(spec: BenchmarkSpec, path: Path, shots: int):
    header = "Answer the science question with the letter of the correct option."
    train = [
        r
        for r in map(_arc_row, _jsonl(path.with_name(path.name.replace("-test", "-train"))))
        if not isinstance(r, str)
    ][:shots]
    pool = [(_mc_instruction(header, q, o), f"Answer: {LETTERS[a]}") for _, q, o, a in train]
    if len(pool) < shots:
        raise ValueError(f"{spec.name}: the train split gave {len(pool)} exemplars, not {shots}.")
    items, skipped = [], []
    for number, row in enumerate(map(_arc_row, _jsonl(path)), start=1):
        if isinstance(row, str):
            skipped.append((f"line{number}", row))
            continue
        row_id, question, options, answer = row
        instruction = _mc_instruction(header, question, options)
        items.append(_choice_item(spec, row_id, "", instruction, len(options), answer, pool))
    return items, skipped


def _gsm8k_row(row: dict | str) -> tuple[str, str, str] | str:
    """(question, worked solution without <<calc>> notes, final number), or why it is bad."""
    try:
        question, answer = row["question"].strip(), str(row["answer"])
    except (KeyError, TypeError, AttributeError) as err:
        return row if isinstance(row, str) else f"missing or bad field {err}"
    final = extract_gsm8k_answer(answer) if "####" in answer else None
    if not question or final is None:
        return "empty question or no '#### N' answer"
    return question, re.sub(r"<<[^>]*>>", "", answer).strip(), final


def _load_gsm8k(spec: BenchmarkSpec, path: Path, shots: int):
    rows = [_gsm8k_row(r) for r in _jsonl(path)]
    pool = [
        (q, solution)
        for q, solution, _ in [r for r in rows[:GSM8K_SHOT_POOL] if not isinstance(r, str)][:shots]
    ]
    if len(pool) < shots:
        raise ValueError(f"gsm8k: only {len(pool)} valid exemplars in the shot pool.")
    items, skipped = [], []
    for i, row in enumerate(rows[GSM8K_SHOT_POOL:], start=GSM8K_SHOT_POOL):
        if isinstance(row, str):
            skipped.append((str(i), row))
        else:
            prompt = _few_shot(pool, row[0])
            items.append(
                _item(spec, str(i), "", row[0], prompt, reference=row[2], shots=tuple(pool))
            )
    return items, skipped


# ---------------------------------------------------------------- the benchmarks
# Keys, kinds, shot pools and user-file entries are the vocabulary's (tbr_ray/vocab.py), which
# config validates against; tests/test_layers.py holds this table equal to it.

_STL = "safety-tuned-llamas/data/evaluation/"
# fmt: off
BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in [
    BenchmarkSpec("xstest_safe", "false_refusal", _load_xstest("safe"),
                  "xstest/xstest_prompts.csv", "XSTest safe (pseudo-harmful) prompts", 250),
    BenchmarkSpec("stl_physical_safe", "false_refusal", _load_stl,
                  _STL + "I-PhysicalSafetySafe.json",
                  "Safety-tuned-llamas physical safety, safe phrasing", 100),
    BenchmarkSpec("orbench_hard", "false_refusal", _load_csv_column("prompt", "category"),
                  "or-bench/or-bench-hard-1k.csv", "OR-Bench-Hard-1K's published "
                  "or-bench-hard-1k.csv (1,319 rows; columns prompt,category)", None,
                  user_file=True),
    BenchmarkSpec("xstest_unsafe", "safety", _load_xstest("unsafe"),
                  "xstest/xstest_prompts.csv", "XSTest unsafe contrast prompts", 200),
    BenchmarkSpec("advbench", "safety", _load_csv_column("goal"),
                  "advbench/harmful_behaviors.csv", "AdvBench harmful behaviours (goal column)",
                  520),
    BenchmarkSpec("stl_malicious", "safety", _load_stl, _STL + "I-MaliciousInstructions.json",
                  "Safety-tuned-llamas malicious instructions (category: hate/crime tag)", 100),
    BenchmarkSpec("stl_cona", "safety", _load_stl, _STL + "I-CoNa.json",
                  "Safety-tuned-llamas CoNa hateful instructions", 178),
    BenchmarkSpec("stl_controversial", "safety", _load_stl, _STL + "I-Controversial.json",
                  "Safety-tuned-llamas controversial topics", 40),
    BenchmarkSpec("stl_physical_unsafe", "safety", _load_stl,
                  _STL + "I-PhysicalSafetyUnsafe.json",
                  "Safety-tuned-llamas physical safety, unsafe phrasing", 100),
    BenchmarkSpec("stl_qharm", "safety", _load_stl, _STL + "Q-Harm.json",
                  "Safety-tuned-llamas harmful questions (Q-Harm)", 100),
    BenchmarkSpec("malicious_instruct", "safety", _load_lines,
                  "malicious-instruct/maliciousinstruct.txt",
                  "the published MaliciousInstruct.txt (100 prompts, one per line)", None,
                  user_file=True),
    # Default shots keep prompts within a 1024-token context for tiny runs; measured with
    # the tiny presets' tokenizer (about 2.8 chars/token; Llama's is about 4), longest
    # prompt: MMLU 0-shot 1,078 (p95 604; 1-shot p95 1,193), ARC-C 3-shot 877, GSM8K 2-shot
    # 677 (+ generated tokens). Paper-scale runs set eval.shots (e.g. mmlu: 5, gsm8k: 8).
    BenchmarkSpec("mmlu", "general", _load_mmlu, "mmlu/test", "MMLU test split, 57 subjects; "
                  "shots: the subject's dev rows in order", 14042, mode="choice",
                  max_shots=SHOT_POOLS["mmlu"]),
    BenchmarkSpec("arc_easy", "general", _load_arc, "arc/ARC-Easy-test.jsonl",
                  "ARC-Easy test split; shots: first train rows", 2376, mode="choice",
                  default_shots=3, max_shots=SHOT_POOLS["arc_easy"]),
    BenchmarkSpec("arc_challenge", "general", _load_arc, "arc/ARC-Challenge-test.jsonl",
                  "ARC-Challenge test split; shots: first train rows", 1172, mode="choice",
                  default_shots=3, max_shots=SHOT_POOLS["arc_challenge"]),
    BenchmarkSpec("gsm8k", "general", _load_gsm8k, "gsm8k/test.jsonl",
                  f"GSM8K test; its first {GSM8K_SHOT_POOL} rows are the shot pool and are "
                  "never evaluated", 1319 - GSM8K_SHOT_POOL, default_shots=2,
                  max_shots=SHOT_POOLS["gsm8k"]),
]}
# fmt: on
# Benchmarks whose file the user brings (eval.benchmark_files): name -> default place.
USER_FILES = {s.name: s.source for s in BENCHMARKS.values() if s.user_file}

# ---------------------------------------------------------------- scoring

_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# A completion may run on into an invented next Alpaca turn; its numbers are not the answer.
_NEXT_TURN = re.compile(r"\n\s*(?:Below is an instruction|### Instruction)")


def extract_gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K answer: the first number after "####" if there is one, else
    the last number in the text. Commas and "$" go, trailing zeros after a point go ("$18.00" ->
    "18", "1,234" -> "1234", "-3" -> "-3"); None when the text holds no number."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    number = found[0] if "####" in text else found[-1]
    try:
        value = Decimal(number.replace(",", "")).normalize()
    except InvalidOperation:
        return None
    return format(value, "f") if value != 0 else "0"


def score_item(item: EvalItem, completion_or_choice: str | int | None) -> bool | None:
    """Correctness of a general item: the chosen index equals `reference` (choice mode), or the
    extracted number equals it (GSM8K; text after an invented next turn is ignored). None for
    refusal and safety items, which judges label instead."""
    if item.kind != "general":
        return None
    if completion_or_choice is None:
        return False
    if item.mode == "choice":
        return str(completion_or_choice).strip() == item.reference
    completion = _NEXT_TURN.split(str(completion_or_choice), maxsplit=1)[0]
    return extract_gsm8k_answer(completion) == item.reference
