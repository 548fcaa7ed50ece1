"""The ``hub_cli`` command: every subcommand and its flags, each a thin shell over a library module beside it.

``fetch`` -> fetch.py, ``models`` -> catalogue.py, ``serve`` -> serve.py and launch.py, ``chat`` -> chat.py,
``demo`` -> demo.py, ``webui`` -> webui.py. Those modules are imported inside the commands (serve.py, whose top level imports only
the standard library, also here for its default host and port), so ``hub_cli --help`` loads no vLLM, torch,
openai or hub client. Failures are :class:`hub_cli.errors.HubCliError`: one line, and the exit code errors.py
lists.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hub_cli.serve import DEFAULT_HOST, DEFAULT_PORT


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Fetch, serve and chat with InternVL / InternLM-XComposer2 models on vLLM."""


@main.command()
@click.argument("repo")
@click.option("--source", type=click.Choice(["hf", "modelscope", "openxlab"], case_sensitive=False), default="hf",
              show_default=True, help="Hub to download from.")
@click.option("--revision", help="Branch, tag or commit (default: the hub's default branch).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Only files matching GLOB (repeatable, comma lists allowed; '*' crosses '/', 'dir/' = all of dir).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files matching GLOB (repeatable).")
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Target folder (default: ./NAME for repo OWNER/NAME).")
@click.option("--token", metavar="TOKEN",
              help="Access token (default: HF_TOKEN / MODELSCOPE_API_TOKEN; OpenXLab: a JWT or AK:SK, "
                   "default OPENXLAB_AK/OPENXLAB_SK). Never printed.")
