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

from tabulate import tabulate

from tbr_ray import results
from tbr_ray.config import ConfigError
from tbr_ray.preflight import ray_job_id
from tbr_ray.results import LOCK_NAME, read_holder  # the lock file is part of a results folder


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


STATUS_ALIGN = ("left", "left", "left", "left", "right", "left")  # elapsed: right


def status_record(row: dict, now: float) -> dict:
    """One cell's row of the status table: state, stage, start, elapsed, last update."""
    state, started, updated = row["status"], row.get("started"), row.get("time")
    end = now if state == "running" else updated
    # started == updated: the cell's first record was its last (no `running` before it)
    timed = _present(started) and _present(end) and (state == "running" or end > started)
    return {
        "cell": row["cell_id"],
        "state": state,
        "stage": str(row.get("stage") or "-"),
        "started": _utc(started) if _present(started) else "-",
        "elapsed": _elapsed(end - started) if timed else "-",
        "last update": _utc(updated) if _present(updated) else "-",
    }


def status_lines(output: Path, now: float | None = None) -> list[str]:
    """The cell table (header, rule, one line per cell), a failed cell's error line and error
    file under its row."""
    now = time.time() if now is None else now
    rows = results.read_status(output).to_dict("records")
    table = tabulate(
        [status_record(row, now) for row in rows],
        headers="keys",
        tablefmt="simple",
        disable_numparse=True,
        colalign=STATUS_ALIGN,
    ).splitlines()
    lines = table[:2]
    for row, line in zip(rows, table[2:], strict=True):
        lines.append(line)
        if row["status"] == "failed":
            error_file = row.get("error_file")
            where = error_file if _present(error_file) else results.cell_dir(output, row["cell_id"])
            lines += [f"    error: {_last_line(row.get('error'))}", f"    full error: {where}"]
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
    return "\n".join(
        [
            f"run {run.get('run_id', '?')} in {output}",
            f"driver: {driver}",
            "cells: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none yet"),
            *status_lines(output),
        ]
    )
