"""The planner (tbr_ray.plan): pure sizing from published shapes, refusals with the fix, and the
grid's schedule. No Ray, no models loaded: every test here runs in well under a second."""

from pathlib import Path

import pytest

from tbr_ray.config import load_config
from tbr_ray.models import PAPER_MODELS, model_shape, shape_params
from tbr_ray.plan import PlanError, engine_gpus, engine_layout, tp_divides

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
