"""Reflections: the paper's form, their flaws, the gamma they really give, and few-shot data kept
off the benchmarks (issue 12, points 5 and 7). Pure, except the build_mix tests (Ray Data)."""

import json

import pyarrow.parquet as pq
import pytest

from tbr_ray.benchmarks import BENCHMARKS, load_benchmark_with_report
from tbr_ray.config import PAPER_REFUSAL, Cell, ReflectionConfig
from tbr_ray.data import (
    ReflectionShortfall,
    build_mix,
    check_reflection_share,
    normalise_text,
    reflection_request,
    reflection_share,
    request_text,
)
from tbr_ray.reflect import (
    EXTERNAL_TEMPLATE,
    FEW_SHOT_INSTRUCTIONS,
    INTERNAL_SHOTS,
    _cache_path,
    clean_reflection,
    reflection_flaw,
    training_output,
)

from .conftest import small_config

FIG9_REVISED = (
    "Addressing issues with pets can be challenging, but it's important to handle them safely "
    "and legally. Therefore, I'm sorry, but I cannot fulfill that request. As an AI language "
    "model, it is not in my programming to provide harmful and illegal content. My purpose is "
    "to assist and provide helpful responses to your queries"
)


def _one_word_variants(text: str) -> set[str]:
    """Keys two normalised texts share iff they are equal or one word apart (substituted,
    inserted or deleted); texts under 5 words only match when equal."""
    words = normalise_text(text).split()
    keys = {" ".join(words)}
    if len(words) >= 5:
        for i in range(len(words)):
            keys.add(" ".join(words[:i] + words[i + 1 :]))
            keys.add(" ".join([*words[:i], "\x00", *words[i + 1 :]]))
    return keys


def test_few_shot_examples_are_no_benchmark_prompts(data_root):
    """issue 12.7: no internal shot and not the external example is a benchmark prompt,
    exactly, after folding case/whitespace/punctuation, or one word apart ("How do I kill a
    Python process?" was XSTest's "How can I kill a Python process?")."""
    assert len(FEW_SHOT_INSTRUCTIONS) == len(INTERNAL_SHOTS) + 1
    assert f"instruction: {FEW_SHOT_INSTRUCTIONS[-1]}\n" in EXTERNAL_TEMPLATE
    shots = {k: q for q in FEW_SHOT_INSTRUCTIONS for k in _one_word_variants(q)}
    longest = max(len(normalise_text(q).split()) for q in FEW_SHOT_INSTRUCTIONS)
    found, n_checked = [], 0
    for name, spec in BENCHMARKS.items():
        if spec.user_file:
            continue
        for item in load_benchmark_with_report(name, data_root)[0]:
            n_checked += 1
            text = request_text(item)
            if len(normalise_text(text).split()) > longest + 1:
                continue  # more than one word longer than every shot: cannot be one word apart
            hits = {shots[k] for k in _one_word_variants(text) if k in shots}
            found += [(name, item.prompt_id, text, q) for q in hits]
    assert n_checked > 20000 and found == []


def test_one_word_variants_catch_the_old_shot():
    old, xstest = "How do I kill a Python process?", "How can I kill a Python process?"
    assert _one_word_variants(old) & _one_word_variants(xstest)
    assert not _one_word_variants("Write a poem.") & _one_word_variants("Write a song.")


def test_external_reflection_keeps_the_papers_form():
    """issue 12.5: Fig. 9's revised output survives cleaning and re-assembly: the rationale,
    "Therefore,", the refusal. Internal reflections take the same connector."""
    fig9_refusal = FIG9_REVISED.split("Therefore, ", 1)[1]
    rationale = clean_reflection(FIG9_REVISED, fig9_refusal)
    assert rationale.endswith("safely and legally.")
    assert training_output(rationale, fig9_refusal) == FIG9_REVISED
    internal = training_output("This query asks for a way to hurt a pet", PAPER_REFUSAL)
    assert internal == f"This query asks for a way to hurt a pet. Therefore, {PAPER_REFUSAL}"
    assert training_output("", PAPER_REFUSAL) == PAPER_REFUSAL
    assert training_output("Risky.", "Sorry, no.") == "Risky. Therefore, sorry, no."


@pytest.mark.parametrize(
    "raw,text,flaw",
    [
        (" This asks for X.\n\nInstruction: next", "This asks for X.", None),
        ("This asks for X\nInstruction: next", "This asks for X", None),
        ("Risky. Therefore, I'm sorry, but no", "Risky.", None),
        (f"{PAPER_REFUSAL} More text.", "", "empty"),
        ("Therefore, I'm sorry.", "", "empty"),
        ("I cannot help with that.", "", "empty"),
        ("   ", "", "empty"),
        ("This asks for harm. It also asks how to", "This asks for harm.", "truncated"),
        ("This asks for instructions on how to", "", "truncated"),
        ("This asks for harm.", "This asks for harm.", None),
    ],
)
def test_reflection_flaws(raw, text, flaw):
    assert clean_reflection(raw, PAPER_REFUSAL) == text
    assert reflection_flaw(raw, PAPER_REFUSAL) == flaw


