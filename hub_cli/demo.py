"""What ``hub_cli demo`` serves: a tiny random-weight InternVL, offline, to try the plugin end to end."""

from __future__ import annotations

import os
from pathlib import Path

from hub_cli.launch import connect_host, curl_example, is_cpu_vllm, server_argv
from internvl_plugin.cpu_dtype import choose_cpu_dtype

SERVED_NAME = "tiny-internvl"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "vllm-internvl" / "demo"


def ready_message(host: str, port: int) -> str:
    base = f"http://{connect_host(host)}:{port}"
    return (f"\nvllm-internvl demo: tiny random-weight InternVL ready at {base}/v1 "
            f"(model '{SERVED_NAME}'; answers are random words). Try:\n\n"
            f"{curl_example(base, SERVED_NAME)}\n\nCtrl-C stops the server.\n")


def demo_server(model_dir: str | os.PathLike[str], host: str, port: int, *, allow_media_hosts: str | None = None,
                on_cpu: bool | None = None) -> tuple[list[str], dict[str, str | None]]:
    """The server command for the tiny model and the environment settings it needs: small limits, no compilation,
    so that it starts in about 30 s on CPU; the CPU dtype of this machine on a CPU vLLM (on GPU vLLM's own
    choice); image URLs under the media policy of ``hub_cli serve`` (``allow_media_hosts`` as its flag)."""
    from hub_cli.serve import ServerPlan, plan_media_policy

    if on_cpu is None:
        on_cpu = is_cpu_vllm()
    media = ServerPlan(args=[])
    plan_media_policy(media, allow_media_hosts, set())
    argv = server_argv(str(model_dir), host=host, port=port, extra=[
        "--served-model-name", SERVED_NAME, *(["--dtype", choose_cpu_dtype().dtype] if on_cpu else []),
        "--max-model-len", "4096", "--enforce-eager", "--max-num-seqs", "4", "--limit-mm-per-prompt",
        '{"image": 2}', *media.args])
    return argv, media.env
