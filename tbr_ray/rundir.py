"""The run folder (`--output`): its layout, every write into it, and one driver at a time.

    run = RunDir(Path("runs/tiny"))
    write_json(run.status_file(cell_id), {...})    # atomic, fsynced, mode from the umask
    with run.updating():                           # a read-modify-write, across processes
        ...
    with run_lock(run.root, "ablate"):             # refuses a second driver, naming the holder
        ...

The layout (tbr_ray.results says what each file holds):

    run.json                          the manifest: resolved config, run id, provenance
    phases.json                       wall time of each phase of each driver invocation
    .tbr-ray.lock                     the run lock; holds the driver's host, pid, Ray job, command
    .tbr-ray.update.lock              held for each read-modify-write of a shared file
    cells/<cell_id>/status.json       running / done / failed / interrupted (+ error.txt)
    cells/<cell_id>/progress.json     a training cell's live progress
    cells/<cell_id>/<table>.parquet   generations, judgements, metrics
    adapters/<cell_id>/               the published LoRA adapter, train_result.json last
    reviews/<reviewer>.parquet        a person's labels
    ray_train/ ray_tune/ mlruns/      Ray Train checkpoints, Tune's state, MLflow's store
    report/                           `tbr-ray report`

Every file is written by `write_atomic`: a temporary file beside the target (created as `open`
creates files: mode 0666 less the umask, default ACLs applied), fsynced, renamed over the
target, the folder fsynced. A reader, a killed writer or a power loss sees the old file or the
new one, never a part; a killed writer's temporary file (`.<name>.<random>.tmp`) is never read
and is removed by the next run (`sweep_temp_files`). Files several processes rewrite (a cell's
status.json: the driver and the trial; a reviewer's labels: two review pages, `--import`) are
read, changed and written under `RunDir.updating()`, a `filelock` on `.tbr-ray.update.lock`.

The run lock is a `flock` on `.tbr-ray.lock` (through `filelock`). The kernel drops it when its
holder exits in any way (kill -9 included), so a dead holder's lock is taken over without a
stale-lock heuristic. `read_holder` asks for a *shared* lock on a read-only descriptor: it
conflicts with the driver's exclusive lock, not with another `tbr-ray status`, and needs no
write access. On NFS v4 (and EFS) Linux carries `flock` as a whole-file byte-range lock, which
the server enforces across nodes; there an exclusive lock needs a descriptor open for writing
and a shared one for reading (fs/nfs/nfs4proc.c, nfs4_proc_lock), which is how both are opened.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tbr_ray.config import ConfigError

LOCK_NAME = ".tbr-ray.lock"
UPDATE_LOCK_NAME = ".tbr-ray.update.lock"
TEMP_SUFFIX = ".tmp"
# How long a driver waits for the run lock: long enough to ride out a `tbr-ray status`
# probing it at that moment, short enough to refuse a second driver at once.
LOCK_WAIT_S = 2.0
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in a `ray job submit` entrypoint


@dataclass(frozen=True)
class RunDir:
    """Where each thing of a run folder lives; the only place that spells the layout."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def phases(self) -> Path:
        return self.root / "phases.json"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def cells(self) -> Path:
        return self.root / "cells"

    def cell(self, cell_id: str) -> Path:
        return self.cells / cell_id

    def status_file(self, cell_id: str) -> Path:
        return self.cell(cell_id) / "status.json"

    def error_file(self, cell_id: str) -> Path:
        return self.cell(cell_id) / "error.txt"

    def progress_file(self, cell_id: str) -> Path:
        return self.cell(cell_id) / "progress.json"

    def table_file(self, cell_id: str, table: str) -> Path:
        return self.cell(cell_id) / f"{table}.parquet"

    def adapter(self, cell_id: str) -> Path:
        return self.root / "adapters" / cell_id

    @property
    def reviews(self) -> Path:
        return self.root / "reviews"

    def review_file(self, reviewer: str) -> Path:
        return self.reviews / f"{reviewer}.parquet"

    @property
    def ray_train(self) -> Path:
        return self.root / "ray_train"

    @property
    def ray_tune(self) -> Path:
        return self.root / "ray_tune"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @contextmanager
    def updating(self) -> Iterator[None]:
        """Hold the folder's update lock for a read-modify-write of a file that other
        processes also rewrite. Reentrant within a thread; other threads and processes wait."""
        make_dirs(self.root)
        lock = FileLock(self.root / UPDATE_LOCK_NAME, is_singleton=True, fallback_to_soft=False)
        _acquire(lock)
        try:
            yield
        finally:
            lock.release()


