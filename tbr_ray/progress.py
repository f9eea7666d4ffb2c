"""The live progress view of `tbr-ray ablate`: phase, cells by state, running cells, ETA.

    with ProgressView(output, cell_ids, on_poll=metrics.record_status) as view:
        view.phase = "training"
        ...                                   # the grid runs; a thread polls the run folder
    print(format_snapshot(snapshot(output, cell_ids, "done", t0)))

It reads only the run folder: cell status files (results.read_status) and the progress file
each training cell's rank-0 worker writes (results.read_progress), so it works whatever
schedules the cells. On a terminal it redraws in place (rich); otherwise (a log, `ray job
logs`) it prints a line when the picture changes, at most every `log_every_s`. `on_poll` is
called on every poll, so dashboard gauges follow cell state as it changes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tbr_ray import results

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

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def finished_fraction(self) -> float:
        done = self.counts["done"] + self.counts["failed"]
        return (done + sum(c.fraction() for c in self.running)) / max(self.total, 1)


def snapshot(
    output: Path, cell_ids: Iterable[str], phase: str, started: float, start_fraction=0.0
) -> Snapshot:
    """The run folder's state now. Cells without a status yet are `waiting`. The ETA is the
    rate seen since `started` (finished cells + running cells' steps, beyond what was already
    finished at the start, `start_fraction`) carried over what is left."""
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
    elapsed = time.time() - started
    snap = Snapshot(phase, elapsed, counts, running)
    gained = snap.finished_fraction() - start_fraction
    eta = elapsed * (1 - snap.finished_fraction()) / gained if gained > 0 else None
    return Snapshot(phase, elapsed, counts, running, eta)


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
    lines = [f"[{snap.phase}] {_clock(snap.elapsed_s)}: {snap.total} cells: {counts}{eta}"]
    for c in snap.running:
        detail = c.stage
        if c.step is not None:
            detail += f" epoch {c.epoch} step {c.step}/{c.total_steps}"
            detail += f" loss {c.loss:.3f}" if c.loss is not None else ""
        lines.append(f"  {c.cell_id}: {detail}")
    return "\n".join(lines)


class ProgressView:
    """Polls the run folder in a thread and shows `format_snapshot` (see the module doc)."""

    def __init__(
        self,
        output: Path,
        cell_ids: Iterable[str],
        on_poll: Callable[[Path], None] | None = None,
        interval_s: float = 2.0,
        log_every_s: float = 10.0,
        live: bool | None = None,
    ):
        self.output, self.cell_ids = Path(output), list(cell_ids)
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
        return snapshot(self.output, self.cell_ids, self.phase, self.started, self._start_fraction)

    def __enter__(self) -> ProgressView:
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
