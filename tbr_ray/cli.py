"""`tbr-ray`: the command line.

    tbr-ray ablate --config jobs/tiny.yaml --output runs/tiny      # the whole grid (resumable)
    tbr-ray ablate --config jobs/paper.yaml --dry-run --gpus 8 --config-only  # the plan
    tbr-ray cell   --config jobs/tiny.yaml --output runs/one        # one cell end to end
    tbr-ray data|train|eval --config ... --output ...               # one stage of one cell
    tbr-ray report runs/tiny --output runs/tiny/report              # tables, stats, plots
    tbr-ray status runs/tiny                                        # cells' states, errors
    tbr-ray judge-score --judge xstest-prefix --labels labels.csv
    tbr-ray review runs/tiny --reviewer ada [--export q.csv | --import q.csv]   # human labels
    tbr-ray models | build-models | validate CONFIG | data-check | fetch-data

Every command takes `--set a.b=c` overrides where it reads a config. Errors in the config or
inputs are printed as one readable message (exit code 2), never a traceback. `validate`,
`--dry-run` and every run command first run the preflight (tbr_ray.preflight): data and
benchmark files, tokenizers, secrets and the output folder, all problems at once. Commands
that write into a run folder hold its lock (tbr_ray.rundir): one driver per --output.
"""

from __future__ import annotations

import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import typer

from tbr_ray.config import Cell, ConfigError, RunConfig, load_config
from tbr_ray.rundir import DamagedFile, RunDir

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Think Before Refusal ablations on Ray: data, LoRA, vLLM eval, analysis.",
)

ConfigOpt = typer.Option(..., "--config", "-c", help="Job YAML, e.g. jobs/tiny.yaml.")
SetOpt = typer.Option([], "--set", help="Override a config value: a.b=c (repeatable).")
OutputOpt = typer.Option(Path("runs/default"), "--output", "-o", help="Results directory.")
ConfigOnlyOpt = typer.Option(
    False,
    "--config-only",
    help="Check the config itself, not this machine's files, secrets and output (for a job "
    "meant for another cluster).",
)


