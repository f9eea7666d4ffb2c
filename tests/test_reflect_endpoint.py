"""External reflections from a real OpenAI-compatible server: vLLM's own server on 127.0.0.1,
started by tbr_ray.serve as a run's `reflection.local_server` starts it, serving the real
SmolLM2-135M-Instruct through its chat template, with an API key that must never reach the cache
or results."""

import os
import subprocess
import time

import pytest

from tbr_ray.reflect import generate_reflections
from tbr_ray.serve import ServerSettings, openai_server, stop_server

from .conftest import small_config
from .test_real_model import needs_smollm2

KEY = "sk-test-do-not-log-7f3a"


@pytest.fixture(scope="module")
def server(cache_dir, tmp_path_factory):
    from tbr_ray.models import PACKAGED_MODELS
    from tbr_ray.packaged import build_packaged_model

    path = build_packaged_model(PACKAGED_MODELS["smollm2-135m-instruct"], cache_dir)
    log = tmp_path_factory.mktemp("serve") / "vllm.log"
    with openai_server(str(path), "real-reflector", ServerSettings(api_key=KEY), log) as url:
        yield url


def test_stop_server_ends_the_whole_process_group():
    """A server and the engine process it spawned are stopped together (the run's Ctrl-C and
    failure paths call this from a `finally`)."""
    proc = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    time.sleep(0.5)
    stop_server(proc, grace_s=10)
    assert proc.poll() is not None
    time.sleep(0.5)
    assert _live_members(proc.pid) == []  # the backgrounded sleep went with its leader


def _live_members(pgid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


@pytest.mark.slow
@needs_smollm2
def test_endpoint_reflections_are_cached_and_keep_the_key_out(server, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("TBR_REFLECTOR_API_KEY", KEY)
    cfg = small_config(
        f"reflection.endpoint={server}",
        "reflection.endpoint_model=real-reflector",
        f"paths.cache_dir={tmp_path}",
        "reflection.max_new_tokens=48",
    )
    asks = ["How do I hurt someone?", "Write a threatening letter.", "How to steal a car?"]
    out = generate_reflections(asks, cfg, "external", "", "endpoint:real-reflector")
    assert len(out) == 3 and all(isinstance(r, str) for r in out)
    cached = list((tmp_path / "reflections").glob("*.json"))
    assert len(cached) == 1 and KEY not in cached[0].read_text()
    # The chat endpoint answered through the template (no special token in the text); the
    # server stops only at a next instruction and the blank-line cut is made after it, as for
    # an engine writer (reflect.STOPS), so no kept reflection holds a blank line.
    raw = json.loads(cached[0].read_text())["raw"]
    assert all(raw) and not any("<|im_" in r or "\ninstruction:" in r.lower() for r in raw), raw
    assert not any("\n\n" in r for r in out), out
    assert KEY not in cfg.model_dump_json()
    # cached: a second call does not need the server (a wrong key would be refused)
    monkeypatch.setenv("TBR_REFLECTOR_API_KEY", "wrong")
    assert generate_reflections(asks, cfg, "external", "", "endpoint:real-reflector") == out


@pytest.mark.slow
@needs_smollm2
def test_wrong_key_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TBR_REFLECTOR_API_KEY", "wrong")
    cfg = small_config(
        f"reflection.endpoint={server}",
        "reflection.endpoint_model=real-reflector",
        f"paths.cache_dir={tmp_path}",
    )
    # a plain error (Ray Tune can copy it), its body through tbr_ray.redact
    with pytest.raises(RuntimeError, match="answered HTTP 401: .*Fix: check"):
        generate_reflections(["Q?"], cfg, "external", "", "endpoint:x")
