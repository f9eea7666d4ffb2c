"""The ablation grid: models x conditions x gammas x seeds, trained and evaluated pipelined.

    report = run_grid(cfg, Path("runs/tiny"))       # what `tbr-ray ablate` runs
    print(format_plan(plan_grid(cfg, 8)))           # `--dry-run --gpus 8` (tbr_ray.plan)

Phase 0 (reflections): every reflection set the untrained cells need, written before any
training (tbr_ray.reflect.prepare_reflections: on CPU one engine actor for all writers, on
GPUs one per writer, side by side), so no cell holds training resources while a writer runs.
Phase 1 (`pipeline_phase`): one Ray cluster trains and evaluates at once. Ray Tune schedules
the training: one trial per cell that still needs an adapter, whose driver builds the data mix
(Ray Data, cached and shared between cells with the same mix) and fine-tunes (Ray Train +
DeepSpeed); a failed trial is retried `grid.max_retries` times, then reported failed while the
others go on. Tune gets each cell from a Searcher (`CellQueue`) only when the grid's policy
admits it, and a Tune callback launches each base model's evaluation (vLLM engine replicas,
sized and placed by tbr_ray.engine, for the base model and every new adapter of that model:
engine start-up paid once per replica, not per cell) as a Ray task as soon as its cells are
trained, while other cells still train. When its generations are done its engines are
released and its judging follows as a job of its own, holding only the judges' devices
(`eval_need`, `judge_need`). Policy (tbr_ray.plan.policy.pick, the same function the
planner's simulation calls): slots are devices, so as many jobs run as the cluster's GPUs
(CPUs on CPU runs) hold; ready judging and evaluations before new training cells, bigger jobs
first, then grid order; nothing overtakes a job that does not fit. The cluster's size is
re-read as it grows, and the autoscaler is asked for what the policy would run (`Capacity`).
Why not evaluations as Tune
trials too: one evaluation serves several cells (trials) and must wait for all of them, which
Tune's independent trials cannot express. With `tracking.mlflow` each trial also goes to MLflow
through Tune's MLflowLoggerCallback.

Resume: rerunning the same command on the same output skips cells whose results are done,
skips training for cells whose adapter is published, and resumes interrupted training from
its last Ray Train checkpoint. Results land per cell, atomically, so there are no duplicates.

Operating it: Ctrl-C / SIGTERM stop scheduling, mark running cells `interrupted`, wind Tune's
trials down (their Ray Train checkpoints kept for the rerun) and skip evaluation
(tbr_ray.interrupt; run_grid raises Interrupted). While it runs, a progress view
reads the run folder (tbr_ray.progress) and keeps the dashboard gauges current; Ray's own
logging stays out of the way unless `verbose`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tbr_ray import results, rundir
from tbr_ray.config import PROMPTING, Cell, ConfigError, RunConfig
from tbr_ray.interrupt import RunInterrupt, mark_interrupted
from tbr_ray.plan.sizing import CPU_RESERVE, TRIAL_DRIVER_CPU  # what the planner counts too
from tbr_ray.progress import ProgressView
from tbr_ray.rundir import DamagedFile, RunDir, run_lock, sweep_temp_files
from tbr_ray.tiny import resolve_model


@dataclass(frozen=True)
class CellPlan:
    cell: Cell
    gpus: int
    workers: int
    zero_stage: int


def run_id(cfg: RunConfig) -> str:
    return f"{cfg.name}-{cfg.config_hash()}"


# ------------------------------------------------------------------ planning (pure)


def plan_cells(cfg: RunConfig) -> list[CellPlan]:
    from tbr_ray.plan import resolved_train_settings

    plans = []
    for cell in cfg.cells():
        workers, zero = resolved_train_settings(cfg, cell.model)
        gpus = workers if cfg.train.use_gpu else 0
        plans.append(CellPlan(cell, gpus, workers, zero))
    return plans


# ------------------------------------------------------------------ effects


def _init_ray(verbose: bool = False) -> None:
    """Join the cluster this process runs in (ray job submit / RAY_ADDRESS), else start a
    local instance; either way leave Ray's token file readable by its owner only. Unless
    `verbose`, the workers' logs and Ray Data's progress bars stay off the terminal (they are
    still in Ray's session logs): the progress view speaks instead."""
    import logging

    from ray.data import DataContext

    init_ray(log_to_driver=verbose, logging_level="INFO" if verbose else "WARNING")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = verbose
    if not verbose:
        for name in ("ray", "ray.data", "ray.tune"):  # ray.data keeps its own INFO handler
            logging.getLogger(name).setLevel(logging.WARNING)
        # Tune's newer console output prints its experiment box even at verbose=0.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def init_ray(**kwargs) -> None:
    """`ray.init(**kwargs)` unless connected, with Ray's token file owner-only throughout: an
    existing one is made 0600 first; for a new local cluster, which would write a new token
    with open(path, "w") (0644 under the usual umask, ray._private.authentication.
    authentication_token_setup.generate_and_save_token), the token is written 0600 first and
    Ray finds and keeps it. A umask around ray.init would also tighten every file the Ray
    processes it starts write, results included."""
    import ray

    if ray.is_initialized():
        return
    token = Path.home() / ".ray" / "auth_token"
    secure_token_file(token)
    if _ray_would_write_a_token(token):
        write_private_token(token)
    ray.init(**kwargs)
    secure_token_file(token)


def _ray_would_write_a_token(token: Path) -> bool:
    """Ray's own decision in ray.init (ray/_private/worker.py, 2.60): no address found means a
    new local cluster, whose token mode is on unless RAY_AUTH_MODE says otherwise, and a token
    is generated when none is given (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, the default file)."""
    from ray._private.services import canonicalize_bootstrap_address

    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return False
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return False
    return not token.exists() and canonicalize_bootstrap_address(None) is None


def write_private_token(token: Path) -> None:
    """A new Ray token (Ray's recipe: 32 random bytes in hex) in a file created 0600."""
    token.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))


