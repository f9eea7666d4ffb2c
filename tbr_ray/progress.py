"""The live progress view of `tbr-ray ablate`: phase, cells by state, running cells, ETA.

    with ProgressView(output, cell_ids, on_poll=metrics.record_status, cfg=cfg) as view:
        view.phase = "training"
        ...                                   # the grid runs; a thread polls the run folder
    print(format_snapshot(snapshot(output, cell_ids, "done", t0)))

It reads only the run folder: cell status files (results.read_status) and the progress file
each training cell's rank-0 worker writes (results.read_progress), so it works whatever
schedules the cells. On a terminal it redraws in place (rich); otherwise (a log, `ray job
logs`) it prints a line when the picture changes, at most every `log_every_s`. `on_poll` is
called on every poll, so dashboard gauges follow cell state as it changes.

The ETA, given the run's config, comes from the planner (tbr_ray.plan: each training cell's and
each base model's evaluation seconds on this cluster, its schedule simulated over the work
left), corrected by what this cluster really took (`planned_eta_s`); without a config (or a
plan) it is the rate seen so far carried over what is left.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tbr_ray import results
from tbr_ray.config import RunConfig
from tbr_ray.plan import GridPlan, Job, plan_grid, simulate

STATES = ("done", "failed", "interrupted", "running", "waiting")


@dataclass(frozen=True)
class CellProgress:
    cell_id: str
    stage: str
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None

    def fraction(self) -> float:
        """How far this running cell is: its training steps, else nothing yet."""
        if self.stage == "train" and self.step and self.total_steps:
            return min(1.0, self.step / self.total_steps)
        return 0.0


@dataclass(frozen=True)
class Snapshot:
    phase: str
    elapsed_s: float
    counts: dict[str, int]
    running: list[CellProgress] = field(default_factory=list)
    eta_s: float | None = None
    plan_ratio: float | None = None  # measured / planned seconds; None: ETA not from the plan

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def finished_fraction(self) -> float:
        done = self.counts["done"] + self.counts["failed"]
        return (done + sum(c.fraction() for c in self.running)) / max(self.total, 1)


# ------------------------------------------------------------------ the planner's ETA (pure)


@dataclass(frozen=True)
class PlannedJob:
    """One job of the plan (tbr_ray.plan.Job: name, kind, devices, planned seconds, the jobs
    it waits for) and the cells whose state tells how far it is."""

    job: Job
    cells: tuple[str, ...]  # train: its cell; eval: the base model's cells; write: none

    @property
    def kind(self) -> str:
        return self.job.kind


@dataclass(frozen=True)
class RunPlan:
    """What the view needs of the plan: the jobs of this run's cells, the devices, and
    grid.max_concurrent (the schedule's cap on training cells at once)."""

    jobs: tuple[PlannedJob, ...]
    capacity: int
    max_train: int | None = None


def run_plan(plan: GridPlan, cell_ids: Iterable[str], max_train: int | None = None):
    """The plan's jobs that concern `cell_ids` (plan jobs are named "write <model>",
    "train <cell id>", "eval <model>", "judge <model>"), as a RunPlan; None when the plan has
    no schedule (no capacity, or problems: the view then falls back on the rate seen)."""
    if not plan.slots or not plan.capacity:
        return None
    ids = list(cell_ids)
    model_of = {p.cell.cell_id: p.cell.model for p in plan.cells}
    jobs = []
    for slot in plan.slots:
        kind, key = slot.job.name.split(" ", 1)
        if kind == "train":
            cells = (key,) if key in ids else ()
        elif kind in ("eval", "judge"):
            cells = tuple(c for c in ids if model_of.get(c) == key)
        else:
            cells = ()
        if cells or kind == "write":
            jobs.append(PlannedJob(slot.job, cells))
    return RunPlan(tuple(jobs), plan.capacity, max_train)


def _phase_span(row: dict, phase: str) -> dict:
    spans = row.get("phases")
    return (spans.get(phase) or {}) if isinstance(spans, dict) else {}


def _finished(job: PlannedJob, rows: dict[str, dict]) -> bool:
    states = [rows.get(c, {}).get("status") for c in job.cells]
    if job.kind == "train" and "end" in _phase_span(rows.get(job.cells[0], {}), "train"):
        return True  # trained; its evaluation is the eval job's
    return all(s in ("done", "failed") for s in states)


def _measured_s(job: PlannedJob, rows: dict[str, dict]) -> float | None:
    """Wall seconds a finished train or eval job took, from the phases the grid records in its
    cells' status (results.record_phase); None if failed or unrecorded."""
    if any(rows.get(c, {}).get("status") == "failed" for c in job.cells):
        return None  # a failure's time says nothing about the cluster's speed
    spans = [_phase_span(rows.get(c, {}), job.kind) for c in job.cells]
    if not spans or not all("start" in s and "end" in s for s in spans):
        return None
    return max(s["end"] for s in spans) - min(s["start"] for s in spans)


def plan_ratio(plan: RunPlan, rows: dict[str, dict]) -> float:
    """Measured over planned seconds of the train and eval jobs already finished (1.0 before
    any): how much slower (> 1) or faster this cluster runs than the cost model assumes. A
    model's recorded `eval` phase runs from its generations' start to its judging's end, so
    it is set against both jobs' planned seconds."""
    judging = {j.job.name.split(" ", 1)[1]: j.job.seconds for j in plan.jobs if j.kind == "judge"}
    measured = planned = 0.0
    for job in plan.jobs:
        if job.kind in ("write", "judge") or not _finished(job, rows):
            continue
        took = _measured_s(job, rows)
        if took is not None:
            extra = judging.get(job.job.name.split(" ", 1)[1], 0.0) if job.kind == "eval" else 0
            measured, planned = measured + took, planned + job.job.seconds + extra
    return measured / planned if planned > 0 else 1.0


def _left_s(job: PlannedJob, rows: dict, fractions: dict, phase: str, now: float, ratio: float):
    """Seconds `job` still needs at the measured pace (`ratio` x planned): none when finished;
    a training cell less its steps done; a running evaluation less the time since it started
    (its cells' last status write); a writer while the reflections phase is still ahead."""
    planned = job.job.seconds * ratio
    if job.kind == "write":
        return planned if phase in ("starting", "reflections") else 0.0
    if _finished(job, rows):
        return 0.0
    if job.kind == "train":
        return planned * (1.0 - fractions.get(job.cells[0], 0.0))
    if job.kind == "judge":  # after its model's generations, whose time the eval job counts
        return planned
    evaluating = [rows[c] for c in job.cells if rows.get(c, {}).get("stage") == "eval"]
    running = [r["time"] for r in evaluating if r.get("status") == "running"]
    return max(0.0, planned - (now - min(running))) if running else planned


def planned_eta_s(
    plan: RunPlan, rows: dict[str, dict], fractions: dict[str, float], phase: str, now: float
) -> tuple[float, float]:
    """(ETA seconds, ratio). The planner's own schedule (tbr_ray.plan.simulate, the policy
    that gives `--dry-run` its makespan) run over the work left: each job's seconds left
    (`_left_s`) on the devices it holds, its dependencies on finished jobs dropped, spread
    over the cluster's slots. Planned seconds are scaled by `plan_ratio`, so after the first
    finished jobs the ETA runs at this cluster's measured pace. `rows`: status rows by cell
    id; `fractions`: the running training cells' share of steps done."""
    ratio = plan_ratio(plan, rows)
    left = {j.job.name: _left_s(j, rows, fractions, phase, now, ratio) for j in plan.jobs}
    todo = [
        replace(j.job, seconds=left[j.job.name], after=tuple(a for a in j.job.after if left.get(a)))
        for j in plan.jobs
        if left[j.job.name] > 0
    ]
    slots = simulate(todo, plan.capacity, 0.0, plan.max_train)
    return max((slot.end_s for slot in slots), default=0.0), ratio


# ------------------------------------------------------------------ the run folder now


def snapshot(
    output: Path,
    cell_ids: Iterable[str],
    phase: str,
    started: float,
    start_fraction=0.0,
    plan: RunPlan | None = None,
) -> Snapshot:
    """The run folder's state now. Cells without a status yet are `waiting`. With a `plan`
    the ETA is `planned_eta_s`; without one it is the rate seen since `started` (finished
    cells + running cells' steps, beyond what was already finished at the start,
    `start_fraction`) carried over what is left."""
    status = results.read_status(output)
    rows = {r["cell_id"]: r for r in status.to_dict("records")} if len(status) else {}
    counts = dict.fromkeys(STATES, 0)
    running = []
    for cell_id in dict.fromkeys([*cell_ids, *rows]):
        row = rows.get(cell_id, {})
        state = row.get("status", "waiting")
        counts[state if state in counts else "waiting"] += 1
        if state == "running":
            running.append(_running_cell(output, cell_id, row))
    now = time.time()
    snap = Snapshot(phase, now - started, counts, running)
    if plan is not None:
        fractions = {c.cell_id: c.fraction() for c in running}
        eta, ratio = planned_eta_s(plan, rows, fractions, phase, now)
        return Snapshot(phase, now - started, counts, running, eta, ratio)
    gained = snap.finished_fraction() - start_fraction
    eta = snap.elapsed_s * (1 - snap.finished_fraction()) / gained if gained > 0 else None
    return Snapshot(phase, now - started, counts, running, eta)


def _running_cell(output: Path, cell_id: str, row: dict) -> CellProgress:
    stage = str(row.get("stage", "?"))
    prog = results.read_progress(output, cell_id) if stage == "train" else {}
    return CellProgress(
        cell_id,
        stage,
        prog.get("step"),
        prog.get("total_steps"),
        prog.get("epoch"),
        prog.get("loss"),
    )


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def format_snapshot(snap: Snapshot) -> str:
    """Plain text: one summary line, then one line per running cell."""
    counts = ", ".join(f"{n} {state}" for state, n in snap.counts.items() if n)
    eta = f", ETA {_clock(snap.eta_s)}" if snap.eta_s is not None else ""
    eta += f" (plan x{snap.plan_ratio:.2f})" if snap.plan_ratio is not None else ""
    lines = [f"[{snap.phase}] {_clock(snap.elapsed_s)}: {snap.total} cells: {counts}{eta}"]
    for c in snap.running:
        detail = c.stage
        if c.step is not None:
            detail += f" epoch {c.epoch} step {c.step}/{c.total_steps}"
            detail += f" loss {c.loss:.3f}" if c.loss is not None else ""
        lines.append(f"  {c.cell_id}: {detail}")
    return "\n".join(lines)


def cluster_plan(cfg: RunConfig, cell_ids: Iterable[str]) -> RunPlan | None:
    """The plan of `cfg` on the Ray cluster this driver is connected to (its GPUs, or CPUs on
    a CPU run; an autoscaling cluster that has no GPU workers yet: cluster.gpus, the size it
    was planned for), for the ETA; None when Ray is not started here."""
    import ray

    if not ray.is_initialized():
        return None
    devices = int(ray.cluster_resources().get("GPU" if cfg.train.use_gpu else "CPU", 0))
    devices = devices or (cfg.cluster.gpus or 0 if cfg.train.use_gpu else 0)
    if not devices:
        return None
    return run_plan(plan_grid(cfg, devices), cell_ids, cfg.grid.max_concurrent)


class ProgressView:
    """Polls the run folder in a thread and shows `format_snapshot` (see the module doc).
    Given `cfg`, the ETA follows the planner (`cluster_plan`, built on entering)."""

    def __init__(
        self,
        output: Path,
        cell_ids: Iterable[str],
        on_poll: Callable[[Path], None] | None = None,
        interval_s: float = 2.0,
        log_every_s: float = 10.0,
        live: bool | None = None,
        cfg: RunConfig | None = None,
    ):
        self.output, self.cell_ids, self.cfg = Path(output), list(cell_ids), cfg
        self.plan: RunPlan | None = None
        self.on_poll, self.interval_s, self.log_every_s = on_poll, interval_s, log_every_s
        self.live = sys.stdout.isatty() if live is None else live
        self.phase = "starting"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tbr-progress", daemon=True)
        self._start_fraction = 0.0
        self._last_key: tuple = ()
        self._last_print = 0.0

    def snapshot(self) -> Snapshot:
        return snapshot(
            self.output, self.cell_ids, self.phase, self.started, self._start_fraction, self.plan
        )

    def __enter__(self) -> ProgressView:
        if self.cfg is not None:
            try:
                self.plan = cluster_plan(self.cfg, self.cell_ids)
            except Exception as exc:  # noqa: BLE001 - a view must never stop the run
                print(f"progress view: no planned ETA ({exc})", file=sys.stderr)
        self._start_fraction = self.snapshot().finished_fraction()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            with Live(console=Console(), refresh_per_second=1, transient=True) as live:
                self._loop(lambda snap: live.update(format_snapshot(snap)))
        else:
            self._loop(self._log)

    def _loop(self, show: Callable[[Snapshot], None]) -> None:
        while not self._stop.is_set():
            try:
                if self.on_poll:
                    self.on_poll(self.output)
                show(self.snapshot())
            except Exception as exc:  # noqa: BLE001 - a view must never stop the run
                print(f"progress view: {exc}", file=sys.stderr)
            self._stop.wait(self.interval_s)

    def _log(self, snap: Snapshot) -> None:
        """Non-terminal output: print when the picture changed (phase, states, stages, steps;
        not the clock), at most every log_every_s seconds."""
        key = (snap.phase, tuple(snap.counts.values()))
        key += tuple((c.cell_id, c.stage, c.step) for c in snap.running)
        now = time.time()
        if key != self._last_key and now - self._last_print >= self.log_every_s:
            print(format_snapshot(snap), flush=True)
            self._last_key, self._last_print = key, now
