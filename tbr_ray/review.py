"""Human review of refusals: a queue of generations, a local review page, CSV round trip.

    tbr-ray review runs/tiny --reviewer ada                 # serve the page, print its URL
    tbr-ray review runs/tiny --reviewer ada --export q.csv  # the same queue as a spreadsheet
    tbr-ray review runs/tiny --reviewer ada --import q.csv  # labels from the filled-in sheet

    cfg = ReviewConfig(reviewer="ada")
    queue = build_queue(read_results("runs/tiny"), cfg)     # disagreements first, then a sample
    server = make_server("runs/tiny", cfg)                  # ReviewServer; .url has the token
    server.serve_forever()

The queue holds refusal-judged generations (false-refusal and safety benchmarks) of finished
cells: first every generation on which the automatic judges disagree, then a seeded sample of
the others per benchmark x cell. Each label is written as it is given, atomically, to
RESULTS/reviews/<reviewer>.parquet through `tbr_ray.results`; `read_results` returns them as the
judges `human` and `paper-reviewed`. The page is bound to 127.0.0.1 on a free port (another
host only with `allow_network`) and answers only requests that carry the token printed with its
URL; a malformed request gets a 4xx and a JSON reason, never a held thread (`ReviewHandler`).
"""

from __future__ import annotations

import csv
import ipaddress
import json
import re
import secrets
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from tbr_ray.judges import JUDGES, _read_labels, is_refusal, normalise_human_label
from tbr_ray.labels import disagreements, label_table
from tbr_ray.results import (
    REVIEW_KEYS,
    SCHEMA_VERSION,
    Results,
    read_results,
    read_reviews,
    review_path,
    update_review,
)
from tbr_ray.rundir import RunDir

PAGE = Path(__file__).with_name("review.html")
QUEUE_COLUMNS = [
    *REVIEW_KEYS,
    "reason",  # disagreement | sample
    "model",
    "condition",
    "gamma",
    "seed",
    "category",
    "prompt",
    "completion",
]


