"""The grid end to end on the real stack, killed part-way and resumed.

One run of `tbr-ray ablate` (a subprocess, as a user runs it) is killed once the first cell's
adapter is published (a second driver started meanwhile on the same output is refused); the
rerun takes the dead driver's lock over and finishes only the missing work: the finished
adapter is not retrained, and no result row is duplicated."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tbr_ray import results
from tbr_ray.config import load_config

from .conftest import short_temp_dir, stop_ray_under

REPO = Path(__file__).resolve().parent.parent
SETS = [
    "data.n_general=24",
    "data.n_safety=8",
    "train.epochs=1",
    "train.max_steps=3",
    "train.micro_batch_size=4",
    "eval.sample_size=3",
    "eval.max_new_tokens=8",
    "reflection.max_new_tokens=8",
    "grid.models=[tiny-llama]",
    "grid.conditions=[none, internal]",
]


def _ablate(output: Path, ray_tmp: str, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "tbr_ray.cli",
        "ablate",
        "--config",
        "jobs/tiny.yaml",
        "--output",
        str(output),
    ]
    for s in [*SETS, *extra]:
        args += ["--set", s]
    return _popen(args, ray_tmp)


def _popen(args: list[str], ray_tmp: str) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
    )


@pytest.fixture
def ray_tmp():
    """A Ray temp root of this test's own: the drivers it runs start their local Ray there,
    and at the end exactly the processes of that Ray are stopped, never the session's or a
    user's (conftest.stop_ray_under)."""
    root = short_temp_dir("tbr-ray-")
    yield str(root)
    stop_ray_under(root)
    shutil.rmtree(root, ignore_errors=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    t0 = time.time()
    while not path.is_file():
        if proc.poll() is not None:
            pytest.fail(f"ablate exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if time.time() - t0 > timeout_s:
            pytest.fail(f"{path} did not appear within {timeout_s}s")
        time.sleep(2)


def test_dry_run_prints_the_paper_grid():
    from tbr_ray.plan import format_plan, plan_grid

    table = format_plan(plan_grid(load_config(REPO / "jobs" / "paper.yaml"), 8))
    assert "45 cells" in table and "GPU-hours" in table and "makespan" in table
    assert table.count("llama-2-70b__") == 3


def test_concurrency_comes_from_the_cluster_or_the_config(ray_local):
    """2 CPUs, cells of 2 workers x 0.5 CPU: one at a time; 0.25 CPU workers: three side by
    side; on GPUs with none here: one; grid.max_concurrent overrides all of it."""
    from tbr_ray.grid import max_concurrent_cells, plan_cells

    def cells_at_once(path, *sets):
        cfg = load_config(REPO / "jobs" / path, list(sets))
        return max_concurrent_cells(cfg, plan_cells(cfg))

    assert cells_at_once("tiny.yaml") == 1
    assert cells_at_once("tiny.yaml", "train.cpus_per_worker=0.25") == 3
    assert cells_at_once("paper.yaml") == 1
    assert cells_at_once("tiny.yaml", "grid.max_concurrent=4") == 4


def test_judging_is_a_job_of_its_own_after_the_generations(ray_local, tmp_path, monkeypatch):
    """Issue 20 point 7d: a base model's generations hold its engines (`eval_need`: replicas x
    its engine size); when they end those are released and its judging is a job of its own
    holding the judge's engine (`judge_need`), not the model's reservation. CPU bundles:
    half a CPU per engine worker, tiny-falcon's judge engine 2 workers, tiny-llama's 1."""
    from tbr_ray import grid

    from .conftest import small_config

    cfg = small_config(
        "grid.conditions=[none, prompt-direct]",
        "cluster.engine_gpus={tiny-llama: 1, tiny-falcon: 2}",
        "cluster.max_engine_replicas=4",
        "eval.judges=[paper-keywords, model]",
        "eval.refusal_judge={model: tiny-falcon, format: three-class}",
    )
    cells = [c for c in cfg.cells() if c.condition == "prompt-direct"]  # trains nothing
    assert grid.eval_units(cfg, "tiny-llama", cfg.cells()) == 2  # the adapter; base + prompt
    assert grid.eval_need(cfg, "tiny-llama", cfg.cells()) == 2 * 0.5  # 2 replicas x 1 worker
    assert grid.judge_need(cfg) == 1.0 and grid.judge_need(small_config()) == 0.0
    launched = []
    generated = {"generated": "the generations"}
    monkeypatch.setattr(
        grid, "_launch_eval", lambda job, st: launched.append(job) or ray_put(generated)
    )
    monkeypatch.setattr(
        grid, "_launch_judge", lambda gen, st: launched.append(gen) or ray_put({"c": "done"})
    )
    state = grid._Pipeline(cfg, cells, {"tiny-llama": "unused"}, tmp_path)
    state.metrics = grid.GridMetrics("t")
    state.schedule()
    assert [(j.kind, j.need) for j, _ in state.evals.values()] == [("eval", 0.5)]
    state.poll(timeout=30)
    assert not state.evals and [(j.kind, j.need) for j, _, _ in state.judging] == [("judge", 1.0)]
    assert sum(j.need for j in state._busy()) == 0  # the model's engines are released
    state.schedule()
    assert [(j.kind, j.need) for j, _ in state.evals.values()] == [("judge", 1.0)]
    assert launched[1] == generated and not state.judging
    state.poll(timeout=30)
    assert not state.evals and not state.waiting


def ray_put(value):
    import ray

    return ray.put(value)


@pytest.mark.slow
def test_killed_grid_resumes_without_redoing_or_duplicating(tmp_path, ray_tmp):
    out = tmp_path / "run"
    first = out / "adapters" / "tiny-llama__none__g0.00__s0" / "train_result.json"
    proc = _ablate(out, ray_tmp)
    _wait_for(first, proc, timeout_s=600)
    # A second driver on the same output (e.g. a resubmitted job) is refused, naming the first.
    second = _ablate(out, ray_tmp)
    log, _ = second.communicate(timeout=300)
    assert second.returncode == 2 and f"is in use by pid {proc.pid}" in log, log[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    stop_ray_under(Path(ray_tmp))  # what outlived its process group (Ray's own daemons)
    mtime = first.stat().st_mtime
    assert not results.is_done(out, "tiny-llama__internal__g1.00__s0")

    proc = _ablate(out, ray_tmp)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    assert first.stat().st_mtime == mtime, "a finished adapter was trained again"
    status = results.read_status(out).set_index("cell_id")["status"].to_dict()
    assert status == {
        "tiny-llama__base__g0.00__s0": "done",
        "tiny-llama__none__g0.00__s0": "done",
        "tiny-llama__internal__g1.00__s0": "done",
    }
    res = results.read_results(out)
    keys = ["cell_id", "benchmark", "prompt_id"]
    assert not res.generations.duplicated(keys).any()
    assert not res.judgements.duplicated(keys + ["judge"]).any()
    assert len(res.generations) == 3 * 2 * 3  # cells x benchmarks x prompts
    assert res.generations["git_sha"].notna().all()
    # A third run with everything finished does nothing and says so.
    proc = _ablate(out, ray_tmp)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "2/2 cells done" in log


@pytest.mark.slow
def test_sigint_during_training_skips_evaluation_and_the_rerun_resumes(tmp_path, ray_tmp):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once the cell has
    checkpointed: exit 130, the cell marked interrupted, no evaluation started, the resume
    command printed; that command finishes the run, resuming training from the checkpoint."""
    import shlex

    out = tmp_path / "run"
    extra = ["grid.conditions=[none]", "train.epochs=5", "train.max_steps=20"]
    extra.append("train.checkpoint_every_steps=1")
    proc = _ablate(out, ray_tmp, *extra)
    t0 = time.time()
    while len(list(out.glob("ray_train/train-*/checkpoint_*"))) < 2:
        if proc.poll() is not None or time.time() - t0 > 600:
            pytest.fail(f"no checkpoint before the end ({proc.poll()}):\n{proc.stdout.read()}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    print(f"interrupted run printed:\n{log}")
    stop_ray_under(Path(ray_tmp))
    cell, base = "tiny-llama__none__g0.00__s0", "tiny-llama__base__g0.00__s0"
    assert proc.returncode == 130, log[-4000:]
    row = results.read_status(out).set_index("cell_id").loc[cell]
    assert (row["status"], row["stage"]) == ("interrupted", "train")
    assert not (out / "cells" / base).exists(), "evaluation started after Ctrl-C"
    assert not list(out.glob("cells/*/generations.parquet"))
    (resume,) = [line for line in log.splitlines() if line.startswith("resume with: ")]
    args = shlex.split(resume.removeprefix("resume with: "))
    assert args[:2] == ["tbr-ray", "ablate"] and str(out) in args

    proc = _popen([sys.executable, "-m", "tbr_ray.cli", *args[1:]], ray_tmp)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    status = results.read_status(out).set_index("cell_id")["status"].to_dict()
    assert status == {cell: "done", base: "done"}
    info = json.loads((out / "adapters" / cell / "train_result.json").read_text())
    assert f"next: tbr-ray report {out}" in log
    (resumed,) = info["resumes"]
    # the last checkpoint Ray Train had registered (a later one may still have been uploading)
    assert resumed["from_step"] >= 1 and info["step"] == 20
    assert f"next: tbr-ray report {out}" in log
    print(f"rerun printed {len(log.splitlines())} lines:\n{log}")


def test_the_scheduler_puts_ready_evaluations_before_new_cells():
    """pick_jobs: ready evaluations first, then cells in grid order within the free resource
    and the training slots; nothing overtakes a job that does not fit."""
    from tbr_ray.grid import Job, pick_jobs

    ev_a, ev_b = Job("eval", "a", 0.5), Job("eval", "b", 4.0)
    c1, c2, c3 = Job("train", "c1", 1.01), Job("train", "c2", 0.3), Job("train", "c3", 0.3)
    # The CPU box: an engine (0.5) fits beside one cell (1.01) in 1.9 CPUs.
    assert pick_jobs([ev_a], [c1, c2], free=1.9, train_slots=1) == [ev_a, c1]
    assert pick_jobs([], [c1, c2, c3], free=1.9, train_slots=3) == [c1, c2, c3]
    assert pick_jobs([], [c1, c2, c3], free=1.9, train_slots=2) == [c1, c2]
    # A cell that does not fit is not overtaken by smaller cells behind it.
    assert pick_jobs([], [c1, c2], free=1.0, train_slots=2) == []
    # A ready evaluation that does not fit holds back new cells, so the resource drains to it.
    assert pick_jobs([ev_b, ev_a], [c2], free=2.0, train_slots=1) == []
    assert pick_jobs([ev_a, ev_b], [c2], free=2.0, train_slots=1) == [ev_a]


def test_phase_times_survive_status_writes(tmp_path):
    results.write_status(tmp_path, "m__none__g0.00__s0", "running", stage="train")
    results.record_phase(tmp_path, "m__none__g0.00__s0", "train", 10.0, 20.0)
    results.write_status(tmp_path, "m__none__g0.00__s0", "done", stage="eval")
    results.record_phase(tmp_path, "m__none__g0.00__s0", "eval", 21.0, 30.0)
    row = results.read_status(tmp_path).iloc[0]
    assert row["status"] == "done" and row["stage"] == "eval"
    assert row["phases"] == {
        "train": {"start": 10.0, "end": 20.0},
        "eval": {"start": 21.0, "end": 30.0},
    }


def test_what_tune_pickles_of_the_pipeline_holds_no_live_state(tmp_path):
    """Tune pickles its callbacks, searcher and stopper into tuner.pkl. Pickled, they must
    drop the live pipeline (object refs, saved signal handlers): in the full suite an actor
    handle of an earlier Ray session reachable from there aborted the driver."""
    import ray.cloudpickle as pickle

    from tbr_ray.grid import _tune_classes
    from tbr_ray.interrupt import RunInterrupt

    class Live:
        def __reduce__(self):
            raise AssertionError("live pipeline state was pickled")

    cell_queue, callback = _tune_classes()
    with RunInterrupt(tmp_path) as stop:
        stopper = stop.stopper()
        for part in (cell_queue(Live()), callback(Live()), stopper):
            assert pickle.loads(pickle.dumps(part)) is not None
        assert stopper.stop_all() is False
