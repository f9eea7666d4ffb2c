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
    benchmarks = check_benchmarks(cfg)
    said = {b.partition(": ")[2] for b in benchmarks}
    problems = [
        # the mix reads the benchmarks too (its overlap filter): a bad file once, by its field
        *[p for p in check_data(cfg) if p.partition(": ")[2] not in said],
        *benchmarks,
        *check_tokenizers(cfg),
        *check_contexts(cfg),
        *check_hub_pins(cfg),
        *check_cpu_cells(cfg),
        *check_secrets(cfg),
        *check_job_roots(cfg),
        *check_extras(cfg),
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


def _budgets(cfg: RunConfig, field: str) -> list[tuple[str, int]]:
    """(setting, tokens) an engine of the model in `field` must write after a prompt."""
    if field == "grid.models":
        out = [("eval.max_new_tokens", cfg.eval.max_new_tokens)]
        if "internal" in cfg.grid.conditions:  # each model writes its own reflections
            out.append(("reflection.max_new_tokens", cfg.reflection.max_new_tokens))
        return out
    if field in ("reflection.reflector", "reflection.local_server"):
        return [("reflection.max_new_tokens", cfg.reflection.max_new_tokens)]
    judge = getattr(cfg.eval, field.split(".")[1])
    return [(f"{field.removesuffix('.model')}.max_new_tokens", judge.budget())]


def check_contexts(cfg: RunConfig) -> list[str]:
    """A model built for fewer positions than eval.max_model_len gets an engine of its own
    context (tbr_ray.engine.engine_max_len); what still cannot fit is refused here, before a
    cell trains: an answer budget with no room for a prompt, or training sequences
    (data.max_seq_len) longer than the model's positions. Local models and tiny presets only:
    a hub model's config is read on the cluster."""
    from tbr_ray.models import model_context

    problems = []
    for field, model in model_settings(cfg):
        context = model_context(model)
        if context is None:
            continue
        engine = min(context, cfg.eval.max_model_len)
        for setting, tokens in _budgets(cfg, field):
            if tokens >= engine:
                problems.append(
                    f"{field} = {model!r}: its context is {context} tokens, so its engine holds "
                    f"{engine}, and {setting} = {tokens} leaves no room for a prompt. Fix: "
                    f"lower {setting} well below {engine}, or use a model with a longer context."
                )
        if field == "grid.models" and cfg.data.max_seq_len > context:
            problems.append(
                f"{field} = {model!r}: its context is {context} tokens, shorter than the training "
                f"sequences (data.max_seq_len = {cfg.data.max_seq_len}). Fix: set "
                f"data.max_seq_len to at most {context}."
            )
    return list(dict.fromkeys(problems))


def check_hub_pins(cfg: RunConfig) -> list[str]:
    """Every model loaded from the Hugging Face hub is pinned to a commit
    (grid.hub_revisions; tbr_ray.tiny.resolve_model loads that snapshot)."""
    from tbr_ray.models import hub_repo
    from tbr_ray.tiny import unpinned_message

    return [
        f"{field} = {unpinned_message(model, repo)}"
        for field, model in model_settings(cfg)
        if (repo := hub_repo(model)) and model not in cfg.grid.hub_revisions
    ]


def check_cpu_cells(cfg: RunConfig) -> list[str]:
    """A CPU run that starts its own Ray here: each cell's workers must fit this machine's
    CPUs, or Ray waits for them forever (tbr_ray.plan.sizing, as `--dry-run` plans). A run
    joining a cluster (RAY_ADDRESS) is not sized here: that cluster may grow."""
    from tbr_ray.plan import train_layout

    if cfg.train.use_gpu or os.environ.get("RAY_ADDRESS"):
        return []
    layouts = [train_layout(cfg, m, os.cpu_count()) for m in cfg.grid.models]
    return list(dict.fromkeys(lay.problem for lay in layouts if lay.problem))


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


def check_extras(cfg: RunConfig) -> list[str]:
    """A setting that needs an optional package (pyproject's extras) needs it installed:
    MLflow tracking the `tracking` extra, an external reflection endpoint the `endpoint`
    extra (the openai client)."""
    import importlib.util

    needs = []
    if cfg.tracking.mlflow:
        needs.append(("tracking.mlflow: true", "mlflow", "tracking", "set tracking.mlflow=false"))
    r = cfg.reflection
    served = r.endpoint is not None or r.local_server is not None
    if "external" in cfg.grid.conditions and served:
        field = "endpoint" if r.endpoint is not None else "local_server"
        needs.append(
            (
                f"reflection.{field} = {getattr(r, field)!r}",
                "openai",
                "endpoint",
                "use reflection.reflector (a model) instead",
            )
        )
    return [
        f"{setting}, but the {package} package is not installed. Fix: "
        f"`pip install 'tbr-ray[{extra}]'`, or {other}."
        for setting, package, extra, other in needs
        if importlib.util.find_spec(package) is None
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
