"""The grid's makespan against the ideal, and a rerun of a finished grid against its first run.

    .venv/bin/python bench/grid_makespan.py runs/tiny --wall-s 480       # a finished run
    .venv/bin/python bench/grid_makespan.py runs/tiny --wall-s 480 --rerun jobs/tiny.yaml

From the cells' status.json `phases` (when the scheduler trained and evaluated each cell):
- work: the seconds of every job (one cell's training; one base model's evaluation, counted
  once for all its cells), summed;
- ideal: work / the training slots the scheduler had (`--slots`; 1 on the 2-core box, where
  one cell's two workers take the cores), i.e. the makespan of jobs run back to back with no
  gap. Efficiency = ideal / measured wall time (`--wall-s`, the run's whole `tbr-ray ablate`,
  Ray start and reflections included); target >= 0.85. Jobs that overlap (an evaluation beside
  a training cell) can push it above 1;
- busy: the share of the wall time in which at least one job ran (what the scheduler can
  influence: start-up, reflections and gaps between jobs are the rest).
`--rerun CONFIG` then runs `tbr-ray ablate --config CONFIG --output RUN` again (everything is
done, so it redoes nothing) and prints its wall time against `--wall-s`; target <= 5%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def jobs(run: Path) -> list[tuple[str, float, float]]:
    """(kind:key, start, end) of every job, an evaluation once per base model."""
    seen = {}
    for status in sorted(run.glob("cells/*/status.json")):
        cell = json.loads(status.read_text())
        model = cell["cell_id"].split("__")[0]
        for phase, span in (cell.get("phases") or {}).items():
            key = f"train:{cell['cell_id']}" if phase == "train" else f"eval:{model}"
            seen[key, span["start"]] = (key, span["start"], span["end"])
    return sorted(seen.values(), key=lambda j: j[1])


def busy_seconds(spans: list[tuple[str, float, float]]) -> float:
    """Length of the union of the jobs' time spans."""
    total, end = 0.0, float("-inf")
    for _, s, e in spans:
        if s > end:
            total, end = total + (e - s), e
        elif e > end:
            total, end = total + (e - end), e
    return total


def report(run: Path, wall_s: float, slots: int) -> str:
    spans = jobs(run)
    if not spans:
        raise SystemExit(f"{run}: no cell has `phases` in its status.json (not a finished run?)")
    work = sum(e - s for _, s, e in spans)
    ideal = work / slots
    span = spans[-1][2] - spans[0][1]
    lines = [
        f"{k:44} {s - spans[0][1]:7.0f} {e - spans[0][1]:7.0f} {e - s:6.0f}" for k, s, e in spans
    ]
    return "\n".join(
        [
            f"{'job':44} {'start_s':>7} {'end_s':>7} {'took':>6}",
            *lines,
            f"jobs: {len(spans)}, work {work:.0f} s, slots {slots}, ideal {ideal:.0f} s; "
            f"first job start to last job end {span:.0f} s; wall {wall_s:.0f} s",
            f"efficiency (ideal / wall): {ideal / wall_s:.2f}  (target >= 0.85)",
            f"busy (a job running / wall): {busy_seconds(spans) / wall_s:.2f}",
        ]
    )


def rerun(config: str, run: Path, wall_s: float) -> str:
    t0 = time.time()
    args = [sys.executable, "-m", "tbr_ray.cli", "ablate", "--config", config]
    proc = subprocess.run([*args, "--output", str(run)], capture_output=True, text=True)
    took = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rerun failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    last = proc.stdout.strip().splitlines()[-2:]
    return f"rerun of the finished grid: {took:.1f} s = {took / wall_s:.1%} of the first run " + (
        f"(target <= 5%); it printed: {' | '.join(last)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run folder")
    ap.add_argument("--wall-s", type=float, required=True, help="the run's wall time (s)")
    ap.add_argument("--slots", type=int, default=1, help="training slots the run had")
    ap.add_argument("--rerun", metavar="CONFIG", help="also time a rerun with this config")
    args = ap.parse_args()
    print(report(args.run, args.wall_s, args.slots))
    if args.rerun:
        print(rerun(args.rerun, args.run, args.wall_s))


if __name__ == "__main__":
    main()
