"""Preflight: bad configs and environments are refused before Ray starts, every problem on one
line naming field, value and fix, all at once, exit code 2, never a traceback. Fast, no Ray."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tbr_ray.cli import app
from tbr_ray.config import DataConfig

from .conftest import small_config

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "jobs" / "tiny.yaml")
DATA = DataConfig().resolved_root()
runner = CliRunner()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the shared data at {DATA}")
PASTED_KEY = "sk-proj-Zx81aQ0mVt55sEcReT9kEy"


def _validate(*args: str):
    return runner.invoke(app, ["validate", *args])


def _yaml_file(tmp: Path, text: bytes) -> str:
    path = tmp / "job.yaml"
    path.write_bytes(text)
    return str(path)


def _data_copy(tmp: Path, drop: str) -> str:
    """The shared data root, linked file by file, without `drop`."""
    root = tmp / "data"
    for src in DATA.rglob("*"):
        rel = src.relative_to(DATA)
        if src.is_file() and not str(rel).startswith(drop):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).symlink_to(src)
    return str(root)


def _truncated(tmp: Path, rel: str) -> str:
    """The shared data root (linked) with the first half of `rel` only: a cut download."""
    root = Path(_data_copy(tmp, rel))
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes((DATA / rel).read_bytes()[: (DATA / rel).stat().st_size // 2])
    return str(root)


def _short_model(tmp: Path, positions: int = 64) -> str:
    """A local Llama folder (config + tokenizer file) built for `positions` tokens."""
    folder = tmp / "short" / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": positions}))
    (folder / "tokenizer.json").write_text("{}")
    return str(folder)


def _model_without_tokenizer(tmp: Path) -> str:
    folder = tmp / "ckpt" / "hf"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return str(folder)


def _user_file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


def _user_benchmark(tmp: Path, name: str, content: bytes) -> list[str]:
    path = _user_file(tmp, f"{name}.file", content)
    return [
        TINY,
        "--set",
        f"eval.benchmarks=[{name}]",
        "--set",
        f"eval.benchmark_files={{{name}: {path}}}",
    ]


# (id, function of (tmp_path, monkeypatch) -> CLI args, text the one-line problem must hold)
CASES = [
    (
        "yaml-date-in-int-field",
        lambda t, m: [
            _yaml_file(
                t, b"name: t\ndata:\n  sample_seed: 2024-01-01\ngrid:\n  models: [tiny-llama]\n"
            )
        ],
        "data.sample_seed = '2024-01-01'",
    ),
    (
        "non-utf8-file",
        lambda t, m: [_yaml_file(t, b"name: t\xff\ngrid:\n  models: [tiny-llama]\n")],
        "not UTF-8 text (byte 0xff at offset 7)",
    ),
    ("unclosed-set-list", lambda t, m: [TINY, "--set", "grid.models=[x"], "is not valid YAML"),
    (
        "unknown-reflector",
        lambda t, m: [TINY, "--set", "reflection.reflector=gpt-9"],
        "reflection.reflector = 'gpt-9': unknown model",
    ),
    (
        "unknown-judge-model",
        lambda t, m: [TINY, "--set", "eval.harm_judge={model: wildguardd, format: wildguard}"],
        "eval.harm_judge.model = 'wildguardd': unknown model",
    ),
    (
        "shots-unknown-key",
        lambda t, m: [TINY, "--set", "eval.shots={xstest_safe: 2}"],
        "'xstest_safe' takes no shots",
    ),
    (
        "shots-out-of-range",
        lambda t, m: [TINY, "--set", "eval.shots={mmlu: 9}"],
        "mmlu: 9 is outside 0..5",
    ),
    (
        "benchmark-files-unknown-key",
        lambda t, m: [TINY, "--set", "eval.benchmark_files={xstest: /x.csv}"],
        "eval.benchmark_files = {'xstest': '/x.csv'}: keys ['xstest'] take no user file",
    ),
    (
        "api-key-pasted-as-name",
        lambda t, m: [TINY, "--set", f"reflection.api_key_env={PASTED_KEY}"],
        "reflection.api_key_env = 'sk-... (30 characters, rest hidden)'",
    ),
    (
        "api-key-env-with-a-trailing-newline",  # re.match with "$" took it
        lambda t, m: [TINY, "--set", 'reflection.api_key_env="TBR_KEY\\n"'],
        "reflection.api_key_env = 'TBR... (8 characters, rest hidden)'",
    ),
    ("unknown-benchmark", lambda t, m: [TINY, "--set", "eval.benchmarks=[xstets]"], "xstets"),
    (
        "data-root-missing",
        lambda t, m: [TINY, "--set", f"data.root={t / 'nowhere'}"],
        "data.root = '",
    ),
    (
        "data-file-missing",
        lambda t, m: [
            TINY,
            "--set",
            f"data.root={_data_copy(t, 'safety-tuned-llamas/data/training')}",
        ],
        "data.safety_source safety-tuned-llamas: data file",
    ),
    (
        "too-many-rows-asked",
        lambda t, m: [TINY, "--set", "data.n_safety=100000"],
        "asked for 100000 safety rows",
    ),
    (
        "truncated-gzip",
        lambda t, m: [
            TINY,
            "--set",
            f"data.root={_truncated(t, 'hh-rlhf/harmless-base/test.jsonl.gz')}",
            "--set",
            "data.safety_source=hh-rlhf-harmless",
        ],
        "test.jsonl.gz is damaged (EOFError",
    ),
    (
        "csv-field-over-131072-characters",  # csv's field limit; an unclosed quote does it
        lambda t, m: _user_benchmark(
            t, "orbench_hard", b'prompt,category\nok,a\n"' + b"x" * 140_000 + b'",b\n'
        ),
        "line 3: not a readable CSV (field larger than field limit (131072))",
    ),
    (
        "yaml-binary-in-the-file",
        lambda t, m: [
            _yaml_file(t, b"name: t\ngrid:\n  models: [tiny-llama]\n  seeds: !!binary aGk=\n")
        ],
        "grid.seeds = b'hi' is a YAML !!binary value",
    ),
    (
        "yaml-set-in-a-set-value",
        lambda t, m: [TINY, "--set", "grid.seeds=!!set {1, 2}"],
        "the value = {1, 2} is a YAML !!set value",
    ),
    # values that passed validate and --dry-run, then failed after Ray started or never ended
    ("seed-over-2**32", lambda t, m: [TINY, "--set", f"grid.seeds=[{2**70}]"], "0..4294967295"),
    (
        "micro-batch-over-the-mix",
        lambda t, m: [TINY, "--set", "train.micro_batch_size=1000000000"],
        "= 2000000000 rows, but the mix holds 300",
    ),
    (
        "a-million-cpu-workers",
        lambda t, m: [TINY, "--set", "train.num_workers=1000000"],
        "fewer train.num_workers",
    ),
    (
        "workers-that-never-fit-this-machine",
        lambda t, m: [TINY, "--set", "train.cpus_per_worker=1000"],
        "so Ray would wait for them forever",
    ),
    (
        "answer-budget-over-the-engine",
        lambda t, m: [TINY, "--set", "eval.max_new_tokens=5000"],
        "eval.max_new_tokens = 5000 leaves no room for a prompt",
    ),
    ("epochs-1e20", lambda t, m: [TINY, "--set", f"train.epochs={10**20}"], "or equal to 1000"),
    ("learning-rate-inf", lambda t, m: [TINY, "--set", "train.learning_rate=.inf"], "finite"),
    (
        "model-context-shorter-than-the-budget",
        lambda t, m: (
            [TINY, "--set", f"grid.models=[{_short_model(t)}]"]
            + ["--set", "eval.max_new_tokens=64"]
        ),
        "its context is 64 tokens, so its engine holds 64, and eval.max_new_tokens = 64",
    ),
    (
        "model-context-shorter-than-training-rows",
        lambda t, m: [TINY, "--set", f"grid.models=[{_short_model(t)}]"],
        "shorter than the training sequences (data.max_seq_len = 192)",
    ),
    (
        "unpinned-hub-model",
        lambda t, m: [
            TINY,
            "--set",
            "eval.harm_judge={model: meta-llama/Llama-Guard-3-8B, format: llama-guard-3}",
        ],
        "eval.harm_judge.model = meta-llama/Llama-Guard-3-8B loads meta-llama/Llama-Guard-3-8B "
        "from the Hugging Face hub without a pinned commit",
    ),
    (
        "hub-revision-not-a-commit",
        lambda t, m: [TINY, "--set", "grid.hub_revisions={tiny-llama: main}"],
        "not a full commit hash (a branch or tag can move)",
    ),
    (
        "benchmark-file-wrong-header",
        lambda t, m: _user_benchmark(t, "orbench_hard", b"text,cat\nx,y\n"),
        "lacks ['category', 'prompt']",
    ),
    (
        "benchmark-file-not-utf8",
        lambda t, m: _user_benchmark(t, "malicious_instruct", b"ok\n\xfe\xff\n"),
        "eval.benchmarks malicious_instruct: 'utf-8' codec can't decode",
    ),
    (
        "local-model-without-tokenizer",
        lambda t, m: [TINY, "--set", f"grid.models=[{_model_without_tokenizer(t)}]"],
        "the folder has no tokenizer",
    ),
    (
        "api-key-variable-unset",
        lambda t, m: [
            TINY,
            "--set",
            "reflection.endpoint=http://127.0.0.1:9/v1",
            "--set",
            "reflection.endpoint_model=m",
            "--set",
            "reflection.api_key_env=TBR_TEST_UNSET_KEY",
        ],
        "reflection.api_key_env = 'TBR_TEST_UNSET_KEY': the variable is not set",
    ),
    (
        "output-is-a-file",
        lambda t, m: [TINY, "--output", _user_file(t, "results", b"")],
        "is a file, not a folder",
    ),
    (
        "output-under-a-file",
        lambda t, m: [TINY, "--output", str(Path(_user_file(t, "results", b"")) / "run")],
        "is a file, so the folder cannot be made",
    ),
    (
        "relative-output-under-ray-job",
        lambda t, m: _in_ray_job(m) + [TINY, "--output", "runs/x"],
        "a relative path under `ray job submit`",
    ),
    (
        "default-roots-under-ray-job",
        lambda t, m: _in_ray_job(m, roots=False) + [TINY],
        "data.root is unset under `ray job submit`",
    ),
]


def _in_ray_job(monkeypatch, roots: bool = True) -> list[str]:
    """What Ray's job supervisor sets for an entrypoint (see preflight.RAY_JOB_ENV)."""
    meta = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_T"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(meta))
    for var in ("TBR_DATA_ROOT", "TBR_CACHE_DIR"):
        if roots:
            monkeypatch.setenv(var, os.environ.get(var) or str(DATA))
        else:
            monkeypatch.delenv(var, raising=False)
    return []


