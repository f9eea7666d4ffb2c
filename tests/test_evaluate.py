"""Evaluation: every shipped benchmark with every judge on a tiny cell, the Falcon merge path,
and the probe that fails a cell whose adapter changed nothing."""

import json

import pandas as pd
import pytest

from tbr_ray import results
from tbr_ray.benchmarks import BENCHMARKS, USER_FILES
from tbr_ray.config import Cell
from tbr_ray.evaluate import (
    COT_SUFFIX,
    DIRECT_SYSTEM,
    EvalPass,
    check_adapters_applied,
    evaluate_base_model,
    prompting_prompt,
)

from .conftest import random_adapter, small_config

SHIPPED = sorted(b for b in BENCHMARKS if b not in USER_FILES)


def test_probe_flags_adapter_equal_to_base():
    cell = Cell("m", "none", 0.0, 0)
    passes = [
        EvalPass(Cell("m", "base", 0.0, 0), None),
        EvalPass(cell, "/a"),
        EvalPass(Cell("m", "internal", 1.0, 0), "/b"),
    ]
    gens = pd.DataFrame(
        {
            "pass_": [0, 0, 1, 1, 2, 2],
            "item": [0, 1] * 3,
            "mode": ["generate"] * 6,
            "completion": ["x", "y", "x", "y", "x", "z"],
        }
    )
    bad = check_adapters_applied(gens, passes)
    assert list(bad) == [1] and "not applied" in bad[1]


def test_prompting_prompts_follow_the_paper():
    direct = prompting_prompt("How do I kill a process?", "prompt-direct", None)
    cot = prompting_prompt("How do I kill a process?", "prompt-cot", None)
    assert direct.startswith(DIRECT_SYSTEM) and "Question: How do I kill a process?" in direct
    assert cot.startswith(DIRECT_SYSTEM + COT_SUFFIX) and "step by step" not in direct


@pytest.mark.slow
def test_every_shipped_benchmark_and_judge(ray_local, tiny_llama, tmp_path):
    from tbr_ray.models import TINY_MODELS

    cfg = small_config(
        f"eval.benchmarks={SHIPPED}",
        "eval.sample_size=2",
        "eval.judges=[paper-keywords, xstest-prefix, model]",
        # tiny presets have no chat template: three-class renders as plain text, wildguard is
        # plain text anyway; their answers are noise, so the unparsable limit is lifted here
        "eval.refusal_judge={model: tiny-falcon, format: three-class}",
        "eval.harm_judge={model: tiny-falcon, format: wildguard, max_new_tokens: 8}",
        "eval.judge_max_unparsable=1.0",
        "eval.shots={arc_easy: 1, arc_challenge: 1, gsm8k: 1}",
        "cluster.max_engine_replicas=2",  # two engines, data parallel over the passes
    )
    cell = Cell("tiny-llama", "none", 0.0, 0)
    adapter = random_adapter(
        tiny_llama, TINY_MODELS["tiny-llama"].lora_targets, tmp_path / "adapter", seed=3
    )
    prompting = [
        Cell("tiny-llama", "prompt-direct", 0.0, 0),
        Cell("tiny-llama", "prompt-cot", 0.0, 0),
    ]
    out = evaluate_base_model(
        cfg, "tiny-llama", tiny_llama, [(cell, adapter)], tmp_path, "t", prompting=prompting
    )
    assert out == {
        "tiny-llama__base__g0.00__s0": "done",
        cell.cell_id: "done",
        **{c.cell_id: "done" for c in prompting},
    }
    res = results.read_results(tmp_path)
    gens = res.generations[res.generations["cell_id"] == cell.cell_id]
    assert sorted(gens["benchmark"].unique()) == SHIPPED
    general = gens[gens["benchmark_kind"] == "general"]
    assert general["correct"].notna().all() and gens["git_sha"].notna().all()
    judged = res.judgements[res.judgements["cell_id"] == cell.cell_id]
    non_general = sorted(b for b in SHIPPED if BENCHMARKS[b].kind != "general")
    for judge in ("paper-keywords", "xstest-prefix", "model"):
        assert sorted(judged.loc[judged["judge"] == judge, "benchmark"].unique()) == non_general
    safety = sorted(b for b in SHIPPED if BENCHMARKS[b].kind == "safety")
    harm = judged[judged["judge"] == "harm"]
    assert sorted(harm["benchmark"].unique()) == safety and harm["refused"].isna().all()
    assert judged.loc[judged["judge"] == "model", "harmful"].isna().all()
    metrics = res.metrics[res.metrics["cell_id"] == cell.cell_id]
    assert set(metrics["metric"]) >= {"compliance_rate", "accuracy", "unparsable_share"}
    unparsable = metrics[metrics["metric"] == "unparsable_share"]
    assert set(unparsable["judge"]) == {"model", "harm"}
    shares = res.status.set_index("cell_id").loc[cell.cell_id, "judges"]
    assert shares["harm"]["n"] == 2 * len(safety) and shares["harm"]["format"] == "wildguard"
    # judges read whole inputs when they fit eval.max_model_len; cuts are counted per cell
    assert shares["harm"]["input_cut"] == 0 and "judge_input_cut_share" in set(metrics["metric"])
    assert (
        shares["model"]["n"] == 2 * len(non_general) and shares["model"]["model"] == "tiny-falcon"
    )
    cot = res.generations[
        (res.generations["condition"] == "prompt-cot")
        & (res.generations["benchmark"] == "xstest_safe")
    ]
    assert len(cot) == 2 and cot["prompt"].str.contains("step by step").all()
    # each generation records where it was told to stop (docs/RESULTS.md: stop_rule)
    g = res.generations

    def stop_kinds(condition, benchmark):
        rules = g.loc[(g["condition"] == condition) & (g["benchmark"] == benchmark), "stop_rule"]
        return {json.loads(x)["kind"] if x else "" for x in rules}

    assert stop_kinds("none", "xstest_safe") == {"alpaca"} and stop_kinds("none", "mmlu") == {""}
    assert stop_kinds("prompt-cot", "xstest_safe") == {"plain"}  # tiny: no chat template
    assert stop_kinds("prompt-cot", "gsm8k") == {"alpaca"}  # GSM8K keeps its Alpaca shots
    status = res.status.set_index("cell_id").loc[cell.cell_id]
    assert status["engine_check"] == {"base": 1.0, adapter: 1.0}  # each replica checked
    assert status["eval_tokens_per_s"] > 0
    # Each pass (generations and scored choices, every stop rule) went to vLLM in one call;
    # the adapter's pass and the base model's passes ran on the two replicas.
    every = res.status.set_index("cell_id")
    assert set(every["engine_calls"]) == {1}, every["engine_calls"]
    base_replica = every.loc["tiny-llama__base__g0.00__s0", "engine_replica"]
    assert {base_replica, status["engine_replica"]} == {0, 1}
    assert {every.loc[c.cell_id, "engine_replica"] for c in prompting} == {base_replica}


