"""The test infrastructure itself: cluster tests run last and can be left out by marker, and
the Ray clean-up helper stops only the processes it names.

    pytest tests/test_conftest.py -q      # about 10 s (two pytest collections)
"""

import subprocess
import sys

from .conftest import REPO, short_temp_dir, stop_ray_under


def _collected(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_cluster_tests_run_last_and_are_deselected_by_marker():
    # test_cluster.py sorts before test_progress.py by name: only the marker puts it last.
    ids = _collected("tests/test_cluster.py", "tests/test_progress.py")
    cluster = [i for i in ids if i.startswith("tests/test_cluster.py")]
    assert cluster and ids[-len(cluster) :] == cluster, ids
    kept = _collected("tests/test_cluster.py", "tests/test_progress.py", "-m", "not cluster")
    assert kept and not any(i.startswith("tests/test_cluster.py") for i in kept), kept


def test_stop_ray_under_stops_only_processes_of_its_temp_dir():
    mine, other = short_temp_dir("tbr-mine-"), short_temp_dir("tbr-other-")
    sleep = [sys.executable, "-c", "import time, sys; time.sleep(120)"]
    procs = {d: subprocess.Popen([*sleep, f"--temp-dir={d}"]) for d in (mine, other)}
    try:
        assert stop_ray_under(mine, grace_s=10) == 1
        assert procs[mine].wait(timeout=10) is not None
        assert procs[other].poll() is None, "a process of another temp folder was stopped"
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
        for d in (mine, other):
            d.rmdir()
