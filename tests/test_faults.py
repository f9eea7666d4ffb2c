"""Fault tests of a whole run (issue 15): a real `tbr-ray ablate` (a subprocess, as a user runs
it) meets a fault in what it reads and still finishes, saying what it set aside.

    flock /work/heavy.lock timeout 900 .venv/bin/pytest tests/test_faults.py -x -q   # ~2 min

Other faults of issue 15 live beside the code they test: a killed driver and a second driver
(tests/test_grid.py), SIGINT (tests/test_grid.py, tests/test_interrupt.py), a killed writer
(tests/test_results.py, tests/test_rundir.py)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tbr_ray import results
from tbr_ray.config import DataConfig

from .test_data import BROKEN_HH_LINES, write_hh

REPO = Path(__file__).resolve().parent.parent
CELL = "tiny-llama__none__g0.00__s0"
DATA = DataConfig().resolved_root()


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
    """A cache of its own, so the run's mix is the only one in it; the built models shared."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir / "models")
    return cache


@pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the shared data at {DATA}")
def test_malformed_data_rows_are_quarantined_with_reasons_and_the_run_completes(
    tmp_path, data_root, cache_dir, tiny_llama
):
    root = _data_root_with_broken_rows(tmp_path, data_root)
    cache = _fresh_cache(tmp_path, cache_dir)
    out = tmp_path / "run"
    args = ["--config", "jobs/smoke.yaml", "--output", str(out)]
    for s in (
        f"data.root={root}",
        f"paths.cache_dir={cache}",
        "data.safety_source=hh-rlhf-harmless",
    ):
        args += ["--set", s]
    proc = subprocess.run(
        [sys.executable, "-m", "tbr_ray.cli", "ablate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert results.read_status(out).set_index("cell_id").loc[CELL, "status"] == "done"
    (report,) = [json.loads(p.read_text()) for p in (cache / "mixes").glob("*/report.json")]
    assert report["n_skipped"] == len(BROKEN_HH_LINES)
    assert [(s["source_id"], s["reason"]) for s in report["skipped"]] == [
        (f"hh-rlhf-harmless:{i}", reason) for i, (_, reason) in enumerate(BROKEN_HH_LINES)
    ]
    assert report["n_safety"] == 8  # the mix is whole: good rows took the broken ones' place