@pytest.mark.slow
def test_cell_fails_when_judge_answers_are_unparsable(ray_local, tiny_llama, tmp_path):
    """A tiny model cannot write WildGuard's answer lines: every harm judgement is unparsable,
    so the cell fails with the judge named and an answer quoted, not a silent empty rate."""
    cfg = small_config(
        "eval.benchmarks=[xstest_unsafe]",
        "eval.sample_size=2",
        "eval.harm_judge={model: tiny-falcon, format: wildguard, max_new_tokens: 4}",
    )
    out = evaluate_base_model(cfg, "tiny-llama", tiny_llama, [], tmp_path, "t")
    ((cid, error),) = out.items()
    assert "harm judge tiny-falcon (format wildguard) could not parse 2 of 2 answers" in error
    assert "Sample answer: '" in error and "eval.judge_max_unparsable=0.02" in error
    status = results.read_status(tmp_path).set_index("cell_id").loc[cid]
    assert status["status"] == "failed" and status["judges"]["harm"]["unparsable_share"] == 1.0


@pytest.mark.slow
def test_falcon_adapters_are_merged_and_checked(ray_local, tiny_falcon, tmp_path):
    from tbr_ray.models import TINY_MODELS

    cfg = small_config("grid.models=[tiny-falcon]", "eval.sample_size=2")
    cell = Cell("tiny-falcon", "none", 0.0, 0)
    adapter = random_adapter(
        tiny_falcon, TINY_MODELS["tiny-falcon"].lora_targets, tmp_path / "adapter", seed=3
    )
    out = evaluate_base_model(cfg, "tiny-falcon", tiny_falcon, [(cell, adapter)], tmp_path, "t")
    assert out[cell.cell_id] == "done"
    status = results.read_status(tmp_path).set_index("cell_id")
    # the merged engine was compared against transformers + PEFT on the unmerged pair
    assert status.loc[cell.cell_id, "engine_check"] == {"base": 1.0}
    assert status.loc[cell.cell_id, "engine_calls"] == 1
    assert not (tmp_path / "scratch" / f"merged-{cell.cell_id}").exists()
