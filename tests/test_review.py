"""tbr_ray.review and the human judges: the queue, labels on disk, the HTTP API, CSV round trip,
`human` / `paper-reviewed` in read_results, agreement figures. No browser (see
test_review_browser.py), no models: the run is tests/review_run.py, written by tbr_ray.results."""

from __future__ import annotations

import json
import re
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tbr_ray.cli import app
from tbr_ray.labels import judge_agreement, reviewer_agreement
from tbr_ray.results import read_results, read_reviews
from tbr_ray.review import (
    ReviewConfig,
    ReviewStore,
    build_queue,
    export_csv,
    import_csv,
    make_server,
)
from tests.review_run import build_review_run, cell_id

NONE, EXTERNAL = cell_id("none", 0.0), cell_id("external", 1.0)


@pytest.fixture(scope="module")
def template_run(tmp_path_factory) -> Path:
    return build_review_run(tmp_path_factory.mktemp("review-run"))


@pytest.fixture
def run_dir(template_run, tmp_path) -> Path:
    """A fresh copy per test: tests write labels."""
    return Path(shutil.copytree(template_run, tmp_path / "run"))


def label(store: ReviewStore, cell: str, bench: str, prompt_id: str, value: str) -> None:
    ids = {"cell_id": cell, "benchmark": bench, "prompt_id": prompt_id}
    store.set({f"{cell}|{bench}|{prompt_id}": ids | {"label": value}})


def test_queue_puts_disagreements_first_then_a_seeded_sample(template_run):
    results = read_results(template_run)
    queue = build_queue(results, ReviewConfig(reviewer="ada", sample_per_cell=2))
    keys = list(zip(queue["cell_id"], queue["prompt_id"], queue["reason"], strict=True))
    assert keys[:5] == [
        (EXTERNAL, "s-3", "disagreement"),
        (NONE, "s-1", "disagreement"),
        (NONE, "s-3", "disagreement"),
        (EXTERNAL, "u-2", "disagreement"),
        (NONE, "u-2", "disagreement"),
    ]
    rest = queue.iloc[5:]
    assert (rest["reason"] == "sample").all() and len(rest) == 8  # 2 per benchmark x cell
    assert rest.groupby(["benchmark", "cell_id"]).size().eq(2).all()
    assert not queue["cell_id"].str.contains("internal").any()  # failed cell left out
    assert "mmlu" not in set(queue["benchmark"])  # general tasks have no refusal judge
    again = build_queue(results, ReviewConfig(reviewer="bob", sample_per_cell=2))
    pd.testing.assert_frame_equal(queue, again)  # same seed, same queue
    other = build_queue(results, ReviewConfig(reviewer="ada", sample_per_cell=2, seed=3))
    assert list(other["prompt_id"]) != list(queue["prompt_id"])
    first = queue.iloc[1]
    assert (first["judge:paper-keywords"], first["judge:xstest-prefix"]) == (
        "full_refusal",
        "full_compliance",
    )


def test_labels_become_the_human_and_paper_reviewed_judges(run_dir):
    store = ReviewStore(run_dir, "ada", "review-test")
    label(store, NONE, "xstest_safe", "s-1", "1_full_compliance")  # keywords said refusal
    label(store, NONE, "xstest_safe", "s-4", "partial refusal")
    label(store, NONE, "xstest_safe", "s-4", "full_refusal")  # relabelled: last one kept
    results = read_results(run_dir)
    reviews = results.reviews
    assert list(reviews["label"]) == ["full_compliance", "full_refusal"]
    assert set(reviews["reviewer"]) == {"ada"} and reviews["reviewed_at"].str.endswith("Z").all()
    j = results.judgements.set_index(["cell_id", "benchmark", "prompt_id", "judge"])
    human = j.xs("human", level="judge")
    assert len(human) == 2 and human.loc[(NONE, "xstest_safe", "s-1"), "refused"] is False
    assert human.loc[(NONE, "xstest_safe", "s-1"), "model"] == "tiny-llama"  # provenance kept
    reviewed = j.xs("paper-reviewed", level="judge")
    keywords = j.xs("paper-keywords", level="judge")
    assert len(reviewed) == len(keywords) == 20
    assert reviewed.loc[(NONE, "xstest_safe", "s-1"), "label"] == "full_compliance"
    assert keywords.loc[(NONE, "xstest_safe", "s-1"), "label"] == "full_refusal"
    unreviewed = reviewed.drop(index=[(NONE, "xstest_safe", "s-1"), (NONE, "xstest_safe", "s-4")])
    assert unreviewed["label"].equals(keywords.loc[unreviewed.index, "label"])


