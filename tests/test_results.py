"""The results schema round-trips through Parquet; unfinished cells stay out of the tables."""

import json
from pathlib import Path

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


def test_statuses_include_interrupted_and_refuse_unknown_ones(tmp_path):
    results.write_status(tmp_path, "c1", "interrupted", stage="train", reason="SIGINT received")
    assert results.read_status(tmp_path).set_index("cell_id").loc["c1", "status"] == "interrupted"
    with pytest.raises(ValueError, match="unknown cell status 'paused'; one of running"):
        results.write_status(tmp_path, "c1", "paused")


def test_a_finished_cell_still_names_its_mix(tmp_path):
    """The mix (whose report lists the rows set aside as malformed) outlives the `running`
    write that recorded it; the stage does not."""
    results.write_status(tmp_path, "c1", "running", stage="train", mix="/cache/mixes/m1")
    results.write_status(tmp_path, "c1", "done")
    row = results.read_status(tmp_path).set_index("cell_id").loc["c1"]
    assert row["mix"] == "/cache/mixes/m1" and row["status"] == "done"
    assert "stage" not in row or row.isna()["stage"]


def _cells(tmp_path):
    results.write_status(tmp_path, "c1", "running", stage="train")
    results.write_status(tmp_path, "c2", "done")
    return results.read_status(tmp_path).set_index("cell_id")


def test_cells_of_a_dead_driver_read_as_interrupted(tmp_path):
    """A driver killed with -9 leaves its lock file; the kernel freed the lock itself."""
    import subprocess
    import sys

    code = (
        "import os, sys; from pathlib import Path; from tbr_ray.rundir import run_lock\n"
        "with run_lock(Path(sys.argv[1]), 'ablate'): os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    status = _cells(tmp_path)
    assert status.loc["c1", "status"] == "interrupted" and status.loc["c2", "status"] == "done"
    assert status.loc["c1", "reason"] == "its driver is gone (run lock free)"


def test_cells_of_a_live_driver_or_without_one_stay_running(tmp_path):
    from tbr_ray.rundir import run_lock

    assert _cells(tmp_path).loc["c1", "status"] == "running"  # no driver ever ran here
    with run_lock(tmp_path, "ablate"):
        assert _cells(tmp_path).loc["c1", "status"] == "running"
    assert _cells(tmp_path).loc["c1", "status"] == "interrupted"


def test_progress_round_trips(tmp_path):
    assert results.read_progress(tmp_path, "c1") == {}
    results.write_progress(tmp_path, "c1", {"step": 3, "total_steps": 8, "epoch": 0, "loss": 2.5})
    got = results.read_progress(tmp_path, "c1")
    assert got["step"] == 3 and got["total_steps"] == 8 and got["time"] > 0


WRITER = """
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tbr_ray import results, rundir
from tests.test_results import _rows

prov = results.make_provenance("run-1", "abc123")
tables = []
for n in (2000, 3000):  # two sizes: a reader sees one or the other, never anything else
    gens = _rows(prov, "c1", n)["generations"]
    gens = [{**g, "completion": g["prompt"] * 5000} for g in gens]
    tables.append(results.to_table(gens, results.GENERATIONS))
path = results.cell_dir(sys.argv[1], "c1") / "generations.parquet"
print("ready", flush=True)
i = 0
while True:  # the write itself is nearly all the time: where the kill lands
    rundir.write_atomic(path, lambda p, t=tables[i % 2]: pq.write_table(t, p))
    i += 1
"""


def test_a_writer_killed_mid_write_never_leaves_a_partial_table(tmp_path):
    """A process rewriting a big table is SIGKILLed while readers read it: every read sees a
    whole table, and so does the first read after the kill (the temp file it was writing is
    never read; its name is not the table's)."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parent.parent
    table = results.cell_dir(tmp_path, "c1") / "generations.parquet"
    results.write_status(tmp_path, "c1", "done")
    for _ in range(5):  # until a kill lands mid-write (leaves the writer's temp file)
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], cwd=repo, stdout=subprocess.PIPE
        )
        assert proc.stdout.readline().strip() == b"ready"
        t0, reads = time.time(), 0
        while time.time() - t0 < 1.5 or reads < 3:
            if table.is_file():
                assert len(results.read_results(tmp_path).generations) in (2000, 3000)
                reads += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(results.read_results(tmp_path).generations) in (2000, 3000)
        if list(table.parent.glob(".generations.parquet.*")):
            return
    pytest.fail("no kill landed mid-write in 5 tries")