@needs_data
@pytest.mark.parametrize("make_args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_naming_the_fix(make_args, expected, tmp_path, monkeypatch):
    monkeypatch.delenv("TBR_TEST_UNSET_KEY", raising=False)
    out = _validate(*make_args(tmp_path, monkeypatch))
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output
    line = next((x for x in out.output.splitlines() if expected in x), None)
    assert line is not None, f"{expected!r} not in:\n{out.output}"
    assert "Fix:" in line, line
    assert PASTED_KEY not in out.output  # a pasted key is never echoed back in full


@needs_data
def test_ablate_names_a_truncated_data_file_instead_of_aborting(tmp_path):
    """gzip's EOFError reached click, which prints only "Aborted." (exit 1)."""
    root = _truncated(tmp_path, "hh-rlhf/harmless-base/test.jsonl.gz")
    sets = ["--set", f"data.root={root}", "--set", "data.safety_source=hh-rlhf-harmless"]
    out = runner.invoke(app, ["ablate", "--config", TINY, "-o", str(tmp_path / "run"), *sets])
    assert out.exit_code == 2 and "is damaged" in out.output and "Aborted" not in out.output


@needs_data
def test_every_problem_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("TBR_TEST_UNSET_KEY", raising=False)
    # (A bad benchmark file is left out: the data stage reads the benchmarks too, for its
    # overlap filter, so it would stand in for the data line's own problem.)
    no_tokenizer = _model_without_tokenizer(tmp_path)
    out = _validate(
        TINY,
        "--output",
        _user_file(tmp_path, "results", b""),
        "--set",
        f"grid.models=[tiny-llama, {no_tokenizer}]",
        "--set",
        f"reflection.reflector={no_tokenizer}",
        "--set",
        "data.n_general=100000",
        "--set",
        "reflection.endpoint=http://127.0.0.1:9/v1",
        "--set",
        "reflection.endpoint_model=m",
        "--set",
        "reflection.api_key_env=TBR_TEST_UNSET_KEY",
    )
    assert out.exit_code == 2
    assert "5 problem(s) before starting" in out.output, out.output
    for part in ("general rows", "TBR_TEST_UNSET_KEY", "a file"):
        assert part in out.output
    assert "grid.models" in out.output and "reflection.reflector" in out.output
    assert out.output.count("no tokenizer") == 2


@needs_data
def test_good_config_passes_and_keyless_endpoint_needs_no_key(monkeypatch, tmp_path):
    monkeypatch.delenv("TBR_REFLECTOR_API_KEY", raising=False)
    external = [
        "--set",
        "reflection.endpoint=http://127.0.0.1:9/v1",
        "--set",
        "reflection.endpoint_model=m",
    ]
    assert _validate(TINY, *external).exit_code == 2
    out = _validate(
        TINY, *external, "--set", "reflection.endpoint_keyless=true", "-o", str(tmp_path / "r")
    )
    assert out.exit_code == 0, out.output
    monkeypatch.setenv("TBR_REFLECTOR_API_KEY", "a-key")
    assert _validate(TINY, *external).exit_code == 0


def test_yaml_dates_stay_strings(tmp_path):
    out = _validate(
        _yaml_file(
            tmp_path, b"name: 2024-01-01\ngrid:\n  models: [tiny-llama]\n  conditions: [none]\n"
        ),
        "--config-only",
    )
    assert out.exit_code == 0, out.output


def test_dry_run_runs_the_preflight_and_config_only_skips_it(tmp_path):
    args = ["ablate", "--config", TINY, "--dry-run", "--set", f"data.root={tmp_path / 'no'}"]
    out = runner.invoke(app, args)
    assert out.exit_code == 2 and "cells;" in out.output and "data.root = " in out.output
    assert runner.invoke(app, [*args, "--config-only"]).exit_code == 0


@pytest.mark.parametrize("command", ["ablate", "cell", "train", "eval"])
def test_run_commands_stop_before_ray_on_a_bad_output(command, tmp_path):
    """The output check fails in well under a second: Ray is never imported for it."""
    target = _user_file(tmp_path, "results", b"")
    out = runner.invoke(app, [command, "--config", TINY, "--output", target])
    assert out.exit_code == 2 and "is a file, not a folder" in out.output, out.output


def test_data_command_runs_the_preflight(tmp_path):
    out = runner.invoke(app, ["data", "--config", TINY, "--set", f"data.root={tmp_path / 'x'}"])
    assert out.exit_code == 2 and "data.root = " in out.output


def test_tiny_model_build_reads_data_root_setting_not_environment(tmp_path, monkeypatch):
    """build_tiny_model is given the config's data root: an empty one fails on its files,
    even though $TBR_DATA_ROOT points at good data."""
    from tbr_ray.grid import model_paths

    monkeypatch.setenv("TBR_DATA_ROOT", str(DATA))
    monkeypatch.setenv("TBR_CACHE_DIR", str(tmp_path / "cache"))  # nothing built there
    cfg = small_config(f"data.root={tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty"))):
        model_paths(cfg)