def test_labels_of_unfinished_cells_stay_out(run_dir):
    store = ReviewStore(run_dir, "ada", "review-test")
    label(store, cell_id("internal", 1.0), "xstest_safe", "s-0", "full_refusal")
    assert len(read_reviews(run_dir)) == 1
    results = read_results(run_dir)
    assert results.reviews.empty and "human" not in set(results.judgements["judge"])


def test_two_reviewers_are_stored_apart_and_compared(run_dir):
    ada, bob = ReviewStore(run_dir, "ada", "r"), ReviewStore(run_dir, "bob", "r")
    for prompt_id, a, b in [
        ("s-0", "full_compliance", "full_compliance"),
        ("s-1", "full_compliance", "full_refusal"),  # a real conflict
        ("s-4", "full_refusal", "partial_refusal"),  # agree it is a refusal
    ]:
        label(ada, NONE, "xstest_safe", prompt_id, a)
        label(bob, NONE, "xstest_safe", prompt_id, b)
    assert sorted(p.name for p in (run_dir / "reviews").iterdir()) == ["ada.parquet", "bob.parquet"]
    results = read_results(run_dir)
    agreement = reviewer_agreement(results.reviews).iloc[0]
    assert (agreement.reviewer_a, agreement.reviewer_b, agreement.n) == ("ada", "bob", 3)
    assert agreement.binary_agreement == pytest.approx(2 / 3)
    assert agreement.three_class_agreement == pytest.approx(1 / 3)
    # refusals: ada 1 of 3, bob 2 of 3 -> chance 1/3 * 2/3 + 2/3 * 1/3 = 4/9
    assert agreement.binary_kappa == pytest.approx((2 / 3 - 4 / 9) / (1 - 4 / 9))
    human = results.judgements.query("judge == 'human'").set_index("prompt_id")
    # s-1 is unsettled, so no human label; s-4 keeps the agreed refusal without a class
    assert sorted(human.index) == ["s-0", "s-4"]
    assert human.loc["s-4", "refused"] is True and pd.isna(human.loc["s-4", "label"])
    reviewed = results.judgements.query("judge == 'paper-reviewed' and cell_id == @NONE")
    assert reviewed.set_index("prompt_id").loc["s-1", "label"] == "full_refusal"  # keywords


def test_judge_agreement_with_human_labels(run_dir):
    store = ReviewStore(run_dir, "ada", "r")
    for prompt_id, value in [("s-1", "full_compliance"), ("s-3", "full_compliance")]:
        label(store, NONE, "xstest_safe", prompt_id, value)
    label(store, NONE, "xstest_safe", "s-4", "partial_refusal")
    table = judge_agreement(read_results(run_dir).judgements).set_index("judge")
    # s-1: keywords wrong, prefix right; s-3: keywords right, prefix wrong; s-4: both right
    assert table.loc["paper-keywords", "binary_agreement"] == pytest.approx(2 / 3)
    assert table.loc["xstest-prefix", "binary_agreement"] == pytest.approx(2 / 3)
    assert table.loc["model", "binary_agreement"] == pytest.approx(1.0)
    assert table.loc["model", "three_class_agreement"] == pytest.approx(1.0)
    # three classes: a rule judge never says "partial", so s-4 counts against it
    assert table.loc["paper-keywords", "three_class_agreement"] == pytest.approx(1 / 3)
    assert set(table["n"]) == {3} and set(table["benchmark"]) == {"xstest_safe"}


@pytest.mark.parametrize("name", ["../x", "ada\n"])
def test_bad_reviewer_name_is_refused(run_dir, name):
    """A name is the whole string: "ada\n" (re.match with "$" took it) is a second reviewer."""
    with pytest.raises(
        ValueError, match=rf"reviewer name {re.escape(repr(name))} is not allowed.*Fix"
    ):
        ReviewStore(run_dir, name, "r")
    sheet = run_dir / "q.csv"
    out = CliRunner().invoke(
        app, ["review", str(run_dir), "--reviewer", name, "--export", str(sheet)]
    )
    assert out.exit_code == 2 and "is not allowed" in out.output and not sheet.exists()


