"""tbr_ray.redact: URL credentials, tokens and API keys never reach run.json, status.json,
error.txt or the terminal; config URLs that carry one are refused. Pure, no Ray."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tbr_ray.cli import app
from tbr_ray.redact import redact, redact_values
from tbr_ray.results import write_run_manifest, write_status

from .conftest import small_config

SECRET = "s3cretPa55word"


@pytest.mark.parametrize(
    "text, shown",
    [
        (f"http://ada:{SECRET}@mlflow.lab:5000/api", "http://***@mlflow.lab:5000/api"),
        (f"https://{SECRET}@host/v1", "https://***@host/v1"),
        (f"postgresql://u:p@{SECRET}@db/x", "postgresql://***@db/x"),  # "@" in a password
        (f"https://h/v1?x=1&api_key={SECRET}&y=2", "https://h/v1?x=1&api_key=***&y=2"),
        (f"https://h/?token={SECRET}", "https://h/?token=***"),
        (f"Authorization: Bearer {SECRET}", "Authorization: Bearer ***"),
        (f"{{'api_key': '{SECRET}'}}", "{'api_key': '***'}"),
        (
            "Error code: 401 - {'error': {'message': 'Incorrect API key provided: "
            "sk-proj-Zx81aQ0mVt55sEcReT9kEy'}}",
            "Error code: 401 - {'error': {'message': 'Incorrect API key provided: ***'}}",
        ),
        ("hf_abcdefghijklmnopqrstuvwxyz12", "***"),
        ("AKIAABCDEFGHIJKLMNOP", "***"),
        # kept: what is not a secret
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("file:///runs/tiny/mlruns", "file:///runs/tiny/mlruns"),
        ("ada@example.com wrote http://h/x", "ada@example.com wrote http://h/x"),
        ("eval.max_new_tokens=64000 exceeds the token embeddings", None),
    ],
)
def test_redact_masks_secrets_and_keeps_the_rest(text, shown):
    assert redact(text) == (text if shown is None else shown)


def test_redact_values_keeps_the_shape():
    value = {"a": [f"http://u:{SECRET}@h", 3, None], "b": {"c": ("Bearer " + SECRET,)}}
    assert redact_values(value) == {"a": ["http://***@h", 3, None], "b": {"c": ["Bearer ***"]}}


def test_nothing_persisted_holds_a_secret(tmp_path):
    """An API error body (status.json), its traceback (error.txt) and the manifest."""
    body = f"Error code: 401 - {{'error': 'Bearer {SECRET}', 'url': 'http://u:{SECRET}@h'}}"
    write_status(tmp_path, "c1", "failed", traceback=f"Traceback ...\n{body}", error=body)
    write_run_manifest(tmp_path, {"run_id": "r", "config": {"endpoint": f"https://{SECRET}@h"}})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"status.json", "error.txt", "run.json"}
    assert not [p for p in files if SECRET in p.read_text()]
    assert json.loads((tmp_path / "cells/c1/status.json").read_text())["error"].count("***") == 2


@pytest.mark.parametrize(
    "setting, fix",
    [
        (f"reflection.endpoint=http://ada:{SECRET}@h:8000/v1", "reflection.api_key_env names"),
        (f"reflection.endpoint=http://h:8000/v1?api_key={SECRET}", "reflection.api_key_env"),
        (f"tracking.mlflow_uri=https://ada:{SECRET}@mlflow.lab", "MLFLOW_TRACKING_USERNAME"),
    ],
)
def test_a_url_with_a_credential_is_refused_masked(setting, fix):
    """Ray Tune writes each trial's config into the run folder (params.json, result.json),
    beyond any redaction: a credential in a config URL is refused, and never echoed."""
    with pytest.raises(ValueError, match="carries a credential"):
        small_config(setting, "reflection.endpoint_model=m")
    tiny = str(Path(__file__).resolve().parent.parent / "jobs" / "tiny.yaml")
    out = CliRunner().invoke(app, ["validate", tiny, "--config-only", "--set", setting])
    assert out.exit_code == 2 and fix in out.output and "***" in out.output
    assert SECRET not in out.output
