"""The shared data sets: check a data root, and fetch what a fresh clone lacks.

The data root is a setting (`DataConfig.root`, else $TBR_DATA_ROOT, else <repo>/../shared/data).
A clone without ../shared has no data; `tbr_ray/data_sources.json` lists every shipped file
with the URL it came from (pinned to a commit), its sha256 and its licence, so it can be
fetched and verified anywhere:

    manifest = load_manifest()
    verify_data_root(root, manifest)      # [(path, "ok" | "missing" | "checksum-mismatch")]
    check_data_root(root)                 # raises DataRootError naming the fix
    fetch_data(root, manifest)            # downloads missing files; sha256-checked, atomic
    fetch_data(root, manifest, only=["xstest", "gsm8k/test.jsonl"])

From the shell: `tbr-ray fetch-data --root DIR`. Files already present are never overwritten;
a download whose sha256 differs from the manifest is deleted and reported, never kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tbr_ray import rundir

MANIFEST_PATH = Path(__file__).with_name("data_sources.json")
CHUNK_BYTES = 1 << 20  # read and hash downloads 1 MiB at a time
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
FIX_HINT = (
    "Fix: run `tbr-ray fetch-data --root {root}` to download the shipped data sets, or point "
    "$TBR_DATA_ROOT (or data.root in the job YAML) at a folder that holds them."
)

OK, MISSING, MISMATCH = "ok", "missing", "checksum-mismatch"  # verify_data_root statuses
FETCHED = "fetched"  # fetch_data: downloaded now and verified


class DataRootError(RuntimeError):
    """The data root is absent or incomplete; the message names the folder and the fix."""


class DataFetchError(RuntimeError):
    """A download failed or did not match its manifest checksum; nothing was kept."""


@dataclass(frozen=True)
class DataFile:
    """One manifest entry: where the file lives under the data root and where it comes from."""

    path: str  # relative to the data root, POSIX separators
    url: str  # pinned to a commit; for third-party re-hosts, the repository it was taken from
    sha256: str
    bytes: int
    dataset: str  # folder under the data root, e.g. "xstest" or "alpaca-subsets/gumbelsoft"
    licence: str


def load_manifest(path: str | Path = MANIFEST_PATH) -> list[DataFile]:
    """The manifest's file entries, in file order."""
    raw: dict[str, Any] = json.loads(Path(path).read_text())
    return [DataFile(**entry) for entry in raw["files"]]