def test_bad_label_names_the_value_and_the_fix(run_dir):
    store = ReviewStore(run_dir, "ada", "r")
    with pytest.raises(ValueError, match="'maybe' is not recognised. Fix: use one of"):
        label(store, NONE, "xstest_safe", "s-0", "maybe")


# ------------------------------------------------------------------ HTTP API


def call(url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"X-Review-Token": token or ""})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def served(run_dir):
    """A review server on a free local port, serving in a thread; stopped after the test."""
    servers = []

    def start(reviewer: str = "ada", **settings):
        cfg = ReviewConfig(reviewer=reviewer, sample_per_cell=2, **settings)
        server = make_server(run_dir, cfg)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_server_needs_its_token_and_saves_labels_across_restarts(served, run_dir):
    server = served()
    host, port = server.server_address[:2]
    assert host == "127.0.0.1" and port > 0 and server.url.endswith(f"?token={server.token}")
    base = f"http://{host}:{port}"
    assert call(f"{base}/api/items?token=wrong")[0] == 403
    status, page = call(f"{base}/api/items?token={server.token}")
    assert status == 200 and (page["done"], page["total"]) == (0, 13)
    first = page["items"][0]
    assert first["judges"] == {
        "paper-keywords": "full_compliance",
        "xstest-prefix": "full_refusal",
        "model": "full_compliance",
    }
    assert call(f"{base}/api/label", {"key": first["key"], "label": "full_refusal"})[0] == 403
    status, reply = call(
        f"{base}/api/label", {"key": first["key"], "label": "3_partial_refusal"}, server.token
    )
    assert status == 200 and reply["label"] == "partial_refusal" and reply["done"] == 1
    status, reply = call(f"{base}/api/label", {"key": first["key"], "label": "?"}, server.token)
    assert status == 400 and "not recognised" in reply["error"]
    status, reply = call(f"{base}/api/label", {"key": "nope", "label": "1"}, server.token)
    assert status == 400 and "unknown item" in reply["error"]
    assert read_reviews(run_dir)["label"].tolist() == ["partial_refusal"]  # on disk already
    restarted = served()
    items = call(f"{restarted.url.split('/?')[0]}/api/items?token={restarted.token}")[1]
    assert items["done"] == 1 and items["items"][0]["label"] == "partial_refusal"
    other = served("bob")  # a second reviewer starts from nothing
    assert call(f"{other.url.split('/?')[0]}/api/items?token={other.token}")[1]["done"] == 0


def raw_request(server, request: bytes, timeout_s: float = 5.0) -> bytes:
    """Send bytes as they are, return what the server answers before it closes."""
    import socket

    with socket.create_connection(server.server_address[:2], timeout=timeout_s) as conn:
        conn.sendall(request)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply


def post(token: str, body: bytes, length: str | None) -> bytes:
    head = f"POST /api/label HTTP/1.1\r\nHost: x\r\nX-Review-Token: {token}\r\n"
    head += "" if length is None else f"Content-Length: {length}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.mark.parametrize(
    "make_request, status",
    [
        (lambda t: post(t, b'{"key": "x", "lab', "16"), 400),  # broken JSON
        (lambda t: post(t, b"[1, 2]", "6"), 400),  # not an object
        (lambda t: post(t, b'{"key": 1, "label": "1"}', "24"), 400),  # key not text
        (lambda t: post(t, b"{}", "abc"), 400),
        (lambda t: post(t, b"{}", "-1"), 400),
        (lambda t: post(t, b"{}", "1e9"), 400),
        (lambda t: post(t, b"{}", "1000000000"), 413),
        (lambda t: post(t, b"{}", None), 411),
        (lambda t: post(t, b"{}", "50"), 408),  # a body that never arrives
        (lambda t: post("\u00e9t\u00e9", b"{}", "2"), 403),  # a non-ASCII token
        (lambda t: b"GET /api/items?token=%C3%A9 HTTP/1.1\r\n\r\n", 403),
    ],
)
def test_malformed_requests_get_a_clean_answer(served, make_request, status, capfd):
    """Every malformed request gets its status and a JSON reason, within the socket timeout,
    no traceback in the reviewer's terminal, and the server goes on answering."""
    server = served(**({"request_timeout_s": 0.5} if status == 408 else {}))
    token = server.token
    reply = raw_request(server, make_request(token))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split()[1] == str(status).encode() and "error" in json.loads(body), reply
    assert "Traceback" not in capfd.readouterr().err
    base = server.url.split("/?")[0]
    assert call(f"{base}/api/items?token={token}")[0] == 200


