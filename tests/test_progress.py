"""The progress view reads the run folder: states, running cells' steps, ETA, log lines."""

import time

from tbr_ray import results
from tbr_ray.plan import Job, plan_grid
from tbr_ray.plan.cost import cost_model
from tbr_ray.progress import (
    PlannedJob,
    ProgressView,
    RunPlan,
    format_snapshot,
    planned_eta_s,
    run_plan,
    snapshot,
)

from .conftest import small_config


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


# ------------------------------------------------------------------ the planner's ETA

A, B = "m__none", "m__internal"
# Two training cells of 100 planned seconds and their model's evaluation of 50 (after both),
# each job holding 2 devices: on a 2-device cluster 250 planned seconds in a row.
TRAIN_A = Job(f"train {A}", "train", 2, 100.0)
TRAIN_B = Job(f"train {B}", "train", 2, 100.0)
EVAL = Job("eval m", "eval", 2, 50.0, after=(TRAIN_A.name, TRAIN_B.name))
PLAN = RunPlan(
    (PlannedJob(TRAIN_A, (A,)), PlannedJob(TRAIN_B, (B,)), PlannedJob(EVAL, (A, B))), capacity=2
)


def _trained(took_s: float, status="running", stage="train") -> dict:
    return {"status": status, "stage": stage, "phases": {"train": {"start": 0, "end": took_s}}}


def test_planned_eta_is_the_work_left_over_the_slots_at_the_measured_pace():
    now = 1000.0
    assert planned_eta_s(PLAN, {}, {}, "training", now) == (250.0, 1.0)
    # A trained in twice its planned time; B is half-way through its steps.
    rows = {A: _trained(200.0), B: {"status": "running", "stage": "train"}}
    eta, ratio = planned_eta_s(PLAN, rows, {B: 0.5}, "training", now)
    assert ratio == 2.0 and eta == 2.0 * (50 + 50)  # B's half, then the evaluation
    # The evaluation has run for 30 s of its 100 (50 planned x 2).
    evaluating = {"status": "running", "stage": "eval", "time": now - 30}
    rows = {A: _trained(200.0) | evaluating, B: _trained(200.0) | evaluating}
    assert planned_eta_s(PLAN, rows, {}, "training", now) == (70.0, 2.0)
    done = {"status": "done", "stage": "eval"}
    assert planned_eta_s(PLAN, {A: done, B: done}, {}, "finished", now)[0] == 0.0


def test_planned_eta_follows_the_schedule_and_ignores_failed_time():
    # A failed after 5 s: finished, but its time says nothing about the cluster's pace.
    rows = {A: _trained(5.0, status="failed")}
    assert planned_eta_s(PLAN, rows, {}, "training", 0.0) == (150.0, 1.0)
    # On 8 devices both cells train side by side, then the evaluation: 150 s, not 250.
    wide = RunPlan(PLAN.jobs, capacity=8)
    assert planned_eta_s(wide, {}, {}, "training", 0.0) == (150.0, 1.0)
    # ... unless grid.max_concurrent keeps one training cell at a time.
    one_at_a_time = RunPlan(PLAN.jobs, capacity=8, max_train=1)
    assert planned_eta_s(one_at_a_time, {}, {}, "training", 0.0) == (250.0, 1.0)


def test_the_eta_at_the_start_is_the_dry_runs_makespan():
    cfg = small_config("grid.conditions=[none, internal]")
    grid_plan = plan_grid(cfg, 2)
    plan = run_plan(grid_plan, [c.cell_id for c in cfg.cells()])
    eta, _ = planned_eta_s(plan, {}, {}, "starting", 0.0)
    cost = cost_model(cfg)
    assert abs(eta - (grid_plan.makespan_s - cost.phase_fixed_s)) < 1e-6


def test_run_plan_maps_the_planners_jobs_onto_the_run_cells():
    cfg = small_config("grid.conditions=[none, internal]")
    none, internal = (c.cell_id for c in cfg.cells())
    plan = run_plan(plan_grid(cfg, 2), [none, internal])
    assert [(j.kind, j.cells) for j in plan.jobs] == [
        ("write", ()),
        ("train", (none,)),
        ("train", (internal,)),
        ("eval", (none, internal)),
        ("judge", (none, internal)),
    ]
    # Rule judges only (tiny.yaml): its judging is a job of no model engine, planned at 0 s.
    assert plan.capacity == 2 and all(j.job.seconds > 0 for j in plan.jobs if j.kind != "judge")
    # `tbr-ray cell`: one cell of the grid, so one training job and its evaluation.
    assert [(j.kind, j.cells) for j in run_plan(plan_grid(cfg, 2), [none]).jobs][1:] == [
        ("train", (none,)),
        ("eval", (none,)),
        ("judge", (none,)),
    ]
    assert run_plan(plan_grid(cfg, None), [none]) is None  # no cluster size: no schedule


def test_snapshot_shows_the_planned_eta_and_its_correction(tmp_path):
    results.write_status(tmp_path, A, "running", stage="train")
    results.record_phase(tmp_path, A, "train", 0.0, 200.0)
    results.write_status(tmp_path, B, "running", stage="train")
    results.write_progress(tmp_path, B, {"step": 5, "total_steps": 10, "epoch": 1})
    snap = snapshot(tmp_path, [A, B], "training", time.time(), plan=PLAN)
    assert (snap.eta_s, snap.plan_ratio) == (200.0, 2.0)
    assert "ETA 3m20s (plan x2.00)" in format_snapshot(snap)


def test_view_plans_on_the_ray_cluster_it_runs_in(tmp_path, ray_local):
    cfg = small_config("grid.conditions=[none]")
    (cell,) = cfg.cells()
    with ProgressView(tmp_path, [cell.cell_id], cfg=cfg, interval_s=60) as view:
        snap = view.snapshot()
    assert view.plan.capacity == int(ray_local.cluster_resources()["CPU"])
    assert [j.kind for j in view.plan.jobs] == ["train", "eval", "judge"]
    assert snap.plan_ratio == 1.0 and snap.eta_s == sum(j.job.seconds for j in view.plan.jobs)
