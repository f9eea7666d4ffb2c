"""One writer per place: the run lock (real processes), atomic mix publishing, unique cell ids,
the config check of every writing command, and `tbr-ray status`. Fast, no Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tbr_ray import results
from tbr_ray.cli import app
from tbr_ray.config import Cell, ConfigError, DataConfig
from tbr_ray.rundir import LOCK_NAME, publish_dir, read_holder, run_lock

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
needs_data = pytest.mark.skipif(
    not DataConfig().resolved_root().is_dir(), reason="needs the shared data (preflight runs first)"
)
HOLDER = """
import sys, time
from pathlib import Path
from tbr_ray.rundir import run_lock
with run_lock(Path(sys.argv[1]), "ablate"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(output: Path) -> subprocess.Popen:
    """Another driver: a real process holding the lock on `output`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_driver_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(ConfigError) as err, run_lock(tmp_path, "ablate"):
            pass
        msg = str(err.value)
        assert f"pid {proc.pid} on {os.uname().nodename}" in msg and "`tbr-ray ablate`" in msg
        assert "Fix:" in msg
        assert read_holder(tmp_path)["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_driver_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)  # no clean-up runs: the lock file stays behind
    proc.wait()
    assert (tmp_path / LOCK_NAME).read_text()  # the dead holder's details are still there
    with run_lock(tmp_path, "cell") as me:
        assert me["pid"] == os.getpid()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "cell"
    assert read_holder(tmp_path) is None


@needs_data
def test_cell_on_a_locked_output_exits_2_before_ray(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        t0 = time.time()
        out = runner.invoke(
            app, ["cell", "-c", str(REPO / "jobs/tiny.yaml"), "-o", str(tmp_path / "run")]
        )
        assert out.exit_code == 2 and f"pid {proc.pid}" in out.output, out.output
        assert time.time() - t0 < 30
    finally:
        proc.kill()
        proc.wait()


@needs_data
def test_train_and_eval_refuse_another_configs_run(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "other-1", "config_hash": "abc"}))
    for command in ("train", "eval"):
        out = runner.invoke(app, [command, "-c", str(REPO / "jobs/tiny.yaml"), "-o", str(tmp_path)])
        assert out.exit_code == 2 and "holds run other-1 (config hash abc)" in out.output, (
            out.output
        )


def test_cell_ids_differ_for_paths_with_the_same_base_name():
    a, b = Cell("/ckpt1/hf", "none", 0.0, 0), Cell("/ckpt2/hf", "none", 0.0, 0)
    assert a.cell_id != b.cell_id
    assert a.cell_id.startswith("hf-") and a.cell_id.endswith("__none__g0.00__s0")
    assert Cell("tiny-llama", "none", 0.0, 0).cell_id == "tiny-llama__none__g0.00__s0"


def test_publish_keeps_the_first_complete_mix(tmp_path):
    out = tmp_path / "mixes" / "k"
    first, second = tmp_path / "mixes" / ".k.tmp-1", tmp_path / "mixes" / ".k.tmp-2"
    for d, tag in ((first, "first"), (second, "second")):
        d.mkdir(parents=True)
        (d / "report.json").write_text(tag)
    publish_dir(first, out, keep="report.json")
    publish_dir(second, out, keep="report.json")  # a builder of the same key finished later
    assert (out / "report.json").read_text() == "first" and not second.exists()


def test_publish_replaces_a_partial_folder(tmp_path):
    out, tmp = tmp_path / "k", tmp_path / ".k.tmp"
    (out / "shards").mkdir(parents=True)  # a killed writer's leftover: no report.json
    tmp.mkdir()
    (tmp / "report.json").write_text("{}")
    publish_dir(tmp, out, keep="report.json")
    assert (out / "report.json").is_file() and not (out / "shards").exists()


def test_status_shows_states_times_and_the_full_error_file(tmp_path):
    results.write_status(tmp_path, "m__none__g0.00__s0", "running", stage="train")
    results.write_status(tmp_path, "m__none__g0.00__s0", "done", stage="eval")
    results.write_status(tmp_path, "m__internal__g1.00__s0", "running", stage="data")
    tb = "Traceback (most recent call last):\n  ...\nValueError: boom deep inside\n"
    results.write_status(
        tmp_path,
        "m__internal__g1.00__s0",
        "failed",
        stage="train",
        error="ValueError: boom",
        traceback=tb,
    )
    results.write_status(tmp_path, "m__external__g1.00__s0", "running", stage="train")
    error_file = results.cell_dir(tmp_path, "m__internal__g1.00__s0") / "error.txt"
    assert error_file.read_text() == tb
    out = runner.invoke(app, ["status", str(tmp_path)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert (
        "driver: none (not running)" in out.output and "1 done, 1 failed, 1 running" in out.output
    )
    failed = next(i for i, x in enumerate(lines) if x.startswith("m__internal"))
    assert "failed" in lines[failed] and "train" in lines[failed] and "UTC" in lines[failed]
    assert f"full error: {error_file}" in out.output
    assert "running" in next(x for x in lines if x.startswith("m__external"))


def test_status_names_the_driver_holding_the_run(tmp_path):
    results.write_status(tmp_path, "c", "running", stage="train")
    proc = _holder(tmp_path)
    try:
        out = runner.invoke(app, ["status", str(tmp_path)])
        assert f"driver: pid {proc.pid}" in out.output, out.output
    finally:
        proc.kill()
        proc.wait()
    assert runner.invoke(app, ["status", str(tmp_path / "nothing")]).exit_code == 2


def test_started_is_kept_across_stages_of_one_attempt(tmp_path):
    results.write_status(tmp_path, "c", "running", stage="data")
    first = json.loads((results.cell_dir(tmp_path, "c") / "status.json").read_text())["started"]
    time.sleep(0.01)
    results.write_status(tmp_path, "c", "running", stage="train")
    results.write_status(tmp_path, "c", "failed", stage="train", error="x")
    assert results.read_status(tmp_path)["started"].iloc[0] == first
    time.sleep(0.01)
    results.write_status(tmp_path, "c", "running", stage="data")  # a new attempt
    assert results.read_status(tmp_path)["started"].iloc[0] > first