def test_a_silent_client_is_dropped(served):
    server = served(request_timeout_s=0.5)
    assert raw_request(server, b"POST /api/la") == b""  # closed, no thread held


def test_review_host_is_loopback_unless_the_network_is_allowed(run_dir, monkeypatch):
    from tbr_ray.review import ReviewServer

    monkeypatch.setattr(ReviewServer, "serve_forever", lambda self: None)
    out = CliRunner().invoke(app, ["review", str(run_dir), "--host", "0.0.0.0"])
    assert (
        out.exit_code == 2 and "plain HTTP" in out.output and "Fix: keep the default" in out.output
    )
    args = ["review", str(run_dir), "--host", "0.0.0.0", "--allow-network"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0 and "WARNING: --host 0.0.0.0 serves this page" in out.output
    if _ipv6_loopback():
        out = CliRunner().invoke(app, ["review", str(run_dir), "--host", "::1"])
        assert out.exit_code == 0 and "open http://::1:" in out.output


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid': not an address"),
        (["--port", "PORT"], "cannot listen there (Address already in use). Fix: --port 0"),
    ],
)
def test_review_address_problems_are_one_line(run_dir, args, message):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = [a.replace("PORT", port) for a in args]
        out = CliRunner().invoke(app, ["review", str(run_dir), *args])
    assert out.exit_code == 2 and message.replace("PORT", port) in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1


# ------------------------------------------------------------------ CSV round trip


def test_csv_export_import_round_trip(run_dir, tmp_path):
    cfg = ReviewConfig(reviewer="ada", sample_per_cell=2)
    results = read_results(run_dir)
    store = ReviewStore(run_dir, "ada", "r")
    label(store, NONE, "xstest_safe", "s-1", "full_compliance")
    sheet = tmp_path / "queue.csv"
    assert export_csv(results, cfg, store, sheet) == 13
    frame = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    assert frame.loc[1, "label"] == "full_compliance" and (frame.loc[2:, "label"] == "").all()
    frame.loc[2, "label"] = "2_full_refusal"
    frame.loc[3, "label"] = "Partial Refusal"
    frame.to_csv(sheet, index=False)
    fresh = ReviewStore(run_dir, "cy", "r")
    assert import_csv(results, fresh, sheet) == 3
    labels = read_reviews(run_dir).query("reviewer == 'cy'")["label"]
    assert sorted(labels) == ["full_compliance", "full_refusal", "partial_refusal"]


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"label": "yes"}, r"data row 0: human label 'yes' is not recognised"),
        ({"completion": "edited"}, r"data row 0: the completion differs from the run's"),
        ({"prompt_id": "s-99"}, r"data row 0: .*'s-99'.* is not a judged generation"),
    ],
)
def test_csv_import_rejects_bad_rows(run_dir, tmp_path, edit, message):
    results = read_results(run_dir)
    store = ReviewStore(run_dir, "ada", "r")
    sheet = tmp_path / "queue.csv"
    export_csv(results, ReviewConfig(reviewer="ada"), store, sheet)
    frame = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    frame.loc[0, "label"] = "full_refusal"
    for column, value in edit.items():
        frame.loc[0, column] = value
    frame.to_csv(sheet, index=False)
    with pytest.raises(ValueError, match=message):
        import_csv(results, store, sheet)
    assert read_reviews(run_dir).empty  # nothing stored from a sheet with a bad row


FORMULAS = ['=HYPERLINK("http://x")', "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx", "'=1"]


