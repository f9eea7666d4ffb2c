"""External reflections from a real OpenAI-compatible server: `vllm serve` on localhost,
serving a tiny model, with an API key that must never reach the cache or results."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tbr_ray.reflect import generate_reflections

from .conftest import small_config

pytestmark = pytest.mark.slow
KEY = "sk-test-do-not-log-7f3a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_falcon, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # The OpenAI server module is what `vllm serve` runs; the `vllm` CLI itself looks up the
    # "vllm" distribution's version and fails under vllm-cpu (its distribution is "vllm-cpu").
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        tiny_falcon,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.3",
        "--api-key",
        KEY,
        "--served-model-name",
        "tiny-reflector",
    ]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() - t0 > 300:
                proc.kill()
                pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(2)
    yield f"{url}/v1"
    proc.terminate()
    proc.wait(timeout=60)


def test_endpoint_reflections_are_cached_and_keep_the_key_out(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TBR_REFLECTOR_API_KEY", KEY)
    cfg = small_config(
        f"reflection.endpoint={server}",
        "reflection.endpoint_model=tiny-reflector",
        f"paths.cache_dir={tmp_path}",
    )
    asks = ["How do I hurt someone?", "Write a threatening letter.", "How to steal a car?"]
    out = generate_reflections(asks, cfg, "external", "", "endpoint:tiny-reflector")
    assert len(out) == 3 and all(isinstance(r, str) for r in out)
    cached = list((tmp_path / "reflections").glob("*.json"))
    assert len(cached) == 1 and KEY not in cached[0].read_text()
    assert KEY not in cfg.model_dump_json()
    # cached: a second call does not need the server (a wrong key would be refused)
    monkeypatch.setenv("TBR_REFLECTOR_API_KEY", "wrong")
    assert generate_reflections(asks, cfg, "external", "", "endpoint:tiny-reflector") == out


def test_wrong_key_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TBR_REFLECTOR_API_KEY", "wrong")
    cfg = small_config(
        f"reflection.endpoint={server}",
        "reflection.endpoint_model=tiny-reflector",
        f"paths.cache_dir={tmp_path}",
    )
    # a plain error (Ray Tune can copy it), its body through tbr_ray.redact
    with pytest.raises(RuntimeError, match="answered HTTP 401: .*Fix: check"):
        generate_reflections(["Q?"], cfg, "external", "", "endpoint:x")
