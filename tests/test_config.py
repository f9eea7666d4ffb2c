"""Config: validation errors name field, value and fix; overrides; hash; the cell grid."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from tbr_ray.config import ConfigError, RunConfig, apply_overrides, load_config, validate_config

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {"name": "t", "grid": {"models": ["tiny-llama"], "conditions": ["none"]}}


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as err:
        validate_config({**MINIMAL, "train": {"lora_rnak": 8}})
    msg = str(err.value)
    assert "train.lora_rnak: unknown key" in msg and "lora_rank" in msg


def test_missing_field_is_named():
    with pytest.raises(ConfigError, match=r"grid: required field is missing"):
        validate_config({"name": "t"})


def test_bad_value_names_field_and_value():
    with pytest.raises(ConfigError) as err:
        validate_config({**MINIMAL, "train": {"lora_rank": "big"}})
    assert "train.lora_rank = 'big'" in str(err.value) and "Fix:" in str(err.value)


def test_gamma_out_of_range_and_cross_field_checks():
    with pytest.raises(ConfigError, match=r"gamma must lie in \[0, 1\]"):
        validate_config({**MINIMAL, "grid": {"models": ["tiny-llama"], "gammas": [1.5]}})
    with pytest.raises(ConfigError, match="reflection.reflector"):
        validate_config(
            {"name": "t", "grid": {"models": ["tiny-llama"], "conditions": ["external"]}}
        )
    with pytest.raises(ConfigError, match="eval.refusal_judge"):
        validate_config({**MINIMAL, "eval": {"judges": ["model"]}})


def test_broken_yaml_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ngrid:\n  models: [a, b\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_parse_yaml_values_and_reject_garbage():
    raw = apply_overrides(
        MINIMAL, ["train.lora_rank=32", "grid.seeds=[0, 1]", "train.use_gpu=true"]
    )
    cfg = validate_config(raw)
    assert cfg.train.lora_rank == 32 and cfg.grid.seeds == (0, 1) and cfg.train.use_gpu
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(MINIMAL, ["train.lora_rank"])


def test_hash_is_stable_and_ignores_locations():
    a = validate_config(MINIMAL)
    b = validate_config({**MINIMAL, "data": {"root": "/elsewhere"}})
    c = validate_config({**MINIMAL, "train": {"lora_rank": 4}})
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert len(a.config_hash()) == 12


def test_config_is_frozen():
    cfg = validate_config(MINIMAL)
    with pytest.raises(ValidationError):
        cfg.train.lora_rank = 3  # type: ignore[misc]


def test_cells_none_ignores_gamma():
    cfg = validate_config(
        {
            "name": "t",
            "reflection": {"reflector": "tiny-gemma2"},
            "grid": {"models": ["tiny-llama", "tiny-gemma"], "gammas": [0.5, 1.0], "seeds": [0, 1]},
        }
    )
    cells = cfg.cells()
    # per model and seed: none once, internal and external at 2 gammas each
    assert len(cells) == 2 * 2 * (1 + 2 + 2)
    assert {c.gamma for c in cells if c.condition == "none"} == {0.0}
    assert len({c.cell_id for c in cells}) == len(cells)


def test_tiny_job_is_the_embedded_default():
    cfg = load_config(REPO / "jobs" / "tiny.yaml")
    assert isinstance(cfg, RunConfig)
    assert len(cfg.grid.models) >= 3 and set(cfg.grid.conditions) == {
        "none",
        "internal",
        "external",
    }
    assert cfg.train.num_workers == 2 and cfg.train.zero_stage == 2


def test_a_misspelt_name_gets_the_closest_known_names():
    """difflib's suggestions in the errors for unknown models, judges and benchmarks."""
    from tbr_ray.benchmarks import load_benchmark
    from tbr_ray.models import UnknownModelError, get_spec

    with pytest.raises(UnknownModelError, match=r"did you mean 'llama-2-7b'"):
        get_spec("llama-2-7")
    with pytest.raises(ConfigError, match=r"did you mean 'paper-keywords'\?"):
        load_config(REPO / "jobs" / "tiny.yaml", ["eval.judges=[paper-keyword]"])
    with pytest.raises(ValueError, match=r"did you mean 'xstest_safe'"):
        load_benchmark("xstest-safe", REPO)


def test_writer_model_follows_the_documented_precedence():
    """endpoint, then local_server, then reflector: with jobs/tiny.yaml's reflector and a
    local_server, the run serves (and so must load) the local_server's model."""
    tiny = REPO / "jobs" / "tiny.yaml"
    assert load_config(tiny).reflection.writer_model() == "tiny-falcon"
    served = load_config(tiny, ["reflection.local_server=smollm2-135m-instruct"])
    assert served.reflection.writer_model() == "smollm2-135m-instruct"
    remote = ["reflection.endpoint=http://127.0.0.1:8000/v1", "reflection.endpoint_model=m"]
    assert load_config(tiny, remote).reflection.writer_model() is None
