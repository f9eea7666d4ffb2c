"""Nothing lost, nothing exposed (issue 23): the run folder's writes, locks and reads under
faults, each test a fault that once lost or exposed something. Fast, no Ray:

    pytest tests/test_reliability.py -q

Two review writers (two pages, `--import` beside a page), a status file emptied mid-run, a
writer killed inside its locked write, the umask, fsync, NFS's lock rules, pickles planted in a
run folder, Ray's token file, and build folders of failed mix builds."""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tbr_ray import results, rundir
from tbr_ray.cli import app
from tbr_ray.interrupt import mark_interrupted
from tbr_ray.review import ReviewStore
from tbr_ray.rundir import LOCK_NAME, RunDir, read_holder, run_lock
from tests.review_run import build_review_run, cell_id

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
runner = CliRunner()
NONE = cell_id("none", 0.0)


def _popen(code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


# ------------------------------------------------------------------ point 1: two review writers


@pytest.fixture
def review_dir(tmp_path) -> Path:
    """A small finished run to label (tests/review_run.py)."""
    return build_review_run(tmp_path / "run")


def _label(store: ReviewStore, prompt_id: str, value: str = "full_refusal") -> None:
    ids = {"cell_id": NONE, "benchmark": "xstest_safe", "prompt_id": prompt_id}
    store.set({f"{NONE}|xstest_safe|{prompt_id}": ids | {"label": value}})


def _labelled(run: Path) -> set[str]:
    return set(results.read_reviews(run).query("reviewer == 'ada'")["prompt_id"])


def test_labels_are_written_only_through_the_locked_merge(tmp_path):
    """results offers `update_review` (read, merge, write under the update lock) and no public
    whole-file replace a caller could race a review page with."""
    assert not hasattr(results, "write_review")
    results.update_review(tmp_path, "ada", [])
    assert results.read_reviews(tmp_path).empty


def test_two_pages_of_one_reviewer_keep_each_others_labels(review_dir):
    """The issue's reproduction: two `tbr-ray review RUN --reviewer ada` pages; s-5 labelled on
    the second, then s-1 on the first, which once rewrote the file from its memory."""
    first = ReviewStore(review_dir, "ada", "review-test")
    second = ReviewStore(review_dir, "ada", "review-test")
    _label(first, "s-3")
    _label(second, "s-5")
    _label(first, "s-1")
    assert _labelled(review_dir) == {"s-1", "s-3", "s-5"}
    assert first.label_of(f"{NONE}|xstest_safe|s-5") == "full_refusal"  # it sees the other's


IMPORTER = """
import sys
from tbr_ray.review import ReviewStore
store = ReviewStore(sys.argv[1], "ada", "review-test")
print("ready", flush=True)
cell = sys.argv[2]
for i in range(0, 6, 2):
    ids = {"cell_id": cell, "benchmark": "xstest_safe", "prompt_id": f"s-{i}"}
    store.set({f"{cell}|xstest_safe|s-{i}": ids | {"label": "full_compliance"}})
"""


def test_a_second_process_writing_labels_meanwhile_loses_none(review_dir):
    """`--import` (another process) while a page labels: every label of both ends up on disk."""
    page = ReviewStore(review_dir, "ada", "review-test")
    proc = _popen(IMPORTER, str(review_dir), NONE)
    for i in range(1, 6, 2):
        _label(page, f"s-{i}")
    assert proc.wait(timeout=60) == 0
    assert _labelled(review_dir) == {f"s-{i}" for i in range(6)}


# ------------------------------------------------------------------ point 2: an emptied status


def test_an_emptied_status_file_is_a_named_damaged_cell_not_a_traceback(tmp_path):
    """A power loss before a write reached the disk left a zero-length status.json: `status`
    and `report` name it and the fix, the cell is not done (the next run redoes it), and the
    next write mends it."""
    results.write_status(tmp_path, "c1", "done")
    results.write_status(tmp_path, "c2", "running", stage="train")
    results.write_run_manifest(tmp_path, {"run_id": "r-1", "config_hash": "h"})
    path = RunDir(tmp_path).status_file("c1")
    path.write_text("")  # emptied mid-run
    row = results.read_status(tmp_path).set_index("cell_id").loc["c1"]
    assert row["status"] == results.DAMAGED and str(path) in row["error"]
    assert "Fix: rerun" in row["error"] and not results.is_done(tmp_path, "c1")
    out = runner.invoke(app, ["status", str(tmp_path)])
    assert out.exit_code == 0 and f"{path} is empty" in out.output, out.output
    report = runner.invoke(app, ["report", str(tmp_path)])
    assert report.exit_code == 0, report.output  # the damaged cell is left out, like a failed one
    assert mark_interrupted(tmp_path, "SIGINT received") == ["c2"]
    results.write_status(tmp_path, "c1", "running", stage="data")  # the rerun redoes it
    assert results.read_status(tmp_path).set_index("cell_id").loc["c1", "status"] == "running"


def test_a_garbled_run_manifest_is_one_line_with_the_fix(tmp_path):
    from tbr_ray.config import ConfigError, load_config
    from tbr_ray.grid import check_run_dir

    RunDir(tmp_path).manifest.write_text('{"run_id": "r-')
    with pytest.raises(ConfigError, match="is not a JSON object.*Fix: if it holds this"):
        check_run_dir(load_config(REPO / "jobs/smoke.yaml"), tmp_path)


def test_an_emptied_phases_file_is_no_phases_not_a_stopped_run(tmp_path, capsys):
    """phases.json emptied by a power loss: the next phase still records itself and the
    timing summary still prints (it was a bare json.loads that raised in both)."""
    from tbr_ray.grid import PhaseClock, timing_summary

    path = RunDir(tmp_path).phases
    path.write_text("")
    assert timing_summary(tmp_path) == ""
    with PhaseClock(tmp_path)("models"):
        pass
    assert "phase models" in timing_summary(tmp_path)
    assert f"{path} is empty" in capsys.readouterr().out


STATUS_WRITER = """
import sys
from tbr_ray import results
print("ready", flush=True)
i = 0
while True:
    results.write_status(sys.argv[1], "c1", "running", stage="train", step=i)
    i += 1
"""


def test_a_writer_killed_inside_its_locked_write_leaves_a_whole_file_and_a_free_lock(tmp_path):
    """SIGKILL lands while a process rewrites a status under the update lock: the file is a
    whole record, the kernel freed the lock (the next write does not wait), and the next run
    sweeps the writer's temporary file."""
    for _ in range(2):
        proc = _popen(STATUS_WRITER, str(tmp_path))
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert results.read_status(tmp_path).set_index("cell_id").loc["c1", "status"] == "running"
        t0 = time.time()
        results.write_status(tmp_path, "c1", "running", stage="eval")
        assert time.time() - t0 < 5
    leftovers = list(RunDir(tmp_path).cell("c1").glob(".status.json.*.tmp"))
    assert rundir.sweep_temp_files(tmp_path) == leftovers
    assert not list(RunDir(tmp_path).cell("c1").glob(".*.tmp"))


def test_writes_are_fsynced_file_and_folder(tmp_path, monkeypatch):
    synced: list[Path] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    results.write_status(tmp_path, "c1", "done")
    folder = RunDir(tmp_path).cell("c1")
    assert folder in synced  # the rename reached the disk
    assert any(p.parent == folder and p.name.startswith(".status.json.") for p in synced)


# ------------------------------------------------------------------ point 3: the lock on NFS


@pytest.fixture
def nfs_lock_rules(monkeypatch):
    """Linux's NFS v4 client carries flock as a byte-range lock and refuses an exclusive one
    on a descriptor without write access, a shared one without read access (EBADF;
    fs/nfs/nfs4proc.c, nfs4_proc_lock): the same rule, applied here to every flock."""
    real = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        if operation & fcntl.LOCK_EX and mode == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        if operation & fcntl.LOCK_SH and mode == os.O_WRONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


HOLDER = """
import sys, time
from pathlib import Path
from tbr_ray.rundir import run_lock
with run_lock(Path(sys.argv[1]), "ablate"):
    print("ready", flush=True)
    time.sleep(60)
"""


def test_the_holder_check_and_the_lock_work_under_nfs_lock_rules(tmp_path, nfs_lock_rules):
    with run_lock(tmp_path, "ablate"):
        pass
    assert read_holder(tmp_path) is None
    proc = _popen(HOLDER, str(tmp_path))
    try:
        assert read_holder(tmp_path)["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_status_probing_the_lock_does_not_refuse_a_starting_driver(tmp_path):
    """`tbr-ray status` (watched in a loop) holds the lock file for an instant to probe it; a
    driver starting at that instant once took the probe for another driver."""
    (tmp_path / LOCK_NAME).touch()
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # as read_holder does while it looks
    threading.Timer(0.3, os.close, (fd,)).start()
    with run_lock(tmp_path, "ablate") as me:
        assert me["pid"] == os.getpid()


# ------------------------------------------------------------------ point 4: the umask


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_run_folder_files_take_their_mode_from_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        results.write_status(tmp_path, "c1", "done", traceback="Traceback ...")
        results.write_run_manifest(tmp_path, {"run_id": "r"})
        results.update_review(tmp_path, "ada", [])
    finally:
        os.umask(old)
    run = RunDir(tmp_path)
    for path in (run.status_file("c1"), run.error_file("c1"), run.manifest, run.review_file("ada")):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


# ------------------------------------------------------------------ point 7: pickles


class _Plant:
    """Unpickling this creates `marker`: code run by whoever can write the run folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_failed_trials_error_is_read_from_its_text_not_unpickled(tmp_path):
    from tbr_ray.grid import _trial_error

    marker = tmp_path / "ran"
    (tmp_path / "error.pkl").write_bytes(pickle.dumps(_Plant(marker)))
    (tmp_path / "error.txt").write_text(
        "Failure # 1 (occurred at 2026-12-02_10-00-00)\nold failure\nValueError: first\n"
        "Failure # 2 (occurred at 2026-12-02_10-05-00)\n"
        "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=10.0.0.1, actor_id=ab)\n"
        '  File "/x/grid.py", line 9, in _train_cell\n    raise ValueError("boom")\n'
        "ValueError: reflection.endpoint = http://h: no connection.\nFix: start it.\n"
    )
    trial = SimpleNamespace(
        pickled_error_file=str(tmp_path / "error.pkl"), error_file=str(tmp_path / "error.txt")
    )
    line, full = _trial_error(trial)
    assert not marker.exists()
    assert line == "ValueError: reflection.endpoint = http://h: no connection.\nFix: start it."
    assert full.startswith("ray::ImplicitFunc.train()") and "first" not in full


class _Engine:
    """What `_restore_resume_state` asks of DeepSpeed's engine, on rank 0 (a test double:
    the DeepSpeed files themselves are tests/test_train.py's)."""

    global_rank = 0

    def __init__(self):
        self.lr_scheduler = SimpleNamespace(last_batch_iteration=0, step=lambda *a: None)

    def load_checkpoint(self, *args, **kwargs):
        return None


def _resume_folder(tmp_path: Path, rng: bytes) -> Path:
    from tbr_ray.train import DS_TAG, RESUME_DIR

    (tmp_path / RESUME_DIR / DS_TAG).mkdir(parents=True)
    (tmp_path / RESUME_DIR / "rng_rank0.pt").write_bytes(rng)
    return tmp_path


def test_a_planted_rng_pickle_is_refused_not_run(tmp_path):
    import torch

    from tbr_ray.train import Position, _restore_resume_state

    marker, buf = tmp_path / "ran", tmp_path / "plant.pt"
    torch.save({"torch": _Plant(marker)}, buf)
    ckpt = _resume_folder(tmp_path / "ckpt", buf.read_bytes())
    with pytest.raises(RuntimeError, match="rng_rank0.pt: not an RNG state file.*Fix: delete"):
        _restore_resume_state(_Engine(), str(ckpt), Position())
    assert not marker.exists()


def test_rng_state_round_trips_through_the_safe_loader(tmp_path):
    import random

    import numpy as np
    import torch

    from tbr_ray.train import Position, _restore_resume_state, _rng_state

    buf = tmp_path / "rng.pt"
    torch.save(_rng_state(), buf)  # as _save_resume_state writes it
    ckpt = _resume_folder(tmp_path / "ckpt", buf.read_bytes())
    expected = (torch.rand(3), np.random.rand(), random.random())
    _restore_resume_state(_Engine(), str(ckpt), Position())
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


# ------------------------------------------------------------------ point 9: Ray's token file


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    return tmp_path


def test_a_new_local_cluster_finds_its_token_file_private_already(home, monkeypatch):
    """Ray 2.60 writes a new ~/.ray/auth_token with open(path, "w") (0644 under the usual
    umask) inside ray.init; tbr-ray writes it 0600 first, and Ray keeps that one."""
    import ray
    from ray._private import services

    from tbr_ray import grid

    seen = {}
    # A machine with no Ray running (other tests' `ray start` would be joined instead).
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)

    def init(**kwargs):
        token = home / ".ray" / "auth_token"
        seen["mode"] = stat.S_IMODE(token.stat().st_mode) if token.exists() else None

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    grid.init_ray(logging_level="WARNING")
    assert seen["mode"] == 0o600
    assert len((home / ".ray" / "auth_token").read_text()) == 64


RAY_KEEPS = """
from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
ensure_token_if_auth_enabled(None, create_token_if_missing=True)
print("ready", flush=True)
"""


def test_ray_keeps_the_private_token_it_finds(home):
    from tbr_ray.grid import write_private_token

    token = home / ".ray" / "auth_token"
    write_private_token(token)
    before = token.read_text()
    env = {**ENV, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    proc = subprocess.run(
        [sys.executable, "-c", RAY_KEEPS], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert token.read_text() == before and stat.S_IMODE(token.stat().st_mode) == 0o600


def test_judge_score_with_a_model_judge_starts_ray_through_the_private_token(monkeypatch):
    from tbr_ray import grid
    from tbr_ray.cli import _model_labeler
    from tbr_ray.config import load_config

    class Started(Exception):
        pass

    def init_ray(**kwargs):
        raise Started

    monkeypatch.setattr(grid, "init_ray", init_ray)
    cfg = load_config(
        REPO / "jobs/smoke.yaml",
        ["eval.refusal_judge={model: tiny-llama, format: three-class}", "eval.judges=[model]"],
    )
    with pytest.raises(Started):
        _model_labeler(cfg)([("a prompt", "a completion")])


# ------------------------------------------------------------------ point 14: build folders

BUILDER = """
import sys, time
from pathlib import Path
from tbr_ray.rundir import building_dir
with building_dir(Path(sys.argv[1])) as tmp:
    (tmp / "shards").mkdir(parents=True)
    print("ready", flush=True)
    time.sleep(60)
"""


def test_build_folders_of_failed_or_killed_builders_are_removed(tmp_path):
    final = tmp_path / "mixes" / "key"
    with pytest.raises(OSError), rundir.building_dir(final) as tmp:
        (tmp / "shards").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")  # a failed build
    assert not tmp.exists() and list(final.parent.iterdir()) == []
    dead, live = _popen(BUILDER, str(final)), _popen(BUILDER, str(final))
    dead.kill()
    dead.wait()
    try:
        old_style = final.parent / ".key.tmp-0a1b2c3d"  # a killed build from before the lock
        (old_style / "shards").mkdir(parents=True)
        gone = rundir.sweep_building_dirs(final.parent)
        left = [p for p in final.parent.iterdir() if p.is_dir()]
        assert len(gone) == 2 and old_style in gone and len(left) == 1  # the live one's
    finally:
        live.kill()
        live.wait()


def test_a_failed_mix_build_leaves_no_build_folder(tmp_path, monkeypatch, cache_dir, tiny_llama):
    """A mix build that fails (here Ray Data, as a full disk would) removes its folder, and the
    next build removes what a killed one left."""
    import ray.data

    from tbr_ray.config import Cell, load_config
    from tbr_ray.data import build_mix

    cache = tmp_path / "cache"
    (cache / "mixes" / ".abc.tmp-0a1b2c3d" / "shards").mkdir(parents=True)  # a killed build's
    cfg = load_config(REPO / "jobs/smoke.yaml", [f"paths.cache_dir={cache}"])

    class FullDisk:
        """Ray Data's dataset whose write runs out of space half way."""

        def map_batches(self, *args, **kwargs):
            return self

        def write_parquet(self, path: str, **kwargs):
            Path(path).mkdir(parents=True)
            (Path(path) / "part-0.parquet").write_bytes(b"PAR1")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ray.data, "from_items", lambda rows: FullDisk())
    with pytest.raises(OSError, match="No space"):
        build_mix(cfg, Cell("tiny-llama", "none", 0.0, 0), tiny_llama)
    assert list((cache / "mixes").iterdir()) == []


def test_a_failed_packaged_model_build_leaves_no_build_folder(tmp_path, monkeypatch):
    """A packaged model's build (a ~538 MB folder) that fails writing its weights, as a full
    disk would, removes its folder, and the next build removes what a killed one left."""
    from tbr_ray import packaged
    from tbr_ray.models import PACKAGED_MODELS

    spec = PACKAGED_MODELS["smollm2-135m-instruct"]
    models = tmp_path / "models"
    killed = models / f".{packaged.packaged_dir(spec, tmp_path).name}.tmp-0a1b2c3d"
    (killed / "weights").mkdir(parents=True)

    class FullDisk:
        """The plain model whose safetensors write runs out of space half way."""

        def save_pretrained(self, path: Path, **kwargs):
            Path(path).mkdir(parents=True)
            (Path(path) / "model.safetensors").write_bytes(b"part")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packaged, "gguf_path", lambda spec: tmp_path / "model.gguf")
    monkeypatch.setattr(packaged, "file_sha256", lambda path: spec.packaged.sha256)
    monkeypatch.setattr(packaged, "_load_gguf", lambda gguf: (None, None))
    monkeypatch.setattr(packaged, "_plain_copy", lambda model: FullDisk())
    with pytest.raises(OSError, match="No space"):
        packaged.build_packaged_model(spec, tmp_path)
    assert list(models.iterdir()) == []