@click.option("--max-workers", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Files downloaded in parallel.")
@click.option("--endpoint", metavar="URL",
              help="Hub base URL (default: HF_ENDPOINT / MODELSCOPE_ENDPOINT / HUB_CLI_OPENXLAB_ENDPOINT, "
                   "else the public hub; with --via git: the git server).")
@click.option("--retries", type=click.IntRange(0, 20), default=5, show_default=True,
              help="Retries after a network error or HTTP 5xx/429 (exponential backoff).")
@click.option("--via", type=click.Choice(["http", "git"]), default="http", show_default=True,
              help="OpenXLab only: 'git' clones from code.openxlab.org.cn (LFS files need git-lfs).")
@click.option("--no-xet", is_flag=True, help="HF: plain HTTP instead of xet (always so for custom endpoints).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or info logs; print only the folder.")
def fetch(repo: str, source: str, revision: str | None, include: tuple[str, ...], exclude: tuple[str, ...],
          local_dir: Path | None, token: str | None, max_workers: int, endpoint: str | None, retries: int,
          via: str, no_xet: bool, quiet: bool) -> None:
    """Download REPO (OWNER/NAME) into a folder and print its path.

    Every file is checked against the hub's listing (size, sha256 or git hash); a re-run downloads only
    what is missing or changed. Exit codes: 2 usage, 3 not found, 4 auth, 5 integrity, 6 network,
    7 unsafe file name, 1 other.
    """
    if quiet:  # before tqdm and the hub clients are imported: they read these at import time
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from hub_cli.errors import HubCliError, redact
    from hub_cli.fetch import fetch as fetch_repo

    try:
        path = fetch_repo(repo, source=source.lower(), revision=revision, include=include, exclude=exclude,
                          local_dir=local_dir, token=token, max_workers=max_workers, endpoint=endpoint,
                          quiet=quiet, retries=retries, via=via, no_xet=no_xet)
    except HubCliError as exc:
        click.echo(f"hub_cli fetch: error: {redact(exc.message, [token])}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("hub_cli fetch: interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug or an unexpected client failure: still one line, still no token
        message = redact(" ".join(f"{type(exc).__name__}: {exc}".split()), [token])
        click.echo(f"hub_cli fetch: unexpected error: {message}", err=True)
        sys.exit(1)
    click.echo(str(path))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output with every detail.")
@click.option("--family", type=click.Choice(["internvl", "internvl1.5", "internvl2", "internvl2.5", "xcomposer2"],
                                            case_sensitive=False),
              help="Only one family.")
@click.option("--group-size", type=click.IntRange(32, 1024), default=128, show_default=True,
              help="AWQ group size for the W4A16 estimate.")
@click.option("--tokens", type=click.IntRange(0), default=0,
              help="Also show the KV cache for this many tokens (per quant_policy 0/8/4).")
def models(as_json: bool, family: str | None, group_size: int, tokens: int) -> None:
    """List supported models with hub ids, sizes and memory estimates (fp16 vs W4A16, KV per token)."""
    import json

    from hub_cli.catalogue import format_table, rows

    entries = rows(family)
    if as_json:
        click.echo(json.dumps([e.as_dict(group_size, tokens) for e in entries], indent=1))
    else:
        click.echo(format_table(entries, group_size=group_size, tokens=tokens))


# ---------------------------------------------------------------------------------------------------------
# serve and chat: both start a server for MODEL_OR_REPO, with the same flags
# ---------------------------------------------------------------------------------------------------------
def hub_options(fn: Callable) -> Callable:
    """Where a repo id is fetched from."""
    for decorator in reversed([
        click.option("--source", type=click.Choice(["hf", "modelscope", "openxlab"], case_sensitive=False),
                     default="hf", show_default=True, help="Hub to fetch a repo id from."),
        click.option("--revision", help="Branch, tag or commit of a repo id (default: the hub's default)."),
        click.option("--download-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Where a repo id is fetched to (default ~/.cache/vllm-internvl/models/OWNER/NAME)."),
    ]):
        fn = decorator(fn)
    return fn


def engine_options(fn: Callable) -> Callable:
    """LMDeploy's engine flags."""
    for decorator in reversed([
        click.option("--tp", type=click.IntRange(1), default=1, show_default=True,
                     help="Tensor parallelism (vLLM --tensor-parallel-size)."),
        click.option("--cache-max-entry-count", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="Share of the memory left free after the weights that the KV cache takes (LMDeploy "
                          "semantics; mapped to vLLM's budget). Default: vLLM's default on GPU, one full session "
                          "on CPU."),
        click.option("--quant-policy", type=click.Choice(["0", "4", "8"]), default="0", show_default=True,
                     help="KV cache: 0 = 16-bit, 8 = int8, 4 = int4 per token and head (not yet on CPU)."),
        click.option("--model-format", type=click.Choice(["hf", "awq"], case_sensitive=False), default=None,
                     help="Expected checkpoint format; awq checks that it is an AWQ checkpoint (vLLM reads its "
                          "quantization_config either way)."),
        click.option("--model-name", help="Name served at /v1/models (default: MODEL_OR_REPO as typed)."),
        click.option("--session-len", type=click.IntRange(1), default=None,
                     help="Longest prompt + answer in tokens (vLLM --max-model-len)."),
        click.option("--max-batch-size", type=click.IntRange(1), default=None,
                     help="Most sequences decoded together (vLLM --max-num-seqs)."),
        click.option("--trust-request-mm-kwargs", is_flag=True,
                     help="Let requests carry mm_processor_kwargs such as max_dynamic_patch (up to "
                          "--max-dynamic-patch tiles). Off by default: trust your clients first."),
        click.option("--max-dynamic-patch", type=click.IntRange(1, 40), default=None,
                     help="With --trust-request-mm-kwargs: the most tiles a request's max_dynamic_patch may ask "
                          "for; vLLM's encoder cache is sized for it (default 40, or what fits --session-len)."),
        click.option("--allow-media-hosts", metavar="LIST", default=None,
                     help="Image URLs may also point at these host names, addresses or CIDR ranges (comma list, "
                          "e.g. images.lan,10.0.0.0/8). By default the server fetches public http(s) addresses "
                          "only: loopback, private, link-local and multicast are refused."),
    ]):
        fn = decorator(fn)
    return fn


@main.command()
@click.argument("model_or_repo")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_ARGS...]")
@click.option("--server-name", default=DEFAULT_HOST, show_default=True,
              help="Address to bind (0.0.0.0 for every interface; there is no authentication unless "
                   "-- --api-key KEY).")
@click.option("--server-port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@engine_options
@hub_options
@click.option("--dry-run", is_flag=True, help="Print the vLLM command and start nothing.")
@click.option("--webui", is_flag=True,
              help="Also open the browser chat page (hub_cli webui) on --server-name:--webui-port once the server "
                   "is up; needs the webui extra.")
@click.option("--webui-port", type=click.IntRange(1, 65535), default=6006, show_default=True,
              help="Port of the --webui page.")
def serve(model_or_repo: str, vllm_args: tuple[str, ...], server_name: str, server_port: int, dry_run: bool,
          webui: bool, webui_port: int, **options: Any) -> None:
    """Serve MODEL_OR_REPO (a folder, or a repo id fetched first) with vLLM's OpenAI-compatible server.

    LMDeploy's flags are mapped onto vLLM's; anything after '--' goes to vLLM unchanged, e.g.
    `hub_cli serve ./InternVL2-2B --tp 2 -- --limit-mm-per-prompt '{"image": 4}'`.
    """
    from hub_cli.errors import HubCliError
    from hub_cli.launch import connect_host, run_server
    from hub_cli.serve import prepare_server, printable_command, ready_message

    try:
        resolved, served, argv, env, notes = prepare_server(model_or_repo, host=server_name, port=server_port,
                                                            vllm_args=vllm_args, check=not dry_run, **options)
    except HubCliError as exc:
        click.echo(f"hub_cli serve: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("hub_cli serve: interrupted", err=True)
        sys.exit(130)
    for note in notes:
        click.echo(f"hub_cli serve: {note}", err=True)
    changes = {k: env.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_MEDIA_URL_ALLOW_REDIRECTS",
                                       "VLLM_INTERNVL_MEDIA_ALLOW", "VLLM_INTERNVL_MAX_DYNAMIC_PATCH")
               if env.get(k) != os.environ.get(k)}
    command = printable_command(argv, changes)
    if dry_run:
        click.echo(command)
        return
    if webui:
        from hub_cli.webui import GradioMissing, require_gradio

        try:
            require_gradio()
        except GradioMissing as exc:
            click.echo(f"hub_cli serve: error: --webui: {exc}", err=True)
            sys.exit(2)
    click.echo(f"hub_cli serve: starting vLLM for {resolved.path}:\n  {command}", err=True)
    base = f"http://{connect_host(server_name)}:{server_port}"

    def on_ready() -> None:
        click.echo(ready_message(base, served))
        if webui:  # the page runs in this process's threads and ends with it
            from hub_cli.webui import launch_in_background
            from hub_cli.serve import given_value
            from hub_cli.webui_chat import image_limit_from_args

            launch_in_background(base, served, server_name=server_name, server_port=webui_port,
                                 api_key=given_value(argv, "--api-key") or "EMPTY",   # the key the server asks for
                                 image_limit=image_limit_from_args(argv), echo=lambda m: click.echo(m, err=True))

    sys.exit(run_server(argv, env, base, on_ready=on_ready))


@main.command()
@click.argument("model_or_url")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_ARGS...]")
@click.option("--image", "images", multiple=True, metavar="PATH_OR_URL",
              help="Attach an image to the first message (repeatable).")
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True, help="Longest answer.")
@click.option("--temperature", type=click.FloatRange(0), default=0.7, show_default=True)
@click.option("--api-key", envvar="OPENAI_API_KEY", default="EMPTY", show_default=False,
              help="Key for a server started with --api-key (default: OPENAI_API_KEY). Never printed.")
