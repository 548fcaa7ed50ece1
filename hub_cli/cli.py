"""hub_cli: fetch models from Hugging Face / ModelScope / OpenXLab, serve them with vLLM, chat."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Fetch, serve and chat with InternVL / InternLM-XComposer2 models on vLLM."""