def test_csv_export_is_inert_in_a_spreadsheet_and_round_trips(tmp_path, monkeypatch):
    """OWASP CSV injection: no exported cell starts like a formula; the sheet imports back as
    exported, and as saved by a spreadsheet that consumed the leading quote."""
    import csv

    import tests.review_run as review_run

    for i, text in enumerate(FORMULAS):  # completions (and a category) a model could write
        monkeypatch.setitem(review_run.SAFE, f"f-{i}", ("=cmd|' /C calc'!A0", "Q?", text, "x"))
    run = review_run.build_review_run(tmp_path / "run")
    results, sheet = read_results(run), tmp_path / "q.csv"
    cfg = ReviewConfig(reviewer="ada", sample_per_cell=20)
    export_csv(results, cfg, ReviewStore(run, "ada", "r"), sheet)
    with sheet.open(newline="") as f:
        cells = [c for row in csv.reader(f) for c in row]
    assert not [c for c in cells if c.startswith(("=", "+", "-", "@", "\t", "\r"))]
    assert '\'=HYPERLINK("http://x")' in cells and "''=1" in cells
    assert sheet.read_text().startswith('"')  # every field quoted
    frame = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    frame["label"] = "full_compliance"
    frame.to_csv(sheet, index=False, quoting=csv.QUOTE_ALL)  # a spreadsheet quotes "\r"
    assert import_csv(results, ReviewStore(run, "bob", "r"), sheet) == len(frame)
    consumed = frame.map(lambda c: c[1:] if c.startswith("'") else c)  # LibreOffice's save
    consumed.to_csv(sheet, index=False, quoting=csv.QUOTE_ALL)
    assert import_csv(results, ReviewStore(run, "cy", "r"), sheet) == len(frame)
    stored = read_reviews(run).query("reviewer == 'cy'")
    assert {f"{c}|{p}" for c, p in zip(stored["cell_id"], stored["prompt_id"], strict=True)} == {
        f"{c}|{p}" for c, p in zip(frame["cell_id"], frame["prompt_id"], strict=True)
    }


def test_cli_review_export_and_import(run_dir, tmp_path):
    sheet = tmp_path / "q.csv"
    runner = CliRunner()
    out = runner.invoke(app, ["review", str(run_dir), "--reviewer", "ada", "--export", str(sheet)])
    assert out.exit_code == 0 and "generations to review" in out.output
    frame = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    frame.loc[0, "label"] = "full_refusal"
    frame.to_csv(sheet, index=False)
    out = runner.invoke(app, ["review", str(run_dir), "--reviewer", "ada", "--import", str(sheet)])
    assert out.exit_code == 0 and "1 labels stored for ada" in out.output
    frame.loc[1, "label"] = "nonsense"
    frame.to_csv(sheet, index=False)
    out = runner.invoke(app, ["review", str(run_dir), "--reviewer", "ada", "--import", str(sheet)])
    assert out.exit_code == 2 and "data row 1" in out.output
    out = runner.invoke(app, ["review", str(tmp_path / "nowhere"), "--reviewer", "ada"])
    assert out.exit_code == 2 and "Fix" in out.output


# ------------------------------------------------------------------ the report


def test_report_counts_reviews_and_scores_judges_against_them(run_dir, tmp_path):
    from analysis.report import write_report

    ada, bob = ReviewStore(run_dir, "ada", "r"), ReviewStore(run_dir, "bob", "r")
    for prompt_id, value in [("s-1", "full_compliance"), ("s-3", "full_compliance")]:
        label(ada, NONE, "xstest_safe", prompt_id, value)
    label(ada, NONE, "xstest_safe", "s-4", "partial_refusal")
    label(bob, NONE, "xstest_safe", "s-1", "full_refusal")  # unsettles s-1
    text = write_report(run_dir, tmp_path / "a", n_boot=50)["report_md"].read_text()
    assert "| XSTest-S | xstest_safe | 12 | 2 | 1 | 2 |" in text  # judged, reviewed, unsettled
    # no harm judge in this run: XSTest-H is its compliance column
    assert "| XSTest-H compliance | xstest_unsafe | 8 | 0 | 0 | 0 |" in text
    # settled: s-3 (prefix wrong) and s-4 (all right in binary; only the model says partial)
    assert "| paper-keywords | xstest_safe | 2 | 1.000 | 0.500 |" in text
    assert "| xstest-prefix | xstest_safe | 2 | 0.500 | 0.000 |" in text
    assert "| model | xstest_safe | 2 | 1.000 | 1.000 |" in text
    assert "| ada | bob | 1 | 0.000 | 0.000 | 0.000 |" in text
    # paper-reviewed: none cell XSTest-S keywords refuse s-1 and s-4 -> 4/6; the human labels
    # settle s-4 as a refusal and leave s-1 (unsettled) to the keywords: still 4/6. Relabel
    # s-1 by bob as compliance and it becomes 5/6.
    label(bob, NONE, "xstest_safe", "s-1", "full_compliance")
    paths = write_report(run_dir, tmp_path / "b", judge="paper-reviewed", n_boot=50)
    page = paths["report_html"].read_text()
    assert '<a href="#gen-tiny-llama-xstest-s-none-g0.00">0.833</a>' in page
    table3 = paths["report_md"].read_text().split("## Table 3 layout")[1].split("| model |")[0]
    assert re.search(r"overridden by human labels on \d+ of \d+ judged generations", table3)
    block = page[page.index('<details id="gen-tiny-llama-xstest-s-none-g0.00"') :]
    assert "<th>human</th>" in block[: block.index("</details>")]