@pytest.mark.parametrize("ignore_file", [".gitignore", ".rayignore"])
def test_secret_files_are_ignored_by_git_and_ray(ignore_file, tmp_path):
    """Matched the way `ray job submit --working-dir` matches (Ray's own exclusion code)."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    shutil.copy(REPO / ignore_file, tmp_path / ignore_file)
    (excluded,) = get_excludes_from_ignore_files(tmp_path, include_gitignore=True)
    for secret in ("hf_token", "auth_token", "reflector_api_key", "x.key", ".env", "id.pem"):
        assert excluded(tmp_path / secret), f"{ignore_file} lets {secret} through"
    for kept in ("tbr_ray/preflight.py", "tokenizer.json", "jobs/tiny.yaml"):
        assert not excluded(tmp_path / kept)


def test_token_file_is_made_owner_only(tmp_path):
    from tbr_ray.grid import secure_token_file

    token = tmp_path / "auth_token"
    token.write_text("t")
    token.chmod(0o644)
    secure_token_file(token)
    assert token.stat().st_mode & 0o777 == 0o600
    secure_token_file(tmp_path / "absent")  # no file: nothing to do


def test_data_copy_helper_really_drops_the_file(tmp_path):
    root = Path(_data_copy(tmp_path, "xstest"))
    assert not (root / "xstest").exists() and (root / "advbench").exists()
    shutil.rmtree(root)


def test_unset_endpoint_key_is_an_error_not_an_empty_key(monkeypatch):
    from tbr_ray.config import ConfigError
    from tbr_ray.reflect import endpoint_key

    endpoint = ["reflection.endpoint=http://127.0.0.1:9/v1", "reflection.endpoint_model=m"]
    monkeypatch.delenv("TBR_REFLECTOR_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="TBR_REFLECTOR_API_KEY.*not set"):
        endpoint_key(small_config(*endpoint))
    assert endpoint_key(small_config(*endpoint, "reflection.endpoint_keyless=true")) == "EMPTY"
    monkeypatch.setenv("TBR_REFLECTOR_API_KEY", "k")
    assert endpoint_key(small_config(*endpoint)) == "k"
    keyless = small_config(*endpoint, "reflection.endpoint_keyless=true")
    assert keyless.config_hash() == small_config(*endpoint).config_hash()  # access, not results


def test_ray_job_detection_uses_the_variable_rays_job_supervisor_sets(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.dashboard.modules.job.common import JOB_ID_METADATA_KEY

    from tbr_ray.preflight import RAY_JOB_ENV, ray_job_id

    assert RAY_JOB_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR and JOB_ID_METADATA_KEY == "job_submission_id"
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    assert ray_job_id() is None
    _in_ray_job(monkeypatch)
    assert ray_job_id() == "raysubmit_T"


def test_unreachable_endpoint_is_a_plain_error_naming_the_setting():
    """A plain ConnectionError survives Ray Tune's copy of a trial error; openai's does not."""
    import copy

    from tbr_ray.reflect import _endpoint_generate

    cfg = small_config(
        "reflection.endpoint=http://127.0.0.1:9/v1",
        "reflection.endpoint_model=m",
        "reflection.endpoint_keyless=true",
    )
    with pytest.raises(ConnectionError, match="reflection.endpoint = 'http://127.0.0.1:9/v1'") as e:
        _endpoint_generate(["Q?"], cfg)
    assert "Fix:" in str(copy.copy(e.value))


def test_engine_is_capped_at_the_models_context(tmp_path):
    """vLLM refuses max_model_len over the model's own ("greater than the derived
    max_model_len"), which failed a 512-position model's cell after it trained."""
    from transformers import LlamaConfig

    from tbr_ray.engine import engine_max_len

    LlamaConfig(max_position_embeddings=512).save_pretrained(tmp_path)
    assert engine_max_len(str(tmp_path), 1024) == 512
    assert engine_max_len(str(tmp_path), 256) == 256


