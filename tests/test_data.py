"""The data stage: sources, malformed rows, the TBR mix, label masking, Parquet on Ray Data."""

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tbr_ray.benchmarks import BENCHMARKS, load_benchmark_with_report
from tbr_ray.config import Cell, load_config
from tbr_ray.data import (
    IGNORE_INDEX,
    Tokenize,
    _safety_items,
    assemble_mix,
    benchmark_prompts,
    build_mix,
    drop_benchmark_overlap,
    general_token_lengths,
    normalise_text,
    read_general,
    read_safety,
    reflected_indices,
    request_text,
    sample_rows,
    source_rows,
    tokenize_row,
    tokenize_rows,
    upstream_refused,
)
from tbr_ray.lengths import answer_words, sample_general
from tbr_ray.models import format_prompt
from tbr_ray.prompts import prompt_token_ids
from tbr_ray.reflect import clean_reflection, external_prompt, internal_prompt

from .conftest import REPO, SHARED_TOKENIZERS, needs_tokenizers, shared_tokenizer, small_config


def test_shipped_sources_read_cleanly(data_root):
    gen = read_general(data_root, ("alpaca-bloom-lora", "alpaca-gumbelsoft"))
    saf = read_safety(data_root, "safety-tuned-llamas", "none")
    hh = read_safety(data_root, "hh-rlhf-harmless", "none")
    assert len(gen.rows) > 2900 and len(saf.rows) > 2000 and len(hh.rows) > 2000
    assert all(r["instruction"] and r["output"] for r in gen.rows)
    assert not hh.rows[0]["instruction"].startswith("Human:")


def test_malformed_rows_are_set_aside_with_reason(tmp_path):
    folder = tmp_path / "alpaca-subsets" / "bloom-lora"
    folder.mkdir(parents=True)
    rows = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "", "output": "x"},
        "not an object",
        {"instruction": "No output"},
        {"instruction": "a", "output": "b", "input": 3},
    ]
    (folder / "alpaca_data_1k.json").write_text(json.dumps(rows))
    out = read_general(tmp_path, ("alpaca-bloom-lora",))
    assert len(out.rows) == 1
    reasons = [s["reason"] for s in out.skipped]
    assert reasons == [
        "missing or empty 'instruction'",
        "row is str, not an object",
        "missing or empty 'output'",
        "'input' is not a string",
    ]


# HH-RLHF lines, one per kind of malformed row, then a good one: (line, reason set aside).
BROKEN_HH_LINES = [
    (
        '{"chosen": "\\n\\nHuman: How do I',
        "not valid JSON (Invalid control character at: line 1 column 32 (char 31))",
    ),
    ('{"rejected": "Human: hi"}', "missing 'chosen'"),
    ('{"chosen": 42}', "'chosen' is int, not a string"),
    ('{"chosen": "\\n\\nHuman:  \\n\\nAssistant: ok"}', "empty first 'Human:' turn"),
    ('["chosen"]', "row is list, not an object"),
    ('{"chosen": "Assistant: no human turn"}', "'chosen' has no 'Human:' turn"),
]
GOOD_HH_LINE = '{"chosen": "\\n\\nHuman: Pick a lock?\\n\\nAssistant: I\'m sorry, I can\'t."}'


def write_hh(root: Path, lines: list[str]) -> None:
    path = root / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        fh.write("".join(line + "\n" for line in lines))


def test_malformed_safety_rows_are_set_aside_naming_what_is_wrong(tmp_path):
    write_hh(tmp_path, [line for line, _ in BROKEN_HH_LINES] + [GOOD_HH_LINE])
    out = read_safety(tmp_path, "hh-rlhf-harmless")
    assert [r["instruction"] for r in out.rows] == ["Pick a lock?"]
    assert [(s["source_id"], s["reason"]) for s in out.skipped] == [
        (f"hh-rlhf-harmless:{i}", reason) for i, (_, reason) in enumerate(BROKEN_HH_LINES)
    ]
    folder = tmp_path / "safety-tuned-llamas" / "data" / "training"
    folder.mkdir(parents=True)
    rows = [{"instruction": ""}, {"output": "x"}, {"instruction": ["a"]}, 7, {"instruction": "ok"}]
    (folder / "safety_only_data_Instructions.json").write_text(json.dumps(rows))
    out = read_safety(tmp_path, "safety-tuned-llamas", "none")
    assert [r["instruction"] for r in out.rows] == ["ok"]
    assert [s["reason"] for s in out.skipped] == [
        "empty 'instruction'",
        "missing 'instruction'",
        "'instruction' is list, not a string",
        "row is int, not an object",
    ]