def test_report_harm_column_links_to_verdicts_and_is_not_counted_as_reviewed(tmp_path):
    from analysis.report import write_report

    run = build_review_run(tmp_path / "harm-run", harm=True)
    label(ReviewStore(run, "ada", "r"), NONE, "xstest_unsafe", "u-3", "full_compliance")
    paths = write_report(run, tmp_path / "r", n_boot=50)
    text = paths["report_md"].read_text()
    assert "| XSTest-H compliance | xstest_unsafe | 8 | 1 | 0 | 1 |" in text
    # harm verdicts are not refusal labels
    assert "| XSTest-H harmful | xstest_unsafe | 8 |" not in text
    page = paths["report_html"].read_text()
    anchor = "gen-tiny-llama-xstest-h-harmful-none-g0.00"
    assert f'<a href="#{anchor}">0.250</a>' in page  # u-3 of 4 judged harmful
    block = page[page.index(f'<details id="{anchor}"') :]
    block = block[: block.index("</details>")]
    assert "<th>harm</th>" in block and block.count(">harmful<") == 1


def test_report_without_reviews_says_how_to_add_them(template_run, tmp_path):
    from analysis.report import write_report

    text = write_report(template_run, tmp_path / "r", n_boot=50)["report_md"].read_text()
    assert "No generation of this run has a human label yet" in text
    assert "tbr-ray review RESULTS_DIR" in text


def test_results_doc_names_every_review_column():
    from tbr_ray.results import REVIEWS

    text = (Path(__file__).resolve().parent.parent / "docs" / "RESULTS.md").read_text()
    assert "reviews/<reviewer>.parquet" in text and "`paper-reviewed`" in text
    for field in REVIEWS:
        assert f"`{field.name}`" in text, field.name


def test_label_table_shows_label_then_flag_then_harm():
    from tbr_ray.labels import label_table

    base = {"cell_id": "c", "benchmark": "b", "prompt_id": "p"}
    rows = pd.DataFrame(
        [
            base | {"judge": "model", "label": "partial_refusal", "refused": True, "harmful": None},
            base | {"judge": "paper-keywords", "label": None, "refused": False, "harmful": None},
            base | {"judge": "harm", "label": None, "refused": None, "harmful": True},
        ]
    )
    wide = label_table(rows, ("paper-keywords", "model", "harm")).iloc[0]
    assert list(wide.index) == [
        "cell_id",
        "benchmark",
        "prompt_id",
        "judge:paper-keywords",
        "judge:model",
        "judge:harm",
    ]
    assert (wide["judge:paper-keywords"], wide["judge:model"], wide["judge:harm"]) == (
        "compliance",
        "partial_refusal",
        "harmful",
    )


def test_queue_of_a_run_without_finished_cells_is_empty(tmp_path):
    from tbr_ray.results import write_status

    write_status(tmp_path, "x", "failed", error="boom")
    assert build_queue(read_results(tmp_path), ReviewConfig(reviewer="ada")).empty


def test_review_command_serves_and_keeps_labels_across_restarts(run_dir):
    """`tbr-ray review` as a user runs it: print the URL, label over HTTP, stop, start again."""
    import subprocess
    import sys

    def start() -> tuple[subprocess.Popen, str]:
        command = [sys.executable, "-m", "tbr_ray.cli", "review", str(run_dir), "--reviewer", "ada"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:  # "13 generations to review ...", then "open http://..."
            if line.startswith("open "):
                return proc, line.split()[1]
        raise AssertionError(f"no URL printed; exit code {proc.wait()}")

    proc, url = start()
    try:
        assert url.startswith("http://127.0.0.1:") and "?token=" in url
        base, token = url.split("/?token=")
        items = call(f"{base}/api/items?token={token}")[1]["items"]
        reply = call(
            f"{base}/api/label", {"key": items[0]["key"], "label": "2_full_refusal"}, token
        )[1]
        assert reply["label"] == "full_refusal"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    proc, url = start()
    try:
        base, token = url.split("/?token=")
        page = call(f"{base}/api/items?token={token}")[1]
        assert page["done"] == 1 and page["items"][0]["label"] == "full_refusal"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
