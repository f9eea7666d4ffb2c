"""A base model's passes over engine replicas on Ray (what evaluation runs; tbr_ray.evaluate).

    rows = run_engines(cfg, "tiny-llama", [EngineSpec(path, adapters, keys, units)],
                       CheckPlan(path, prompts, 16, [None, *adapters], stop_json), 64, replicas=2)

`replicas` placement groups of the model's tensor-parallel size are reserved at once
(tbr_ray.engine.engine_placements, as OpenRLHF's `create_vllm_engines`). Each holds one engine
actor at a time (tbr_ray.engine.EngineReplica); whichever is free takes the next pass, and a
pass is one vLLM call with all its prompts (`Engine.run`: continuous batching, no batch waits
for its longest sequence). A pass carries one adapter or none, never a mix (STACK.md).

Checks: transformers' greedy reference is computed once per base model, by the first
replica's actor before its engine starts (the base model loaded once, adapters swapped:
`reference_greedy`); every replica's engine is compared with it before any of its results
count. Archs vLLM cannot serve LoRA for get one engine per adapter on a merged copy
(`EngineSpec.merge`): the merges run as Ray tasks that reserve the host memory they need
(`tbr_ray.engine.merge_options`), a replica's worth ahead of use, and each merged copy is
deleted once its pass is done.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tbr_ray.engine import (
    EngineReplica,
    engine_gpus_for,
    engine_placements,
    engine_settings,
    fits_a_node,
    merge_adapter,
    merge_dtype,
    merge_options,
)


@dataclass(frozen=True)
class Unit:
    """One pass as an engine sees it: rows that all carry `adapter` (None: none)."""

    adapter: str | None
    rows: tuple[dict, ...]


@dataclass(frozen=True)
class EngineSpec:
    """One kind of engine and its passes. `model_path` is the folder it loads; with `merge`
    = (base, adapter) that folder is first made by merging (`merge_adapter`)."""

    model_path: str
    adapters: tuple[str, ...]  # LoRA adapters it serves
    check_keys: dict  # each adapter it serves (None: none) -> the reference's key
    units: tuple[Unit, ...]
    merge: tuple[str, str] | None = None


@dataclass(frozen=True)
class CheckPlan:
    """The engine check of one base model: `keys` (None: the base model; adapters) each
    decoded by transformers on `prompts` for `n_tokens`, ending by the stop rule `stop`."""

    base_path: str
    prompts: tuple[str, ...]
    n_tokens: int
    keys: tuple[str | None, ...]
    stop: str = ""


def run_engines(
    cfg, model: str, specs: list[EngineSpec], check: CheckPlan, max_new_tokens: int, replicas: int
) -> list[dict]:
    """Every unit of `specs` through checked engines on `replicas` placement groups of
    `model`'s engine size; returns the rows with their outputs (`EngineReplica.run`)."""
    tp = engine_gpus_for(cfg, model)
    settings = engine_settings(cfg.eval, cfg.train.lora_rank, tensor_parallel_size=tp)
    with engine_placements(cfg, model, tp, replicas) as slots:
        feeder = _Feeder(cfg, model, specs, check, settings, max_new_tokens, slots)
        try:
            return feeder.run()
        finally:
            feeder.close()


