"""tbr_ray.fetch: the data manifest, data-root checks and checksum-verified fetching.

No network: every fetch reads file:// URLs from a temporary "upstream" copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest

from tbr_ray import fetch
from tbr_ray.config import REPO_ROOT
from tbr_ray.fetch import DataFetchError, DataFile, DataRootError

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "SHA256SUMS").is_file(), reason="no ../shared/data beside this clone"
)


def _upstream(tmp_path: Path, files: dict[str, bytes]) -> list[DataFile]:
    """Write files into a fake upstream folder; a manifest with file:// URLs to them."""
    up = tmp_path / "upstream"
    entries = []
    for rel, body in files.items():
        (up / rel).parent.mkdir(parents=True, exist_ok=True)
        (up / rel).write_bytes(body)
        entries.append(
            DataFile(
                path=rel,
                url=(up / rel).as_uri(),
                sha256=hashlib.sha256(body).hexdigest(),
                bytes=len(body),
                dataset=rel.split("/")[0],
                licence="CC-BY-4.0",
            )
        )
    return entries


FILES = {"xs/prompts.csv": b"id,prompt\n1,hello\n", "mm/test/a.csv": b"q,a\n", "mm/dev/b.csv": b"x"}


def _no_network(url, timeout=None):
    raise AssertionError(f"unexpected download of {url}")


# ---------------------------------------------------------------- the shipped manifest


def test_manifest_entries_are_well_formed():
    manifest = fetch.load_manifest()
    datasets = fetch.load_datasets()
    paths = [e.path for e in manifest]
    assert len(paths) == len(set(paths)) > 100
    for e in manifest:
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256), e.path
        assert e.url.startswith("https://") and e.url.endswith(e.path.split("/")[-1]), e.path
        assert e.path.startswith(e.dataset + "/") and e.dataset in datasets, e.path
        assert e.licence == datasets[e.dataset]["licence"] and e.bytes > 0
        commit = datasets[e.dataset]["commit"]
        assert re.fullmatch(r"[0-9a-f]{40}", commit) and f"/{commit}/" in e.url, e.url
        repo = datasets[e.dataset]["source"].removeprefix("https://github.com/")
        assert f"/{repo}/" in e.url, e.url


@needs_shared_data
def test_manifest_matches_shared_sha256sums_and_attributions():
    lines = (SHARED_DATA / "SHA256SUMS").read_text().splitlines()
    sums = dict(line.split()[::-1] for line in lines)
    data_files = {p: h for p, h in sums.items() if not p.endswith("ATTRIBUTION.md")}
    manifest = {e.path: e.sha256 for e in fetch.load_manifest()}
    assert manifest == data_files
    # Each URL's repository and commit are the ones its folder's ATTRIBUTION.md states.
    for name, d in fetch.load_datasets().items():
        attribution = (SHARED_DATA / name.split("/")[0] / "ATTRIBUTION.md").read_text()
        assert d["commit"] in attribution, name
        assert d["source"].removeprefix("https://") in attribution, name


@needs_shared_data
def test_shared_data_root_verifies_ok():
    statuses = fetch.verify_data_root(SHARED_DATA)
    assert statuses and all(s == fetch.OK for _, s in statuses)
    assert fetch.check_data_root(SHARED_DATA) == SHARED_DATA


@needs_shared_data
def test_fetch_real_entries_from_a_file_url_copy(tmp_path):
    """The real manifest's xstest and gsm8k entries, fetched from a local copy of the files."""
    copy = tmp_path / "copy"
    entries = fetch.select_entries(fetch.load_manifest(), ["xstest", "gsm8k"])
    for e in entries:
        (copy / e.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_DATA / e.path, copy / e.path)
    local = [dataclasses.replace(e, url=(copy / e.path).as_uri()) for e in entries]
    root = tmp_path / "root"
    assert fetch.fetch_data(root, local) == [(e.path, fetch.FETCHED) for e in entries]
    fetch.check_data_root(root, local)


# ---------------------------------------------------------------- verify / check


def test_verify_reports_ok_missing_and_mismatch(tmp_path):
    manifest = _upstream(tmp_path, FILES)
    root = tmp_path / "root"
    (root / "xs").mkdir(parents=True)
    (root / "xs/prompts.csv").write_bytes(FILES["xs/prompts.csv"])
    (root / "mm/test").mkdir(parents=True)
    (root / "mm/test/a.csv").write_bytes(b"edited\n")
    assert fetch.verify_data_root(root, manifest) == [
        ("xs/prompts.csv", "ok"),
        ("mm/test/a.csv", "checksum-mismatch"),
        ("mm/dev/b.csv", "missing"),
    ]


def test_check_data_root_names_missing_folder_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataRootError) as err:
        fetch.check_data_root(missing, _upstream(tmp_path, FILES))
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg
    assert f"tbr-ray fetch-data --root {missing}" in msg and "TBR_DATA_ROOT" in msg