def load_datasets(path: str | Path = MANIFEST_PATH) -> dict[str, dict[str, str]]:
    """Per data set: source repository, commit, licence, citation and notes."""
    return json.loads(Path(path).read_text())["datasets"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_data_root(
    root: str | Path, manifest: list[DataFile] | None = None
) -> list[tuple[str, str]]:
    """(path, status) for every manifest file: ok, missing or checksum-mismatch."""
    root = Path(root)
    out = []
    for entry in manifest if manifest is not None else load_manifest():
        target = root / entry.path
        if not target.is_file():
            out.append((entry.path, MISSING))
        elif sha256_file(target) != entry.sha256:
            out.append((entry.path, MISMATCH))
        else:
            out.append((entry.path, OK))
    return out


def check_data_root(root: str | Path, manifest: list[DataFile] | None = None) -> Path:
    """Return the root if it holds every manifest file intact; else raise DataRootError."""
    root = Path(root).expanduser()
    fix = FIX_HINT.format(root=root)
    if not root.is_dir():
        raise DataRootError(f"data root {root} does not exist. {fix}")
    bad = [(p, s) for p, s in verify_data_root(root, manifest) if s != OK]
    if bad:
        shown = "\n  ".join(f"{p}: {s}" for p, s in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataRootError(
            f"data root {root}: {len(bad)} file(s) missing or changed:\n  {shown}{more}\n"
            f"{fix} A changed file is never overwritten: delete it first to fetch it again."
        )
    return root


def select_entries(manifest: list[DataFile], only: Iterable[str] | None) -> list[DataFile]:
    """Entries named by `only`: data set folders (e.g. "mmlu") or single file paths."""
    if only is None:
        return list(manifest)
    wanted = [w.strip("/") for w in only]
    unknown = [w for w in wanted if not any(_names(w, e) for e in manifest)]
    if unknown:
        names = ", ".join(sorted({e.dataset for e in manifest}))
        raise ValueError(
            f"only={unknown}: not a data set or file in the manifest. "
            f"Fix: use data set names ({names}) or paths under them."
        )
    return [e for e in manifest if any(_names(w, e) for w in wanted)]


def _names(name: str, entry: DataFile) -> bool:
    return entry.path == name or entry.path.startswith(name + "/")


def fetch_data(
    root: str | Path,
    manifest: list[DataFile] | None = None,
    only: Iterable[str] | None = None,
    opener: Callable[..., Any] = urllib.request.urlopen,
    timeout_s: float = 60.0,
) -> list[tuple[str, str]]:
    """Download the missing files of `manifest` (or those named by `only`) into root.

    Returns (path, "ok" | "fetched") per selected file. Refuses before downloading anything if
    a present file differs from the manifest. Each download is written to a temporary file,
    checked, then renamed into place, so a failure leaves no partial or unverified file.
    """
    root = Path(root).expanduser()
    entries = select_entries(manifest if manifest is not None else load_manifest(), only)
    status = dict(verify_data_root(root, entries))
    changed = [p for p, s in status.items() if s == MISMATCH]
    if changed:
        raise DataFetchError(
            f"{len(changed)} file(s) under {root} differ from the manifest: "
            f"{', '.join(changed[:5])}. They are not overwritten. Fix: delete them (or use "
            "another --root) and fetch again."
        )
    out = []
    for entry in entries:
        if status[entry.path] == OK:
            out.append((entry.path, OK))
            continue
        _download(entry, root, opener, timeout_s)
        out.append((entry.path, FETCHED))
    return out


def _download(entry: DataFile, root: Path, opener: Callable[..., Any], timeout_s: float) -> None:
    """Stream the entry's URL into a temporary file beside its target, check its sha256, rename
    it into place (tbr_ray.rundir.write_atomic: fsynced, mode from the umask). A failure keeps
    nothing: the network's and the disk's are told apart."""
    target = root / entry.path
    try:
        rundir.write_atomic(target, lambda tmp: _fetch_into(entry, tmp, opener, timeout_s))
    except OSError as exc:  # the network's errors are DataFetchErrors by now: this is the disk
        raise DataFetchError(_disk_message(entry, target, exc)) from None


def _fetch_into(entry: DataFile, tmp: Path, opener: Callable[..., Any], timeout_s: float) -> None:
    with open(tmp, "wb", buffering=0) as out:  # unbuffered: a full disk fails the write itself
        digest, first = _stream(entry.url, out, opener, timeout_s)
    if digest != entry.sha256:
        raise DataFetchError(_mismatch_message(entry, digest, first))


def _stream(url: str, out: BinaryIO, opener: Callable[..., Any], timeout_s: float):
    """Copy the URL's body into `out`; return its sha256 and its first bytes. Reading errors
    become DataFetchError (the network); writing errors stay OSErrors (the disk)."""
    digest, first = hashlib.sha256(), b""
    try:
        response = opener(url, timeout=timeout_s)
    except OSError as exc:  # URLError, HTTPError and socket errors are all OSErrors
        raise _network_error(url, exc) from exc
    with response:
        while chunk := _read(response, url):
            first = first or chunk[:64]
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), first


def _read(response: Any, url: str) -> bytes:
    try:
        return response.read(CHUNK_BYTES)
    except OSError as exc:
        raise _network_error(url, exc) from exc


def _network_error(url: str, exc: OSError) -> DataFetchError:
    return DataFetchError(
        f"could not download {url}: {exc}. Nothing was kept. Fix: check the network "
        "(or a proxy), then fetch again; files already fetched are kept."
    )


def _disk_message(entry: DataFile, target: Path, exc: OSError) -> str:
    folder = next(p for p in target.parents if p.is_dir())
    free = shutil.disk_usage(folder).free
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        problem = f"the disk is full ({free / 2**20:,.0f} MiB free under {folder})"
        fix = f"free at least {entry.bytes / 2**20:,.1f} MiB there, or fetch into another --root"
    else:
        problem = f"could not write it ({exc.strerror or exc})"
        fix = f"check that {folder} is writable and has room, or use another --root"
    return (
        f"{target}: {problem}; the file is {entry.bytes:,} bytes. Nothing partial was kept; "
        f"files already fetched are kept. Fix: {fix}, then fetch again."
    )


def _mismatch_message(entry: DataFile, digest: str, first: bytes) -> str:
    why = ""
    if first.startswith(LFS_POINTER_PREFIX):
        why = " The server returned a Git LFS pointer, not the file."
    return (
        f"{entry.path}: the download from {entry.url} has sha256 {digest}, the manifest says "
        f"{entry.sha256}. The file was not kept.{why} Fix: the upstream file may have moved or "
        "changed; get the file with that checksum by hand (see the data set's source in "
        "tbr_ray/data_sources.json) and place it under the data root."
    )


def licence_lines(manifest_path: str | Path = MANIFEST_PATH) -> list[str]:
    """One line per data set: folder, licence, source; for printing after a fetch."""
    return [
        f"{name}: {d['licence']} ({d['source']} @ {d['commit'][:12]})"
        for name, d in load_datasets(manifest_path).items()
    ]