def secure_token_file(path: Path) -> None:
    """Make Ray's auth token file owner-only (Ray 2.60 writes it 0644: any local user could
    read it and submit jobs), or raise ConfigError with the fix when that is not allowed."""
    if not path.is_file() or path.stat().st_mode & 0o077 == 0:
        return
    try:
        path.chmod(0o600)
    except PermissionError:
        raise ConfigError(
            f"{path} (Ray's auth token) is readable by other users and this user cannot "
            f"change that. Fix: its owner runs `chmod 600 {path}`."
        ) from None


def check_run_dir(cfg: RunConfig, output: Path) -> None:
    """Refuse to mix two different configs in one results directory."""
    try:
        old = results.read_run_manifest(output)
    except DamagedFile as err:
        raise ConfigError(
            f"{err}: which config's run this folder holds is unknown. Fix: if it holds this "
            f"config's run, delete {RunDir(output).manifest} and rerun to resume; else use "
            "another --output."
        ) from None
    if old is not None:
        if old.get("config_hash") != cfg.config_hash():
            raise ConfigError(
                f"{output} holds run {old.get('run_id')} (config hash {old.get('config_hash')}),"
                f" but this config hashes to {cfg.config_hash()}. Fix: use another --output, or "
                f"the same config and --set values as before to resume that run."
            )


def _write_manifest(cfg: RunConfig, output: Path) -> None:
    sha, dirty = results.git_state()
    results.write_run_manifest(
        output,
        {
            "run_id": run_id(cfg),
            "name": cfg.name,
            "config_hash": cfg.config_hash(),
            "config": cfg.model_dump(mode="json"),
            "git_sha": sha,
            "git_dirty": dirty,
            "package_versions": json.loads(results.package_versions()),
            "schema_version": results.SCHEMA_VERSION,
            "updated": time.time(),
        },
    )


def model_paths(cfg: RunConfig) -> dict[str, str]:
    """Every model the run needs, resolved (tiny presets built on the driver, once)."""
    cache, root = cfg.paths.resolved_cache_dir(), cfg.data.resolved_root()
    names = list(cfg.grid.models)
    if cfg.reflection.writer_model():
        names.append(cfg.reflection.writer_model())
    names += [j.model for j in (cfg.eval.refusal_judge, cfg.eval.harm_judge) if j is not None]
    pins = cfg.grid.hub_revisions
    return {n: resolve_model(n, cache, root, revisions=pins) for n in dict.fromkeys(names)}


def train_cell(config: dict, callbacks: list | None = None) -> dict:
    """One cell's training (a Tune trial: `cell_trainable`): data mix -> Ray Train. Returns
    the adapter's train_result.json."""
    from tbr_ray.data import build_mix
    from tbr_ray.train import run_training

    cfg = RunConfig.model_validate(config["run"])
    cell = Cell(**config["cell"])
    output, paths = Path(config["output"]), config["paths"]
    results.write_status(output, cell.cell_id, "running", stage="data")
    reflector = paths.get(cfg.reflection.writer_model() or "")
    mix = build_mix(cfg, cell, paths[cell.model], reflector_path=reflector)
    results.write_status(output, cell.cell_id, "running", stage="train", mix=str(mix))
    adapter = run_training(cfg, cell, paths[cell.model], mix, output, callbacks=callbacks)
    return json.loads((adapter / "train_result.json").read_text())


def reflect_phase(cfg: RunConfig, cells: list[Cell], paths: dict[str, str], output: Path) -> None:
    """Every reflection set the untrained cells need, generated before training in one Ray Data
    job (on CPU one engine actor for all writers), so Tune trials find them cached. A failure
    here is not fatal: the cells that need the set retry it in their trial and fail alone."""
    from tbr_ray.data import reflection_request, source_rows
    from tbr_ray.reflect import prepare_reflections

    todo = untrained(cells, output)
    if not todo:
        return
    reflector = paths.get(cfg.reflection.writer_model() or "")
    safety = source_rows(cfg)[1]
    requests = [reflection_request(cfg, c, paths[c.model], reflector, None, safety) for c in todo]
    try:
        prepare_reflections([r for r in requests if r is not None], cfg)
    except Exception as exc:  # noqa: BLE001 - reported, then each cell retries on its own
        print(f"reflections before training failed ({exc}); cells will retry them one by one")


def untrained(cells: list[Cell], output: Path) -> list[Cell]:
    """The cells that train (not prompting-only) and have no finished adapter yet."""
    from tbr_ray.train import adapter_dir

    return [
        c
        for c in cells
        if c.condition not in PROMPTING
        and not (adapter_dir(output, c) / "train_result.json").is_file()
    ]


# ------------------------------------------------------------------ the pipelined scheduler


@dataclass(frozen=True)
class Job:
    """What the scheduler launches: one cell's training, or one base model's evaluation."""

    kind: str  # "train" | "eval" (a base model's generations) | "judge" (then its judging)
    key: str  # the cell id (train) or the base model (eval, judge)
    devices: float  # units of the run's resource (GPUs; CPUs on CPU runs) held while it runs


