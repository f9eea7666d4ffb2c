"""The progress view reads the run folder: states, running cells' steps, ETA, log lines."""

import time

from tbr_ray import results
from tbr_ray.progress import ProgressView, format_snapshot, snapshot


def _run_folder(tmp_path):
    results.write_status(tmp_path, "m__none", "done")
    results.write_status(tmp_path, "m__internal", "running", stage="train")
    results.write_progress(
        tmp_path, "m__internal", {"step": 5, "total_steps": 10, "epoch": 1, "loss": 1.25}
    )
    results.write_status(tmp_path, "m__external", "failed", stage="train", error="boom")
    return ["m__none", "m__internal", "m__external", "m__waiting"]


def test_snapshot_counts_states_and_shows_running_steps(tmp_path):
    ids = _run_folder(tmp_path)
    snap = snapshot(tmp_path, ids, "training", started=time.time() - 60)
    assert snap.counts == {"done": 1, "failed": 1, "interrupted": 0, "running": 1, "waiting": 1}
    (cell,) = snap.running
    assert (cell.cell_id, cell.stage, cell.step, cell.total_steps, cell.epoch) == (
        "m__internal",
        "train",
        5,
        10,
        1,
    )
    # 2.5 of 4 cells in 60 s: 1.5 cells left take 36 s more.
    assert abs(snap.eta_s - 36) < 1
    text = format_snapshot(snap)
    assert text.startswith("[training] 1m00s: 4 cells: 1 done, 1 failed, 1 running, 1 waiting")
    assert "ETA 0m36s" in text
    assert "m__internal: train epoch 1 step 5/10 loss 1.250" in text


def test_eta_counts_only_progress_made_in_this_run(tmp_path):
    ids = _run_folder(tmp_path)
    snap = snapshot(tmp_path, ids, "training", time.time() - 60, start_fraction=2.5 / 4)
    assert snap.eta_s is None  # nothing gained since the start: no rate to go on


def test_view_logs_changes_and_feeds_the_gauges(tmp_path, capsys):
    ids = _run_folder(tmp_path)
    polled = []
    view = ProgressView(tmp_path, ids, on_poll=polled.append, interval_s=0.05, log_every_s=0)
    with view:
        view.phase = "evaluation"
        time.sleep(0.3)
    out = capsys.readouterr().out
    assert "[evaluation]" in out and "m__internal: train epoch 1 step 5/10" in out
    assert out.count("[evaluation]") == 1  # unchanged picture: printed once
    assert polled and all(p == tmp_path for p in polled)