def test_sample_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match="lower data.n_safety"):
        sample_rows([{"a": 1}], 5, 0, "safety")


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_mix_sizes_and_reflection_share(gamma):
    general = [{"instruction": f"g{i}", "input": "", "output": "o"} for i in range(90)]
    safety = [{"instruction": f"s{i}"} for i in range(10)]
    refl = [f"This asks for harm {i}" for i in range(10)]
    rows = assemble_mix(general, safety, refl, gamma, "I'm sorry.", seed=3)
    assert len(rows) == 100
    saf = [r for r in rows if r["kind"] == "safety"]
    assert len(saf) == 10 and sum(r["reflection"] != "" for r in saf) == round(gamma * 10)
    for r in saf:
        assert r["output"].endswith("I'm sorry.")
        assert r["output"].startswith(r["reflection"]) if r["reflection"] else True
    assert sorted(r["example_id"] for r in rows) == list(range(100))
    assert reflected_indices(10, gamma, 3) == reflected_indices(10, gamma, 3)


def test_labels_mask_the_prompt(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    out = tokenize_row(row, tok, max_seq_len=512)
    n_prompt = len(tok(format_prompt("Name a colour."))["input_ids"])
    assert out["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert out["labels"][n_prompt:] == out["input_ids"][n_prompt:]
    assert out["input_ids"][-1] == tok.eos_token_id and not out["over_max_len"]
    assert tok.decode(out["input_ids"][n_prompt:-1]) == "Blue."
    short = tokenize_row(row, tok, max_seq_len=5)  # never cut: whole, EOS kept, flagged
    assert short["input_ids"] == out["input_ids"] and short["over_max_len"]


def _one_row_at_a_time(row: dict, tok, max_seq_len: int) -> dict:
    """The reference: one tokenizer call per prompt and per response (the code before batching)."""
    prompt = prompt_token_ids(tok, format_prompt(row["instruction"], row["input"]))
    resp = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = prompt + resp
    labels = [IGNORE_INDEX] * len(prompt) + resp
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize(
    "name",
    [
        "tiny",
        *(pytest.param(n, marks=needs_tokenizers) for n in ("mistral", "llama3", "gemma3")),
    ],
)
def test_batched_tokenization_gives_the_row_by_row_ids(name, data_root, request):
    """Real mix rows (Alpaca with and without input, refusals with reflections) through the
    batched call give the ids and labels of one call per row, on the tiny preset's tokenizer
    and the real tokenizers of the paper's families."""
    from transformers import AutoTokenizer

    if name == "tiny":
        tok = AutoTokenizer.from_pretrained(request.getfixturevalue("tiny_llama"))
    else:
        tok = shared_tokenizer(name)
    gen = read_general(data_root, ("alpaca-bloom-lora",)).rows[:80]
    saf = read_safety(data_root, "safety-tuned-llamas").rows[:20]
    reflections = [f"This asks about {s['instruction'][:30]}, which is harmful." for s in saf]
    rows = assemble_mix(gen, saf, reflections, 0.5, "I'm sorry, but I cannot help.", 0)
    assert any(r["input"] for r in rows) and any(r["reflection"] for r in rows)
    batched = tokenize_rows(rows, tok, max_seq_len=96)
    flags = [b["over_max_len"] for b in batched]
    assert any(flags) and not all(flags)
    for row, got in zip(rows, batched, strict=True):
        assert {k: got[k] for k in ("input_ids", "labels")} == _one_row_at_a_time(row, tok, 96)
    assert tokenize_rows([], tok, 96) == []


def test_reflection_prompts_follow_the_paper():
    p = internal_prompt("How do I pick a lock?")
    assert p.count("Instruction:") == 6 and p.endswith(
        "Instruction: How do I pick a lock?\nExplain:"
    )
    e = external_prompt("Q?", "I'm sorry.")
    assert "revised output:" in e and e.endswith(
        "instruction: Q?\noutput: I'm sorry.\nrevised output:"
    )
    assert (
        clean_reflection(" This asks for X.\n\nInstruction: next", "I'm sorry")
        == "This asks for X."
    )
    assert clean_reflection("Risky. Therefore, I'm sorry, but no", "I'm sorry, but") == "Risky."


def test_build_mix_writes_parquet_with_asked_sizes(ray_local, tiny_llama):
    from transformers import AutoTokenizer

    cfg = small_config()
    cell = Cell("tiny-llama", "none", 0.0, 0)
    mix = build_mix(cfg, cell, tiny_llama)
    report = json.loads((mix / "report.json").read_text())
    assert (report["n_general"], report["n_safety"], report["n_reflected"]) == (24, 8, 0)
    table = pq.read_table(mix / "shards").to_pylist()
    assert len(table) == 32
    eos = AutoTokenizer.from_pretrained(tiny_llama).eos_token_id
    for row in table:
        n_masked = sum(1 for x in row["labels"] if x == IGNORE_INDEX)
        assert 0 < n_masked < len(row["input_ids"]) <= cfg.data.max_seq_len  # none cut ...
        assert row["labels"][-1] == row["input_ids"][-1] == eos  # ... each ends with its EOS
    over = report["over_max_seq_len"]
    assert over["checked"] and over["in_mix"] == {"general": 0, "safety": 0}
    assert over["n_general_dropped"] > 0  # bloom-lora rows over 192 tiny-llama tokens
    loss = report["loss_tokens"]
    assert loss["safety_share"] == round(loss["safety"] / (loss["safety"] + loss["general"]), 4)
    assert report["general_sampling"]["answer_tokens"]["all"]["n"] == 24
    assert build_mix(cfg, cell, tiny_llama) == mix  # cached: same key, nothing rebuilt
    general, safety, rep = source_rows(cfg)
    assert len(general) == 24 and len(safety) == 8 and rep["n_skipped"] == 0


def test_reflections_of_two_writers_come_from_one_engine_actor(
    ray_local, tiny_llama, tiny_falcon, tmp_path
):
    """The grid's pre-training pass: internal (tiny-llama) and external (tiny-falcon) sets in
    one Ray Data job; each set is its writer's own greedy text (transformers agrees on the
    first prompt), cached, and found by the per-cell path without generating again."""
    from transformers import AutoTokenizer

    from tbr_ray.engine import reference_greedy
    from tbr_ray.reflect import ReflectionRequest, generate_reflections, prepare_reflections

    cfg = small_config(f"paths.cache_dir={tmp_path}", "data.n_safety=3")
    asks = ("How do I pick a lock?", "How can I hurt someone?", "How do I make a bomb?")
    internal = ReflectionRequest("internal", tiny_llama, "llama", asks)
    external = ReflectionRequest("external", tiny_falcon, "falcon", asks)
    assert prepare_reflections([internal, external, internal], cfg) == 2
    assert prepare_reflections([internal, external], cfg) == 0  # all cached
    files = sorted((tmp_path / "reflections").glob("*.json"))
    assert len(files) == 2
    sets = {json.loads(f.read_text())["writer"]: json.loads(f.read_text()) for f in files}
    n = cfg.reflection.max_new_tokens
    for req in (internal, external):
        got = sets[req.writer_id]
        assert len(got["raw"]) == 3 and got["condition"] == req.condition
        ref = reference_greedy(req.writer_path, got["prompts"][:1], n, [None])[None][0].tokens
        want = AutoTokenizer.from_pretrained(req.writer_path).decode(ref, skip_special_tokens=True)
        assert got["raw"][0].strip() == want.strip()
        assert (
            generate_reflections(list(asks), cfg, req.condition, req.writer_path, req.writer_id)
            == got["reflections"]
        )


def test_safety_rows_are_harmful_requests_by_upstream_refusal(data_root):
    """issue 12.2: 647 of safety-tuned-llamas' 2,483 requests have no refusal in the first 300
    characters of their upstream answer (e.g. a break-up letter); none of them is kept."""
    stl = read_safety(data_root, "safety-tuned-llamas")
    every = read_safety(data_root, "safety-tuned-llamas", "none")
    assert (len(stl.rows), len(stl.dropped), len(every.rows)) == (1834, 647, 2479)
    assert "safety-tuned-llamas:24" in stl.dropped  # "Compose a letter to end a relationship..."
    answers = {
        f"safety-tuned-llamas:{i}": a
        for i, _, a, _ in _safety_items(data_root, stl.rows[0]["source"])
    }
    assert all(upstream_refused(answers[r["source_id"]]) for r in stl.rows)
    assert not any(upstream_refused(answers[sid]) for sid in stl.dropped)
    hh = read_safety(data_root, "hh-rlhf-harmless")
    assert len(hh.rows) == 358 and len(hh.dropped) == 1945


def test_upstream_refusal_must_open_the_answer():
    assert upstream_refused("I'm sorry, but I can't help with that.")
    assert not upstream_refused("Sure! Here is a letter. " * 20 + "I don't recommend it.")
    assert not upstream_refused(None) and not upstream_refused("No problem, here it is.")


def test_source_report_records_the_safety_filter(data_root):
    general, safety, rep = source_rows(small_config())
    f = rep["safety_filter"]
    assert (f["rule"], f["n_kept"], f["n_dropped"]) == ("upstream-refusal", 1834, 647)
    assert len(f["kept_ids"]) == 1834 and len(f["dropped_ids"]) == 647
    assert not {s["source_id"] for s in safety} & set(f["dropped_ids"])
    assert "seven categories" in rep["safety_categories"]
    assert set(rep["benchmark_overlap"]["not_checked"]) == {"orbench_hard", "malicious_instruct"}


def _benchmark_texts(data_root) -> dict[str, set[str]]:
    """Exact and normalised request texts of every shipped benchmark (user files skipped)."""
    exact = set()
    for name, spec in BENCHMARKS.items():
        if not spec.user_file:
            exact |= {request_text(it) for it in load_benchmark_with_report(name, data_root)[0]}
    return {"exact": exact, "normalised": {normalise_text(t) for t in exact}}


def test_training_sources_overlapping_benchmarks_are_filtered(data_root):
    """issue 12.7: HH-RLHF's first turns hold 16 benchmark prompts (1 XSTest-unsafe, 15
    Q-Harm; one differs only in case); the Alpaca subsets and safety-tuned-llamas hold none.
    Overlapping rows are dropped before sampling and recorded in the mix report."""
    bench = _benchmark_texts(data_root)
    index, _ = benchmark_prompts(data_root, {})
    sources = {
        "alpaca": read_general(data_root, ("alpaca-bloom-lora", "alpaca-gumbelsoft")).rows,
        "stl": read_safety(data_root, "safety-tuned-llamas", "none").rows,
        "hh": read_safety(data_root, "hh-rlhf-harmless", "none").rows,
    }
    n_dropped = {}
    for name, rows in sources.items():
        kept, dropped = drop_benchmark_overlap(rows, index)
        n_dropped[name] = len(dropped)
        for row in kept:
            for text in (row["instruction"], row.get("input") or "x"):
                assert (
                    text not in bench["exact"] and normalise_text(text) not in bench["normalised"]
                )
    assert n_dropped == {"alpaca": 0, "stl": 0, "hh": 16}
    cfg = small_config("data.safety_source=hh-rlhf-harmless", "data.safety_filter=none")
    _, safety, rep = source_rows(cfg)
    hits = {d["source_id"]: d["benchmark_item"] for d in rep["benchmark_overlap"]["dropped"]}
    assert rep["benchmark_overlap"]["n_dropped"] == 16
    assert hits["hh-rlhf-harmless:75"].startswith("xstest_unsafe:")  # "How can I rob a casino?"
    assert not set(hits) & {s["source_id"] for s in safety}


def test_reflection_writers_share_an_actor_on_cpu_and_run_side_by_side_on_gpus():
    from tbr_ray.reflect import writer_groups

    sets = [Path("a.json"), Path("b.json"), Path("c.json")]
    assert writer_groups(sets, use_gpu=False) == [sets]
    assert writer_groups(sets, use_gpu=True) == [[p] for p in sets]
    assert writer_groups([], use_gpu=True) == []


# ------------------------------------------------------------------ general rows: lengths


def _rows(words: list[int]) -> list[dict]:
    """General rows whose answers are `words[i]` words long."""
    return [
        {
            "source": "s",
            "source_id": f"s:{i}",
            "instruction": f"q{i}",
            "input": "",
            "output": "w " * n,
        }
        for i, n in enumerate(words)
    ]


def test_general_sample_follows_the_reference_lengths():
    """issue 22.1: per decile of the reference's answer words, that decile's share of n; a
    decile short of rows passes its shortfall to the next longer one (its shortest rows), a
    shortfall at the top goes downward (the longest rows left)."""
    reference = list(range(1, 101))  # deciles: 1-10, 11-20, ... words
    sample, bins = sample_general(
        _rows([w for w in range(1, 101) for _ in range(5)]), 200, 0, reference
    )
    assert len({r["source_id"] for r in sample}) == 200
    assert [b.target for b in bins] == [20] * 10 and [b.taken for b in bins] == [20] * 10
    assert (bins[0].low, bins[0].high, bins[-1].high) == (0, 11, None)
    short = _rows([5] * 4 + [w for w in range(11, 101) for _ in range(5)])
    sample, bins = sample_general(short, 100, 0, reference)
    assert [(b.available, b.taken) for b in bins[:2]] == [(4, 4), (50, 16)]
    assert sum(answer_words(r) == 11 for r in sample) == 5  # the carried rows: shortest first
    top = _rows([w for w in range(1, 51) for _ in range(5)])  # no answer over 50 words
    sample, bins = sample_general(top, 100, 0, reference)
    assert len({r["source_id"] for r in sample}) == 100 and [b.taken for b in bins[5:]] == [0] * 5
    assert [b.taken for b in bins[:5]] == [10, 10, 10, 20, 50]  # filled downward, longest first


def test_removing_a_row_from_the_pool_moves_no_other():
    """Rows are taken in a seeded rank per row, so a row one tokenizer finds too long (dropped
    before sampling) changes only its own place in the sample."""
    pool = _rows(list(range(1, 301)))
    for reference in (None, list(range(1, 101))):
        sample, _ = sample_general(pool, 60, 0, reference)
        ids = {r["source_id"] for r in sample}
        gone = sample[0]["source_id"]
        again, _ = sample_general([r for r in pool if r["source_id"] != gone], 60, 0, reference)
        assert ids - {r["source_id"] for r in again} == {gone}
        other = next(r["source_id"] for r in pool if r["source_id"] not in ids)
        same, _ = sample_general([r for r in pool if r["source_id"] != other], 60, 0, reference)
        assert {r["source_id"] for r in same} == ids
        assert sample_general(pool, 60, 1, reference)[0] != sample  # the seed matters


def test_shipped_general_sample_is_near_a_plain_alpaca_sample(data_root):
    """issue 22.1: jobs/paper.yaml's 1,800 general rows, seed 0. A uniform sample of the pooled
    subsets took 1,194 from gumbelsoft ("biased toward long outputs") and had a median answer
    of 140 words; drawn to bloom-lora's answer lengths (a plain Alpaca sample, median 34) it
    takes every short row the pool holds, and says how far it still is from the reference."""
    _, _, rep = source_rows(load_config(REPO / "jobs" / "paper.yaml"))
    s = rep["general_sampling"]
    assert s["reference"] == "alpaca-bloom-lora" and s["answer_words"]["reference"]["median"] == 34
    assert s["answer_words"]["all"]["median"] == 84 and s["answer_words"]["all"]["n"] == 1800
    assert s["answer_words"]["alpaca-gumbelsoft"]["n"] == 827  # was 1,194
    assert [b["taken"] == b["available"] for b in s["bins"]] == [True] * 9 + [False]
    assert s["n_moved"] == 621 and "Fix: a larger plain Alpaca pool" in s["note"]
    assert not rep["over_max_seq_len"]["checked"]  # no tokenizer: nothing dropped for length


@needs_tokenizers
def test_rows_over_max_seq_len_are_dropped_before_sampling_never_cut(tmp_path):
    """issue 22.1: 38 of the 1,800 rows passed 512 tokens (Llama-2-style tokenizer) and were
    cut, losing their EOS. Now every general row too long for the model's tokenizer leaves
    the pool before sampling (the mix keeps its 1,800), and the report counts them."""
    cfg = load_config(REPO / "jobs" / "paper.yaml", [f"paths.cache_dir={tmp_path}"])
    mistral = str(SHARED_TOKENIZERS / "mistral")
    general, _, rep = source_rows(cfg, mistral)
    over = rep["over_max_seq_len"]
    assert over["checked"] and over["n_general_dropped"] == 60 and len(general) == 1800
    lengths = general_token_lengths(cfg, general, mistral)
    assert max(lengths[r["source_id"]][0] for r in general) <= 512
    assert not set(over["general_dropped_ids"]) & {r["source_id"] for r in general}
    assert len(list((tmp_path / "lengths").glob("*.json"))) == 2  # pool and sample, cached
    tokens = rep["general_sampling"]["answer_tokens"]["all"]
    assert tokens["median"] == 126 and tokens["max"] <= 512  # answer tokens; was median 188


@needs_tokenizers
def test_tokenize_leaves_rows_over_max_seq_len_out_whole():
    rows = _rows([3, 80])
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = Tokenize(str(SHARED_TOKENIZERS / "mistral"), 60)(batch)
    assert list(out["source_id"]) == ["s:0"] and len(out["input_ids"]) == 1
    assert out["input_ids"][0][-1] == shared_tokenizer("mistral").eos_token_id
    assert len(out["input_ids"][0]) == len(out["labels"][0]) <= 60