# ------------------------------------------------------------------ writes


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Write `path` through `write(temp_path)` (which may open the file by name, as pyarrow
    does): temp file beside it, fsync, rename over `path`, fsync the folder. The file's mode
    is what the umask gives a new file (tempfile.mkstemp would make it 0600)."""
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda p: Path(p).write_bytes(data))


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda p: Path(p).write_text(text))


def write_json(path: Path, payload: Any, **dumps: Any) -> Path:
    """`payload` as JSON (json.dumps keywords: indent, sort_keys, default)."""
    return write_text(path, json.dumps(payload, **dumps))


def make_dirs(folder: Path) -> None:
    """mkdir -p, fsyncing the parent of each folder it creates (so the new entry survives a
    power loss as the files written into it do)."""
    folder = Path(folder)
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            continue  # made meanwhile by another writer
        _fsync(new.parent)


def publish_dir(tmp: Path, final: Path, keep: str | None = None) -> Path:
    """Put a finished folder in place of `final` (replacing it): its files fsynced, renamed,
    the parent fsynced. Between the removal of an old `final` and the rename, `final` is
    absent, never partial. With `keep` (the file a complete folder is written with last, e.g.
    a mix's report.json), a complete `final` is kept and `tmp` dropped: a folder named by its
    content key, which another builder published first; an incomplete one is replaced."""
    tmp, final = Path(tmp), Path(final)
    if keep is not None and (final / keep).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            _fsync(path)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:  # `final` exists again: a builder of the same key published meanwhile
        if keep is None or not (final / keep).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync(final.parent)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ reads


_JSON_NAMES = {dict: "object", list: "list"}


class DamagedFile(ValueError):
    """A run-folder file that is empty or not what was written (a power loss before the
    write reached the disk, a full disk, a hand edit). The message names it and the fix."""


def read_json(path: Path, of: type = dict) -> Any:
    """A JSON object file (`of=list`: a JSON list file): None when absent, DamagedFile when
    empty or not of that type."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if not isinstance(payload, of):
        what = "is empty" if not text.strip() else f"is not a JSON {_JSON_NAMES[of]}"
        raise DamagedFile(f"{path} {what}")
    return payload


# ------------------------------------------------------------------ leftovers of killed writers


def sweep_temp_files(root: Path) -> list[Path]:
    """Remove the temporary files killed writers left (`.<name>.<random>.tmp`); call it only
    while holding the run lock, before any writer of this run starts. Returns them."""
    root = Path(root)
    # Not reviews/: a review page writes there without the run lock.
    found = [*root.glob(f".*{TEMP_SUFFIX}"), *root.glob(f"cells/*/.*{TEMP_SUFFIX}")]
    for path in found:
        path.unlink(missing_ok=True)
    return found


@contextmanager
def building_dir(final: Path) -> Iterator[Path]:
    """A private folder beside `final` to build it in (`.<name>.tmp-<random>`), owned by this
    process through a lock file beside it for as long as the block runs. The folder is
    removed if the block fails; the caller renames it into place. `sweep_building_dirs` removes
    the folders of builders that died (their lock is free)."""
    final = Path(final)
    make_dirs(final.parent)
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    owner = FileLock(_owner_lock(tmp), fallback_to_soft=False)
    _acquire(owner)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        Path(owner.lock_file).unlink(missing_ok=True)  # still held: no sweeper takes it
        owner.release()


def sweep_building_dirs(parent: Path) -> list[Path]:
    """Remove the `.<name>.tmp-*` folders in `parent` whose builder is gone. Returns them."""
    gone = []
    for tmp in sorted(Path(parent).glob(".*.tmp-*")):
        if not tmp.is_dir():
            continue
        lock = FileLock(_owner_lock(tmp), fallback_to_soft=False)
        try:
            _acquire(lock, blocking=False)
        except Timeout:
            continue  # its builder is still at work
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            Path(lock.lock_file).unlink(missing_ok=True)
            gone.append(tmp)
        finally:
            lock.release()
    return gone


def _owner_lock(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".lock")


def _acquire(lock: FileLock, **wait: Any) -> None:
    """`lock.acquire(**wait)`; a filesystem without `flock` (some FUSE mounts) is one clear
    error, not filelock's fallback to a marker file that a killed process would leave held."""
    try:
        lock.acquire(**wait)
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        raise ConfigError(
            f"{lock.lock_file}: the filesystem refuses file locks ({os.strerror(err.errno)}). "
            "Fix: put it on a local disk, NFS v4 or EFS (which carry flock)."
        ) from None


# ------------------------------------------------------------------ one driver per folder


def ray_job_id() -> str | None:
    """The submission id when running as a `ray job submit` entrypoint, else None."""
    blob = os.environ.get(RAY_JOB_ENV)
    if not blob:
        return None
    try:
        return str(json.loads(blob).get("metadata", {}).get("job_submission_id", "unknown"))
    except ValueError:
        return "unknown"


def utc_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def describe_holder(holder: dict) -> str:
    """One line naming a lock holder: pid, host, Ray job, command and start time."""
    if not holder:
        return "another process (its details are being written)"
    job = f", Ray job {holder['ray_job_id']}" if holder.get("ray_job_id") else ""
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}{job} "
        f"(`tbr-ray {holder.get('command')}`, since {utc_time(holder.get('started', 0))})"
    )