def _resource(cfg: RunConfig) -> str:
    return "GPU" if cfg.train.use_gpu else "CPU"


def resource_capacity(cfg: RunConfig) -> float:
    """The cluster's GPUs (GPU runs) or CPUs (CPU runs) the scheduler hands out now. On CPU
    CPU_RESERVE stays free: Ray Data tasks and the task drivers take slivers outside the
    accounting."""
    import ray

    total = ray.cluster_resources().get(_resource(cfg), 0.0)
    return total if cfg.train.use_gpu else max(total - CPU_RESERVE, 0.0)


def train_need(cfg: RunConfig, plan: CellPlan) -> float:
    """A training cell's share of the resource: its GPUs, or its workers' CPUs + its driver."""
    if cfg.train.use_gpu:
        return float(plan.gpus)
    return TRIAL_DRIVER_CPU + plan.workers * cfg.train.cpus_per_worker


def eval_need(cfg: RunConfig, model: str, cells: list[Cell]) -> float:
    """A base model's generations hold its engine replicas (`engine_replicas_for` over its
    passes among `cells`), each of its engine's size. Its judging is a job of its own
    (`judge_need`): the model's devices are free once its generations are done."""
    from tbr_ray.engine import engine_bundle, engine_gpus_for, engine_replicas_for

    replicas = engine_replicas_for(cfg, model, eval_units(cfg, model, cells))
    return replicas * engine_bundle(cfg, engine_gpus_for(cfg, model)).get(_resource(cfg), 0.0)


def eval_units(cfg: RunConfig, model: str, cells: list[Cell]) -> int:
    """Engine passes of `model`'s evaluation (pure): one per trained cell, plus one for the
    base model's own pass and the prompting cells together (tbr_ray.evaluate._units)."""
    mine = [c for c in cells if c.model == model]
    trained = sum(c.condition not in PROMPTING for c in mine)
    return trained + int(cfg.eval.evaluate_base or len(mine) > trained)


def judge_need(cfg: RunConfig) -> float:
    """Judging holds one model judge's engine at a time: the largest judge's; nothing when
    only rule judges run."""
    from tbr_ray.engine import engine_bundle, engine_gpus_for

    judges = [judge.model for _, judge in cfg.eval.model_judges()]
    if not judges:
        return 0.0
    tp = max(engine_gpus_for(cfg, m) for m in judges)
    return engine_bundle(cfg, tp).get(_resource(cfg), 0.0)


def job_bundles(cfg: RunConfig, job: Job) -> list[dict[str, float]]:
    """The resources one job holds, as the bundles the autoscaler must fit, each on one node:
    a training cell's devices (and, with cluster.accelerator_type, Ray Train's
    `accelerator_type:<type>` resource, as its ScalingConfig asks for it per worker); an
    evaluation's engine replicas, one `engine_bundle` each, as `engine_placements` reserves
    them; a judge's one engine. GPUs and the CPUs beside them on a GPU run, CPUs on a CPU run."""
    from tbr_ray.engine import engine_bundle, engine_gpus_for

    if job.kind == "eval":
        one = engine_bundle(cfg, engine_gpus_for(cfg, job.key))
        return [one] * max(1, round(job.devices / one[_resource(cfg)]))
    if not cfg.train.use_gpu:
        return [{"CPU": job.devices}]
    if job.kind == "judge":
        return [{"GPU": job.devices, "CPU": 1.0}]
    bundle = {"GPU": job.devices, "CPU": job.devices * cfg.train.cpus_per_worker}
    if cfg.cluster.accelerator_type:
        # Ray's own spelling (ray._common.utils.RESOURCE_CONSTRAINT_PREFIX; ScalingConfig
        # asks 0.001 of it per worker, every node of that type holds 1).
        bundle[f"accelerator_type:{cfg.cluster.accelerator_type}"] = 0.001
    return [bundle]


CAPACITY_POLL_S = 5.0  # how often the scheduler re-reads the cluster's size


class Capacity:
    """The cluster's size as it grows (or shrinks): `resource_capacity`, re-read at most every
    CAPACITY_POLL_S seconds, so GPU workers that join an autoscaling cluster (both cluster
    files start with none) are used as they come. `request` tells Ray's autoscaler what the
    policy wants to run now (`ray.autoscaler.sdk.request_resources`: a standing request,
    replaced by each call, that scales the cluster up at once instead of waiting for demand
    to queue; on a cluster without an autoscaler it is a note nobody reads)."""

    def __init__(self, cfg: RunConfig, read=None, ask=None, clock=time.monotonic):
        self.cfg, self.clock = cfg, clock
        self.read = read or functools.partial(resource_capacity, cfg)
        self.ask = ask or _request_resources
        self._value, self._at, self.asked = 0.0, -math.inf, None

    def now(self) -> float:
        """The cluster's devices, at most CAPACITY_POLL_S seconds old."""
        if self.clock() - self._at >= CAPACITY_POLL_S:
            self._value, self._at = self.read(), self.clock()
        return self._value

    def request(self, jobs: list[Job]) -> None:
        """Ask the autoscaler for `jobs`' bundles (when they changed since the last ask)."""
        bundles = [b for j in jobs for b in job_bundles(self.cfg, j)]
        if bundles != self.asked:
            self.ask(bundles)
            self.asked = bundles


