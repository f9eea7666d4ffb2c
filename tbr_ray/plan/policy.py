"""The grid's scheduling policy (pure): one function that the runtime (tbr_ray.grid) calls to
launch jobs and the planner (tbr_ray.plan.schedule.simulate) calls to simulate them, so the
plan's order is the run's order.

    picked = pick(ready, free=8.0, training=0, max_train=None)   # jobs to start now, in order

Slots are devices: a job holds its `devices` (GPUs on a GPU run; CPUs on a CPU run) while it
runs, and jobs start while their devices fit in what is free: there is no separate count of
training slots (before, the runtime allowed capacity / the largest cell's GPUs cells at once,
so with 8-GPU cells in the grid one cell ran at a time). `grid.max_concurrent` may cap the
training cells at once.

Order: writers (reflection engines), then evaluations, then training cells; within a kind,
bigger jobs first (more devices), then grid order. Big cells first puts the long, wide jobs
(70B cells, then their evaluations) at the front, where small jobs can fill around them, and
not at the end, where they would run alone on an otherwise idle cluster (a "largest first"
list schedule; Graham 1969 for its bound). The first ready job that does not fit ends the
round: nothing overtakes it, so a big engine or cell is not starved by a stream of small ones
(the devices drain to it). When nothing runs and the first job is larger than what the
cluster has now, it is started anyway: on an autoscaling cluster Ray holds it until a node
joins (the planner refuses a job larger than its capacity before it simulates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

# The priority of kinds, first to last. "judge": a base model's judging, ready once its
# generations ("eval") are done (tbr_ray.grid); it holds only the judges' devices.
KINDS = ("write", "judge", "eval", "train")
EPS = 1e-9  # fractional CPUs (0.01 a trial driver) add up with rounding errors


class Schedulable(Protocol):
    kind: str  # write | judge | eval | train
    devices: float  # held while it runs


J = TypeVar("J", bound=Schedulable)


def priority(job: Schedulable) -> tuple[int, float]:
    """Sort key: kind (writers, evaluations, training), then more devices first. Python's sort
    is stable, so jobs of equal key keep their grid order."""
    return KINDS.index(job.kind), -job.devices


def pick(
    ready: Sequence[J], free: float, training: int = 0, max_train: int | None = None
) -> list[J]:
    """The jobs of `ready` to start now, in start order: by `priority`, each while its devices
    fit in `free` and (training cells) fewer than `max_train` train (`training` already do);
    the first that does not fit stops the round. If nothing runs (`training` 0 and `free` is
    everything) and the first job does not fit, it alone is picked (see the module doc)."""
    ordered = sorted(ready, key=priority)
    picked: list[J] = []
    for job in ordered:
        if job.kind == "train" and max_train and training >= max_train:
            break
        if job.devices > free + EPS:
            break
        free -= job.devices
        training += job.kind == "train"
        picked.append(job)
    return picked


def overflow(ready: Sequence[J], running: int) -> list[J]:
    """When no job runs and `pick` started none: the first job by `priority` (a job larger
    than the cluster as it is now; Ray holds it until the cluster grows)."""
    if running or not ready:
        return []
    return [sorted(ready, key=priority)[0]]


def wanted(running: Sequence[J], ready: Sequence[J], target: float | None) -> list[J]:
    """What to ask the autoscaler for: the running jobs and those the policy would start next
    on a cluster of `target` devices (cluster.gpus: the size the run was planned for); with
    no target, every ready job (the autoscaler's max_workers bounds it)."""
    if target is None:
        return [*running, *ready]
    return [*running, *pick(ready, target - sum(j.devices for j in running))]
