"""The planner (tbr_ray.plan): pure sizing from published shapes, refusals with the fix, and the
grid's schedule. No Ray, no models loaded: every test here runs in well under a second."""

from pathlib import Path

import pytest

from tbr_ray.config import load_config
from tbr_ray.models import PAPER_MODELS, model_shape, shape_params
from tbr_ray.plan import (
    CPU_COST,
    Job,
    PlanError,
    engine_gpus,
    engine_layout,
    plan_grid,
    refused_models,
    resolved_train_settings,
    simulate,
    tp_divides,
    train_layout,
)

REPO = Path(__file__).resolve().parent.parent


def paper(*sets):
    return load_config(REPO / "jobs" / "paper.yaml", list(sets))


def test_shapes_count_the_published_parameters():
    """The shapes copied from the models' configs reproduce each published parameter count
    within 8% (a wrong layer count or width would miss by far more)."""
    for name, spec in PAPER_MODELS.items():
        counted = shape_params(model_shape(name)) / 1e9
        assert abs(counted - spec.params_b) / spec.params_b < 0.08, (name, counted)


def test_engine_gpus_on_80gib_cards():
    cfg = paper()
    sizes = {m: engine_gpus(cfg, m) for m in cfg.grid.models}
    assert sizes["llama-2-7b"] == sizes["gemma-2-9b"] == sizes["llama-2-13b"] == 1
    assert sizes["falcon-40b"] == 2  # 78 GiB of weights: two 80 GiB cards
    assert sizes["llama-2-70b"] == sizes["llama-3.1-70b"] == 4  # 130 GiB + KV: four
    assert engine_gpus(cfg, "tiny-llama") == 1


def test_smaller_cards_need_more_engine_gpus():
    """40 GiB cards: Llama-2-13B's full multi-head KV cache (800 KiB a token) no longer fits
    beside its weights on one."""
    small = paper("cluster.gpu_memory_gib=40")
    models = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
    assert [engine_gpus(small, m) for m in models] == [1, 2, 8]


def test_falcon_7b_heads_allow_no_tensor_parallel():
    """71 attention heads: only one GPU divides them, so a too-small card is refused rather than
    planned at a size vLLM would reject."""
    shape = model_shape("falcon-7b")
    assert [tp for tp in (1, 2, 4, 8) if tp_divides(shape, tp)] == [1]
    with pytest.raises(PlanError, match="falcon-7b.*at 1 GPU"):
        engine_gpus(paper("cluster.gpu_memory_gib=16"), "falcon-7b")


def test_engine_override_wins_and_is_checked():
    assert engine_gpus(paper("cluster.engine_gpus={llama-2-13b: 2}"), "llama-2-13b") == 2
    tiny = load_config(REPO / "jobs/tiny.yaml", ["cluster.engine_gpus={tiny-llama: 2}"])
    assert engine_gpus(tiny, "tiny-llama") == 2
    with pytest.raises(PlanError, match=r"cluster.engine_gpus\[falcon-7b\]=2.*Fix: one of \[1\]"):
        engine_gpus(paper("cluster.engine_gpus={falcon-7b: 2}"), "falcon-7b")
    with pytest.raises(PlanError, match="larger than a node"):
        engine_gpus(paper("cluster.engine_gpus={llama-2-70b: 16}"), "llama-2-70b")


def test_engine_larger_than_a_node_is_refused_with_the_fix():
    with pytest.raises(PlanError) as err:
        engine_gpus(paper("cluster.gpus_per_node=2"), "llama-3-70b")
    msg = str(err.value)
    assert "llama-3-70b" in msg and "cluster.gpus_per_node=2" in msg and "Fix:" in msg


def test_a_model_without_a_shape_gets_one_gpu_or_its_override():
    """The judge (a hub id outside the registry) has no shape to size by."""
    cfg = paper("cluster.engine_gpus={allenai/wildguard: 2}")
    assert engine_gpus(cfg, "allenai/wildguard") == 2
    assert engine_gpus(paper(), "allenai/wildguard") == 1
    assert engine_layout(paper(), "allenai/wildguard").gpus == 1


