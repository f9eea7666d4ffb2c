"""Clusters beyond the session's local instance, marked `cluster`: they run last (conftest's
`pytest_collection_modifyitems`; each shuts down the session's instance) and `-m "not cluster"`
leaves them out. Each stops only the Ray processes it started (by their Ray temp folder, or
`Cluster.shutdown()`), never with `ray stop`, which ends every Ray process on the machine.

1. The README's `ray job submit` block, run as pasted (start, submit jobs/smoke.yaml), its
   closing `ray stop` aside; then `ray start --head` (token auth on, Ray 2.60's default): a
   client without the token is refused.
2. A cluster (`ray.cluster_utils.Cluster`) that grows while the grid runs: a node that joins
   is used, a cell trains on both nodes, results on the shared output path.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tbr_ray import results

from .conftest import SMALL_SETS, short_temp_dir, small_config, stop_ray_under

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


README_MARK = (
    "<!-- ray-job-submit: tests/test_cluster.py runs this block, its last line `ray stop` aside -->"
)


def readme_job_block() -> str:
    """The README's `ray job submit` commands: the bash block right after README_MARK."""
    text = (REPO / "README.md").read_text()
    after = text.split(README_MARK, 1)[1]
    return after.split("```bash\n", 1)[1].split("```", 1)[0]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_readme_job_submit_commands_work_as_pasted():
    """The README's block, run by bash in the checkout as a user would paste it, with no
    TBR_* or RAY_* variables set beforehand. TMPDIR gives its Ray instance a temp folder of its
    own, so the test ends exactly that instance in place of the block's last line, `ray stop`."""
    import ray

    if not (REPO / ".venv" / "bin" / "activate").is_file():
        pytest.skip("needs the checkout's .venv (make run); a worktree may link one")
    busy = [p for p in (6379, 8265) if _port_in_use(p)]
    if busy:
        pytest.skip(f"ports {busy} are held by another Ray instance, which this test leaves be")
    lines = readme_job_block().rstrip().splitlines()
    assert lines[-1].split("#")[0].strip() == "ray stop", lines[-1]
    ray.shutdown()  # this process's own local instance, if a fixture started one
    output = REPO / "runs" / "job-smoke"
    shutil.rmtree(output, ignore_errors=True)
    tmp = short_temp_dir("tbr-readme-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TBR_", "RAY_"))}
    env.pop("VIRTUAL_ENV", None)
    env["TMPDIR"] = str(tmp)  # Ray's temp folder is then $TMPDIR/ray
    try:
        proc = subprocess.run(
            ["bash", "-e", "-c", "\n".join(lines[:-1])],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        log = proc.stdout + proc.stderr
        errors = "".join(p.read_text()[-3000:] for p in output.glob("cells/*/error.txt"))
        assert proc.returncode == 0, log[-5000:] + errors
        assert "succeeded" in log.lower()
        status = results.read_status(output).set_index("cell_id")["status"].to_dict()
        assert status == {
            "tiny-llama__base__g0.00__s0": "done",
            "tiny-llama__none__g0.00__s0": "done",
        }
        assert (Path.home() / ".ray" / "auth_token").stat().st_mode & 0o077 == 0
    finally:
        assert stop_ray_under(tmp) > 0, "the block's Ray instance was not found to stop"
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


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


@pytest.fixture
def head(tmp_path_factory):
    """A `ray start --head` of its own, stopped when its one test ends (before the next test
    starts a cluster of its own)."""
    import ray

    ray.shutdown()  # this process's own local instance, if a fixture started one
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    tmp = short_temp_dir("tbr-head-")
    _ray(
        "start",
        "--head",
        f"--temp-dir={tmp}",
        "--num-cpus=2",
        "--port=6399",
        "--dashboard-host=127.0.0.1",
        "--dashboard-port=8299",
        "--include-dashboard=true",
        env=env,
    )
    try:
        yield env
    finally:
        assert stop_ray_under(tmp) > 0, "the head's processes were not found to stop"
        shutil.rmtree(tmp, ignore_errors=True)


def test_client_without_token_is_refused(head):
    env = {k: v for k, v in head.items() if k != "RAY_AUTH_MODE"}
    proc = _ray("job", "list", "--address", "http://127.0.0.1:8299", env=env, check=False)
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()


def _wait_until_running(proc, output: Path, cell_id: str, timeout_s: float = 300) -> None:
    import time

    t0 = time.time()
    while time.time() - t0 < timeout_s:
        status = results.read_status(output)
        if len(status) and cell_id in set(status[status["status"] == "running"]["cell_id"]):
            return
        if proc.poll() is not None:
            pytest.fail(f"ablate exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"{cell_id} did not start within {timeout_s} s")


def test_a_node_that_joins_after_the_grid_starts_is_used(tmp_path):
    """The cluster grows while the grid runs (an autoscaling cluster starts without its GPU
    workers): the scheduler re-reads its size (tbr_ray.grid.Capacity). At the start only the
    head's 1 CPU: one cell (2 workers x 0.25 CPU + its trial driver) fits, the second waits.
    A node of 2 CPUs joins once the first cell runs; the second cell then trains beside the
    first, with its two workers on two nodes (SPREAD), one on the new node. Capacity read
    once at the start (before) trained the second cell after the first, on the head. The
    grid is `tbr-ray ablate` joining the cluster by RAY_ADDRESS, as under `ray job submit`."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    shared = tmp_path / "shared-storage"
    sets = [*SMALL_SETS, "grid.models=[tiny-llama]", "train.max_steps=2", "eval.sample_size=2"]
    sets += ["eval.evaluate_base=false", "grid.conditions=[none]", "grid.seeds=[0, 1]"]
    sets += ["train.cpus_per_worker=0.25", "train.placement_strategy=SPREAD"]
    args = [sys.executable, "-m", "tbr_ray.cli", "ablate", "--config", "jobs/tiny.yaml"]
    args += ["--output", str(shared), *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        first, second = "tiny-llama__none__g0.00__s0", "tiny-llama__none__g0.00__s1"
        _wait_until_running(proc, shared, first)
        joined = cluster.add_node(num_cpus=2).node_id
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log[-5000:]
        status = results.read_status(shared).set_index("cell_id")
        assert status["status"].to_dict() == {first: "done", second: "done"}, log[-3000:]
        phases = status["phases"]
        assert phases[second]["train"]["start"] < phases[first]["train"]["end"], phases
        nodes = status.loc[second, "train"]["worker_nodes"].split(",")
        assert len(set(nodes)) == 2 and joined in nodes, (nodes, joined)
        assert (shared / "cells" / second / "metrics.parquet").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()


def test_an_evaluation_starts_while_another_model_trains(tmp_path):
    """Two logical nodes of 1 CPU: one cell (2 workers x 0.5 CPU) trains at a time and an
    engine (0.5 CPU) fits beside it. tiny-llama's evaluation must start as soon as its cells
    are trained or failed, before tiny-gemma's cell finishes training (the phases in
    status.json). Each model's `external` cell fails in its Tune trial (its reflection
    endpoint refuses connections): it is reported failed with the error, and the other cells
    go on."""
    import ray
    from ray.cluster_utils import Cluster

    from tbr_ray.grid import run_grid

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cfg = small_config(
            "train.max_steps=2",
            "eval.sample_size=2",
            "eval.evaluate_base=false",
            "grid.conditions=[none, external]",
            "grid.max_retries=0",
            "reflection.endpoint=http://127.0.0.1:9/v1",  # nothing listens on port 9
            "reflection.endpoint_model=refuser",
            "reflection.endpoint_keyless=true",
            "tracking.mlflow=true",
            output_models=("tiny-llama", "tiny-gemma"),
        )
        outcome = run_grid(cfg, tmp_path / "run")
        failed = {c for c, state in outcome.items() if "external" in c}
        assert {outcome[c] for c in failed} == {"failed"} and len(failed) == 2, outcome
        assert {s for c, s in outcome.items() if c not in failed} == {"done"}, outcome
        status = results.read_status(tmp_path / "run").set_index("cell_id")
        assert status.loc[sorted(failed), "error"].str.contains("Connection").all(), status
        phases = status["phases"]
        llama, gemma = phases["tiny-llama__none__g0.00__s0"], phases["tiny-gemma__none__g0.00__s0"]
        assert llama["train"]["end"] <= llama["eval"]["start"] < gemma["train"]["end"], phases
        assert gemma["train"]["start"] < llama["eval"]["end"], "no overlap: not pipelined"
        _assert_mlflow_has_one_run_per_cell(tmp_path / "run" / "mlruns", cfg.name)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _assert_mlflow_has_one_run_per_cell(store: Path, experiment: str) -> None:
    """tracking.mlflow: Tune's MLflow callback logged each training trial, named by its cell,
    with the trainer's loss and the tbr-ray run id."""
    mlflow = pytest.importorskip("mlflow")
    mlflow.set_tracking_uri(store.as_uri())
    runs = mlflow.search_runs(experiment_names=[experiment])
    trained = runs.set_index("tags.trial_name").loc[
        ["tiny-llama__none__g0.00__s0", "tiny-gemma__none__g0.00__s0"]
    ]
    assert trained["metrics.loss"].notna().all() and trained["tags.tbr_run_id"].notna().all()