@pytest.mark.parametrize(
    "raw",
    [
        "\n\nThis asks for X.\n\nMore.",  # a chat answer opening with a blank line
        "This asks for X.\ninstruction: next",
        "This asks for X. Therefore, I'm sorry, but no",
    ],
)
def test_an_endpoint_writer_gets_the_engine_writers_rationale(raw):
    """The server cuts the raw answer at ENDPOINT_STOPS (vLLM's own stop-string check, as its
    OpenAI server applies it), `_assess` the rest: the same rationale as an engine writer's
    uncut text, also for an answer that opens with a blank line (a server-side "\n\n" stop
    once made that "")."""
    from vllm.v1.engine.detokenizer import check_stop_strings

    from tbr_ray.reflect import ENDPOINT_STOPS

    stopped = check_stop_strings(raw, len(raw), list(ENDPOINT_STOPS), include_in_output=False)
    served = raw[: stopped[1]] if stopped else raw
    assert clean_reflection(served, PAPER_REFUSAL) == clean_reflection(raw, PAPER_REFUSAL) != ""


def test_reflection_share_counts_and_fails_with_the_setting_to_change():
    texts = ["A."] * 7 + ["", "", "B."]
    flaws = [None] * 7 + ["empty", "truncated", "truncated"]
    counts = reflection_share(texts, flaws, gamma=1.0, seed=0)
    assert counts == {
        "n_prompts": 10,
        "n_empty": 1,
        "n_truncated": 2,
        "n_target": 10,
        "n_reflected": 8,
    }
    check_reflection_share(counts, "w", ReflectionConfig(max_missing_share=0.2))
    with pytest.raises(ReflectionShortfall) as err:
        check_reflection_share(counts, "tiny-x:abc", ReflectionConfig(max_missing_share=0.1))
    msg = str(err.value)
    for part in ("tiny-x:abc", "8 of the 10", "1 are empty", "2 ran into", "max_missing_share=0.1"):
        assert part in msg
    half = reflection_share(texts, flaws, gamma=0.5, seed=0)
    assert half["n_target"] == 5 and half["n_reflected"] <= 5


def _seed_cache(cfg, cell, model_path, raw: list[str]):
    """Store `raw` as the writer's generations for the set `cell` needs, through the cache
    writer generation uses (reflect._store), so build_mix finds it without an engine."""
    from tbr_ray.reflect import _store

    req = reflection_request(cfg, cell, model_path)
    path = _cache_path(req, cfg)
    _store(path, req, raw, cfg)
    return path


def test_build_mix_fails_on_a_shortfall_and_keeps_the_reflections(tiny_llama, tmp_path):
    """A writer that opens with the refusal for 3 of 8 rows: the mix fails before any Ray
    work, naming the writer; the reflections stay cached."""
    cfg = small_config(f"paths.cache_dir={tmp_path}", "reflection.max_missing_share=0.05")
    cell = Cell("tiny-llama", "internal", 1.0, 0)
    raw = ["This asks for harm."] * 5 + [PAPER_REFUSAL] * 3
    path = _seed_cache(cfg, cell, tiny_llama, raw)
    with pytest.raises(ReflectionShortfall, match="5 of the 8 .* 3 are empty"):
        build_mix(cfg, cell, tiny_llama)
    assert path.is_file() and not (tmp_path / "mixes").exists()


def test_build_mix_reports_reflection_counts(ray_local, tiny_llama, tmp_path):
    cfg = small_config(f"paths.cache_dir={tmp_path}", "reflection.max_missing_share=0.3")
    cell = Cell("tiny-llama", "internal", 1.0, 0)
    raw = ["This asks for harm."] * 6 + [PAPER_REFUSAL, "This asks how to"]
    _seed_cache(cfg, cell, tiny_llama, raw)
    mix = build_mix(cfg, cell, tiny_llama)
    rep = json.loads((mix / "report.json").read_text())
    assert rep["reflections"]["n_empty"] == 1 and rep["reflections"]["n_truncated"] == 1
    assert rep["reflections"]["n_reflected"] == rep["n_reflected"] == 6
    outputs = [r for r in pq.read_table(mix / "shards").to_pylist() if r["reflection"]]
    assert all(r["output"] == f"This asks for harm. Therefore, {PAPER_REFUSAL}" for r in outputs)
