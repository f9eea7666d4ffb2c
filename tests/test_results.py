"""The results schema round-trips through Parquet; unfinished cells stay out of the tables."""

import json

import pyarrow.parquet as pq
import pytest

from tbr_ray import results


def _rows(prov, cell_id, n=3):
    common = {
        **prov.columns(),
        "cell_id": cell_id,
        "model": "tiny-llama",
        "condition": "none",
        "gamma": 0.0,
        "seed": 0,
    }
    gens = [
        {
            **common,
            "benchmark": "xstest_safe",
            "benchmark_version": "xstest_safe/1",
            "benchmark_kind": "false_refusal",
            "category": "homonyms",
            "prompt_id": str(i),
            "prompt": f"p{i}",
            "stop_rule": "",
            "completion": "I'm sorry" if i else "Sure",
            "n_new_tokens": 2,
            "reference": None,
            "correct": None,
        }
        for i in range(n)
    ]
    judg = [
        {
            **common,
            "benchmark": "xstest_safe",
            "prompt_id": str(i),
            "judge": "paper-keywords",
            "label": "full_refusal" if i else "full_compliance",
            "refused": bool(i),
            "harmful": None,
        }
        for i in range(n)
    ]
    met = [
        {
            **common,
            "benchmark": "xstest_safe",
            "benchmark_version": "xstest_safe/1",
            "benchmark_kind": "false_refusal",
            "judge": "paper-keywords",
            "metric": "compliance_rate",
            "value": 1 / n,
            "n": n,
        }
    ]
    return {"generations": gens, "judgements": judg, "metrics": met}


def test_round_trip_keeps_schema_and_values(tmp_path):
    prov = results.make_provenance("run-1", "abc123")
    results.write_cell_tables(tmp_path, "c1", _rows(prov, "c1"))
    results.write_status(tmp_path, "c1", "done")
    for name, schema in results.TABLES.items():
        assert pq.read_schema(tmp_path / "cells" / "c1" / f"{name}.parquet").equals(
            schema, check_metadata=False
        )
    res = results.read_results(tmp_path)
    stored = res.judgements[res.judgements["judge"] != "paper-reviewed"]
    assert len(res.generations) == 3 and stored["refused"].tolist() == [False, True, True]
    # no human labels yet: the paper's combined judge is the keyword rule, row for row
    reviewed = res.judgements[res.judgements["judge"] == "paper-reviewed"]
    keywords = stored[stored["judge"] == "paper-keywords"]
    assert reviewed["refused"].tolist() == keywords["refused"].tolist() and res.reviews.empty
    row = res.metrics.iloc[0]
    assert row["run_id"] == "run-1" and row["config_hash"] == "abc123"
    assert json.loads(row["package_versions"])["torch"].startswith("2.13")
    assert row["git_sha"] and row["schema_version"] == results.SCHEMA_VERSION


def test_missing_column_is_an_error():
    with pytest.raises(ValueError, match="lack columns"):
        results.to_table([{"run_id": "x"}], results.METRICS)


def test_unfinished_cells_are_reported_not_mixed_in(tmp_path):
    prov = results.make_provenance("run-1", "abc123")
    for cid in ("done", "failed", "running"):
        results.write_cell_tables(tmp_path, cid, _rows(prov, cid))
    results.write_status(tmp_path, "done", "done")
    results.write_status(tmp_path, "failed", "failed", error="boom")
    results.write_status(tmp_path, "running", "running")
    (tmp_path / "cells" / "orphan").mkdir()
    res = results.read_results(tmp_path)
    assert set(res.metrics["cell_id"]) == {"done"}
    states = dict(zip(res.status["cell_id"], res.status["status"], strict=True))
    assert states == {
        "done": "done",
        "failed": "failed",
        "running": "running",
        "orphan": "incomplete",
    }
    with pytest.raises(ValueError):
        results.write_status(tmp_path, "x", "finished")
