"""The ablation grid: models x conditions x gammas x seeds on Ray Tune, then batched evaluation.

    report = run_grid(cfg, Path("runs/tiny"))       # what `tbr-ray ablate` runs
    print(format_plan(plan_grid(cfg, 8)))           # `--dry-run --gpus 8` (tbr_ray.plan)

Phase 0 (reflections): every reflection set the untrained cells need, written before any
training in one Ray Data job (tbr_ray.reflect.prepare_reflections; on CPU one engine actor
for all writers), so no trial holds training resources while a writer runs. Phase 1 (Ray
Tune): one trial per cell that still needs an adapter; its driver builds the cell's data mix
(Ray Data, cached and shared between cells with the same mix) and fine-tunes (Ray Train +
DeepSpeed). Failed trials are retried `grid.max_retries` times, then reported failed while
the other cells go on. Phase 2 (evaluation): per base model, one vLLM engine
evaluates the base model and every new adapter of that model (tbr_ray.evaluate), so engine
start-up is paid once per base model instead of once per cell.

Resume: rerunning the same command on the same output skips cells whose results are done,
skips training for cells whose adapter is published, and resumes interrupted training from
its last Ray Train checkpoint. Results land per cell, atomically, so there are no duplicates.

Operating it: Ctrl-C / SIGTERM stop scheduling, mark running cells `interrupted` and skip
evaluation (tbr_ray.interrupt; run_grid raises Interrupted). While it runs, a progress view
reads the run folder (tbr_ray.progress) and keeps the dashboard gauges current; Ray's own
logging stays out of the way unless `verbose`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tbr_ray import results
from tbr_ray.config import PROMPTING, Cell, ConfigError, RunConfig
from tbr_ray.interrupt import RunInterrupt, mark_interrupted
from tbr_ray.progress import ProgressView
from tbr_ray.rundir import run_lock
from tbr_ray.tiny import resolve_model

TRIAL_DRIVER_CPU = 0.01  # the Tune trial only orchestrates; 1 CPU would starve workers (STACK.md)


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
    from tbr_ray.train import resolved_train_settings

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

    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        secure_token_file(RAY_TOKEN_FILE)  # before: an existing token is not exposed meanwhile
        ray.init(log_to_driver=verbose, logging_level="INFO" if verbose else "WARNING")
        secure_token_file(RAY_TOKEN_FILE)  # after: a new local cluster writes it 0644
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = verbose
    if not verbose:
        for name in ("ray", "ray.data", "ray.tune"):  # ray.data keeps its own INFO handler
            logging.getLogger(name).setLevel(logging.WARNING)
        # Tune's newer console output prints its experiment box even at verbose=0.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


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
    manifest = output / "run.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text())
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
    if cfg.reflection.reflector:
        names.append(cfg.reflection.reflector)
    names += [j.model for j in (cfg.eval.refusal_judge, cfg.eval.harm_judge) if j is not None]
    return {n: resolve_model(n, cache, root) for n in dict.fromkeys(names)}


def cell_trainable(config: dict) -> None:
    """Tune trial driver for one cell: data mix -> Ray Train. Runs in a Tune actor."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tbr_ray.data import build_mix
    from tbr_ray.train import run_training

    cfg = RunConfig.model_validate(config["run"])
    cell = Cell(**config["cell"])
    output, paths = Path(config["output"]), config["paths"]
    results.write_status(output, cell.cell_id, "running", stage="data")
    reflector = paths.get(cfg.reflection.reflector) if cfg.reflection.reflector else None
    mix = build_mix(cfg, cell, paths[cell.model], reflector_path=reflector)
    results.write_status(output, cell.cell_id, "running", stage="train", mix=str(mix))
    adapter = run_training(
        cfg, cell, paths[cell.model], mix, output, callbacks=[TuneReportCallback()]
    )
    info = json.loads((adapter / "train_result.json").read_text())
    tune.report(
        {
            "trained": 1,
            "train_tokens_per_s": info.get("train_tokens_per_s", 0.0),
            "loss": info.get("loss", float("nan")),
        }
    )


