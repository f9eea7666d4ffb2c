"""`tbr-ray status RUN_DIR`: the driver holding a run folder and, per cell, where it stands.

    print(format_status(Path("runs/tiny")))

Reads only the run folder (tbr_ray.results, tbr_ray.rundir): works while a run goes on, after
it stopped, and for a user who may only read the folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from tabulate import tabulate

from tbr_ray import results
from tbr_ray.rundir import DamagedFile, RunDir, describe_holder, read_holder, read_json, utc_time


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
        "stage": str(row.get("stage") if _present(row.get("stage")) else "-"),
        "started": utc_time(started) if _present(started) else "-",
        "elapsed": _elapsed(end - started) if timed else "-",
        "last update": utc_time(updated) if _present(updated) else "-",
    }


def status_lines(output: Path, now: float | None = None) -> list[str]:
    """The cell table (header, rule, one line per cell), a failed cell's error line and error
    file under its row, a damaged cell's problem and fix."""
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
        if row["status"] == results.DAMAGED:
            lines.append(f"    {row['error']}")
        elif row["status"] == "failed":
            error_file = row.get("error_file")
            where = error_file if _present(error_file) else RunDir(output).cell(row["cell_id"])
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
    try:
        run = read_json(RunDir(output).manifest) or {}
    except DamagedFile as err:
        run = {"run_id": f"? ({err})"}
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
