"""Ctrl-C and SIGTERM (also `ray job stop`) during a run: stop scheduling, mark, skip the rest.

    with RunInterrupt(output) as stop:
        tuner = tune.Tuner(..., run_config=tune.RunConfig(stop=stop.stopper()))
        with stop.graceful():           # Tune winds its trials down itself
            tuner.fit()
        stop.raise_if_stopped()         # raises Interrupted: evaluation never starts

The first signal marks every `running` cell `interrupted` at once (so a SIGKILL that follows,
as `ray job stop` sends after a few seconds, still leaves the right states) and then either
raises KeyboardInterrupt (outside a graceful section) or lets Tune stop its trials (inside one,
through `stopper()`, whose trials keep their Ray Train checkpoints for the rerun). A second
signal always raises at once. Reruns resume: interrupted cells are not done.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from pathlib import Path

from tbr_ray import results
from tbr_ray.rundir import RunDir

SIGNALS = (signal.SIGINT, signal.SIGTERM)
TUNE_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


class Interrupted(Exception):
    """A run stopped by a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int, cells: list[str]):
        self.signum, self.cells = signum, cells
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped; {len(cells)} cell(s) marked interrupted")


def mark_interrupted(output: Path, reason: str) -> list[str]:
    """Every cell recorded `running` becomes `interrupted` (its stage kept); returns their ids.
    Each is checked again under the folder's update lock, so a cell whose trial wrote `done`
    meanwhile stays done."""
    status = results.read_status(output)
    if not len(status):
        return []
    marked = []
    for row in status[status["status"] == "running"].to_dict("records"):
        with RunDir(output).updating():
            if not results.is_running(output, row["cell_id"]):
                continue
            info = {k: v for k, v in row.items() if k not in ("cell_id", "status", "time")}
            info = {**_present(info), "reason": reason}
            results.write_status(output, row["cell_id"], "interrupted", **info)
        marked.append(row["cell_id"])
    return marked


def _present(info: dict) -> dict:
    """Drop the NaNs a DataFrame row fills in for keys this cell never had."""
    return {k: v for k, v in info.items() if not (isinstance(v, float) and v != v)}


class RunInterrupt:
    """Installs the SIGINT/SIGTERM handlers for the length of a run (main thread only: signal
    handlers cannot be set elsewhere, and then the default behaviour stays)."""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.signum: int | None = None
        self.cells: list[str] = []
        self._graceful = False
        self._saved: dict = {}
        self._tune_env: str | None = None

    def __enter__(self) -> RunInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._handle) for s in SIGNALS}
            # Tune would otherwise take SIGINT over while it runs and let the grid go on.
            self._tune_env = os.environ.get(TUNE_ENV)
            os.environ[TUNE_ENV] = "1"
        return self

    def __exit__(self, *exc) -> None:
        if not self._saved:
            return
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        if self._tune_env is None:
            os.environ.pop(TUNE_ENV, None)
        else:
            os.environ[TUNE_ENV] = self._tune_env

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: stop now
        self.signum = signum
        name = signal.Signals(signum).name
        self.cells = mark_interrupted(self.output, f"{name} received")
        print(f"\n{name}: stopping (cells marked interrupted; again to stop at once)", flush=True)
        if not self._graceful:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def graceful(self):
        """A section that winds down by itself when stopped (Tune through `stopper()`)."""
        self._graceful = True
        try:
            yield
        finally:
            self._graceful = False

    def stopper(self):
        """A Tune Stopper that ends the whole experiment once a signal came."""
        return _stopper_class()(self)

    def raise_if_stopped(self) -> None:
        """After a graceful section: mark what still runs, and raise Interrupted."""
        if self.signum is not None:
            late = mark_interrupted(self.output, f"{signal.Signals(self.signum).name} received")
            raise Interrupted(self.signum, sorted(set(self.cells) | set(late)))


@functools.cache
def _stopper_class():
    """Built on first use (importing Ray Tune costs a second)."""
    from ray.tune import Stopper

    class SignalStopper(Stopper):
        """Ends Tune's experiment once `interrupt` caught a signal. Tune pickles its stopper
        into the experiment state: the pickled copy drops the RunInterrupt (its saved signal
        handlers are not state to pickle) and never stops anything."""

        def __init__(self, interrupt: RunInterrupt):
            self.interrupt = interrupt

        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return self.interrupt is not None and self.interrupt.signum is not None

        def __getstate__(self) -> dict:
            return {"interrupt": None}

    return SignalStopper