def max_concurrent_cells(cfg: RunConfig, plans: list[CellPlan]) -> int:
    """Cells Tune trains at once: `grid.max_concurrent` if set, else as many as the cluster's
    GPUs (GPU runs) or CPUs (CPU runs) hold side by side. No extra trial "preparing ahead" on
    CPU: on the 2-core box it saved nothing, and the waiting trial's Ray Train worker group hit
    its start timeout and retried (docs/BENCHMARKS.md "Tiny ablation: where the 15 minutes
    go")."""
    import ray

    if cfg.grid.max_concurrent:
        return cfg.grid.max_concurrent
    res = ray.cluster_resources()
    if cfg.train.use_gpu:
        need = max(p.gpus for p in plans)
        return max(1, int(res.get("GPU", 0) // max(need, 1)))
    need = max(p.workers for p in plans) * cfg.train.cpus_per_worker
    # Tune drivers (TRIAL_DRIVER_CPU each) and Ray Data tasks take a sliver of the CPUs.
    return max(1, int((res.get("CPU", 1) - 0.1) // need))


def untrained(cells: list[Cell], output: Path) -> list[Cell]:
    """The cells that train (not prompting-only) and have no finished adapter yet."""
    from tbr_ray.train import adapter_dir

    return [
        c
        for c in cells
        if c.condition not in PROMPTING
        and not (adapter_dir(output, c) / "train_result.json").is_file()
    ]


def reflect_phase(cfg: RunConfig, cells: list[Cell], paths: dict[str, str], output: Path) -> None:
    """Every reflection set the untrained cells need, generated before training in one Ray Data
    job (on CPU one engine actor for all writers), so Tune trials find them cached. A failure
    here is not fatal: the cells that need the set retry it in their trial and fail alone."""
    from tbr_ray.data import reflection_request, source_rows
    from tbr_ray.reflect import prepare_reflections

    todo = untrained(cells, output)
    if not todo:
        return
    reflector = paths.get(cfg.reflection.reflector) if cfg.reflection.reflector else None
    safety = source_rows(cfg)[1]
    requests = [reflection_request(cfg, c, paths[c.model], reflector, None, safety) for c in todo]
    try:
        prepare_reflections([r for r in requests if r is not None], cfg)
    except Exception as exc:  # noqa: BLE001 - reported, then each cell retries on its own
        print(f"reflections before training failed ({exc}); cells will retry them one by one")


def train_phase(
    cfg: RunConfig,
    cells: list[Cell],
    paths: dict[str, str],
    output: Path,
    metrics: GridMetrics,
    stop: RunInterrupt | None = None,
    verbose: bool = False,
) -> dict[str, str]:
    """Tune over cells lacking an adapter. Returns {cell_id: (error, traceback)} for cells
    that failed. A signal caught by `stop` ends the experiment (its Stopper); the caller
    checks it."""
    from ray import tune

    todo = untrained(cells, output)
    if not todo:
        return {}
    plans = [p for p in plan_cells(cfg) if p.cell in todo]
    space = {
        "run": cfg.model_dump(mode="json"),
        "output": str(output),
        "paths": paths,
        "cell": tune.grid_search([c.__dict__ for c in todo]),
    }
    tuner = tune.Tuner(
        tune.with_resources(cell_trainable, {"CPU": TRIAL_DRIVER_CPU}),
        param_space=space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent_cells(cfg, plans),
            # A finished trial's driver process takes the next cell: no new actor, no
            # re-import of Ray Data / tbr_ray per cell (every trial asks the same resources).
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"grid-{int(time.time())}",
            storage_path=str(output / "ray_tune"),
            failure_config=tune.FailureConfig(max_failures=cfg.grid.max_retries),
            callbacks=[metrics.tune_callback()],
            stop=stop.stopper() if stop else None,
            verbose=1 if verbose else 0,
        ),
    )
    with stop.graceful() if stop else contextlib.nullcontext():
        grid = tuner.fit()
    errors = {}
    for res in grid:
        cell = Cell(**res.config["cell"])
        if res.error is not None:
            errors[cell.cell_id] = (
                "".join(traceback.format_exception_only(res.error)).strip(),
                "".join(traceback.format_exception(res.error)),
            )
    return errors


def eval_phase(
    cfg: RunConfig, cells: list[Cell], paths: dict[str, str], output: Path, metrics: GridMetrics
) -> dict[str, str]:
    """Evaluate, per base model, the base model and every trained, not-yet-evaluated cell."""
    from tbr_ray.evaluate import base_cell, evaluate_base_model
    from tbr_ray.train import adapter_dir

    outcome = {}
    for model in dict.fromkeys(c.model for c in cells):  # only models of the asked cells
        prompting = [
            c
            for c in cells
            if c.model == model
            and c.condition in PROMPTING
            and not results.is_done(output, c.cell_id)
        ]
        ready = [
            (c, adapter_dir(output, c))
            for c in cells
            if c.model == model
            and not results.is_done(output, c.cell_id)
            and (adapter_dir(output, c) / "train_result.json").is_file()
        ]
        base_needed = cfg.eval.evaluate_base and not results.is_done(
            output, base_cell(model).cell_id
        )
        if not ready and not base_needed and not prompting:
            continue
        todo = [c for c, _ in ready] + prompting
        for c in todo:
            results.write_status(output, c.cell_id, "running", stage="eval")
        try:
            out = evaluate_base_model(
                cfg, model, paths[model], ready, output, run_id(cfg), prompting=prompting
            )
        except Exception as exc:  # one base model's failure must not stop the others
            err = "".join(traceback.format_exception_only(exc)).strip()
            full = traceback.format_exc()
            out = {c.cell_id: err for c in todo}
            for c in todo:
                results.write_status(
                    output, c.cell_id, "failed", stage="eval", error=err, traceback=full
                )
        metrics.record_eval(output)
        outcome.update(out)
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

    def tune_callback(self):
        from ray.tune import Callback

        parent = self

        class _Metrics(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                if "train_tokens_per_s" in result:
                    parent.train_tps.set(
                        float(result["train_tokens_per_s"]), tags={"run": parent.run}
                    )

        return _Metrics()


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
    _write_manifest(cfg, output)
    metrics = GridMetrics(run_id(cfg))
    ids = [c.cell_id for c in cells]
    view = ProgressView(output, ids, on_poll=metrics.record_status, live=False if verbose else None)
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
    paths = model_paths(cfg)
    view.phase = "reflections"
    reflect_phase(cfg, pending, paths, output)
    view.phase = "training"
    train_errors = train_phase(cfg, pending, paths, output, metrics, stop, verbose)
    stop.raise_if_stopped()  # before anything is marked failed or evaluated
    for cell_id, (err, full) in train_errors.items():
        results.write_status(output, cell_id, "failed", stage="train", error=err, traceback=full)
    view.phase = "evaluation"
    eval_phase(cfg, [c for c in pending if c.cell_id not in train_errors], paths, output, metrics)
    view.phase = "finished"


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
