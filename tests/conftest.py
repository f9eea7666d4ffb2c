"""Session fixtures: one local Ray instance and the tiny models, built once per test session.

Heavy parts (Ray, DeepSpeed, vLLM) are real; they start once here, not once per test."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from tbr_ray.config import DataConfig, PathsConfig, load_config
from tbr_ray.models import TINY_MODELS
from tbr_ray.tiny import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
# Real tokenizers of the paper's families (../shared/tokenizers/ATTRIBUTION.md); tests that use
# them skip without the folder.
SHARED_TOKENIZERS = REPO.parent / "shared" / "tokenizers"
needs_tokenizers = pytest.mark.skipif(
    not SHARED_TOKENIZERS.is_dir(), reason=f"no shared tokenizers at {SHARED_TOKENIZERS}"
)


@functools.cache
def shared_tokenizer(name: str):
    """The real tokenizer in SHARED_TOKENIZERS/<name> (mistral, llama3, gemma3), loaded once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED_TOKENIZERS / name)


def pytest_configure(config):
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def pytest_collection_modifyitems(config, items):
    """`cluster` tests run last (they shut down the session's Ray instance); `gpu` tests are
    skipped on a machine without CUDA."""
    import torch

    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)  # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    return DataConfig().resolved_root()


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return PathsConfig().resolved_cache_dir()


@pytest.fixture(scope="session")
def tiny_llama(cache_dir, data_root) -> str:
    return str(build_tiny_model(TINY_MODELS["tiny-llama"], cache_dir, data_root))


@pytest.fixture(scope="session")
def tiny_falcon(cache_dir, data_root) -> str:
    return str(build_tiny_model(TINY_MODELS["tiny-falcon"], cache_dir, data_root))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (2 CPUs, as on the CI box)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


# jobs/tiny.yaml shrunk for tests: few rows, one short epoch, 4 prompts per benchmark. As
# `--set` strings, so a test that runs the command line (`tbr-ray ablate --set ...`) uses them too.
SMALL_SETS = (
    "data.n_general=24",
    "data.n_safety=8",
    "train.epochs=1",
    "train.max_steps=3",
    "train.micro_batch_size=4",
    "eval.sample_size=4",
    "eval.max_new_tokens=8",
    "reflection.max_new_tokens=8",
)


def small_config(*extra: str, output_models=("tiny-llama",)):
    """jobs/tiny.yaml with SMALL_SETS, `output_models` as the grid's models, then `extra`."""
    sets = [*SMALL_SETS, f"grid.models={list(output_models)}", *extra]
    return load_config(REPO / "jobs" / "tiny.yaml", sets)


def random_adapter(base: str, targets, path: Path, seed: int) -> str:
    """A random (non-zero) LoRA adapter of rank 8 on `base`, saved at `path`: its outputs differ
    from the base model's, so a test can tell whether an adapter was applied."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=32, init_lora_weights=False, target_modules=list(targets))
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(path)
    return str(path)


def ray_processes_under(temp_dir: Path) -> list:
    """The Ray processes started with `temp_dir` as their Ray temp folder (gcs_server, raylet,
    dashboard, workers all carry it on their command line), with their descendants (e.g. a
    vLLM engine a worker spawned)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in arg for arg in proc.info["cmdline"] or ()):
            found[proc.pid] = proc
            for child in _children(proc):
                found[child.pid] = child
    return list(found.values())


def _children(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def stop_ray_under(temp_dir: Path, grace_s: float = 5.0) -> int:
    """Stop exactly the Ray processes started under `temp_dir`; returns how many there were.
    Unlike `ray stop` (which ends every Ray process on the machine, another user's run too),
    this leaves every other Ray instance alone. SIGTERM, then SIGKILL after `grace_s`: gcs_server
    and the autoscaler monitor were seen ignoring SIGTERM for 30 s once the raylet was gone."""
    import psutil

    procs = ray_processes_under(temp_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def short_temp_dir(prefix: str) -> Path:
    """A new folder under /tmp with a short path: Ray's socket paths inside its temp folder must
    stay under the 107-byte Unix socket limit, which pytest's tmp_path can exceed."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
