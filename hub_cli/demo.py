"""``hub_cli demo``: a tiny random-weight InternVL served offline, to try the plugin end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hub_cli.launch import connect_host, curl_example, run_server, server_argv, server_env

SERVED_NAME = "tiny-internvl"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "vllm-internvl" / "demo"


def ready_message(host: str, port: int) -> str:
    base = f"http://{connect_host(host)}:{port}"
    return (f"\nvllm-internvl demo: tiny random-weight InternVL ready at {base}/v1 "
            f"(model '{SERVED_NAME}'; answers are random words). Try:\n\n"
            f"{curl_example(base, SERVED_NAME)}\n\nCtrl-C stops the server.\n")


@click.command("demo")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", "--server-port", type=click.IntRange(1, 65535), default=23333, show_default=True)
@click.option("--layout", type=click.Choice(["internvl2-2b", "internvl2-1b", "internvl-chat-v1-5", "internvl2_5-2b"]),
              default="internvl2-2b", show_default=True, help="Which real model's layout the tiny model copies.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the tiny checkpoint is built (default ~/.cache/vllm-internvl/demo).")
def demo(host: str, port: int, layout: str, cache_dir: Path | None) -> None:
    """Build a tiny InternVL (random weights) and serve it with vLLM's OpenAI-compatible server."""
    from internvl_plugin.tiny import build_tiny_model

    path = build_tiny_model(layout, (cache_dir or default_cache_dir()) / layout)
    click.echo(f"vllm-internvl demo: tiny {layout} checkpoint at {path}; starting vLLM (about 30 s on CPU)...")
    argv = server_argv(str(path), host=host, port=port, extra=[
        "--served-model-name", SERVED_NAME, "--dtype", "bfloat16", "--max-model-len", "4096",
        "--enforce-eager", "--max-num-seqs", "4", "--limit-mm-per-prompt", '{"image": 2}'])
    sys.exit(run_server(argv, server_env(), f"http://{connect_host(host)}:{port}",
                        on_ready=lambda: click.echo(ready_message(host, port))))