def _request_resources(bundles: list[dict[str, float]]) -> None:
    # Ray 2.60: ray.autoscaler.sdk.request_resources(bundles=...), "persistent until another
    # call to request_resources() is made to override" (its docstring); [] clears it.
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def _error_text(exc: BaseException) -> tuple[str, str]:
    """(one line, full traceback) of a task's failure; a RayTaskError carries the task's
    exception as `cause` and the remote traceback in its text."""
    cause = getattr(exc, "cause", None) or exc
    return "".join(traceback.format_exception_only(cause)).strip(), str(exc)


class _Pipeline:
    """The scheduler's bookkeeping on the driver while `pipeline_phase` runs: what is queued,
    admitted, training (Tune trials) and evaluating (Ray tasks). `schedule` applies the
    policy (tbr_ray.plan.policy.pick, which the planner simulates) to the cluster's size as it
    is now (`Capacity`): evaluations launch at once, training cells are admitted for
    `CellQueue` to hand to Tune. `launch(job, state)` starts an evaluation and returns what
    `poll` waits on (a Ray object ref; a test passes its own)."""

    def __init__(self, cfg: RunConfig, cells: list[Cell], paths: dict[str, str], output: Path):
        plans = {p.cell.cell_id: p for p in plan_cells(cfg)}
        todo = untrained(cells, output)
        models = list(dict.fromkeys(c.model for c in cells))
        self.cfg, self.cells, self.paths, self.output = cfg, cells, paths, output
        self.by_id = {c.cell_id: c for c in cells}
        self.queued = [Job("train", c.cell_id, train_need(cfg, plans[c.cell_id])) for c in todo]
        self.admitted: list[Job] = []  # picked for training, not yet a Tune trial
        self.untrained_of = {m: {c.cell_id for c in todo if c.model == m} for m in models}
        self.waiting = [Job("eval", m, eval_need(cfg, m, cells)) for m in models]
        self.judging: list[tuple[Job, object, float]] = []  # ready: (job, generated, start)
        self.training: dict[str, tuple[Job, float]] = {}  # Tune trial id -> (job, start)
        self.evals: dict = {}  # what `launch` returned -> (job, start of the evaluation)
        self.errors: dict[str, str] = {}
        self.capacity = Capacity(cfg)
        self.launch, self.launch_judge = _launch_eval, _launch_judge
        self.stop: RunInterrupt | None = None  # its signal ends scheduling
        self.metrics: GridMetrics | None = None
        self.verbose = False

    @property
    def halted(self) -> bool:
        return self.stop is not None and self.stop.signum is not None

    def _ready_evals(self) -> list[Job]:
        ready = [j for j in self.waiting if not self.untrained_of[j.key]]
        idle = [j for j in ready if not any(eval_todo(self.cfg, j.key, self.cells, self.output))]
        self.waiting = [j for j in self.waiting if j not in idle]
        return [j for j in ready if j not in idle]

    def _busy(self) -> list[Job]:
        return [*self.admitted, *(j for j, _ in self.training.values())] + [
            j for j, _ in self.evals.values()
        ]

    def schedule(self) -> None:
        """Launch the evaluations and admit the training cells that the policy picks now, and
        ask the autoscaler for what the policy would run on the planned cluster."""
        from tbr_ray.plan.policy import overflow, pick, wanted

        if self.halted:
            return
        ready = [j for j, _, _ in self.judging] + self._ready_evals() + self.queued
        busy = self._busy()
        free = self.capacity.now() - sum(j.devices for j in busy)
        n_train = sum(j.kind == "train" for j in busy)
        picked = pick(ready, free, n_train, self.cfg.grid.max_concurrent)
        # Nothing fits the cluster as it is now (an autoscaling cluster before its GPU workers
        # joined): start the first job anyway; Ray holds it until the cluster grows (an
        # engine that fits no node is refused by tbr_ray.engine.engine_placement).
        picked = picked or overflow(ready, len(busy))
        target = self.cfg.cluster.gpus if self.cfg.train.use_gpu else None
        rest = [j for j in ready if j not in picked]
        self.capacity.request(wanted([*busy, *picked], rest, target))
        for job in picked:
            if job.kind == "judge":
                (_, generated, start), *_ = (j for j in self.judging if j[0] is job)
                self.judging = [j for j in self.judging if j[0] is not job]
                self.evals[self.launch_judge(generated, self)] = (job, start)
                self._say(f"judge {job.key} started")
            elif job.kind == "eval":
                self.waiting.remove(job)
                self.evals[self.launch(job, self)] = (job, time.time())
                self._say(f"eval {job.key} started")
            else:
                self.queued.remove(job)
                self.admitted.append(job)

    def poll(self, timeout: float = 0.0) -> None:
        """Record the evaluations that have ended (waiting at most `timeout` seconds)."""
        import ray

        if not self.evals:
            return
        done, _ = ray.wait(list(self.evals), num_returns=len(self.evals), timeout=timeout)
        for ref in done:
            try:
                out = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - one job's failure must not stop others
                out = dict(zip(("error", "traceback"), _error_text(exc), strict=True))
            self.eval_ended(ref, out)

    def eval_ended(self, ref, out: dict) -> None:
        """The job launched as `ref` ended (`out`: {cell_id: outcome}, or its error, or, for a
        base model's generations, {"generated": ...}: its engines are released and its judging
        becomes a ready job of its own, `judge_need` devices)."""
        job, start = self.evals.pop(ref)
        if job.kind == "eval" and "generated" in out:
            self.judging.append((Job("judge", job.key, judge_need(self.cfg)), out, start))
            self._say(f"eval {job.key} generated in {time.time() - start:.0f} s")
            return
        _eval_finished(self.cfg, job.key, self.cells, out, self.output, self.metrics)
        for cell_id in out:
            results.record_phase(self.output, cell_id, "eval", start, time.time())
        self._say(f"{job.kind} {job.key} ended after {time.time() - start:.0f} s")

    def trial_started(self, trial_id: str) -> dict | None:
        """The next admitted cell, now Tune trial `trial_id`: its part of the trial config."""
        if not self.admitted:
            return None
        job = self.admitted.pop(0)
        self.training[trial_id] = (job, time.time())
        self._say(f"train {job.key} started")
        return {"cell": self.by_id[job.key].__dict__}

    def trial_ended(self, trial_id: str, out: dict) -> None:
        """A training trial ended (`out`: its last result, or its error)."""
        job, start = self.training.pop(trial_id)
        _train_finished(job.key, out, self.output, self.metrics, self.errors)
        results.record_phase(self.output, job.key, "train", start, time.time())
        self.untrained_of[self.by_id[job.key].model].discard(job.key)
        self._say(f"train {job.key} ended after {time.time() - start:.0f} s")

    def training_left(self) -> bool:
        return bool(self.queued or self.admitted) and not self.halted

    def _say(self, what: str) -> None:
        if self.verbose:
            print(f"grid: {what} ({len(self.training) + len(self.evals)} running)", flush=True)