class ReviewConfig(BaseModel):
    """One review session: who labels, which generations, where the page listens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reviewer: str = Field(description="Name stored with each label; one file per reviewer.")
    sample_per_cell: int = Field(
        5, ge=0, description="Generations the judges agree on, sampled per benchmark x cell."
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of that sample: the same seed, the same queue."
    )
    host: str = Field("127.0.0.1", description="Address to bind; keep it local.")
    port: int = Field(0, ge=0, le=65535, description="0: a free port chosen by the system.")
    allow_network: bool = Field(
        False,
        description="Bind a host other machines reach (0.0.0.0, a LAN address). The page and "
        "its token then travel in plain HTTP: anyone on the path can read the token and label "
        "in your name. Off: such a host is refused (reach the page over `ssh -L` instead).",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="A client silent this long mid-request is dropped."
    )


# ------------------------------------------------------------------ the queue (pure)


def build_queue(results: Results, cfg: ReviewConfig) -> pd.DataFrame:
    """Generations to review: QUEUE_COLUMNS + a `judge:<name>` column per judge. Disagreements
    first, then `sample_per_cell` others per benchmark x cell; each part sorted by benchmark,
    cell, prompt."""
    gens = results.generations
    gens = gens[gens["benchmark_kind"] != "general"]
    auto = results.judgements[results.judgements["judge"].isin(JUDGES)]
    differ = disagreements(auto[[*REVIEW_KEYS, "judge", "refused"]])[REVIEW_KEYS]
    judged = gens.merge(label_table(results.judgements), on=REVIEW_KEYS, how="inner")
    flagged = judged.merge(differ.assign(reason="disagreement"), on=REVIEW_KEYS, how="left")
    first = flagged[flagged["reason"].notna()]
    rest = flagged[flagged["reason"].isna()].assign(reason="sample")
    sample = [
        group.sample(n=min(cfg.sample_per_cell, len(group)), random_state=cfg.seed)
        for _, group in rest.groupby(["benchmark", "cell_id"], sort=True)
    ]
    order = ["benchmark", "cell_id", "prompt_id"]
    parts = [first.sort_values(order)]
    if sample:
        parts.append(pd.concat(sample).sort_values(order))
    queue = pd.concat(parts, ignore_index=True)
    return queue[QUEUE_COLUMNS + judge_columns(queue)].reset_index(drop=True)


def judge_columns(frame: pd.DataFrame) -> list[str]:
    """The `judge:<name>` columns of a queue, in JUDGES order."""
    return [f"judge:{j}" for j in JUDGES if f"judge:{j}" in frame.columns]


def item_key(row: Any) -> str:
    """The id of a generation in the page and its API: cell|benchmark|prompt."""
    return "|".join(str(row[k]) for k in REVIEW_KEYS)


def review_row(run_id: str, key: dict[str, str], reviewer: str, label: str) -> dict[str, Any]:
    """A REVIEWS row for one label given now."""
    return {
        "run_id": run_id,
        **key,
        "reviewer": reviewer,
        "label": label,
        "refused": is_refusal(label),
        "reviewed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "schema_version": SCHEMA_VERSION,
    }


# ------------------------------------------------------------------ labels on disk


class ReviewStore:
    """A reviewer's labels in memory and on disk. Every `set` reads the file, adds its labels
    and writes it atomically under the run folder's update lock (results.update_review), so
    closing the page or killing the command loses nothing already acknowledged, and two
    pages, or `--import` beside a page, keep each other's labels."""

    def __init__(self, results_dir: str | Path, reviewer: str, run_id: str):
        review_path(results_dir, reviewer)  # fails early on a bad reviewer name
        self.results_dir, self.reviewer, self.run_id = Path(results_dir), reviewer, run_id
        mine = read_reviews(results_dir).query("reviewer == @reviewer")
        self.rows = {item_key(r): r for r in mine.to_dict("records")}
        self._lock = threading.Lock()

    def label_of(self, key: str) -> str | None:
        row = self.rows.get(key)
        return None if row is None else row["label"]

    def set(self, items: dict[str, dict[str, str]]) -> None:
        """Store labels {item key: {"label", "cell_id", "benchmark", "prompt_id"}} at once."""
        rows = []
        for item in items.values():
            label = normalise_human_label(item["label"])
            ids = {k: item[k] for k in REVIEW_KEYS}
            rows.append(review_row(self.run_id, ids, self.reviewer, label))
        with self._lock:
            mine = update_review(self.results_dir, self.reviewer, rows)
            self.rows = {item_key(r): r for r in mine.to_dict("records")}


def run_id_of(results: Results) -> str:
    ids = results.generations["run_id"].unique()
    return str(ids[0]) if len(ids) else "unknown"


# ------------------------------------------------------------------ CSV round trip

