"""Session fixtures: one local Ray instance and the tiny models, built once per test session.

Heavy parts (Ray, DeepSpeed, vLLM) are real; they start once here, not once per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tbr_ray.config import DataConfig, PathsConfig, load_config
from tbr_ray.models import TINY_MODELS
from tbr_ray.tiny import build_tiny_model

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def pytest_collection_modifyitems(config, items):
    import torch

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


def small_config(*extra: str, output_models=("tiny-llama",)):
    """jobs/tiny.yaml shrunk for tests: few rows, one short epoch, 4 prompts per benchmark."""
    sets = [
        "data.n_general=24",
        "data.n_safety=8",
        "train.epochs=1",
        "train.max_steps=3",
        "train.micro_batch_size=4",
        "eval.sample_size=4",
        "eval.max_new_tokens=8",
        "reflection.max_new_tokens=8",
        f"grid.models={list(output_models)}",
        *extra,
    ]
    return load_config(REPO / "jobs" / "tiny.yaml", sets)
