"""The grid's schedule (pure): jobs from the sized cells and engines, the scheduling policy as a
discrete-event simulation, GPU-hours, the makespan, and the dry-run report."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tabulate import tabulate

from tbr_ray.config import PROMPTING, Cell, RunConfig
from tbr_ray.plan.cost import CostModel, cost_model, train_s, writer_s
from tbr_ray.plan.evalcost import answers_note, eval_job_s, judge_job_s
from tbr_ray.plan.gpus import GPU_TYPES
from tbr_ray.plan.policy import KINDS, pick
from tbr_ray.plan.sizing import (
    EngineLayout,
    PlanError,
    TrainLayout,
    engine_gpus,
    engine_layout,
    eval_passes,
    eval_replicas,
    judge_engine_gpus,
    train_layout,
)
from tbr_ray.plan.steps import batch_fit_problems, global_batch_problems, planned_steps

# ------------------------------------------------------------------ simulation


@dataclass(frozen=True)
class Job:
    name: str  # "write <model>", "train <cell id>", "eval <model>"
    kind: str  # write | eval | train (tbr_ray.plan.policy.KINDS)
    devices: int  # GPUs (GPU runs) or busy CPU cores (CPU runs)
    seconds: float
    after: tuple[str, ...] = ()  # jobs that must end first


@dataclass(frozen=True)
class Slot:
    job: Job
    start_s: float
    end_s: float


def simulate(jobs: list[Job], capacity: int, start_s: float = 0.0, max_train: int | None = None):
    """The grid's scheduling policy (tbr_ray.plan.policy.pick, the function the runtime calls)
    as a discrete-event simulation: at the start and whenever a job ends, the ready jobs
    (every `after` ended) are offered to `pick` with the devices free then. `max_train`:
    grid.max_concurrent. A job larger than `capacity` is refused (PlanError) before."""
    if too_big := [j for j in jobs if j.devices > capacity]:
        raise PlanError(f"{too_big[0].name} can never start (capacity {capacity}).")
    pending, ended = list(jobs), {}
    running: list[Slot] = []
    slots: list[Slot] = []
    t = start_s
    while pending or running:
        ready = [j for j in pending if all(a in ended for a in j.after)]
        free = capacity - sum(s.job.devices for s in running)
        n_train = sum(s.job.kind == "train" for s in running)
        for job in pick(ready, free, n_train, max_train):
            slot = Slot(job, t, t + job.seconds)
            running.append(slot)
            slots.append(slot)
            pending.remove(job)
        if not running:
            raise PlanError(f"{pending[0].name} can never start: it waits for a job never run.")
        first = min(running, key=lambda s: s.end_s)
        running.remove(first)
        t = first.end_s
        ended[first.job.name] = t
    return slots


# ------------------------------------------------------------------ the grid's plan


@dataclass(frozen=True)
class CellPlan:
    cell: Cell
    layout: TrainLayout | None  # None: a prompting cell (evaluated, never trained)
    steps: int
    seconds: float  # training wall time on its devices


@dataclass(frozen=True)
class GridPlan:
    device: str  # "GPU" or "CPU core"
    capacity: int | None  # devices planned for; None: unknown (no makespan)
    cells: list[CellPlan]
    engines: list[EngineLayout]  # one per grid model, then writers and the judge
    problems: list[str]  # non-empty: the config is refused
    slots: list[Slot]
    gpu_type: str | None = None  # cluster.gpu_type (GPU runs)
    usd_per_gpu_hour: float | None = None  # cluster.gpu_hour_usd[gpu_type]; None: not known
    answers: str = ""  # where the answer lengths came from (the report says it)

    @property
    def makespan_s(self) -> float:
        return max((s.end_s for s in self.slots), default=0.0)

    @property
    def device_hours(self) -> float:
        return sum(s.job.devices * s.job.seconds for s in self.slots) / 3600


def _writers(cfg: RunConfig) -> list[str]:
    """Models whose engines write reflections: each internal cell's base model, and the
    external reflector when it is an engine or a server the run starts (a remote endpoint is
    somebody else's GPUs)."""
    models = [c.model for c in cfg.cells() if c.condition == "internal"]
    if "external" in cfg.grid.conditions and cfg.reflection.writer_model():
        models.append(cfg.reflection.writer_model())
    return list(dict.fromkeys(models))


def _writer_jobs(cfg: RunConfig, cost: CostModel, devices) -> list[Job]:
    """A job per engine that writes reflections (`_writers`, on `devices(model)`): a local
    OpenAI server the run starts for the external ones (reflection.local_server, where no
    endpoint comes first) is a process of its own, with its own start, even where its model
    also writes the internal reflections in the engines' actor."""
    served = cfg.reflection.writer_model() if "external" in cfg.grid.conditions else None
    served = served if served and served == cfg.reflection.local_server else None
    internal = {c.model for c in cfg.cells() if c.condition == "internal"}
    jobs = [
        Job(f"write {w}", "write", devices(w), writer_s(cfg, cost, w, devices(w)))
        for w in _writers(cfg)
        if w != served or w in internal
    ]
    if served:
        seconds = writer_s(cfg, cost, served, devices(served), server=True)
        jobs.append(Job(f"write {served} (server)", "write", devices(served), seconds))
    return jobs


def _cell_plans(cfg: RunConfig, cost: CostModel, capacity: int | None) -> list[CellPlan]:
    out = []
    for cell in cfg.cells():
        if cell.condition in PROMPTING:
            out.append(CellPlan(cell, None, 0, 0.0))
            continue
        lay = train_layout(cfg, cell.model, capacity)
        steps = planned_steps(cfg, cell.model)  # the layout without a cluster cap: the same
        busy = lay.gpus if cfg.train.use_gpu else _cpu_train_cores(cfg, lay.gpus, capacity)
        out.append(
            CellPlan(cell, lay, steps, train_s(cfg, cost, cell.model, busy, steps, lay.gpus))
        )
    return out


def _cpu_train_cores(cfg: RunConfig, workers: int, capacity: int | None) -> int:
    """Cores a CPU cell keeps busy: each worker runs max(1, its whole CPUs) torch threads."""
    busy = workers * max(1, int(cfg.train.cpus_per_worker))
    return min(busy, capacity) if capacity else busy


def _problems(cfg: RunConfig, cells: list[CellPlan], engines: list[EngineLayout], capacity):
    out = [e.problem for e in engines if e.problem]
    out += list(dict.fromkeys(p.layout.problem for p in cells if p.layout and p.layout.problem))
    if capacity and cfg.train.use_gpu:
        for e in engines:
            if not e.problem and e.gpus > capacity:
                out.append(
                    f"{e.model}: its vLLM engine needs {e.gpus} GPUs ({e.gib_per_gpu:.1f} GiB "
                    f"each), the cluster has {capacity}. Fix: --gpus {e.gpus} or more, or drop "
                    f"{e.model} from grid.models."
                )
    return out


def _jobs(cfg, cost: CostModel, cells: list[CellPlan], capacity: int, measured) -> list[Job]:
    gpu = cfg.train.use_gpu

    def devices(model: str) -> int:  # an engine: its GPUs, or every core of a CPU box
        return engine_gpus(cfg, model) if gpu else capacity

    writers = _writer_jobs(cfg, cost, devices)
    after_writers = tuple(j.name for j in writers)
    jobs = list(writers)
    for p in cells:
        if p.layout is not None:
            busy = p.layout.gpus if gpu else _cpu_train_cores(cfg, p.layout.gpus, capacity)
            jobs.append(Job(f"train {p.cell.cell_id}", "train", busy, p.seconds, after_writers))
    for model in cfg.grid.models:
        trained = tuple(
            f"train {p.cell.cell_id}" for p in cells if p.cell.model == model and p.layout
        )
        jobs += _eval_jobs(cfg, cost, model, capacity, after_writers + trained, measured)
    return jobs


def _eval_jobs(cfg, cost: CostModel, model: str, capacity: int, after, measured) -> list[Job]:
    """A base model's evaluation as the runtime runs it (tbr_ray.grid): its generations on
    its engine replicas, then its judging, a job of its own on the judges' devices (every
    core of a CPU box for both)."""
    gpu, passes = cfg.train.use_gpu, eval_passes(cfg, model)
    tp = engine_gpus(cfg, model) if gpu else capacity
    replicas = eval_replicas(cfg, model) if gpu else 1
    seconds = eval_job_s(cfg, cost, model, tp, passes, replicas, measured)
    generate = Job(f"eval {model}", "eval", tp * replicas, seconds, after)
    judge_tp = judge_engine_gpus(cfg) if gpu else capacity
    judging = judge_job_s(cfg, cost, max(judge_tp, 1), passes, measured)
    return [generate, Job(f"judge {model}", "judge", judge_tp, judging, (generate.name,))]


def plan_grid(
    cfg: RunConfig, capacity: int | None, cost: CostModel | None = None, measured=None
) -> GridPlan:
    """Size every cell and engine of `cfg` for `capacity` devices (GPUs on a GPU run, CPU cores
    on a CPU run; None: sizes only), list every problem, and simulate the schedule when none.
    `cost`: the cost model (default: the device's, `cost_model(cfg)`); `measured`: answer
    lengths a run measured (tbr_ray.plan.evalcost.measured_answer_tokens)."""
    cost = cost or cost_model(cfg)
    if batch := global_batch_problems(cfg) or batch_fit_problems(cfg):  # steps need them
        return GridPlan(cost.device, capacity, [], [], batch, [])
    cells = _cell_plans(cfg, cost, capacity)
    names = list(cfg.grid.models) + _writers(cfg)
    names += [judge.model for _, judge in cfg.eval.model_judges()]
    engines = [engine_layout(cfg, m) for m in dict.fromkeys(names)] if cfg.train.use_gpu else []
    problems = _problems(cfg, cells, engines, capacity) + _gpu_type_problems(cfg)
    slots = []
    if capacity and not problems:
        jobs = _jobs(cfg, cost, cells, capacity, measured)
        slots = simulate(jobs, capacity, cost.phase_fixed_s, cfg.grid.max_concurrent)
    gpu = cfg.cluster.gpu_type if cfg.train.use_gpu else None
    price = cfg.cluster.gpu_hour_usd.get(gpu) if gpu else None
    answers = answers_note(cfg, cost, measured)
    return GridPlan(cost.device, capacity, cells, engines, problems, slots, gpu, price, answers)


def _gpu_type_problems(cfg: RunConfig) -> list[str]:
    gpu = cfg.cluster.gpu_type
    if not cfg.train.use_gpu or gpu in GPU_TYPES:
        return []
    return [
        f"cluster.gpu_type={gpu!r}: no datasheet figures for it. Fix: one of "
        f"{', '.join(GPU_TYPES)} (--gpu-type), or add its peak bf16 FLOP/s, memory and "
        "bandwidths to tbr_ray.plan.gpus.GPU_TYPES."
    ]


# ------------------------------------------------------------------ report


def _hms(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{int(seconds % 60):02d}s"


def _table(records: list[dict]) -> list[str]:
    """A text table (header, rule, rows): the first column left-aligned, the rest right."""
    align = ("left",) + ("right",) * (len(records[0]) - 1) if records else ()
    text = tabulate(records, "keys", "simple", disable_numparse=True, colalign=align)
    return text.splitlines()


def _cell_record(plan: GridPlan, p: CellPlan) -> dict:
    lay = p.layout
    unit = "GPUs" if plan.device == "GPU" else "wkrs"
    if lay is None:  # a prompting cell: evaluated only
        return {
            "cell": p.cell.cell_id,
            unit: "-",
            "ZeRO": "-",
            "GiB/GPU": "-",
            "fit": "-",
            "steps": "-",
            "train": "eval only",
        }
    return {
        "cell": p.cell.cell_id,
        unit: lay.gpus,
        "ZeRO": lay.zero_stage,
        "GiB/GPU": f"{lay.gib_per_gpu:.1f}" if plan.device == "GPU" else "-",
        "fit": "no" if lay.problem else "yes",
        "steps": p.steps,
        "train": _hms(p.seconds),
    }


def format_cells(plan: GridPlan) -> list[str]:
    return _table([_cell_record(plan, p) for p in plan.cells])


def format_engines(plan: GridPlan) -> list[str]:
    records = [
        {
            "engine (base model, writer, judge)": e.model,
            "GPUs": e.gpus,
            "GiB/GPU": "?" if math.isnan(e.gib_per_gpu) else f"{e.gib_per_gpu:.1f}",
            "budget": f"{e.budget_gib:.1f}",
            "fit": "no" if e.problem else "yes",
        }
        for e in plan.engines
    ]
    lines = _table(records)
    if any(math.isnan(e.gib_per_gpu) for e in plan.engines):
        lines.append("?: no published shape here; 1 GPU unless cluster.engine_gpus names it")
    return lines


def refused_models(plan: GridPlan) -> list[str]:
    """Grid models (and writers, judge) named by a problem, in grid order."""
    names = [p.cell.model for p in plan.cells] + [e.model for e in plan.engines]
    named = {p.split(": ", 1)[0] for p in plan.problems}  # every problem starts "<model>: "
    return [m for m in dict.fromkeys(names) if m in named]


def format_plan(plan: GridPlan) -> str:
    """The dry-run report: cells, engines, then GPU-hours and makespan (or the problems)."""
    lines = format_cells(plan)
    n = len(plan.cells)
    lines.append(f"{n} cells; {sum(p.layout is not None for p in plan.cells)} trained")
    if plan.engines:
        lines += [""] + format_engines(plan)
    if plan.problems:
        lines += ["", f"REFUSED: {len(plan.problems)} problem(s) on this cluster:"]
        lines += [f"  - {p}" for p in plan.problems]
        lines.append(f"models that cannot run here: {', '.join(refused_models(plan))}")
        return "\n".join(lines)
    if not plan.capacity:
        lines.append(
            "no makespan: the cluster's size is unknown. Fix: pass --gpus N (and --gpu-memory "
            "GiB), set cluster.gpus, or run where RAY_ADDRESS names a running Ray cluster."
        )
        return "\n".join(lines)
    return "\n".join(lines + format_totals(plan))


def format_totals(plan: GridPlan) -> list[str]:
    """GPU-hours by kind of job, the makespan, the bill, and where the answer lengths came
    from (a scheduled plan)."""
    busy = plan.device_hours / (plan.capacity * plan.makespan_s / 3600)
    unit = "GPU" if plan.device == "GPU" else "core"
    hours = {
        k: sum(s.job.devices * s.job.seconds for s in plan.slots if s.job.kind == k) for k in KINDS
    }
    split = ", ".join(f"{kind} {h / 3600:.1f}" for kind, h in hours.items())
    where = f" {plan.gpu_type}" if plan.gpu_type else ""
    lines = [
        f"estimated {plan.device_hours:.1f} {unit}-hours ({split}); makespan "
        f"{_hms(plan.makespan_s)} on {plan.capacity}{where} {plan.device}s ({busy:.0%} busy; "
        f"cost model tbr_ray.plan.{'GPU' if plan.device == 'GPU' else 'CPU'}_COST)"
    ]
    if plan.device == "GPU":
        lines.append(format_bill(plan))
    if plan.answers:
        lines.append(f"answer lengths: {plan.answers}")
    return lines


def format_bill(plan: GridPlan) -> str:
    """The plan's GPU-hours at cluster.gpu_hour_usd's rate for its GPU type."""
    if plan.usd_per_gpu_hour is None:
        return (
            f"bill: no price for {plan.gpu_type} GPUs. Fix: --set "
            f"'cluster.gpu_hour_usd={{{plan.gpu_type}: <USD per GPU-hour>}}'."
        )
    usd = plan.device_hours * plan.usd_per_gpu_hour
    return (
        f"bill: {plan.device_hours:.1f} GPU-hours x ${plan.usd_per_gpu_hour:.3f} "
        f"({plan.gpu_type}, cluster.gpu_hour_usd) = ${usd:,.0f}"
    )
