"""What ``hub_cli demo`` serves: a tiny random-weight InternVL, offline, to try the plugin end to end."""

from __future__ import annotations

import os
from pathlib import Path

from hub_cli.launch import connect_host, curl_example, server_argv
from internvl_plugin.cpu_dtype import choose_cpu_dtype

SERVED_NAME = "tiny-internvl"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "vllm-internvl" / "demo"


def ready_message(host: str, port: int) -> str:
    base = f"http://{connect_host(host)}:{port}"
    return (f"\nvllm-internvl demo: tiny random-weight InternVL ready at {base}/v1 "
            f"(model '{SERVED_NAME}'; answers are random words). Try:\n\n"
            f"{curl_example(base, SERVED_NAME)}\n\nCtrl-C stops the server.\n")


def demo_server_argv(model_dir: str | os.PathLike[str], host: str, port: int) -> list[str]:
    """The server command for the tiny model: small limits, no compilation, so that it starts in about 30 s on CPU."""
    return server_argv(str(model_dir), host=host, port=port, extra=[
        "--served-model-name", SERVED_NAME, "--dtype", choose_cpu_dtype().dtype, "--max-model-len", "4096",
        "--enforce-eager", "--max-num-seqs", "4", "--limit-mm-per-prompt", '{"image": 2}'])
