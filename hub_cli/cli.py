"""hub_cli: fetch models from Hugging Face / ModelScope / OpenXLab, serve them with vLLM, chat."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


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


def _add_lazy_commands() -> None:
    # These modules import only click and the standard library at the top; vLLM, torch, openai and the hub
    # clients are imported inside the commands.
    from hub_cli.chat import chat
    from hub_cli.demo import demo
    from hub_cli.serve import serve

    main.add_command(serve)
    main.add_command(chat)
    main.add_command(demo)


_add_lazy_commands()