@engine_options
@hub_options
def chat(model_or_url: str, vllm_args: tuple[str, ...], images: tuple[str, ...], system: str | None,
         max_tokens: int, temperature: float, api_key: str, model_name: str | None, **options: Any) -> None:
    """Chat in the terminal with MODEL_OR_URL: a running server's URL, or a model folder / repo id to serve.

    With a URL, --model-name picks one of the server's models (default: the first it lists) and the engine
    options are ignored; with a model, a server is started on a free 127.0.0.1 port and stopped on exit.
    """
    import contextlib

    import openai

    from hub_cli.chat import ANSWER, HELP, PROMPT, ChatSession, ImageError, api_base_url, pick_model, run_chat
    from hub_cli.errors import HubCliError
    from hub_cli.launch import local_server

    remote = model_or_url.startswith(("http://", "https://"))
    if remote and vllm_args:
        raise click.UsageError("arguments after '--' go to a server that chat starts; a URL is already running")
    with contextlib.ExitStack() as stack:
        if remote:
            base = model_or_url
        else:
            try:
                base, model_name, _ = stack.enter_context(local_server(
                    model_or_url, dict(options, model_name=model_name), vllm_args, prog="hub_cli chat",
                    echo=lambda line: click.echo(line, err=True)))
            except HubCliError as exc:
                click.echo(f"hub_cli chat: error: {exc.message}", err=True)
                sys.exit(exc.exit_code)
            except RuntimeError as exc:
                click.echo(f"hub_cli chat: error: {exc}", err=True)
                sys.exit(1)
        client = openai.OpenAI(base_url=api_base_url(base), api_key=api_key, max_retries=0, timeout=600)
        try:
            model = pick_model(client, model_name)
        except openai.APIConnectionError:
            click.echo(f"hub_cli chat: error: cannot reach an OpenAI-compatible server at {api_base_url(base)}",
                       err=True)
            sys.exit(6)
        except openai.APIStatusError as exc:
            click.echo(f"hub_cli chat: error: {api_base_url(base)}/models answered HTTP {exc.status_code}", err=True)
            sys.exit(1)
        interactive = sys.stdin.isatty()   # piped input: answers only, no prompts
        session = ChatSession(client, model, system=system, max_tokens=max_tokens, temperature=temperature,
                              answer_prefix=ANSWER if interactive else "")

        def err(message: str) -> None:
            click.echo(f"[{message}]", err=True)

        for item in images:
            try:
                session.attach(item)
            except ImageError as exc:
                err(f"error: {exc}")
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
        click.echo(f"hub_cli chat: talking to '{model}' at {api_base_url(base)}. {HELP}", err=True)
        code = run_chat(session, input, err, prompt=PROMPT if interactive else "")
    sys.exit(code)