# OWASP "CSV Injection" (owasp.org/www-community/attacks/CSV_Injection): a cell that starts
# with one of these is run as a formula by Excel, LibreOffice and Google Sheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell made inert for spreadsheets, as OWASP advises: a leading `'` before text that
    starts like a formula. Text that already starts with `'` gets one too, so `csv_text`
    undoes it exactly. (defusedcsv, the library for this, also rewrites "|" inside a value and
    leaves tab and CR alone: not reversible, so a model's completion would not round-trip.)"""
    if isinstance(value, str) and value.startswith((*FORMULA_STARTS, "'")):
        return "'" + value
    return value


def csv_text(cell: str) -> str:
    """The text `csv_cell` escaped: one leading `'` removed."""
    return cell[1:] if cell.startswith("'") else cell


def export_csv(results: Results, cfg: ReviewConfig, store: ReviewStore, path: Path) -> int:
    """Write the queue with a `label` column (this reviewer's labels so far); returns rows.
    Every cell is quoted and escaped by `csv_cell` (model answers are untrusted text)."""
    queue = build_queue(results, cfg)
    labels = [store.label_of(item_key(r)) or "" for r in queue.to_dict("records")]
    sheet = queue.assign(label=labels).map(csv_cell)
    sheet.to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    return len(queue)


def _as_exported(cell: str, stored: Any) -> bool:
    """A sheet cell holds the run's value: escaped as exported, or with the `'` a spreadsheet
    consumed on saving."""
    return cell == stored or csv_text(cell) == stored


def import_csv(results: Results, store: ReviewStore, path: Path) -> int:
    """Store the labels of a filled-in sheet (rows with an empty label are skipped). Labels are
    validated as by `judge-score`; each row must name a judged generation of this run with the
    same prompt and completion. Returns the labels stored."""
    sheet = _read_labels(path, key_columns=tuple(REVIEW_KEYS), allow_blank=True)
    known = results.generations.merge(label_table(results.judgements)[REVIEW_KEYS], on=REVIEW_KEYS)
    known = known.set_index(REVIEW_KEYS)
    items = {}
    for row_number, row in sheet.iterrows():
        key = tuple(row[k] for k in REVIEW_KEYS)
        if key not in known.index:
            key = tuple(csv_text(row[k]) for k in REVIEW_KEYS)
        if key not in known.index:
            raise ValueError(
                f"{path}, data row {row_number}: {dict(zip(REVIEW_KEYS, key, strict=True))} is "
                "not a judged generation of this run. Fix: export the sheet from this run."
            )
        stored = known.loc[key]
        for column in ("prompt", "completion"):
            if not _as_exported(row[column], stored[column]):
                raise ValueError(
                    f"{path}, data row {row_number}: the {column} differs from the run's. Fix: "
                    "leave the prompt and completion columns as exported."
                )
        ids = dict(zip(REVIEW_KEYS, key, strict=True))
        items[item_key(ids)] = ids | {"label": row["label"]}
    store.set(items)
    return len(items)


# ------------------------------------------------------------------ the page


def queue_payload(queue: pd.DataFrame, store: ReviewStore) -> dict[str, Any]:
    """What the page shows: the reviewer, the judges and every item with its label so far."""
    items = []
    for row in queue.to_dict("records"):
        item = {k: _plain(row[k]) for k in QUEUE_COLUMNS}
        item["judges"] = {c.removeprefix("judge:"): _plain(row[c]) for c in judge_columns(queue)}
        item["key"] = item_key(row)
        item["label"] = store.label_of(item["key"])
        items.append(item)
    return {"reviewer": store.reviewer, "run_id": store.run_id, "items": items}


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and None become null, numpy scalars plain numbers."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value


def bind_address(host: str, port: int, allow_network: bool) -> tuple[int, bool]:
    """(socket family, reached from other machines) of `host`, or ValueError naming the fix:
    an unknown name, or a non-loopback address without `allow_network`."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(
            f"--host {host!r}: not an address or a name this machine resolves ({exc}). "
            "Fix: leave --host at 127.0.0.1 (the default)."
        ) from None
    family = found[0][0]
    exposed = not all(ipaddress.ip_address(a[4][0]).is_loopback for a in found)
    if exposed and not allow_network:
        raise ValueError(
            f"--host {host}: other machines could reach the review page, and its token would "
            "travel in plain HTTP (anyone on the network path could read it and label in your "
            "name). Fix: keep the default 127.0.0.1 and reach it from elsewhere with `ssh -L "
            "8000:127.0.0.1:<port> <this host>`, or add --allow-network to accept the risk."
        )
    return family, exposed


class ReviewServer(ThreadingHTTPServer):
    """The review page and its two API calls, for one reviewer of one run. Binds only a
    loopback address unless `cfg.allow_network` (`exposed` then says so)."""

    daemon_threads = True

    def __init__(self, results_dir: str | Path, cfg: ReviewConfig):
        self.address_family, self.exposed = bind_address(cfg.host, cfg.port, cfg.allow_network)
        results = read_results(results_dir)
        self.cfg = cfg
        self.queue = build_queue(results, cfg)
        self.store = ReviewStore(results_dir, cfg.reviewer, run_id_of(results))
        self.items = {item_key(r): r for r in self.queue.to_dict("records")}
        self.token = secrets.token_urlsafe(16)
        try:
            super().__init__((cfg.host, cfg.port), ReviewHandler)
        except OSError as exc:
            raise ValueError(
                f"--host {cfg.host} --port {cfg.port}: cannot listen there ({exc.strerror}). "
                "Fix: --port 0 (a free port), or stop what holds that port."
            ) from None

    def handle_error(self, request, client_address) -> None:
        """One line, not socketserver's traceback: the URL above it must stay readable."""
        err = sys.exc_info()[1]
        print(f"review page: a request from {client_address[0]} failed: {err!r}", file=sys.stderr)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/?token={self.token}"

    def progress(self) -> dict[str, int]:
        done = sum(self.store.label_of(k) is not None for k in self.items)
        return {"done": done, "total": len(self.items)}


MAX_BODY_BYTES = 64 * 1024  # a label request is ~200 bytes
LENGTH = re.compile(r"[0-9]{1,12}")  # not int(): it takes "-1", " 1_0", "١"
LABEL_KEYS = ("key", "label")


class BadRequest(Exception):
    """A request answered with `status` and `message`, then the connection closed."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class ReviewHandler(BaseHTTPRequestHandler):
    """http.server parses the request line and headers (bounded: 64 KiB a line, 100 headers);
    the body is read here, bounded by Content-Length and MAX_BODY_BYTES, under a socket
    timeout (`timeout`, set from the config), so no client holds a thread open."""

    server: ReviewServer

    def setup(self) -> None:
        self.timeout = self.server.cfg.request_timeout_s  # StreamRequestHandler: settimeout
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        if not self._authorised(parse_qs(url.query).get("token", [""])[0]):
            return
        if url.path == "/":
            self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif url.path == "/api/items":
            payload = queue_payload(self.server.queue, self.server.store)
            self._json(HTTPStatus.OK, payload | self.server.progress())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {url.path}"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if not self._authorised(self.headers.get("X-Review-Token", "")):
            return
        if url.path != "/api/label":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {url.path}"})
            return
        try:
            body = self._label_body()
        except BadRequest as err:
            self.close_connection = True
            self._json(err.status, {"error": str(err)})
            return
        item = self.server.items.get(body["key"])
        if item is None:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"unknown item {body.get('key')!r}"})
            return
        try:
            self.server.store.set({body["key"]: {**item, "label": body["label"]}})
        except ValueError as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return
        except OSError as err:  # e.g. a full disk: the page says the label was not saved
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"not saved: {err}"})
            return
        label = self.server.store.label_of(body["key"])
        self._json(HTTPStatus.OK, {"key": body["key"], "label": label} | self.server.progress())

    def _label_body(self) -> dict[str, str]:
        """The JSON object {"key": str, "label": str} of a POST, or BadRequest."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if not LENGTH.fullmatch(length.strip()):
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"Content-Length {length!r} is no byte count")
        if int(length) > MAX_BODY_BYTES:
            raise BadRequest(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a body over {MAX_BODY_BYTES} bytes"
            )
        try:
            data = self.rfile.read(int(length))
        except TimeoutError:
            raise BadRequest(HTTPStatus.REQUEST_TIMEOUT, "the body did not arrive") from None
        try:
            body = json.loads(data)
        except ValueError:  # also UnicodeDecodeError, a short body
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
        if not (isinstance(body, dict) and all(isinstance(body.get(k), str) for k in LABEL_KEYS)):
            raise BadRequest(HTTPStatus.BAD_REQUEST, 'send a JSON object {"key": .., "label": ..}')
        return body

    def _authorised(self, token: str) -> bool:
        # as bytes: compare_digest refuses str with non-ASCII characters (a TypeError)
        if secrets.compare_digest(
            token.encode("utf-8", "surrogateescape"), self.server.token.encode()
        ):
            return True
        self._json(HTTPStatus.FORBIDDEN, {"error": "missing or wrong token; use the printed URL"})
        return False

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: one line per request would bury the URL the user needs."""


def make_server(results_dir: str | Path, cfg: ReviewConfig) -> ReviewServer:
    """A bound, not yet serving review server; `.url` is the address to open."""
    if not RunDir(results_dir).cells.is_dir():
        raise FileNotFoundError(
            f"{results_dir} holds no cells/ folder. Fix: pass a results directory (the "
            "--output of `tbr-ray ablate`)."
        )
    return ReviewServer(results_dir, cfg)
