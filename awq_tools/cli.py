"""The ``awq_tools`` command: ``estimate``, the weight and KV-cache memory of a checkpoint in fp16 and W4A16.

Quantizing is not a command here yet: make AWQ checkpoints with LMDeploy's ``lmdeploy lite auto_awq`` or
with AutoAWQ; the plugin loads both (internvl_plugin.awq_checkpoint).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

GiB = 1 << 30


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """AWQ W4A16 tools for InternVL / InternLM-XComposer2 checkpoints."""


def _load_config(model: Path) -> dict:
    config_file = model / "config.json" if model.is_dir() else model
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise click.ClickException(f"{config_file}: no such file (give a checkpoint folder or its config.json)")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"{config_file}: not valid JSON ({exc})")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--w-group-size", type=click.IntRange(8, 4096), default=None,
              show_default="an AWQ checkpoint's own, else 128", help="AWQ group size of the W4A16 estimate.")
@click.option("--tokens", type=click.IntRange(0), default=0, help="Also show the KV cache for this many tokens.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def estimate(model: Path, w_group_size: int | None, tokens: int, as_json: bool) -> None:
    """Weights (fp16 vs W4A16) and KV cache per token (quant policy 0/8/4) of MODEL (folder or config.json)."""
    from internvl_plugin.awq_checkpoint import find_quantization_config, group_size_or_default
    from internvl_plugin.memory import estimate_from_config

    config = _load_config(model)
    if w_group_size is None:
        found = find_quantization_config(config, model if model.is_dir() else model.parent)
        w_group_size = group_size_or_default(found.config if found is not None and found.is_awq else None)
    try:
        fp16 = estimate_from_config(config, weight_format="fp16", group_size=w_group_size)
        w4 = estimate_from_config(config, weight_format="w4a16", group_size=w_group_size)
    except KeyError as exc:
        raise click.ClickException(f"{model}: config.json lacks {exc.args[0]!r}; not an InternVL/XComposer2/LLM config")
    if as_json:
        click.echo(json.dumps({"fp16": fp16.as_dict(), "w4a16": w4.as_dict(), "tokens": tokens}, indent=2))
        return
    rows = [("vision tower (fp16)", fp16.vision_bytes, w4.vision_bytes),
            ("projector (fp16)", fp16.projector_bytes, w4.projector_bytes),
            ("language model", fp16.llm_bytes, w4.llm_bytes),
            ("total weights", fp16.total_bytes, w4.total_bytes)]
    click.echo(f"{'part':<22}{'fp16 GiB':>12}{'W4A16 GiB':>12}")
    for name, a, b in rows:
        click.echo(f"{name:<22}{a / GiB:>12.3f}{b / GiB:>12.3f}")
    click.echo("KV cache per token: " + ", ".join(
        f"quant_policy {q}: {n / 1024:.1f} KiB" for q, n in fp16.kv_bytes_per_token.items()))
    if tokens:
        click.echo(f"KV cache for {tokens} tokens: " + ", ".join(
            f"quant_policy {q}: {n * tokens / GiB:.2f} GiB" for q, n in fp16.kv_bytes_per_token.items()))


if __name__ == "__main__":
    sys.exit(main())