def test_check_data_root_lists_incomplete_files(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataRootError, match=r"3 file\(s\) missing or changed") as err:
        fetch.check_data_root(root, _upstream(tmp_path, FILES))
    assert "mm/dev/b.csv: missing" in str(err.value) and "fetch-data" in str(err.value)


# ---------------------------------------------------------------- fetch


def test_fetch_downloads_missing_files_then_skips_them(tmp_path):
    manifest = _upstream(tmp_path, FILES)
    root = tmp_path / "root"
    assert fetch.fetch_data(root, manifest) == [(p, "fetched") for p in FILES]
    assert all((root / p).read_bytes() == body for p, body in FILES.items())
    # Everything present and intact: nothing is downloaded again.
    assert fetch.fetch_data(root, manifest, opener=_no_network) == [(p, "ok") for p in FILES]
    assert not list(root.rglob("*.part"))


def test_fetch_only_selects_datasets_and_paths(tmp_path):
    manifest = _upstream(tmp_path, FILES)
    root = tmp_path / "root"
    assert [p for p, _ in fetch.fetch_data(root, manifest, only=["mm"])] == [
        "mm/test/a.csv",
        "mm/dev/b.csv",
    ]
    assert not (root / "xs").exists()
    assert fetch.fetch_data(root, manifest, only=["xs/prompts.csv"]) == [
        ("xs/prompts.csv", "fetched")
    ]
    with pytest.raises(ValueError, match="not a data set or file"):
        fetch.fetch_data(root, manifest, only=["nope"])


def test_fetch_refuses_a_checksum_mismatch_and_keeps_nothing(tmp_path):
    manifest = _upstream(tmp_path, FILES)
    wrong = [dataclasses.replace(manifest[0], sha256="0" * 64)]
    root = tmp_path / "root"
    with pytest.raises(DataFetchError, match="was not kept") as err:
        fetch.fetch_data(root, wrong)
    assert "xs/prompts.csv" in str(err.value) and manifest[0].sha256 in str(err.value)
    assert not [p for p in root.rglob("*") if p.is_file()]  # no file, no .part left behind


def test_fetch_names_a_git_lfs_pointer(tmp_path):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3\n"
    manifest = _upstream(tmp_path, {"hh/test.jsonl.gz": pointer})
    wrong = [dataclasses.replace(manifest[0], sha256="1" * 64)]
    with pytest.raises(DataFetchError, match="Git LFS pointer"):
        fetch.fetch_data(tmp_path / "root", wrong)


def test_fetch_never_overwrites_a_changed_file(tmp_path):
    manifest = _upstream(tmp_path, FILES)
    root = tmp_path / "root"
    (root / "mm/dev").mkdir(parents=True)
    (root / "mm/dev/b.csv").write_bytes(b"mine")
    with pytest.raises(DataFetchError, match="not overwritten"):
        fetch.fetch_data(root, manifest, opener=_no_network)
    assert (root / "mm/dev/b.csv").read_bytes() == b"mine"


def test_fetch_reports_an_unreachable_url(tmp_path):
    manifest = _upstream(tmp_path, FILES)
    gone = [dataclasses.replace(manifest[0], url=(tmp_path / "absent.csv").as_uri())]
    root = tmp_path / "root"
    with pytest.raises(DataFetchError, match="could not download"):
        fetch.fetch_data(root, gone)
    assert not [p for p in root.rglob("*") if p.is_file()]


def test_a_full_disk_is_reported_as_the_disk_not_the_network(tmp_path, monkeypatch):
    """The kernel's own ENOSPC (writes to /dev/full), mid-download: the message names the
    file, the free space and the fix, and nothing partial is left."""
    import builtins

    manifest = _upstream(tmp_path, {"big/data.bin": b"x" * (3 * fetch.CHUNK_BYTES)})
    monkeypatch.setattr(fetch, "open", lambda *a, **k: builtins.open("/dev/full", "wb", 0), False)
    root = tmp_path / "root"
    with pytest.raises(DataFetchError) as err:
        fetch.fetch_data(root, manifest)
    message = str(err.value)
    assert message.startswith(f"{root / 'big/data.bin'}: the disk is full (")
    assert "MiB free under" in message and "Fix: free at least 3.0 MiB" in message
    assert "network" not in message
    assert not [p for p in root.rglob("*") if p.is_file()]


def test_fetched_files_take_the_umask_mode(tmp_path):
    """A shared data root: a fetched file is readable as the umask allows (mkstemp gave 0600)."""
    manifest = _upstream(tmp_path, FILES)
    fetch.fetch_data(tmp_path / "root", manifest)
    umask = os.umask(0)
    os.umask(umask)
    modes = {(tmp_path / "root" / p).stat().st_mode & 0o777 for p in FILES}
    assert modes == {0o666 & ~umask}


def test_licence_lines_cover_every_dataset():
    lines = fetch.licence_lines()
    assert len(lines) == len(fetch.load_datasets())
    assert any(line.startswith("xstest: CC-BY-4.0") for line in lines)