def test_paper_grid_on_8_gpus_of_80gib_fits_everything():
    plan = plan_grid(paper(), 8)
    assert plan.problems == []
    assert len(plan.cells) == 45 and all(p.layout and not p.layout.problem for p in plan.cells)
    assert len([s for s in plan.slots if s.job.kind == "eval"]) == 15
    assert {e.model for e in plan.engines} >= set(paper().grid.models)
    assert 0 < plan.device_hours <= 8 * plan.makespan_s / 3600


def test_registry_suggestions_are_the_planners_choice_on_80gib():
    """`tbr-ray models` lists spec.gpus / zero_stage; a run takes train_layout: the same."""
    cfg = paper()
    for name, spec in PAPER_MODELS.items():
        layout = train_layout(cfg, name)
        assert (layout.gpus, layout.zero_stage) == (spec.gpus, spec.zero_stage), name
        assert layout.gib_per_gpu <= 80


def test_one_gpu_refuses_the_40b_and_70b_models_by_name():
    plan = plan_grid(paper(), 1)
    assert refused_models(plan) == ["falcon-40b", "llama-2-70b", "llama-3-70b", "llama-3.1-70b"]
    assert plan.slots == []  # nothing is simulated for a config that cannot run
    training = [p for p in plan.problems if "training needs" in p]
    assert len(training) == 4 and all("Fix:" in p and "ZeRO-3" in p for p in training)


def test_train_settings_from_the_config_win_and_are_checked():
    assert train_layout(paper("train.num_workers=2"), "llama-2-7b").gpus == 2
    assert train_layout(paper("train.zero_stage=3"), "llama-2-7b").zero_stage == 3
    lay = train_layout(paper("train.num_workers=2"), "llama-2-70b")
    assert lay.problem and "at 2 GPU(s), ZeRO-3 (train.num_workers)" in lay.problem
    tiny = load_config(REPO / "jobs/tiny.yaml")
    assert resolved_train_settings(tiny, "tiny-llama") == (2, 2)  # CPU: the config's
    assert resolved_train_settings(paper(), "falcon-40b") == (4, 3)


def test_evaluation_starts_while_other_models_still_train():
    """The policy: a model's engine starts once its own cells are trained, before the grid's
    last training cell ends (on 8 GPUs the small models' evaluations overlap the big ones'
    training)."""
    slots = {s.job.name: s for s in plan_grid(paper(), 8).slots}
    first_eval = slots["eval gemma-2b"]
    assert first_eval.start_s >= slots["train gemma-2b__external__g1.00__s0"].end_s
    assert first_eval.start_s < slots["train llama-13b__none__g0.00__s0"].end_s
    last_train = max(s.end_s for s in slots.values() if s.job.kind == "train")
    assert first_eval.start_s < last_train
    writes_end = max(s.end_s for s in slots.values() if s.job.kind == "write")
    assert min(s.start_s for s in slots.values() if s.job.kind == "train") >= writes_end


def test_a_waiting_evaluation_is_not_overtaken_by_training():
    """4 GPUs: a 1-GPU cell of model a and an eval of a needing 4; cells of b queued behind.
    When a's cell ends the eval waits for all 4 GPUs and no b cell starts before it."""
    jobs = [
        Job("train a1", "train", 1, 10.0),
        Job("train b1", "train", 3, 20.0),
        Job("eval a", "eval", 4, 5.0, ("train a1",)),
        Job("train b2", "train", 1, 1.0),
    ]
    slots = {s.job.name: s for s in simulate(jobs, 4)}
    assert slots["eval a"].start_s == 20.0  # after b1 frees its 3 GPUs
    assert slots["train b2"].start_s == 25.0  # queued behind the evaluation
    with pytest.raises(PlanError, match="eval a can never start"):
        simulate(jobs, 3)


def test_cpu_plan_counts_busy_cores():
    """On the 2-core box a tiny cell's 2 workers and every engine keep both cores busy, so the
    plan runs everything one after another (as measured: 2 cells at once were no faster)."""
    plan = plan_grid(load_config(REPO / "jobs/tiny.yaml"), 2)
    assert plan.device == "CPU core" and plan.problems == [] and plan.engines == []
    busy = sum(s.job.seconds for s in plan.slots)
    assert plan.makespan_s == pytest.approx(busy + CPU_COST.phase_fixed_s)
