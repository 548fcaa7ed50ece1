"""Shared fixtures: tiny checkpoints (built once per session) and one vLLM engine per layout.

Engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, enforce_eager, 1 GiB KV) in float32 so
that they can be compared with the plain-PyTorch reference at tight tolerances. The multi-process
path (plugin loaded by entry point in the engine core and worker) has its own tests.
"""

from __future__ import annotations

import contextlib
import gc
import os

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# sitecustomize for hub client subprocesses: any name lookup other than loopback fails, so a client
# that tried to reach a real hub would fail the test instead of touching the network
NETGUARD_SITECUSTOMIZE = """
import socket
_real = socket.getaddrinfo
def _guard(host, *args, **kwargs):
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise socket.gaierror(f"test network guard: refusing to resolve {host!r}")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _guard
"""

VL_LAYOUTS = ("internvl2-2b", "internvl2-1b", "internvl-chat-v1-5")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_model(tiny_root):
    """tiny_model(layout) -> path of that tiny checkpoint (built on first use)."""
    from internvl_plugin.tiny import build_tiny_model

    def get(layout: str, **kwargs):
        suffix = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
        return build_tiny_model(layout, tiny_root / (layout + (f"-{suffix}" if suffix else "")), **kwargs)

    return get


def make_llm(model_path, **kwargs):
    from vllm import LLM

    args = dict(model=str(model_path), dtype="float32", max_model_len=4096, enforce_eager=True,
                gpu_memory_utilization=0.2, max_num_seqs=4, limit_mm_per_prompt={"image": 2}, seed=0)
    args.update(kwargs)
    return LLM(**args)


def release_llm(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@pytest.fixture(scope="module", params=VL_LAYOUTS)
def vl_engine(request, tiny_model, monkeypatch_module):
    """(layout, model path, in-process LLM) for each tiny InternVL layout; one engine per module."""
    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = tiny_model(request.param)
    llm = make_llm(path)
    yield request.param, path, llm
    release_llm(llm)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cli_server(argv, log, *, port, drop_env=("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS"),
               ready_marker="curl -s", timeout_s=400):
    """Run a server command (hub_cli demo/serve) in its own process group until /health answers and
    ``ready_marker`` is in its log; yield the base URL; stop it with SIGINT (SIGKILL to the group if
    it lingers) and require a clean exit. ``drop_env``: variables the real server must not inherit."""
    import signal
    import subprocess
    import time
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    proc = subprocess.Popen([str(a) for a in argv], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            assert proc.poll() is None, f"{argv[1]} exited early:\n{log.read_text()[-3000:]}"
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"server never healthy:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        for _ in range(40):  # the ready message follows health by a moment
            if ready_marker in log.read_text():
                break
            time.sleep(0.25)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode in (0, 130), log.read_text()[-2000:]


def png_bytes(w: int, h: int, color) -> bytes:
    """A w x h single-colour RGB PNG file's bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def random_image(w: int, h: int, seed: int):
    """A w x h RGB PIL image of seeded random pixels."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="session")
def awq_model(tiny_model, tmp_path_factory):
    """awq_model(layout, producer, group_size) -> (quantized folder, dense dequantized folder), each built
    once per session and shared by the GPU-layout and CPU int4 tests."""
    from quant_helpers import dequantized_copy, quantize_tiny_checkpoint

    root = tmp_path_factory.mktemp("awq-models")
    built = {}

    def get(layout, producer, group_size):
        key = (layout, producer, group_size)
        if key not in built:
            name = f"{layout}-{producer}-g{group_size}"
            quant = quantize_tiny_checkpoint(tiny_model(layout), root / name, layout=producer, group_size=group_size)
            built[key] = quant, dequantized_copy(quant, root / f"{name}-dense")
        return built[key]

    return get