@main.command()
@click.argument("model_or_url")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_ARGS...]")
@click.option("--server-name", default=DEFAULT_HOST, show_default=True,
              help="Address the page binds (0.0.0.0 for every interface; the page has no authentication).")
@click.option("--server-port", type=click.IntRange(1, 65535), default=6006, show_default=True,
              help="Port of the page.")
@click.option("--api-key", envvar="OPENAI_API_KEY", default="EMPTY", show_default=False,
              help="Key for a server started with --api-key (default: OPENAI_API_KEY). Never printed.")
@click.option("--limit-images", type=click.IntRange(1), default=None,
              help="Images the server takes per request (its --limit-mm-per-prompt); older images are left out "
                   "of a request beyond it. Default: the limit of the server webui starts, else learned from "
                   "the server's first refusal.")
@click.option("--system", default="", help="Initial system prompt (editable in the page).")
@click.option("--max-tokens", type=click.IntRange(1, 8192), default=512, show_default=True,
              help="Initial 'max new tokens' slider value.")
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.7, show_default=True,
              help="Initial temperature slider value.")
@click.option("--top-p", type=click.FloatRange(0.05, 1), default=1.0, show_default=True,
              help="Initial top-p slider value.")
@engine_options
@hub_options
def webui(model_or_url: str, vllm_args: tuple[str, ...], server_name: str, server_port: int, api_key: str,
          limit_images: int | None, system: str, max_tokens: int, temperature: float, top_p: float,
          model_name: str | None, **options: Any) -> None:
    """Chat with images in the browser: MODEL_OR_URL is a running server's URL, or a model folder / repo id.

    A folder or repo id is served the way `hub_cli serve` serves it (the engine and hub options below, and
    arguments after '--') on a free 127.0.0.1 port, stopped when the page stops; with a URL, --model-name
    picks one of its models (default: the first) and the engine options are ignored. Needs the webui extra:
    pip install 'vllm-internvl[webui]'.
    """
    from hub_cli.webui import run

    sys.exit(run(model_or_url, vllm_args, server_name=server_name, server_port=server_port, api_key=api_key,
                 model_name=model_name, limit_images=limit_images, system=system, max_tokens=max_tokens,
                 temperature=temperature, top_p=top_p, options=options, echo=lambda m: click.echo(m, err=True)))


@main.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind.")
@click.option("--port", "--server-port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--layout", type=click.Choice(["internvl2-2b", "internvl2-1b", "internvl-chat-v1-5", "internvl2_5-2b",
                                             "mini-internvl-4b", "internvl2-40b", "xcomposer2-vl-1.8b", "xcomposer2-vl-7b", "xcomposer2-7b",
                                             "xcomposer2-4khd", "xcomposer2d5"]),
              default="internvl2-2b", show_default=True, help="Which real model's layout the tiny model copies.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the tiny checkpoint is built (default ~/.cache/vllm-internvl/demo).")
@click.option("--allow-media-hosts", metavar="LIST", default=None,
              help="As for serve: image URLs may also point at these hosts, addresses or CIDR ranges.")
def demo(host: str, port: int, layout: str, cache_dir: Path | None, allow_media_hosts: str | None) -> None:
    """Build a tiny InternVL or InternLM-XComposer2 (random weights) and serve it with vLLM's OpenAI-compatible server."""
    from hub_cli.demo import default_cache_dir, demo_server, ready_message
    from hub_cli.errors import HubCliError
    from hub_cli.launch import connect_host, run_server, server_env
    from hub_cli.serve import apply_env
    from internvl_plugin.tiny import build_tiny_model

    folder = (cache_dir or default_cache_dir()) / layout
    try:
        argv, env = demo_server(folder, host, port, allow_media_hosts=allow_media_hosts)
    except HubCliError as exc:
        click.echo(f"hub_cli demo: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    path = build_tiny_model(layout, folder)
    click.echo(f"vllm-internvl demo: tiny {layout} checkpoint at {path}; starting vLLM (about 30 s on CPU)...")
    sys.exit(run_server(argv, apply_env(server_env(), env), f"http://{connect_host(host)}:{port}",
                        on_ready=lambda: click.echo(ready_message(host, port))))