@contextmanager
def run_lock(output: Path, command: str) -> Iterator[dict]:
    """Hold `<output>`'s run lock for the block, or raise ConfigError naming the holder."""
    output = Path(output)
    make_dirs(output)
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "ray_job_id": ray_job_id(),
        "command": command,
        "started": time.time(),
    }
    held: list[int] = []

    def write_me(fd: int) -> None:  # the holder's details, in the locked file itself
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        held.append(fd)

    lock = FileLock(output / LOCK_NAME, fallback_to_soft=False, on_acquired=write_me)
    try:
        _acquire(lock, timeout=LOCK_WAIT_S)
    except Timeout:
        raise ConfigError(
            f"--output {output} is in use by {describe_holder(_holder_details(output))}. Fix: "
            "wait for it to finish or stop it (`ray job stop <id>` / `kill <pid>`), then rerun "
            "this command to resume; or pass another --output."
        ) from None
    try:
        yield me
    finally:
        os.ftruncate(held[0], 0)  # no stale holder details once released
        lock.release()


def read_holder(output: Path) -> dict | None:
    """The current holder of the run lock (its details; {} while they are being written), or
    None when no driver holds it. Needs only read access to the folder."""
    try:
        fd = os.open(Path(output) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: conflicts with the driver only
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return _holder_details(output)
    finally:
        os.close(fd)  # also releases the shared lock
    return None


def _holder_details(output: Path) -> dict:
    try:
        text = (Path(output) / LOCK_NAME).read_text()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def driver_gone(output: Path) -> bool:
    """A driver ran here (the lock file exists) and none holds the lock now. The kernel frees
    the lock however its holder ended (kill -9 too), so this needs no pid guesswork."""
    return (Path(output) / LOCK_NAME).is_file() and read_holder(output) is None