def _launch_eval(job: Job, state: _Pipeline):
    """A base model's generations as a Ray task (`generate_model_task`); its engines reserve
    their own placement groups."""
    import ray

    cfg = state.cfg
    mine = [c.__dict__ for c in state.cells if c.model == job.key]
    config = {**_trial_base(cfg, state.paths, state.output), "model": job.key, "cells": mine}
    task = ray.remote(generate_model_task).options(num_cpus=0, name=f"eval:{Path(job.key).name}")
    return task.remote(config)


def _launch_judge(generated: dict, state: _Pipeline):
    """A base model's judging as a Ray task (`judge_model_task`), given its generations."""
    import ray

    model = generated["generated"].model
    config = {**_trial_base(state.cfg, state.paths, state.output), "model": model}
    task = ray.remote(judge_model_task).options(num_cpus=0, name=f"judge:{Path(model).name}")
    return task.remote(config, generated["generated"])


def _trial_base(cfg: RunConfig, paths: dict[str, str], output: Path) -> dict:
    return {"run": cfg.model_dump(mode="json"), "output": str(output), "paths": paths}


def cell_trainable(config: dict) -> None:
    """Tune trial driver for one cell: `train_cell`, Ray Train's reports forwarded to Tune (so
    trial results, and MLflow when configured, follow each epoch)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    info = train_cell(config, callbacks=[TuneReportCallback()])
    tune.report(
        {
            "trained": 1,
            "train_tokens_per_s": info.get("train_tokens_per_s", 0.0),
            "loss": info.get("loss", float("nan")),
        }
    )


class _Detached:
    """Tune pickles its run and tune configs (callbacks, searcher, stopper) into the
    experiment's tuner.pkl. These objects hold the live pipeline (Ray object refs, the signal
    handlers saved by RunInterrupt), which must not be pickled: an actor handle of an earlier
    Ray session reachable from there aborted the driver (Ray's "Cannot find an actor handle"
    check). A rerun resumes from the run folder, never from tuner.pkl, so the pickled copy
    keeps nothing."""

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.state = None


def _tune_parts(state: _Pipeline):
    """The Searcher that hands Tune the admitted cells, and the Callback that drives the rest
    of the pipeline (evaluations) from Tune's own loop."""
    cell_queue, pipeline_callback = _tune_classes()
    return cell_queue(state), pipeline_callback(state)


@functools.cache
def _tune_classes():
    """Built on first use: importing Ray Tune costs a second, which commands that never
    schedule a grid (`status`, `validate`) should not pay."""
    from ray.tune import Callback
    from ray.tune.search import Searcher

    class CellQueue(_Detached, Searcher):
        """Cells in the policy's order, each only once it was admitted (None: wait)."""

        def __init__(self, state: _Pipeline):
            super().__init__()
            self.state = state

        def suggest(self, trial_id: str):
            if not self.state.training_left():
                return self.FINISHED
            return self.state.trial_started(trial_id)

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass  # the callback records it (it sees the trial's error)

        def save(self, checkpoint_path: str) -> None:
            pass  # nothing to save: a rerun resumes from the run folder, not Tune's state

        def restore(self, checkpoint_path: str) -> None:
            pass

    class PipelineCallback(_Detached, Callback):
        """Runs the evaluations from Tune's loop and records the training trials' ends."""

        def __init__(self, state: _Pipeline):
            self.state = state

        def on_step_begin(self, iteration, trials, **info):
            self.state.poll()
            self.state.schedule()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.state.trial_ended(trial.trial_id, dict(trial.last_result or {}))

        def on_trial_error(self, iteration, trials, trial, **info):
            out = dict(zip(("error", "traceback"), _trial_error(trial), strict=True))
            self.state.trial_ended(trial.trial_id, out)

    return CellQueue, PipelineCallback


