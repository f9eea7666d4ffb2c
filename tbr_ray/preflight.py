"""Preflight: what a run needs from this machine, checked before Ray starts.

    problems = preflight(cfg, output=Path("runs/tiny"))   # [] when the run can start
    require_ready(cfg, Path("runs/tiny"))                  # raises ConfigError listing them all

`tbr-ray validate`, `ablate --dry-run` and every run command (ablate, cell, data, train, eval)
call it after the config itself validated (names, ranges and key names are checked there, in
tbr_ray.config). Here: the data files (read as the data stage reads them), every benchmark
file (loaded as the evaluation loads it: headers, encoding, shots), the tokenizers of local
models, the secret named by `reflection.api_key_env`, the data and cache roots under a Ray
job, and the output folder. Every problem is one line naming the field, the value and the
fix, and all of them are reported together.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tbr_ray.config import ConfigError, RunConfig
from tbr_ray.rundir import RAY_JOB_ENV, ray_job_id  # noqa: F401 (RAY_JOB_ENV re-exported)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def preflight(cfg: RunConfig, output: Path | None = None) -> list[str]:
    """Every problem that would stop this config running here, one line each."""
    problems = [
        *check_data(cfg),
        *check_benchmarks(cfg),
        *check_tokenizers(cfg),
        *check_secrets(cfg),
        *check_job_roots(cfg),
        *check_tracking(cfg),
    ]
    if output is not None:
        problems += check_output(Path(output))
    return problems


def require_ready(cfg: RunConfig, output: Path | None = None) -> None:
    """Raise ConfigError listing every preflight problem (the CLI prints it, exit code 2)."""
    problems = preflight(cfg, output)
    if problems:
        raise ConfigError(
            f"{len(problems)} problem(s) before starting:\n  - " + "\n  - ".join(problems)
        )


def _attempt(field: str, check: Callable[[], object]) -> list[str]:
    """Run a real loader; its error (which names the file and the fix) becomes one line."""
    try:
        check()
    except UnicodeDecodeError as exc:
        return [f"{field}: {exc}. Fix: save the file as UTF-8."]
    except (OSError, ValueError) as exc:  # JSON errors are ValueErrors too
        text = str(exc).removeprefix(f"{field.split()[-1]}: ")  # the field already names it
        return [f"{field}: {text}".replace("\n", " ")]
    return []


def check_data(cfg: RunConfig) -> list[str]:
    """The training sources, read and sampled as the data stage does."""
    from tbr_ray.data import read_general, read_safety, source_rows

    root = cfg.data.resolved_root()
    if not root.is_dir():
        return [
            f"data.root = {str(root)!r}: no such folder. Fix: set data.root or $TBR_DATA_ROOT "
            f"to the shared data folder, or run `tbr-ray fetch-data --root {root}`."
        ]
    problems = []
    for source in cfg.data.general_sources:
        problems += _attempt(
            f"data.general_sources {source}", lambda s=source: read_general(root, (s,))
        )
    problems += _attempt(
        f"data.safety_source {cfg.data.safety_source}",
        lambda: read_safety(root, cfg.data.safety_source),
    )
    if not problems:  # the sources read: are there enough rows?
        problems += _attempt("data", lambda: source_rows(cfg))
    return problems


def check_benchmarks(cfg: RunConfig) -> list[str]:
    """Every benchmark loaded as the evaluation loads it: files, headers, encoding, shots."""
    from tbr_ray.benchmarks import load_benchmark_with_report

    root, ev = cfg.data.resolved_root(), cfg.eval
    problems = []
    for name in ev.benchmarks:
        problems += _attempt(
            f"eval.benchmarks {name}",
            lambda name=name: load_benchmark_with_report(
                name, root, ev.size_of(name), ev.sample_seed, ev.shots.get(name), ev.benchmark_files
            ),
        )
    return problems


def model_settings(cfg: RunConfig) -> list[tuple[str, str]]:
    """(field, model) for every model the config names."""
    named = [("grid.models", m) for m in cfg.grid.models]
    named.append(("reflection.reflector", cfg.reflection.reflector))
    named.append(("reflection.local_server", cfg.reflection.local_server))
    named += [(f"eval.{field}.model", judge.model) for field, judge in cfg.eval.model_judges()]
    return [(field, m) for field, m in named if m]


def check_tokenizers(cfg: RunConfig) -> list[str]:
    """A local model folder must carry its tokenizer (registry and hub models are fetched)."""
    problems = []
    for field, model in model_settings(cfg):
        path = Path(model).expanduser()
        if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
            problems.append(
                f"{field} = {model!r}: the folder has no tokenizer ({', '.join(TOKENIZER_FILES)})."
                f" Fix: `tokenizer.save_pretrained({str(path)!r})` next to the weights."
            )
    return problems


def check_secrets(cfg: RunConfig) -> list[str]:
    """The external reflector's key must be in the environment, unless declared keyless."""
    from tbr_ray.reflect import endpoint_key

    if "external" not in cfg.grid.conditions or cfg.reflection.endpoint is None:
        return []
    try:
        endpoint_key(cfg)
    except ConfigError as exc:
        return [str(exc)]
    return []


def check_tracking(cfg: RunConfig) -> list[str]:
    """MLflow tracking asked for needs the mlflow package."""
    import importlib.util

    if not cfg.tracking.mlflow or importlib.util.find_spec("mlflow") is not None:
        return []
    return [
        "tracking.mlflow: true, but the mlflow package is not installed. Fix: "
        "`pip install 'tbr-ray[tracking]'`, or set tracking.mlflow=false."
    ]


def check_job_roots(cfg: RunConfig) -> list[str]:
    """Under a Ray job the default roots would resolve inside Ray's uploaded copy of the
    checkout, which holds no data and is deleted: the roots must be given explicitly."""
    if ray_job_id() is None:
        return []
    problems = []
    if cfg.data.root is None and not os.environ.get("TBR_DATA_ROOT"):
        problems.append(
            "data.root is unset under `ray job submit`: the default would resolve inside "
            "Ray's temporary copy of the working directory. Fix: --set data.root=/abs/path "
            "(or TBR_DATA_ROOT in --runtime-env-json's env_vars)."
        )
    if cfg.paths.cache_dir is None and not os.environ.get("TBR_CACHE_DIR"):
        problems.append(
            "paths.cache_dir is unset under `ray job submit`: the default would resolve "
            "inside Ray's temporary copy of the working directory. Fix: --set "
            "paths.cache_dir=/abs/path (or TBR_CACHE_DIR in --runtime-env-json's env_vars)."
        )
    return problems


def check_output(output: Path) -> list[str]:
    """The results folder: absolute under a Ray job, a folder (not a file), writable."""
    if ray_job_id() is not None and not output.is_absolute():
        return [
            f"--output {output}: a relative path under `ray job submit` lands inside Ray's "
            f"temporary copy of the working directory. Fix: an absolute path on storage "
            f"every node reaches, e.g. --output /mnt/shared/runs/{output.name}."
        ]
    if output.exists() and not output.is_dir():
        return [f"--output {output}: is a file, not a folder. Fix: name a folder to hold results."]
    existing = output.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [
            f"--output {output}: {existing} is a file, so the folder cannot be made. "
            f"Fix: choose a path under a folder."
        ]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [
            f"--output {output}: {existing} is not writable by this user. Fix: choose a "
            f"folder you can write to."
        ]
    return []