def _fail(message: str) -> None:
    """The one-line error (URL credentials and tokens masked: tbr_ray.redact), exit 2."""
    from tbr_ray.redact import redact

    typer.secho(redact(message), fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _config(path: Path, sets: list[str]) -> RunConfig:
    """The validated config, and the checks that need the planner's worker counts (the config
    module imports no stage), for every command, --config-only too, before Ray starts."""
    from tbr_ray.plan import batch_fit_problems, global_batch_problems

    try:
        cfg = load_config(path, sets)
    except ConfigError as exc:
        _fail(str(exc))
    if problems := global_batch_problems(cfg) or batch_fit_problems(cfg):
        _fail("\n".join(problems))
    return cfg


def _ready(cfg: RunConfig, output: Path | None) -> None:
    """The preflight (tbr_ray.preflight): every problem at once, exit 2, before Ray starts."""
    from tbr_ray.preflight import require_ready

    try:
        require_ready(cfg, output)
    except ConfigError as exc:
        _fail(str(exc))


def _pick_cell(cfg: RunConfig, model: str | None, reflection: str | None, seed: int | None) -> Cell:
    cells = [
        c
        for c in cfg.cells()
        if (model is None or c.model == model)
        and (reflection is None or c.condition == reflection)
        and (seed is None or c.seed == seed)
    ]
    if not cells:
        _fail(
            f"no cell matches model={model} reflection={reflection} seed={seed}; the config's "
            f"cells: {', '.join(c.cell_id for c in cfg.cells())}"
        )
    return cells[0]


@app.command()
def models() -> None:
    """List the model registry (the paper's 15 base models, the chat models, the tiny presets),
    then its families: LoRA targets, how vLLM serves adapters, chat template notes."""
    from tabulate import tabulate

    from tbr_ray.models import FAMILIES, REGISTRY

    def model_row(m) -> dict:
        return {
            "name": m.name,
            "family": m.family.name,
            "params": f"{m.params_b:.1f}B" if m.params_b >= 0.1 else "tiny",
            "GPUs": m.gpus,
            "ZeRO": m.zero_stage,
            "vLLM LoRA": "yes" if m.vllm_lora else "merge",
            "source": m.hf_id or "built locally",
        }

    def family_row(f) -> dict:
        targets = f.lora_targets if isinstance(f.lora_targets, str) else ",".join(f.lora_targets)
        return {
            "family": f.name,
            "architecture": f.architecture,
            "vLLM LoRA": "yes" if f.vllm_lora else "merge",
            "LoRA targets / chat template": f"{targets}\n{f.chat_template}",
        }

    align = ("left", "left", "right", "right", "right", "left", "left")
    models = [model_row(m) for m in REGISTRY.values()]
    typer.echo(tabulate(models, "keys", "simple", colalign=align))
    typer.echo("\nfamilies (a local model of another family: all-linear LoRA, vLLM decides)")
    typer.echo(tabulate([family_row(f) for f in FAMILIES.values()], "keys", "simple"))


@app.command("build-models")
def build_models(
    seed: int = typer.Option(0, help="Build seed."),
    cache_dir: Path | None = typer.Option(None, help="Cache folder."),
    data_root: Path | None = typer.Option(
        None,
        help="Data root whose Alpaca text pre-trains them (default: $TBR_DATA_ROOT, else "
        "../shared/data).",
    ),
) -> None:
    """Build (or find cached) every tiny preset (tokenizer + brief pre-training) and every
    packaged real model (its GGUF file dequantized into a verified HF folder)."""
    from tbr_ray.config import DataConfig, PathsConfig
    from tbr_ray.models import PACKAGED_MODELS, TINY_MODELS
    from tbr_ray.packaged import build_packaged_model
    from tbr_ray.tiny import build_tiny_model

    cache = Path(cache_dir) if cache_dir else PathsConfig().resolved_cache_dir()
    root = DataConfig(root=str(data_root) if data_root else None).resolved_root()
    for spec in TINY_MODELS.values():
        t0 = time.time()
        path = build_tiny_model(spec, cache, root, seed=seed)
        typer.echo(f"{spec.name}: {path} ({time.time() - t0:.0f}s)")
    for spec in PACKAGED_MODELS.values():
        t0 = time.time()
        path = build_packaged_model(spec, cache)
        typer.echo(f"{spec.name}: {path} ({time.time() - t0:.0f}s)")


@app.command()
def validate(
    config: Path = typer.Argument(..., help="Job YAML."),
    sets: list[str] = SetOpt,
    output: Path | None = typer.Option(None, "--output", "-o", help="Also check this folder."),
    config_only: bool = ConfigOnlyOpt,
):
    """Validate a job file and what it needs here (data, benchmark files, tokenizers, secrets);
    print its hash and cell count."""
    cfg = _config(config, sets)
    if not config_only:
        _ready(cfg, output)
    typer.echo(f"{config}: ok, config hash {cfg.config_hash()}, {len(cfg.cells())} cells")


VerboseOpt = typer.Option(
    False, "--verbose", "-v", help="Show Ray's own logs, Tune's table and Ray Data's bars."
)


@app.command()
def ablate(
    config: Path = ConfigOpt,
    sets: list[str] = SetOpt,
    output: Path = OutputOpt,
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Plan, train nothing: per cell GPUs, ZeRO, memory fit, steps; per base model "
        "engine GPUs; GPU-hours and makespan (tbr_ray.plan); per Table 3 column the smallest "
        "difference the grid resolves; then the preflight. Exit 2 if it cannot fit.",
    ),
    gpus: int | None = typer.Option(
        None, "--gpus", min=1, help="GPUs of the cluster (cluster.gpus); default: Ray's."
    ),
    gpu_memory: float | None = typer.Option(
        None, "--gpu-memory", min=1, help="GiB of one GPU (cluster.gpu_memory_gib)."
    ),
    gpu_type: str | None = typer.Option(
        None,
        "--gpu-type",
        help="GPU model (cluster.gpu_type: A100, H100, H200, L40S): the plan's FLOPs, "
        "bandwidths and price; its memory too unless --gpu-memory says.",
    ),
    config_only: bool = ConfigOnlyOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Run (or resume) the grid: models x conditions x gammas x seeds. Ctrl-C stops it cleanly
    (cells marked interrupted, no evaluation) and prints the command that resumes it."""
    from tbr_ray.grid import summarize, timing_summary, wall_clock

    sets = list(sets) + [f"cluster.gpus={gpus}"] * bool(gpus)
    sets += _gpu_sets(gpu_type, gpu_memory)
    cfg = _config(config, sets)
    if dry_run:
        _dry_run(cfg, gpus, None if config_only else output, output)
        return
    _refuse_unplannable(cfg)
    if not config_only:
        _ready(cfg, output)
    t0 = time.time()
    command = ["ablate", "--config", str(config)] + ["--config-only"] * config_only
    outcome = _run_grid_or_exit(cfg, output, command, sets, verbose)
    failed = {k: v for k, v in outcome.items() if v != "done"}
    where = output.resolve()
    typer.echo(summarize(output))
    typer.echo(timing_summary(output))
    typer.echo(
        f"{len(outcome) - len(failed)}/{len(outcome)} cells done in "
        f"{wall_clock(time.time() - t0)}; results in {where}"
    )
    for cell_id, state in failed.items():
        typer.secho(
            f"  {cell_id}: {state} (see {where}/cells/{cell_id}/status.json)", fg=typer.colors.RED
        )
    typer.echo(f"next: tbr-ray report {shlex.quote(str(where))}")
    if failed:
        raise typer.Exit(1)


def _run_grid_or_exit(cfg: RunConfig, output: Path, command: list[str], sets, verbose, cells=None):
    """run_grid; on Ctrl-C / SIGTERM print what was stopped and the command that resumes
    (`command` + the --set values + the absolute --output), then exit 128 + signal."""
    from tbr_ray.grid import run_grid
    from tbr_ray.interrupt import Interrupted

    try:
        return run_grid(cfg, output, cells=cells, verbose=verbose)
    except ConfigError as exc:
        _fail(str(exc))
    except Interrupted as exc:
        resume = ["tbr-ray", *command, "--output", str(output.resolve())]
        resume += [arg for s in sets for arg in ("--set", s)]
        typer.secho(f"{exc}: {', '.join(exc.cells) or 'none running'}", fg=typer.colors.YELLOW)
        typer.echo(f"resume with: {shlex.join(resume)}")
        raise typer.Exit(exc.exit_code) from None


def _gpu_sets(gpu_type: str | None, gpu_memory: float | None) -> list[str]:
    """--set values of --gpu-type and --gpu-memory: the type's memory unless given."""
    from tbr_ray.plan.gpus import GPU_TYPES

    sets = [f"cluster.gpu_type={gpu_type}"] * bool(gpu_type)
    if gpu_memory is None and gpu_type in GPU_TYPES:
        gpu_memory = GPU_TYPES[gpu_type].memory_gib
    return sets + [f"cluster.gpu_memory_gib={gpu_memory}"] * bool(gpu_memory)


def _measured_answers(cfg: RunConfig, folder: Path | None) -> dict | None:
    """Answer lengths the run of `cfg` in `folder` measured (its finished cells'
    generations), for the plan of its rest; None without one (or with another config's, or
    with a damaged run.json: which config it holds is unknown)."""
    from tbr_ray.plan.evalcost import measured_answer_tokens
    from tbr_ray.results import read_results, read_run_manifest

    try:
        manifest = read_run_manifest(folder) if folder is not None else None
    except DamagedFile:
        return None
    if manifest is None or manifest.get("config_hash") != cfg.config_hash():
        return None
    return measured_answer_tokens(read_results(folder).generations) or None


def _dry_run(cfg: RunConfig, gpus: int | None, output: Path | None, folder=None) -> None:
    """The plan (tbr_ray.plan), then the preflight of this machine unless `output` is None
    (--config-only). Exit 2 if the plan cannot place the grid, or if a run that would execute
    here (a CPU config) fails the preflight. A GPU config is planned from a laptop before the
    cluster exists: its preflight lines (files on the cluster's volume, secrets set on its
    pods) are printed as what `tbr-ray validate` must pass *there*, and do not fail the plan.
    A run already in `folder` (--output) gives the plan its measured answer lengths."""
    from tbr_ray.plan import PlanError, format_plan, plan_grid
    from tbr_ray.preflight import preflight

    try:
        measured = _measured_answers(cfg, folder)
        plan = plan_grid(cfg, gpus or _cluster_devices(cfg), measured=measured)
    except PlanError as exc:
        _fail(str(exc))
    typer.echo(format_plan(plan))
    typer.echo("\n" + _power_section(cfg))
    if output is not None and not cfg.train.use_gpu:
        _ready(cfg, output)
    elif output is not None and (problems := preflight(cfg, output)):
        typer.secho(
            f"preflight on this machine: {len(problems)} problem(s) that would stop the run "
            "here; run `tbr-ray validate` on the cluster before submitting:\n  - "
            + "\n  - ".join(problems),
            fg=typer.colors.YELLOW,
            err=True,
        )
    if plan.problems:
        raise typer.Exit(2)


def _power_section(cfg: RunConfig) -> str:
    """The dry run's power statement (tbr_ray.plan.power_plan), with the paper's Table 3 as
    analysis/ holds it (its layout and published values)."""
    from analysis.paper import published_pairs
    from analysis.tables import planned_columns
    from tbr_ray.plan.power_plan import format_power, power_rows

    columns = planned_columns(cfg.eval.benchmarks, cfg.eval.harm_judge is not None)
    rows = power_rows(cfg, columns, published_pairs(cfg.grid.models))
    return format_power(cfg, rows)


def _refuse_unplannable(cfg: RunConfig) -> None:
    """A GPU run the planner cannot place (a cell or engine larger than memory or a node, or
    than cluster.gpus when set) stops here, before Ray, with the plan's fixes (exit 2)."""
    from tbr_ray.plan import plan_grid

    problems = plan_grid(cfg, cfg.cluster.gpus).problems if cfg.train.use_gpu else []
    if problems:
        _fail(
            f"{len(problems)} problem(s) placing this grid (`--dry-run` shows the plan):\n  - "
            + "\n  - ".join(problems)
        )


def _cluster_devices(cfg: RunConfig) -> int | None:
    """Devices to plan for without --gpus: the Ray cluster's (only when RAY_ADDRESS names one,
    as `ray job submit` does: never a stray local instance), else cluster.gpus; CPU runs: the
    cluster's CPUs, else this machine's cores."""
    import os

    if os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
        res = ray.cluster_resources()
        return int(res.get("GPU" if cfg.train.use_gpu else "CPU", 0)) or None
    return cfg.cluster.gpus if cfg.train.use_gpu else os.cpu_count()


@app.command()
def cell(
    config: Path = ConfigOpt,
    sets: list[str] = SetOpt,
    output: Path = OutputOpt,
    model: str | None = typer.Option(None, help="Model of the cell (default: first)."),
    reflection: str | None = typer.Option(None, help="none | internal | external."),
    seed: int | None = typer.Option(None, help="Training seed."),
    verbose: bool = VerboseOpt,
) -> None:
    """Run one cell end to end: data -> train -> eval -> Parquet."""
    from tbr_ray.grid import summarize

    cfg = _config(config, sets)
    chosen = _pick_cell(cfg, model, reflection, seed)
    _refuse_unplannable(cfg)
    _ready(cfg, output)
    picked = ["cell", "--config", str(config), "--model", chosen.model]
    picked += ["--reflection", chosen.condition, "--seed", str(chosen.seed)]
    outcome = _run_grid_or_exit(cfg, output, picked, sets, verbose, cells=[chosen])
    typer.echo(summarize(output))
    if outcome[chosen.cell_id] != "done":
        _fail(f"{chosen.cell_id}: {outcome[chosen.cell_id]}")


@app.command()
def data(
    config: Path = ConfigOpt,
    sets: list[str] = SetOpt,
    model: str | None = None,
    reflection: str | None = None,
) -> None:
    """Build one cell's training mix (cached) and print its report."""
    cfg = _config(config, sets)
    chosen = _pick_cell(cfg, model, reflection, None)
    _ready(cfg, None)
    mix, _ = _mix_for(cfg, chosen)
    typer.echo(f"{mix}\n{(mix / 'report.json').read_text()}")


def _mix_for(cfg: RunConfig, cell: Cell) -> tuple[Path, str]:
    """Start Ray, resolve the models and build (or find) the cell's mix: (mix, model path)."""
    from tbr_ray.data import build_mix
    from tbr_ray.grid import _init_ray, model_paths

    _init_ray()
    paths = model_paths(cfg)
    reflector = paths.get(cfg.reflection.writer_model() or "")
    return build_mix(cfg, cell, paths[cell.model], reflector_path=reflector), paths[cell.model]


@app.command()
def train(
    config: Path = ConfigOpt,
    sets: list[str] = SetOpt,
    output: Path = OutputOpt,
    model: str | None = None,
    reflection: str | None = None,
    seed: int | None = None,
) -> None:
    """Fine-tune one cell (building its mix if needed); prints the adapter folder."""
    from tbr_ray.train import run_training

    cfg = _config(config, sets)
    chosen = _pick_cell(cfg, model, reflection, seed)
    _refuse_unplannable(cfg)
    _ready(cfg, output)
    with _run_folder(cfg, output, "train") as out:
        mix, model_path = _mix_for(cfg, chosen)
        adapter = run_training(cfg, chosen, model_path, mix, out)
    typer.echo(f"{adapter}\n{(adapter / 'train_result.json').read_text()}")


@app.command("eval")
def eval_(
    config: Path = ConfigOpt,
    sets: list[str] = SetOpt,
    output: Path = OutputOpt,
    model: str | None = None,
) -> None:
    """Evaluate a base model and its trained adapters found under OUTPUT."""
    from tbr_ray.grid import GridMetrics, _init_ray, eval_phase, model_paths, run_id, summarize

    cfg = _config(config, sets)
    _ready(cfg, output)
    cells = [c for c in cfg.cells() if model is None or c.model == model]
    with _run_folder(cfg, output, "eval") as out:
        _init_ray()
        eval_phase(cfg, cells, model_paths(cfg), out, GridMetrics(run_id(cfg)))
    typer.echo(summarize(output))


@contextmanager
def _run_folder(cfg: RunConfig, output: Path, command: str):
    """Hold OUTPUT's run lock and refuse a folder that holds another config's run."""
    from tbr_ray.grid import check_run_dir
    from tbr_ray.rundir import run_lock

    out = output.resolve()
    try:
        with run_lock(out, command):
            check_run_dir(cfg, out)
            yield out
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def report(
    results_dir: Path = typer.Argument(..., help="A results directory (--output of ablate)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Report folder (default RESULTS/report)."
    ),
    judge: str = typer.Option(
        "paper-keywords",
        help="Judge for compliance rates: paper-keywords | xstest-prefix | model | "
        "paper-reviewed (keywords, human labels overriding) | human.",
    ),
    gamma: float | None = typer.Option(
        None, help="Gamma for the tables (default: largest per cell)."
    ),
) -> None:
    """Write report.md, report.html, PNG plots and summary.csv from a results directory."""
    from analysis.report import write_report

    if not results_dir.is_dir():
        _fail(
            f"{results_dir}: no such results directory. Fix: pass the --output of `tbr-ray ablate`."
        )
    try:
        paths = write_report(
            results_dir, output or RunDir(results_dir).report, judge=judge, gamma=gamma
        )
    except DamagedFile as exc:
        _fail(f"{exc}. Fix: rerun the run's command to redo what it held, or restore the file.")
    for key, path in paths.items():
        typer.echo(f"{key}: {path}")


@app.command()
def review(
    results_dir: Path = typer.Argument(..., help="A results directory (--output of ablate)."),
    reviewer: str | None = typer.Option(
        None, help="Your name, stored with each label (default: the login name)."
    ),
    sample: int = typer.Option(5, help="Agreed-on generations sampled per benchmark x cell."),
    seed: int = typer.Option(0, help="Seed of that sample."),
    host: str = typer.Option("127.0.0.1", help="Address to bind the page to (loopback)."),
    port: int = typer.Option(0, help="Port (0: a free one)."),
    allow_network: bool = typer.Option(
        False,
        "--allow-network",
        help="Allow a --host other machines reach; the token then travels in plain HTTP.",
    ),
    export: Path | None = typer.Option(None, "--export", help="Write the queue as CSV; exit."),
    import_: Path | None = typer.Option(None, "--import", help="Store labels from a CSV; exit."),
) -> None:
    """Label generations by hand: a local page (judge disagreements first), or a CSV round trip.
    Labels land in RESULTS/reviews/<reviewer>.parquet as the judge `human`."""
    import getpass

    from pydantic import ValidationError

    from tbr_ray.results import read_results
    from tbr_ray.review import (
        ReviewConfig,
        ReviewStore,
        export_csv,
        import_csv,
        make_server,
        run_id_of,
    )

    try:
        cfg = ReviewConfig(
            reviewer=reviewer or getpass.getuser(),
            sample_per_cell=sample,
            seed=seed,
            host=host,
            port=port,
            allow_network=allow_network,
        )
        if export or import_:
            results = read_results(results_dir)
            store = ReviewStore(results_dir, cfg.reviewer, run_id_of(results))
            if export:
                n = export_csv(results, cfg, store, export)
                typer.echo(f"{export}: {n} generations to review (fill the label column)")
            if import_:
                n = import_csv(results, store, import_)
                typer.echo(f"{import_}: {n} labels stored for {cfg.reviewer}")
            return
        server = make_server(results_dir, cfg)
    except (ValueError, ValidationError, FileNotFoundError) as exc:
        _fail(str(exc))
    if server.exposed:
        typer.secho(
            f"WARNING: --host {host} serves this page to other machines over plain HTTP: "
            "anyone who sees the traffic can read the token below and label in your name.",
            fg=typer.colors.RED,
            bold=True,
            err=True,
        )
    done = server.progress()
    typer.echo(f"{done['total']} generations to review, {done['done']} labelled by {cfg.reviewer}")
    typer.echo(f"open {server.url}  (Ctrl-C to stop; every label is saved as it is given)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


@app.command("judge-score")
def judge_score(
    judge: str = typer.Option(..., help="paper-keywords | xstest-prefix | model"),
    labels: Path = typer.Option(..., help="CSV: prompt, completion, label[, group]"),
    config: Path | None = typer.Option(
        None, help="Job YAML setting eval.refusal_judge (model judge only)."
    ),
    sets: list[str] = SetOpt,
) -> None:
    """Score a judge against human labels: agreement, confusion matrix, per-group figures."""
    from tbr_ray.judges import JUDGES, format_judge_score, score_judge
    from tbr_ray.vocab import did_you_mean

    if judge not in JUDGES:
        hint = did_you_mean(judge, JUDGES)
        _fail(f"unknown judge {judge!r}{hint}; choose one of {', '.join(JUDGES)}")
    if not labels.is_file():
        _fail(f"{labels}: no such file. Fix: a CSV with columns prompt, completion, label.")
    labeler, fmt = None, "three-class"
    if judge == "model":
        cfg = _config(config, sets) if config is not None else None
        if cfg is None or cfg.eval.refusal_judge is None:
            _fail(
                "the model judge needs --config with eval.refusal_judge set. Fix: e.g. "
                "--set 'eval.refusal_judge={model: allenai/wildguard, format: wildguard}' "
                "--set 'eval.judges=[model]'"
            )
        labeler, fmt = _model_labeler(cfg), cfg.eval.refusal_judge.format
    try:
        scored = score_judge(judge, labels, model_labeler=labeler, model_format=fmt)
        typer.echo(format_judge_score(scored))
    except ValueError as exc:
        _fail(str(exc))


def _model_labeler(cfg: RunConfig):
    """A labeler that runs the configured refusal judge on vLLM (Ray Data + EngineStage),
    its prompts rendered in its declared format through its own tokenizer."""
    from tbr_ray import grid
    from tbr_ray.evaluate import _run_engine, _tokenizer
    from tbr_ray.judges import judge_prompt
    from tbr_ray.tiny import resolve_model

    judge = cfg.eval.refusal_judge

    def label(pairs):
        grid.init_ray(logging_level="WARNING")  # Ray's token file private, as for a run
        path = resolve_model(
            judge.model,
            cfg.paths.resolved_cache_dir(),
            cfg.data.resolved_root(),
            revisions=cfg.grid.hub_revisions,
        )
        tokenizer = _tokenizer(path)
        rows = [
            {
                "row": i,
                "prompt": judge_prompt(judge.format, tokenizer, p, c, judge.model),
                "adapter": "",
                "mode": "generate",
                "choices": "[]",
            }
            for i, (p, c) in enumerate(pairs)
        ]
        out = _run_engine(path, [], rows, cfg, judge.budget(), model=judge.model)
        return list(out.sort_values("row")["completion"])

    return label


@app.command("data-check")
def data_check(root: Path | None = typer.Option(None, help="Data root (default: setting).")):
    """Verify the data root against the shipped manifest (sha256 of every file)."""
    from tbr_ray.config import DataConfig
    from tbr_ray.fetch import verify_data_root

    root = root or DataConfig().resolved_root()
    rows = verify_data_root(root)
    bad = [(p, s) for p, s in rows if s != "ok"]
    typer.echo(f"{root}: {len(rows) - len(bad)}/{len(rows)} files ok")
    for p, s in bad:
        typer.echo(f"  {p}: {s}")
    if bad:
        raise typer.Exit(1)


@app.command("fetch-data")
def fetch_data_cmd(
    root: Path = typer.Option(..., help="Folder to fill."),
    only: list[str] = typer.Option([], help="Data set or file to fetch."),
):
    """Download missing data files from their upstream sources, checking sha256."""
    from tbr_ray.fetch import DataFetchError, fetch_data

    try:
        for path, state in fetch_data(root, only=only or None):
            typer.echo(f"{state:8} {path}")
    except DataFetchError as exc:
        _fail(str(exc))


@app.command()
def status(run_dir: Path = typer.Argument(..., help="A results directory (--output of a run).")):
    """Where a run stands: its driver (if one holds the folder), then per cell its state,
    stage, start, elapsed time, last update and, for a failure, the file with its full error."""
    from tbr_ray.status import format_status

    run = RunDir(run_dir)
    if not run.manifest.is_file() and not run.cells.is_dir():
        _fail(f"{run_dir}: not a results directory. Fix: pass the --output of a run.")
    typer.echo(format_status(run_dir))


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # python -m tbr_ray.cli
    main()