def _trial_error(trial) -> tuple[str, str]:
    """(exception text, full text) of a failed trial's last error, from the text file Tune
    has just written in the trial's local folder (its storage copy is synced later). Tune's
    pickled copy beside it is never loaded: unpickling a file of the run folder would run
    whatever code its writer put in it."""
    text = trial.error_file
    if text and Path(text).is_file():
        return _last_failure(Path(text).read_text())
    return "the trial failed and Tune recorded no error", ""


def _last_failure(text: str) -> tuple[str, str]:
    """Tune appends each failure as "Failure # N (occurred at ...)" + str(error); for a task's
    error that is Ray's header line, the remote traceback, then the exception. Returns (the
    exception: what follows the last traceback frame, full text of the last failure)."""
    block = re.split(r"^Failure # \d+ \(occurred at [^)]*\)\n", text, flags=re.M)[-1]
    block = re.sub(r"\x1b\[[0-9;]*m", "", block).strip()  # Ray colours its header line
    lines = block.splitlines()
    frames = [i for i, x in enumerate(lines) if x.startswith('  File "')]
    after = frames[-1] + 1 if frames else 1 if len(lines) > 1 else 0
    while after < len(lines) and lines[after].startswith("    "):
        after += 1  # the frame's source line(s)
    return "\n".join(lines[after:]).strip() or block, block


def _cell_name(trial) -> str:
    return Cell(**trial.config["cell"]).cell_id


def pipeline_phase(
    cfg: RunConfig,
    cells: list[Cell],
    paths: dict[str, str],
    output: Path,
    metrics: GridMetrics,
    stop: RunInterrupt | None = None,
    verbose: bool = False,
) -> dict[str, str]:
    """Train and evaluate on one Ray cluster, pipelined (tbr_ray.plan.policy). Ray Tune
    schedules the training cells: one trial per cell still lacking an adapter (retried
    `grid.max_retries` times, resuming its Ray Train checkpoint), handed over by `CellQueue`
    only when the policy admits it. From Tune's loop a callback launches each base model's
    evaluation (a Ray task whose engines wait in their placement groups) as soon as its cells
    are trained, while other cells still train. After Tune's last trial the evaluations left
    are drained. Start and end of every phase go to the cells' status.json (`phases`). A
    signal (`stop`) ends Tune's trials gracefully (their checkpoints kept) and nothing more
    starts. Returns {cell_id: error} for cells whose training failed; the other cells go on."""
    state = _Pipeline(cfg, cells, paths, output)
    state.metrics, state.stop, state.verbose = metrics, stop, verbose
    try:
        if state.queued:
            _tune_training(cfg, state, verbose)
        while (state.waiting or state.judging or state.evals) and not state.halted:
            state.schedule()
            if not state.evals:
                break  # the evaluations left had nothing to do (their cells failed training)
            state.poll(timeout=1.0)
    finally:
        state.capacity.request([])  # the grid asks nothing more of the autoscaler
    return state.errors


def _tune_training(cfg: RunConfig, state: _Pipeline, verbose: bool):
    import contextlib

    from ray import tune

    searcher, callback = _tune_parts(state)
    tuner = tune.Tuner(
        tune.with_resources(cell_trainable, {"CPU": TRIAL_DRIVER_CPU}),
        param_space=_trial_base(cfg, state.paths, state.output),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,  # as many trials as CellQueue hands out
            # A finished trial's driver process takes the next cell: no new actor, no
            # re-import of Ray Data / tbr_ray per cell (every trial asks the same resources).
            reuse_actors=True,
            trial_name_creator=_cell_name,
            trial_dirname_creator=_cell_name,
        ),
        run_config=tune.RunConfig(
            name=f"grid-{int(time.time())}",
            storage_path=str(RunDir(state.output).ray_tune),
            failure_config=tune.FailureConfig(max_failures=cfg.grid.max_retries),
            callbacks=[callback, *_tracking_callbacks(cfg, state.output)],
            stop=state.stop.stopper() if state.stop is not None else None,
            verbose=1 if verbose else 0,
        ),
    )
    with state.stop.graceful() if state.stop is not None else contextlib.nullcontext():
        tuner.fit()


def _tracking_callbacks(cfg: RunConfig, output: Path) -> list:
    """MLflow through Tune's own callback when `tracking.mlflow` is on: one MLflow run per
    training trial (the cell), its config as params, Ray Train's per-epoch reports as metrics,
    tagged with the tbr-ray run id and code version."""
    if not cfg.tracking.mlflow:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = cfg.tracking.mlflow_uri or RunDir(output).mlruns.as_uri()
    if uri.startswith("file:"):
        # mlflow 3 keeps its file store in maintenance mode and refuses it unless told: a local
        # store needs no server and no database, which is what an opt-in default should be.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    sha, dirty = results.git_state()
    tags = {"tbr_run_id": run_id(cfg), "git_sha": str(sha), "git_dirty": str(dirty)}
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=cfg.name, tags=tags)]


def _train_finished(
    cell_id: str, out: dict, output: Path, metrics: GridMetrics, errors: dict
) -> None:
    if "error" in out:
        errors[cell_id] = out["error"]
        results.write_status(
            output, cell_id, "failed", stage="train", error=out["error"], traceback=out["traceback"]
        )
    elif "train_tokens_per_s" in out:
        metrics.train_tps.set(float(out["train_tokens_per_s"]), tags={"run": metrics.run})
    metrics.record_status(output)