def test_an_adapter_merge_runs_where_its_memory_is(tmp_path, tiny_falcon):
    """Issue 20 point 6 on logical nodes: a merge asks for its model's weights x margin +
    2 GiB of Ray `memory` (tbr_ray.engine.merge_options). A head of 1 GiB cannot hold that,
    a worker of 4 GiB can: the merge runs on the worker. A merge no node can hold (Falcon-40B
    here) is refused before anything starts."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks

    from tbr_ray.models import TINY_MODELS
    from tbr_ray.replicas import EngineSpec, launch_merge

    from .conftest import random_adapter

    gib = 2**30
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "memory": gib})
    worker = cluster.add_node(num_cpus=1, memory=4 * gib)
    try:
        ray.init(address=cluster.address)
        cfg = small_config("grid.models=[tiny-falcon]")
        targets = TINY_MODELS["tiny-falcon"].lora_targets
        adapter = random_adapter(tiny_falcon, targets, tmp_path / "adapter", seed=3)
        merged = tmp_path / "merged"
        spec = EngineSpec(str(merged), (), {None: adapter}, (), merge=(tiny_falcon, adapter))
        assert ray.get(launch_merge(cfg, "tiny-falcon", spec)) == str(merged)
        assert (merged / "config.json").is_file()
        ran = list_tasks(filters=[("name", "=", "merge:adapter")], detail=True)
        assert {t.node_id for t in ran} == {worker.node_id}, ran
        with pytest.raises(ValueError, match=r"falcon-40b needs \d+\.\d GiB of host memory"):
            launch_merge(cfg, "falcon-40b", spec)
    finally:
        ray.shutdown()
        cluster.shutdown()
