"""The grid end to end on the real stack: one run folder of `tbr-ray ablate` (a subprocess,
as a user runs it) meets issue 15's run faults in turn (malformed data rows, a second
driver, a killed driver, Ctrl-C), so the suite pays for one tiny grid, not three
(`scenario`, built once for this module):

1. The first driver reads a data root whose HH-RLHF file opens with malformed rows; a second
   driver started meanwhile on the same output is refused, naming the first; the first is
   killed (SIGKILL to its process group) once the first cell's adapter is published.
2. The rerun takes the dead driver's lock over and trains the second cell; Ctrl-C (SIGINT to
   the process group) once that cell has checkpointed: exit 130, no evaluation started.
3. The resume command it printed finishes the run, training resumed from the checkpoint: the
   finished adapter is not retrained, no result row is duplicated, the malformed rows are
   listed in the mixes' reports. A last run, with everything finished, does nothing.

Other faults of issue 15 live beside the code they test: SIGINT outside Tune
(tests/test_interrupt.py), a killed writer (tests/test_results.py, tests/test_rundir.py).

    .venv/bin/pytest tests/test_grid.py -k "killed or sigint or malformed"   # ~5 min, 2 cores
"""

import gzip
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tbr_ray import results
from tbr_ray.config import DataConfig, load_config

from .conftest import short_temp_dir, stop_ray_under
from .test_data import BROKEN_HH_LINES, write_hh

REPO = Path(__file__).resolve().parent.parent
DATA = DataConfig().resolved_root()
CELL1 = "tiny-llama__none__g0.00__s0"  # trained by the first driver, which is then killed
CELL2 = "tiny-llama__internal__g1.00__s0"  # trained by the rerun, which Ctrl-C stops
BASE = "tiny-llama__base__g0.00__s0"
SETS = [
    "data.n_general=24",
    "data.n_safety=8",
    "data.safety_source=hh-rlhf-harmless",  # the source whose file gets malformed rows
    "train.epochs=2",
    "train.max_steps=8",
    "train.checkpoint_every_steps=2",  # 4 steps an epoch: a checkpoint mid-epoch
    "train.micro_batch_size=4",
    "eval.sample_size=3",
    "eval.max_new_tokens=8",
    "reflection.max_new_tokens=8",
    "grid.models=[tiny-llama]",
    "grid.conditions=[none, internal]",
]


class Drivers:
    """Starts `tbr-ray ablate` drivers (subprocesses, each its own process group) whose local
    Ray lives under one temp root of this module's own; `stop_ray` ends exactly that Ray's
    processes, never the session's or a user's (conftest.stop_ray_under), and `close` also
    ends any driver still running (a failed wait leaves none behind)."""

    def __init__(self):
        self.root = short_temp_dir("tbr-ray-")
        self.procs: list[subprocess.Popen] = []

    def ablate(self, output: Path, *extra: str) -> subprocess.Popen:
        args = ["ablate", "--config", "jobs/tiny.yaml", "--output", str(output)]
        return self.start([*args, *(a for s in [*SETS, *extra] for a in ("--set", s))])

    def start(self, cli_args: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tbr_ray.cli", *cli_args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, "RAY_TMPDIR": str(self.root)},
        )
        self.procs.append(proc)
        return proc

    def stop_ray(self) -> None:
        stop_ray_under(self.root)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.stop_ray()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def drivers():
    started = Drivers()
    yield started
    started.close()