def _eval_finished(
    cfg: RunConfig, model: str, cells: list[Cell], out: dict, output: Path, metrics: GridMetrics
) -> None:
    if "error" in out:  # the task died (evaluate_model reports its own failures per cell)
        from tbr_ray.evaluate import base_cell

        err, full = out.pop("error"), out.pop("traceback")
        mine = [c for c in cells if c.model == model]
        for c in [base_cell(model)] * cfg.eval.evaluate_base + mine:
            if not results.is_done(output, c.cell_id):
                out[c.cell_id] = err
                results.write_status(
                    output, c.cell_id, "failed", stage="eval", error=err, traceback=full
                )
    metrics.record_eval(output)


def eval_todo(
    cfg: RunConfig, model: str, cells: list[Cell], output: Path
) -> tuple[list[tuple[Cell, Path]], list[Cell], bool]:
    """What `model`'s evaluation has to do: (trained cells with their adapter folders,
    prompting cells, whether the base model itself) among `cells` not yet done."""
    from tbr_ray.evaluate import base_cell
    from tbr_ray.train import adapter_dir

    mine = [c for c in cells if c.model == model and not results.is_done(output, c.cell_id)]
    prompting = [c for c in mine if c.condition in PROMPTING]
    ready = [
        (c, adapter_dir(output, c))
        for c in mine
        if (adapter_dir(output, c) / "train_result.json").is_file()
    ]
    base_needed = cfg.eval.evaluate_base and not results.is_done(output, base_cell(model).cell_id)
    return ready, prompting, base_needed


def generate_model(
    cfg: RunConfig, model: str, cells: list[Cell], paths: dict[str, str], output: Path
) -> dict:
    """Generations of the base model and every trained or prompting cell of `model` not yet
    done (tbr_ray.evaluate.generate_base_model). Returns {"generated": Generated} for
    `judge_model`, {} when nothing is left, or {cell_id: error}: a failure marks these cells
    failed and is not raised."""
    from tbr_ray.evaluate import generate_base_model

    ready, prompting, base_needed = eval_todo(cfg, model, cells, output)
    if not ready and not base_needed and not prompting:
        return {}
    todo = [c for c, _ in ready] + prompting
    for c in todo:
        results.write_status(output, c.cell_id, "running", stage="eval")
    try:
        generated = generate_base_model(cfg, model, paths[model], ready, output, prompting)
    except Exception as exc:  # noqa: BLE001 - one base model's failure must not stop others
        return _eval_failed(output, todo, exc)
    return {"generated": generated} if generated else {}


def judge_model(cfg: RunConfig, generated, output: Path) -> dict[str, str]:
    """Judge a base model's generations and write its cells' results
    (tbr_ray.evaluate.judge_base_model). Returns {cell_id: 'done' | error}; a failure marks
    the cells failed and is not raised."""
    from tbr_ray.evaluate import judge_base_model

    try:
        return judge_base_model(cfg, generated, output, run_id(cfg))
    except Exception as exc:  # noqa: BLE001 - one base model's failure must not stop others
        return _eval_failed(output, [p.cell for p in generated.passes], exc)


def _eval_failed(output: Path, cells: list[Cell], exc: Exception) -> dict[str, str]:
    err, full = "".join(traceback.format_exception_only(exc)).strip(), traceback.format_exc()
    for c in cells:
        results.write_status(output, c.cell_id, "failed", stage="eval", error=err, traceback=full)
    return {c.cell_id: err for c in cells}


def evaluate_model(
    cfg: RunConfig, model: str, cells: list[Cell], paths: dict[str, str], output: Path
) -> dict[str, str]:
    """`generate_model` then `judge_model`, here. Returns {cell_id: 'done' | error}."""
    out = generate_model(cfg, model, cells, paths, output)
    return judge_model(cfg, out["generated"], output) if "generated" in out else out


def generate_model_task(config: dict) -> dict:
    """`generate_model` as a Ray task (`pipeline_phase`): the model's engines' job."""
    cfg = RunConfig.model_validate(config["run"])
    cells = [Cell(**c) for c in config["cells"]]
    return generate_model(cfg, config["model"], cells, config["paths"], Path(config["output"]))


def judge_model_task(config: dict, generated) -> dict[str, str]:
    """`judge_model` as a Ray task (`pipeline_phase`): the judges' job, after the model's."""
    cfg = RunConfig.model_validate(config["run"])
    return judge_model(cfg, generated, Path(config["output"]))


def eval_phase(
    cfg: RunConfig, cells: list[Cell], paths: dict[str, str], output: Path, metrics: GridMetrics
) -> dict[str, str]:
    """Evaluate, base model after base model, everything of `cells` trained and not yet
    evaluated (`tbr-ray eval`; the grid pipelines this with training: `pipeline_phase`)."""
    outcome = {}
    for model in dict.fromkeys(c.model for c in cells):
        outcome.update(evaluate_model(cfg, model, cells, paths, output))
        metrics.record_eval(output)
    return outcome


class GridMetrics:
    """Grid metrics exported with ray.util.metrics (scraped by the Ray dashboard/Prometheus)."""

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        tags = ("run",)
        self.run = run
        self.cells = Gauge("tbr_cells", "Cells by state", tag_keys=("run", "state"))
        self.train_tps = Gauge(
            "tbr_train_tokens_per_s", "Training tokens/s, last cell", tag_keys=tags
        )
        self.eval_tps = Gauge("tbr_eval_tokens_per_s", "Eval tokens/s, last model", tag_keys=tags)

    def record_status(self, output: Path) -> None:
        status = results.read_status(output)
        for state in ("running", "done", "failed", "interrupted"):
            n = int((status["status"] == state).sum()) if len(status) else 0
            self.cells.set(n, tags={"run": self.run, "state": state})

    def record_eval(self, output: Path) -> None:
        status = results.read_status(output)
        if "eval_tokens_per_s" in status:
            last = status["eval_tokens_per_s"].dropna()
            if len(last):
                self.eval_tps.set(float(last.iloc[-1]), tags={"run": self.run})
        self.record_status(output)


