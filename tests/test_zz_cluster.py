"""A real local Ray cluster of two nodes (two `ray start` processes, token auth on, as Ray
2.60 sets it by default), a tiny grid submitted with `ray job submit --working-dir .`, and
evidence that cells ran on both nodes and that results landed on the shared storage path.

Named to run last: `ray stop` at teardown ends every Ray process on the machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tbr_ray import results
from tbr_ray.config import DataConfig, PathsConfig

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _ray(*args, env, check=True, timeout=300):
    return subprocess.run(
        [str(BIN / "ray"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    ray.shutdown()  # this process's own local instance, if a fixture started one
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    _ray("stop", "--force", env=env, check=False)
    _ray(
        "start",
        "--head",
        "--num-cpus=2",
        "--port=6399",
        "--dashboard-host=127.0.0.1",
        "--dashboard-port=8299",
        "--include-dashboard=true",
        env=env,
    )
    _ray("start", "--address=127.0.0.1:6399", "--num-cpus=2", env=env)
    yield env
    _ray("stop", "--force", env=env, check=False)


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared") / "tbr-results"
    runtime_env = {
        "env_vars": {
            "TBR_CACHE_DIR": str(PathsConfig().resolved_cache_dir()),
            "TBR_DATA_ROOT": str(DataConfig().resolved_root()),
        }
    }
    sets = [
        "data.n_general=24",
        "data.n_safety=8",
        "train.epochs=1",
        "train.max_steps=2",
        "train.micro_batch_size=4",
        "eval.sample_size=2",
        "eval.max_new_tokens=8",
        "eval.evaluate_base=false",
        "grid.models=[tiny-llama, tiny-gemma]",
        "grid.conditions=[none]",
        "train.placement_strategy=SPREAD",
    ]
    cmd = [
        "job",
        "submit",
        "--address",
        "http://127.0.0.1:8299",
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "jobs/run_grid.py",
        "--config",
        "jobs/tiny.yaml",
        "--output",
        str(shared),
    ]
    for s in sets:
        cmd += ["--set", s]
    proc = _ray(*cmd, env=cluster, check=False, timeout=1200)
    return proc, shared


def test_job_submit_with_token_auth_succeeds(submitted):
    proc, shared = submitted
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    res = results.read_results(shared)
    assert set(res.metrics["model"]) == {"tiny-llama", "tiny-gemma"}


def test_submit_without_token_is_refused(cluster):
    env = {k: v for k, v in cluster.items() if k != "RAY_AUTH_MODE"}
    proc = _ray("job", "list", "--address", "http://127.0.0.1:8299", env=env, check=False)
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()


def test_cells_ran_on_more_than_one_node(submitted):
    _, shared = submitted
    status = results.read_status(shared)
    nodes = set()
    for train in status["train"].dropna():
        nodes.update(train["worker_nodes"].split(","))
    assert len(nodes) >= 2, f"all cells trained on {nodes}"
    assert (shared / "run.json").is_file() and (shared / "adapters").is_dir()
