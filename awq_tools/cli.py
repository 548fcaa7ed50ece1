"""The ``awq_tools`` command: ``quantize`` (quantize.py), ``eval`` (evaluate.py) and ``estimate`` (memory).

``quantize`` takes LMDeploy's ``lite auto_awq`` flags; the seed's ``--search-scale False`` spelling means off
(LMDeploy 0.4.2-0.6.2 read any value as on, spec internvl-and-quant.md B1.1), so a value after the flag is
read as a boolean before click parses the line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

GiB = 1 << 30


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
               "off": False}


class _Group(click.Group):
    def parse_args(self, ctx, args):
        out = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--search-scale" and i + 1 < len(args) and args[i + 1].lower() in _BOOL_WORDS:
                out.append("--search-scale" if _BOOL_WORDS[args[i + 1].lower()] else "--no-search-scale")
                i += 2
                continue
            if arg.startswith("--search-scale=") and arg.split("=", 1)[1].lower() in _BOOL_WORDS:
                out.append("--search-scale" if _BOOL_WORDS[arg.split("=", 1)[1].lower()] else "--no-search-scale")
                i += 1
                continue
            out.append(arg)
            i += 1
        return super().parse_args(ctx, out)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """AWQ W4A16 tools for InternVL / InternLM-XComposer2 checkpoints."""


def _local_model(model: str, source: str, quiet: bool) -> Path:
    """A folder as given, or a repo id fetched through hub_cli's fetch (resumable, verified)."""
    path = Path(model)
    if path.exists():
        return path
    from hub_cli.fetch import is_repo_id

    if not is_repo_id(model):
        raise click.ClickException(f"{model}: no such folder (give a checkpoint folder or a repo id OWNER/NAME)")
    from hub_cli.errors import HubCliError
    from hub_cli.fetch import fetch

    try:
        return fetch(model, source=source, quiet=quiet,
                     local_dir=Path.home() / ".cache" / "vllm-internvl" / "models" / model)
    except HubCliError as exc:
        raise click.ClickException(f"fetching {model}: {exc.message}")


@main.command()
@click.argument("model")
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("./work_dir"), show_default=True,
              help="Output folder (appears only when complete).")
@click.option("--calib-dataset", default="wikitext2", show_default=True,
              help="wikitext2, ptb, c4, pileval (through the datasets library), or a local .txt / .jsonl file.")
@click.option("--calib-samples", type=click.IntRange(1), default=128, show_default=True)
@click.option("--calib-seqlen", type=click.IntRange(2), default=2048, show_default=True)
@click.option("--w-bits", type=int, default=4, show_default=True, help="Weight bits (only 4).")
@click.option("--w-group-size", type=int, default=128, show_default=True, help="Input channels per scale.")
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True,
              help="Calibration samples per forward chunk.")
@click.option("--search-scale/--no-search-scale", default=False, show_default=True,
              help="Search the smoothing ratio per group (also: --search-scale True/False).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] for the layer math.")
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16"]), default="auto", show_default=True,
              help="Scales and rewritten tensors; auto keeps the checkpoint's.")
@click.option("--source", default="hf", show_default=True, help="Hub a repo id is fetched from (hub_cli fetch).")
@click.option("--quiet", is_flag=True, help="No progress bar or notes.")
def quantize(model: str, work_dir: Path, calib_dataset: str, calib_samples: int, calib_seqlen: int, w_bits: int,
             w_group_size: int, batch_size: int, search_scale: bool, device: str, dtype: str, source: str,
             quiet: bool) -> None:
    """AWQ W4A16 of MODEL's language model (folder or repo id), layer by layer, resumable; vision stays 16-bit."""
    from awq_tools.calib import CalibrationError
    from awq_tools.quantize import QuantizeError, QuantizeSettings, quantize as run

    folder = _local_model(model, source, quiet)
    settings = QuantizeSettings(calib_dataset=calib_dataset, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                                w_bits=w_bits, w_group_size=w_group_size, batch_size=batch_size,
                                search_scale=search_scale, device=device, dtype=dtype)
    try:
        out = run(folder, work_dir, settings, quiet=quiet)
    except (QuantizeError, CalibrationError) as exc:
        raise click.ClickException(str(exc))
    except KeyboardInterrupt:
        click.echo("awq_tools quantize: interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    if not quiet:
        click.echo(f"wrote {out}")


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