def run_grid(
    cfg: RunConfig, output: Path, cells: list[Cell] | None = None, verbose: bool = False
) -> dict[str, str]:
    """Run (or resume) the grid; returns {cell_id: 'done' | error} for every cell. Raises
    tbr_ray.interrupt.Interrupted on Ctrl-C / SIGTERM: running cells are then marked
    `interrupted` and no evaluation starts; rerunning resumes."""
    output = Path(output).resolve()
    with run_lock(output, "ablate" if cells is None else "cell"):
        check_run_dir(cfg, output)
        cells = cells if cells is not None else cfg.cells()
        return _run_grid_locked(cfg, output, cells, verbose)


def _run_grid_locked(cfg: RunConfig, output: Path, cells: list[Cell], verbose: bool):
    _init_ray(verbose)
    # This driver holds the run lock: a cell still recorded `running` was left by one that died.
    mark_interrupted(output, "its driver was gone (found by the next run)")
    sweep_temp_files(output)  # what writers killed with the last driver left
    _write_manifest(cfg, output)
    metrics = GridMetrics(run_id(cfg))
    ids = [c.cell_id for c in cells]
    view = ProgressView(
        output, ids, on_poll=metrics.record_status, live=False if verbose else None, cfg=cfg
    )
    with RunInterrupt(output) as stop, view:
        try:
            _run_phases(cfg, cells, output, metrics, stop, view, verbose)
        except KeyboardInterrupt:
            if stop.signum is None:
                raise
        stop.raise_if_stopped()
    metrics.record_status(output)
    status = results.read_status(output)
    by_id = dict(zip(status["cell_id"], status["status"], strict=True)) if len(status) else {}
    return {c.cell_id: by_id.get(c.cell_id, "missing") for c in cells}


def _run_phases(cfg, cells, output, metrics, stop: RunInterrupt, view, verbose: bool) -> None:
    pending = [c for c in cells if not results.is_done(output, c.cell_id)]
    clock = PhaseClock(output)
    with clock("models"):
        paths = model_paths(cfg)
    view.phase = "reflections"
    with clock("reflections"):
        reflect_phase(cfg, pending, paths, output)
    view.phase = "training and evaluation"
    with clock("training and evaluation"):
        pipeline_phase(cfg, pending, paths, output, metrics, stop, verbose)
    stop.raise_if_stopped()
    view.phase = "finished"


class PhaseClock:
    """Wall time of each phase of this invocation, written to <output>/phases.json as each one
    ends (a rerun appends its own entries; the driver holds the run lock), so `timing_summary`
    and docs/BENCHMARKS.md read what the run itself measured."""

    def __init__(self, output: Path):
        self.path = RunDir(output).phases

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.time()
        try:
            yield
        finally:
            done = read_phases(self.path)
            done.append({"phase": phase, "start": t0, "seconds": round(time.time() - t0, 1)})
            rundir.write_json(self.path, done, indent=1)


def read_phases(path: Path) -> list[dict]:
    """phases.json's entries; none when it is absent or damaged (a power loss may leave it
    empty: it is a record of timings, not a reason to stop a run)."""
    try:
        return rundir.read_json(path, of=list) or []
    except DamagedFile as err:
        print(f"{err}: its phase timings are dropped", flush=True)
        return []


def timing_summary(output: Path) -> str:
    """Where the time went, from the run folder: each phase (phases.json), each cell's data +
    training (its adapter's train_result.json) and each evaluation (engine start, passes)."""
    lines = []
    for p in read_phases(RunDir(output).phases):
        lines.append(f"  phase {p['phase']:<26} {wall_clock(p['seconds'])}")
    status = results.read_status(output)
    for row in status.to_dict("records") if len(status) else []:
        train = row.get("train") if isinstance(row.get("train"), dict) else {}
        if train.get("train_seconds"):
            tps = train.get("train_tokens_per_s", float("nan"))
            lines.append(
                f"  train {row['cell_id']:<40} {wall_clock(train['train_seconds'])} "
                f"({tps:.0f} tokens/s)"
            )
    evals = status.drop_duplicates("eval_seconds_model") if "eval_seconds_model" in status else []
    for row in evals.to_dict("records") if len(evals) else []:
        if row.get("eval_seconds_model") == row.get("eval_seconds_model"):  # not NaN
            lines.append(
                f"  eval  {row['cell_id'].split('__')[0]:<40} "
                f"{wall_clock(row['eval_seconds_model'])} (engine "
                f"start {row.get('engine_start_seconds', 0):.0f} s, all passes of this model)"
            )
    return "time by phase (this run folder):\n" + "\n".join(lines) if lines else ""


def summarize(output: Path) -> str:
    """A short table of per-cell compliance rates, for the terminal."""
    res = results.read_results(output)
    if not len(res.metrics):
        return "no finished cells"
    m = res.metrics[res.metrics["metric"].isin(["compliance_rate", "accuracy"])]
    table = m.pivot_table(
        index=["model", "condition"], columns=["benchmark", "judge"], values="value"
    ).round(3)
    return table.to_string()


def wall_clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{math.floor(seconds % 60):02d}s"
