"""The run folder (`--output`): one writer at a time, and what `tbr-ray status` shows of it.

    with run_lock(Path("runs/tiny"), "ablate"):   # refuses a second driver, naming the holder
        ...
    print(format_status(Path("runs/tiny")))       # `tbr-ray status runs/tiny`

The lock is an advisory `flock` on `<output>/.tbr-ray.lock`, which also holds the holder's
host, pid, Ray job id, command and start time. The kernel drops the lock when its holder
exits in any way (kill -9 included), so a dead holder's lock is taken over by the next driver
without a stale-lock heuristic; a live holder is named in the refusal. On NFS v4 `flock` is
carried by the server's byte-range locks, so drivers on different nodes exclude each other too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tbr_ray import results
from tbr_ray.config import ConfigError
from tbr_ray.preflight import ray_job_id

LOCK_NAME = ".tbr-ray.lock"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def describe_holder(holder: dict) -> str:
    """One line naming a lock holder: pid, host, Ray job, command and start time."""
    if not holder:
        return "another process (its details are being written)"
    job = f", Ray job {holder['ray_job_id']}" if holder.get("ray_job_id") else ""
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}{job} "
        f"(`tbr-ray {holder.get('command')}`, since {_utc(holder.get('started', 0))})"
    )


def read_holder(output: Path) -> dict | None:
    """The current holder of the run lock, or None when no driver holds it."""
    path = Path(output) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)  # flock needs no write access: status works read-only
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = path.read_text()
        return json.loads(text) if text.strip() else {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def run_lock(output: Path, command: str) -> Iterator[dict]:
    """Hold `<output>`'s run lock for the block, or raise ConfigError naming the holder."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        text = path.read_text()
        holder = json.loads(text) if text.strip() else {}
        raise ConfigError(
            f"--output {output} is in use by {describe_holder(holder)}. Fix: wait for it to "
            f"finish or stop it (`ray job stop <id>` / `kill <pid>`), then rerun this command "
            f"to resume; or pass another --output."
        ) from None
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "ray_job_id": ray_job_id(),
        "command": command,
        "started": time.time(),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield me
    finally:
        os.ftruncate(fd, 0)  # no stale holder details once released
        os.close(fd)  # closing the last descriptor releases the flock


def _elapsed(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def status_lines(output: Path, now: float | None = None) -> list[str]:
    """Per cell: state, stage, start, elapsed, last update and, on failure, the error file."""
    now = time.time() if now is None else now
    status = results.read_status(output)
    lines = []
    for row in status.to_dict("records"):
        cell_id, state = row["cell_id"], row["status"]
        started, updated = row.get("started"), row.get("time")
        end = now if state == "running" else updated
        when = _utc(started) if _present(started) else "-"
        # started == updated: the cell's first record was its last (no `running` before it)
        timed = _present(started) and _present(end) and (state == "running" or end > started)
        took = _elapsed(end - started) if timed else "-"
        line = (
            f"{cell_id:44} {state:10} {str(row.get('stage') or '-'):6} {when:23} {took:>10} "
            f"{_utc(updated) if _present(updated) else '-'}"
        )
        if state == "failed":
            error_file = row.get("error_file")
            where = error_file if _present(error_file) else results.cell_dir(output, cell_id)
            line += f"\n    error: {_last_line(row.get('error'))}\n    full error: {where}"
        lines.append(line)
    return lines


def _last_line(error) -> str:
    """The exception line of an error text (Ray prefixes its own task header lines)."""
    lines = [x.strip() for x in str(error if _present(error) else "").splitlines() if x.strip()]
    return lines[-1][:200] if lines else ""


def _present(value) -> bool:
    return value is not None and value == value  # NaN (a column other rows lack) is absent


def format_status(output: Path) -> str:
    """What `tbr-ray status RUN_DIR` prints: run, driver, then one line per cell."""
    output = Path(output).resolve()
    manifest = output / "run.json"
    run = json.loads(manifest.read_text()) if manifest.is_file() else {}
    holder = read_holder(output)
    driver = describe_holder(holder) if holder is not None else "none (not running)"
    counts = results.read_status(output)["status"].value_counts().to_dict()
    head = (
        f"{'cell':44} {'state':10} {'stage':6} {'started':23} {'elapsed':>10} last update\n"
        + "-" * 118
    )
    return "\n".join(
        [
            f"run {run.get('run_id', '?')} in {output}",
            f"driver: {driver}",
            "cells: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none yet"),
            head,
            *status_lines(output),
        ]
    )