def test_an_endpoint_needs_the_endpoint_extra(monkeypatch):
    """openai is imported when a cell writes external reflections through an endpoint (after
    Ray started): the preflight names the extra that brings it."""
    import importlib.util

    from tbr_ray.preflight import check_extras

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openai" else real(name, *a)
    )
    endpoint = ["reflection.endpoint=http://127.0.0.1:9/v1", "reflection.endpoint_model=m"]
    cfg = small_config("grid.conditions=[external]", *endpoint)
    assert check_extras(cfg) == [
        "reflection.endpoint = 'http://127.0.0.1:9/v1', but the openai package is not installed."
        " Fix: `pip install 'tbr-ray[endpoint]'`, or use reflection.reflector (a model) instead."
    ]
    assert check_extras(small_config("grid.conditions=[none]", *endpoint)) == []  # not needed


def test_openai_is_a_runtime_extra_that_setup_installs():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    assert [d for d in extras["endpoint"] if d.startswith("openai")]
    assert not [d for d in extras["dev"] if d.startswith("openai")]
    assert "endpoint]'" in next(
        line for line in (REPO / "Makefile").read_text().splitlines() if "install -q -e" in line
    )


PIN = "0123456789abcdef0123456789abcdef01234567"


def test_a_pinned_hub_model_loads_its_commits_snapshot(tmp_path, monkeypatch):
    """resolve_model hands every loader the Hugging Face cache's folder of the pinned commit
    (huggingface_hub.snapshot_download, offline here: the snapshot is already cached)."""
    from huggingface_hub import constants

    from tbr_ray.tiny import resolve_model

    snapshot = tmp_path / "hub" / "models--org--judge" / "snapshots" / PIN
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    where = resolve_model("org/judge", tmp_path, tmp_path, revisions={"org/judge": PIN})
    assert Path(where) == snapshot
    with pytest.raises(ValueError, match="org/judge loads org/judge .* without a pinned commit"):
        resolve_model("org/judge", tmp_path, tmp_path, revisions={})
    cfg = small_config(
        "eval.harm_judge={model: org/judge, format: llama-guard-3}",
        f"grid.hub_revisions={{org/judge: {PIN}}}",
    )
    assert cfg.config_hash() != small_config().config_hash()  # a pin is part of the hash


def test_hub_revisions_must_name_this_configs_models():
    with pytest.raises(ValueError, match=r"names \['llama-2-7b'\], which this config does not"):
        small_config(f"grid.hub_revisions={{llama-2-7b: {PIN}}}")


def test_a_hub_local_server_can_be_pinned():
    """preflight demands a pin for a hub reflection.local_server: grid.hub_revisions takes it."""
    from tbr_ray.preflight import check_hub_pins

    served = small_config("reflection.local_server=org/writer")
    assert any(p.startswith("reflection.local_server = ") for p in check_hub_pins(served))
    pinned = small_config(
        "reflection.local_server=org/writer", f"grid.hub_revisions={{org/writer: {PIN}}}"
    )
    assert check_hub_pins(pinned) == []