def _wait_for(done, proc: subprocess.Popen, what: str, timeout_s: float, poll_s=0.2) -> None:
    """Poll `done()` until true; fail if `proc` exits first or `timeout_s` passes."""
    t0 = time.time()
    while not done():
        if proc.poll() is not None:
            pytest.fail(f"ablate exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout_s:
            pytest.fail(f"no {what} within {timeout_s}s")
        time.sleep(poll_s)


def _data_root_with_broken_rows(tmp_path: Path, data_root: Path) -> Path:
    """The shared data root, but HH-RLHF's file opens with one malformed line of each kind
    (`BROKEN_HH_LINES`: bad JSON, missing field, wrong type, empty text, ...); the rest are
    links to the shared files (the Alpaca files unchanged, so the cached tiny model serves)."""
    root = tmp_path / "data"
    root.mkdir()
    for entry in data_root.iterdir():
        if entry.name != "hh-rlhf":
            (root / entry.name).symlink_to(entry)
    with gzip.open(data_root / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", "rt") as fh:
        shipped = fh.read().splitlines()
    write_hh(root, [line for line, _ in BROKEN_HH_LINES] + shipped)
    return root


def _fresh_cache(tmp_path: Path, cache_dir: Path) -> Path:
    """A cache of its own, so the run's mixes are the only ones in it; the built models shared."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir / "models")
    return cache


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, drivers, data_root, cache_dir, tiny_llama) -> dict:
    """The module docstring's three stages on one run folder; returns what each stage saw at
    the time (exit codes, logs, states), for the tests below to check."""
    if not DATA.is_dir():
        pytest.skip(f"needs the shared data at {DATA}")
    tmp = tmp_path_factory.mktemp("grid")
    cache = _fresh_cache(tmp, cache_dir)
    sets = [f"data.root={_data_root_with_broken_rows(tmp, data_root)}", f"paths.cache_dir={cache}"]
    seen = {"out": tmp / "run", "cache": cache}
    seen |= _killed_driver(drivers, seen["out"], sets)
    seen |= _interrupted_rerun(drivers, seen["out"], sets)
    seen |= _resumed_runs(drivers, seen["out"], sets, seen["resume"])
    return seen


def _killed_driver(drivers: Drivers, out: Path, sets: list[str]) -> dict:
    """Stage 1: while the first driver holds the run lock a second is refused; the first is
    SIGKILLed (with everything it started) as soon as CELL1's adapter is published."""
    proc = drivers.ablate(out, *sets)
    _wait_for((out / "run.json").is_file, proc, "run.json (the run lock held)", 300)
    second = drivers.ablate(out, *sets)  # e.g. a resubmitted job
    refused, _ = second.communicate(timeout=300)
    first = out / "adapters" / CELL1 / "train_result.json"
    _wait_for(first.is_file, proc, f"{first}", 600)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    drivers.stop_ray()  # what outlived its process group (Ray's own daemons)
    return {
        "first_pid": proc.pid,
        "refused": (second.returncode, refused),
        "first_mtime": first.stat().st_mtime,
        "cell2_done_when_killed": results.is_done(out, CELL2),
    }


def _interrupted_rerun(drivers: Drivers, out: Path, sets: list[str]) -> dict:
    """Stage 2: the rerun trains CELL2; SIGINT to its process group (as a terminal's Ctrl-C)
    once Ray Train has registered a checkpoint of CELL2 (its checkpoint folder and the
    manager's snapshot, which lists it, exist; the first driver died before CELL2's workers
    started, so it is this run's: at step 2 of 8, mid-epoch)."""
    proc = drivers.ablate(out, *sets)
    folder = out / "ray_train" / f"train-{CELL2}"
    _wait_for(lambda: _registered(folder), proc, f"registered checkpoint in {folder}", 600)
    os.killpg(proc.pid, signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    print(f"interrupted run printed:\n{log}")
    drivers.stop_ray()
    row = results.read_status(out).set_index("cell_id").loc[CELL2]
    return {
        "interrupted": (proc.returncode, log),
        "cell2_when_interrupted": (row["status"], row["stage"]),
        "base_cell_when_interrupted": (out / "cells" / BASE).exists(),
        "generations_when_interrupted": list(out.glob("cells/*/generations.parquet")),
        "resume": [line for line in log.splitlines() if line.startswith("resume with: ")],
    }


def _registered(folder: Path) -> bool:
    """Ray Train has registered a checkpoint in `folder` (a cell's ray_train/train-<cell>)."""
    snapshot = folder / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and any(p.is_dir() for p in folder.glob("checkpoint_*"))


def _resumed_runs(drivers: Drivers, out: Path, sets: list[str], resume: list[str]) -> dict:
    """Stage 3: the printed resume command, run as printed, twice: it finishes the run, then
    finds nothing left to do. (Without exactly one such line, which the Ctrl-C test fails on,
    the first driver's command stands in, so the other tests still check their own part.)"""
    args = shlex.split(resume[0].removeprefix("resume with: ")) if len(resume) == 1 else None
    seen = {"resume_args": args}
    for name in ("finished", "rerun_when_finished"):
        proc = drivers.start(args[1:]) if args else drivers.ablate(out, *sets)
        log, _ = proc.communicate(timeout=900)
        print(f"{name} run printed {len(log.splitlines())} lines:\n{log}")
        seen[name] = (proc.returncode, log)
    return seen


def test_dry_run_prints_the_paper_grid():
    from tbr_ray.plan import format_plan, plan_grid

    table = format_plan(plan_grid(load_config(REPO / "jobs" / "paper.yaml"), 8))
    assert "45 cells" in table and "GPU-hours" in table and "makespan" in table
    assert table.count("llama-2-70b__") == 3


def test_judging_is_a_job_of_its_own_after_the_generations(tmp_path):
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
    state = grid._Pipeline(cfg, cells, {"tiny-llama": "unused"}, tmp_path)
    state.metrics = _NoMetrics()
    state.capacity = grid.Capacity(cfg, read=lambda: 1.9, ask=lambda bundles: None)
    state.launch = lambda job, _: "generations"
    state.launch_judge = lambda generated, _: f"judging {generated['generated']}"
    state.schedule()
    assert [(j.kind, j.devices) for j, _ in state.evals.values()] == [("eval", 0.5)]
    state.eval_ended("generations", {"generated": "tiny-llama"})
    assert not state.evals and [(j.kind, j.devices) for j, _, _ in state.judging] == [
        ("judge", 1.0)
    ]
    assert sum(j.devices for j in state._busy()) == 0  # the model's engines are released
    state.schedule()
    assert {r: j.devices for r, (j, _) in state.evals.items()} == {"judging tiny-llama": 1.0}
    assert not state.judging
    state.eval_ended("judging tiny-llama", {"tiny-llama__prompt-direct__g0.00__s0": "done"})
    assert not state.evals and not state.waiting and not state.judging


@pytest.mark.slow
def test_killed_grid_resumes_without_redoing_or_duplicating(scenario):
    """A second driver on the same output is refused, naming the first; the reruns after the
    first was killed take its lock over and finish only the missing work: the finished
    adapter is not trained again, no result row is duplicated, and a run with everything
    finished does nothing and says so."""
    out = scenario["out"]
    code, log = scenario["refused"]
    assert code == 2 and f"is in use by pid {scenario['first_pid']}" in log, log[-2000:]
    assert not scenario["cell2_done_when_killed"]
    code, log = scenario["finished"]
    assert code == 0, log[-4000:]
    first = out / "adapters" / CELL1 / "train_result.json"
    assert first.stat().st_mtime == scenario["first_mtime"], "a finished adapter was trained again"
    status = results.read_status(out).set_index("cell_id")["status"].to_dict()
    assert status == {BASE: "done", CELL1: "done", CELL2: "done"}
    res = results.read_results(out)
    keys = ["cell_id", "benchmark", "prompt_id"]
    assert not res.generations.duplicated(keys).any()
    assert not res.judgements.duplicated(keys + ["judge"]).any()
    assert len(res.generations) == 3 * 2 * 3  # cells x benchmarks x prompts
    assert res.generations["git_sha"].notna().all()
    code, log = scenario["rerun_when_finished"]
    assert code == 0 and "2/2 cells done" in log, log[-4000:]


@pytest.mark.slow
def test_sigint_during_training_skips_evaluation_and_the_rerun_resumes(scenario):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once the cell has
    checkpointed: exit 130, the cell marked interrupted, no evaluation started, the resume
    command printed; that command finishes the run, resuming training from the checkpoint."""
    out = scenario["out"]
    code, log = scenario["interrupted"]
    assert code == 130, log[-4000:]
    assert scenario["cell2_when_interrupted"] == ("interrupted", "train")
    assert not scenario["base_cell_when_interrupted"], "evaluation started after Ctrl-C"
    assert not scenario["generations_when_interrupted"]
    args = scenario["resume_args"]
    assert args, f"no single `resume with:` line: {scenario['resume']}\n{log[-4000:]}"
    assert args[:2] == ["tbr-ray", "ablate"] and str(out) in args

    code, log = scenario["finished"]
    assert code == 0, log[-4000:]
    status = results.read_status(out).set_index("cell_id")["status"].to_dict()
    assert status[CELL2] == "done" and status[BASE] == "done"
    info = json.loads((out / "adapters" / CELL2 / "train_result.json").read_text())
    assert f"next: tbr-ray report {out}" in log
    (resumed,) = info["resumes"]
    # the last checkpoint Ray Train had registered (a later one may still have been uploading)
    assert resumed["from_step"] >= 1 and info["step"] == 8


@pytest.mark.slow
def test_malformed_data_rows_are_quarantined_with_reasons_and_the_run_completes(scenario):
    """Issue 15: the run read an HH-RLHF file opening with malformed rows and still finished;
    each mix (one per trained cell) lists every set-aside row with its file row and reason,
    and is whole (good rows took the broken ones' place)."""
    code, log = scenario["finished"]
    assert code == 0, log[-4000:]
    status = results.read_status(scenario["out"]).set_index("cell_id")["status"]
    assert status[CELL1] == status[CELL2] == "done"
    reports = [json.loads(p.read_text()) for p in scenario["cache"].glob("mixes/*/report.json")]
    assert len(reports) == 2, reports
    for report in reports:
        assert report["n_skipped"] == len(BROKEN_HH_LINES)
        assert [(s["source_id"], s["reason"]) for s in report["skipped"]] == [
            (f"hh-rlhf-harmless:{i}", reason) for i, (_, reason) in enumerate(BROKEN_HH_LINES)
        ]
        assert report["n_safety"] == 8


def test_the_policy_counts_devices_and_puts_big_jobs_first():
    """tbr_ray.plan.policy.pick: slots are devices (no count of training slots); ready
    evaluations first, then cells, bigger first, grid order among equals; nothing overtakes
    a job that does not fit; grid.max_concurrent caps the cells."""
    from tbr_ray.grid import Job
    from tbr_ray.plan.policy import overflow, pick

    ev_a, ev_b = Job("eval", "a", 1.0), Job("eval", "b", 4.0)
    small = [Job("train", f"s{i}", 1.0) for i in range(3)]
    big = Job("train", "big", 4.0)
    # 8 GPUs: the 4-GPU cell first, then the 1-GPU cells beside it (not one cell at a time).
    assert pick([*small, big], free=8.0) == [big, *small]
    assert pick([*small, big], free=8.0, max_train=2) == [big, small[0]]
    assert pick([*small, big], free=8.0, training=1, max_train=2) == [big]
    # Ready evaluations before cells, the bigger first; one that does not fit holds back
    # everything behind it, so the GPUs drain to it.
    assert pick([ev_a, *small, ev_b], free=8.0) == [ev_b, ev_a, *small[:3]]
    assert pick([ev_a, small[0], ev_b], free=3.0) == []
    assert pick([small[0], small[1]], free=1.5) == [small[0]]
    # The CPU box: an engine (0.5) fits beside one cell (1.01) in 1.9 CPUs, a second cell not.
    c1, c2, ev = Job("train", "c1", 1.01), Job("train", "c2", 1.01), Job("eval", "m", 0.5)
    assert pick([c1, c2, ev], free=1.9) == [ev, c1]
    # Nothing running and nothing fits (an autoscaling cluster still without GPU workers):
    # the first job alone, for Ray to hold until the cluster grows.
    assert pick([small[0], big], free=0.0) == []
    assert overflow([small[0], big], running=0) == [big]
    assert overflow([small[0], big], running=1) == []


class _NoMetrics:
    """The dashboard gauges' calls, ignored (the scheduler under test does not need Ray)."""

    def record_status(self, output):
        pass

    def record_eval(self, output):
        pass


def _runtime_order(cfg, output, seconds: dict[str, float], capacity: float):
    """The runtime's scheduler (`_Pipeline`, as `pipeline_phase` drives it from Tune's loop)
    on a fake cluster of `capacity` GPUs and a fake clock: trials start as Tune asks
    `CellQueue` for them, and the job that ends first (by `seconds`) ends next. Returns
    (job name, start s) in start order, and what was asked of the autoscaler."""
    from tbr_ray.grid import Capacity, _Pipeline

    asked = []
    state = _Pipeline(cfg, cfg.cells(), {}, output)
    state.metrics = _NoMetrics()
    state.capacity = Capacity(cfg, read=lambda: capacity, ask=asked.append)
    state.launch = lambda job, _: f"eval {job.key}"
    state.launch_judge = lambda generated, _: f"judge {generated['generated']}"
    now, ends, order = 0.0, {}, []
    while (
        state.queued
        or state.admitted
        or state.training
        or state.waiting
        or state.judging
        or state.evals
    ):
        before = set(state.evals)
        state.schedule()
        order += [(ref, now) for ref in state.evals if ref not in before]
        while (trial := f"train {state.admitted[0].key}" if state.admitted else None) and (
            state.trial_started(trial)
        ):
            order.append((trial, now))
        for name, _ in order:
            ends.setdefault(name, now + seconds[name])
        name = min((n for n in [*state.training, *state.evals]), key=lambda n: ends[n])
        now = ends[name]
        if name in state.training:
            state.trial_ended(name, {"trained": 1})
        elif name.startswith("eval "):  # its generations: then its judging, a job of its own
            state.eval_ended(name, {"generated": name.split(" ", 1)[1]})
        else:
            state.eval_ended(name, {})
    return order, asked


def test_the_run_schedules_as_the_plan_simulates(tmp_path):
    """One policy, planned and run: on the same fake 8-GPU cluster the runtime's scheduler
    (driven by the planner's job times) starts the same jobs in the same order at the same
    times as the dry run's simulation (training, each model's generations, then its judging);
    the 70B cells go first and fill the cluster; the autoscaler is asked for the bundles of
    what runs."""
    from tbr_ray.plan import plan_grid

    cfg = load_config(
        REPO / "jobs" / "paper.yaml",
        ["grid.models=[llama-2-7b, falcon-40b, llama-2-70b]", "grid.conditions=[none, external]"],
    )
    plan = plan_grid(cfg, 8)
    assert plan.problems == []
    planned = [(s.job.name, s.start_s) for s in plan.slots if s.job.kind != "write"]
    seconds = {s.job.name: s.job.seconds for s in plan.slots}
    ran, asked = _runtime_order(cfg, tmp_path, seconds, 8.0)
    t0 = planned[0][1]
    assert [(n, round(t - t0, 6)) for n, t in planned] == [(n, round(t, 6)) for n, t in ran]
    # The biggest cells first, and the cluster full from the start.
    assert ran[0][0].startswith("train llama-2-70b")
    gpus = {f"train {p.cell.cell_id}": p.layout.gpus for p in plan.cells}
    assert sum(gpus[n] for n, t in ran if t == 0.0) == 8
    assert {n.split(" ")[0] for n, _ in ran} == {"train", "eval", "judge"}
    assert asked[0] and all(b["GPU"] >= 1 for b in asked[0]) and asked[-1] != []


def test_the_autoscaler_is_asked_for_each_engine_and_the_accelerator_type():
    """An evaluation holds `replicas` placement groups of one engine each
    (tbr_ray.engine.engine_placements): the autoscaler is asked for that many bundles of one
    engine's GPUs, not one bundle of all of them that no node may hold; a training cell's
    bundle names cluster.accelerator_type as Ray Train asks for it."""
    from tbr_ray.engine import engine_gpus_for
    from tbr_ray.grid import Capacity, Job, eval_need, plan_cells, train_need

    cfg = load_config(
        REPO / "jobs" / "paper.yaml",
        [
            "grid.models=[llama-2-70b]",
            "cluster.max_engine_replicas=2",
            "cluster.accelerator_type=H100",
        ],
    )
    tp = engine_gpus_for(cfg, "llama-2-70b")
    cell = next(p for p in plan_cells(cfg) if p.gpus)
    gpus = train_need(cfg, cell)
    jobs = [
        Job("eval", "llama-2-70b", eval_need(cfg, "llama-2-70b", cfg.cells())),
        Job("train", cell.cell.cell_id, gpus),
    ]
    asked = []
    Capacity(cfg, read=lambda: 0.0, ask=asked.append).request(jobs)
    cpus = gpus * cfg.train.cpus_per_worker
    assert asked == [
        [
            {"CPU": 1.0, "GPU": tp},
            {"CPU": 1.0, "GPU": tp},
            {"GPU": gpus, "CPU": cpus, "accelerator_type:H100": 0.001},
        ]
    ]


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