@dataclass
class _Feeder:
    """The driver's side of `run_engines`: which actor each slot holds, which units wait, the
    merges under way."""

    cfg: object
    model: str
    specs: list[EngineSpec]
    check: CheckPlan
    settings: object
    max_new_tokens: int
    slots: list[dict]
    live: dict = field(default_factory=dict)  # slot -> (spec index, actor)
    merges: dict = field(default_factory=dict)  # spec index -> ObjectRef of its merged folder
    reference: object = None  # ObjectRef of the shared reference, once asked for
    left: dict = field(default_factory=dict)  # spec index -> units not yet done

    def run(self) -> list[dict]:
        import ray

        queue = [(k, u) for k, spec in enumerate(self.specs) for u in spec.units]
        self.left = {k: len(spec.units) for k, spec in enumerate(self.specs)}
        pending, out = {}, []
        while queue or pending:
            busy = set(pending.values())
            for slot in (s for s in range(len(self.slots)) if s not in busy):
                if not queue:
                    break
                k, unit = queue.pop(self._next(queue, slot))
                actor = self._actor(slot, k)
                pending[actor.run.remote(list(unit.rows), unit.adapter, self.max_new_tokens)] = (
                    slot,
                    k,
                )
            (done,), _ = ray.wait(list(pending), num_returns=1)
            _, k = pending.pop(done)
            out += ray.get(done)
            self.left[k] -= 1
            if not self.left[k] and self.specs[k].merge:
                shutil.rmtree(self.specs[k].model_path, ignore_errors=True)
        return out

    def _next(self, queue: list, slot: int) -> int:
        """The queued unit a free slot takes: the first its live engine serves, else the first."""
        mine = self.live.get(slot, (None,))[0]
        return next((i for i, (k, _) in enumerate(queue) if k == mine), 0)

    def _actor(self, slot: int, k: int):
        """The slot's actor for spec `k`, started (and checked) if the slot holds another."""
        import ray

        if slot in self.live and self.live[slot][0] == k:
            return self.live[slot][1]
        if slot in self.live:
            ray.kill(self.live.pop(slot)[1])  # its devices go to the next engine
        spec, c = self.specs[k], self.check
        actor = ray.remote(EngineReplica).options(**self.slots[slot])
        actor = actor.remote(self.settings, list(spec.adapters), slot)
        if self.reference is None:  # before any engine holds this slot's devices
            self.reference = actor.reference.remote(
                c.base_path, list(c.prompts), c.n_tokens, list(c.keys), c.stop
            )
        # ObjectRefs in lists: a failed merge or reference is then the replica's recorded
        # error, not a method Ray skipped (tbr_ray.engine._resolved).
        actor.start.remote(self._model_path(k))
        actor.check.remote([self.reference], spec.check_keys, list(c.prompts), c.n_tokens, c.stop)
        self.live[slot] = (k, actor)
        return actor

    def _model_path(self, k: int):
        """Spec `k`'s folder, or [the ObjectRef of its merge]; starts the merges of the next
        merged specs too, one slot's worth ahead, so they run while engines work."""
        if not self.specs[k].merge:
            return self.specs[k].model_path
        ahead = [j for j in range(k, len(self.specs)) if self.specs[j].merge]
        for j in ahead[: len(self.slots) + 1]:
            if j not in self.merges:
                self.merges[j] = launch_merge(self.cfg, self.model, self.specs[j])
        return [self.merges[k]]

    def close(self) -> None:
        import ray

        for _, actor in self.live.values():
            ray.kill(actor)
        for k, merging in self.merges.items():
            ray.cancel(merging)  # a merge still running would write after the clean-up
            shutil.rmtree(self.specs[k].model_path, ignore_errors=True)


def launch_merge(cfg, model: str, spec: EngineSpec):
    """`merge_adapter` as a Ray task holding the host memory it needs (`merge_options`), so
    Ray runs it on a node that has that memory, never on a smaller head. On a GPU run it waits
    for such a node (both cluster files start with no GPU worker; the autoscaler adds one for
    the queued task); a CPU run, whose box is the cluster, is refused at once when no node
    has it."""
    import ray

    options = merge_options(cfg, model)
    need = {"memory": options["memory"], "CPU": options["num_cpus"]}
    if not cfg.train.use_gpu and not fits_a_node(need):
        raise ValueError(
            f"merging an adapter into {model} needs {options['memory'] / 2**30:.1f} GiB of host "
            f"memory on one node ({merge_dtype(cfg)} weights x margin, tbr_ray.engine."
            f"merge_options), more than any node's Ray `memory` resource. Fix: a machine with "
            f"that much memory, or drop {model} from grid.models."
        )
    base, adapter = spec.merge
    task = ray.remote(merge_adapter).options(**options, name=f"merge:{Path(adapter).name}")
    return task.remote(base, adapter, spec.model_path, merge_dtype(cfg))
