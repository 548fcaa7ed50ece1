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

from internvl_plugin.json_files import JsonFileError, read_json_object

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


def _local_model(model: str, source: str, quiet: bool, download_dir: Path | None = None) -> Path:
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
                     local_dir=(download_dir or Path.home() / ".cache" / "vllm-internvl" / "models") / model)
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
@click.option("--download-dir", type=click.Path(path_type=Path), default=None,
              help="Where a repo id is fetched to (default ~/.cache/vllm-internvl/models/OWNER/NAME).")
@click.option("--quiet", is_flag=True, help="No progress bar or notes.")
def quantize(model: str, work_dir: Path, calib_dataset: str, calib_samples: int, calib_seqlen: int, w_bits: int,
             w_group_size: int, batch_size: int, search_scale: bool, device: str, dtype: str, source: str,
             download_dir: Path | None, quiet: bool) -> None:
    """AWQ W4A16 of MODEL's language model (folder or repo id), layer by layer, resumable; vision stays 16-bit."""
    from awq_tools.calib import CalibrationError
    from awq_tools.quantize import QuantizeError, QuantizeSettings, quantize as run

    folder = _local_model(model, source, quiet, download_dir)
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


@main.command(name="eval")
@click.argument("model", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--dataset", default="wikitext2", show_default=True,
              help="wikitext2, ptb, c4, pileval (test split) or a local .txt / .jsonl file.")
@click.option("--baseline", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Also evaluate this model (e.g. the 16-bit original) on the same windows.")
@click.option("--seqlen", type=click.IntRange(2), default=2048, show_default=True, help="Tokens per window.")
@click.option("--max-samples", type=click.IntRange(1), default=None, help="At most this many windows.")
@click.option("--dtype", default="auto", show_default=True, help="vLLM dtype for both engines.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_(model: Path, dataset: str, baseline: Path | None, seqlen: int, max_samples: int | None, dtype: str,
          as_json: bool) -> None:
    """Perplexity of MODEL on a dataset through vLLM (prompt logprobs); with --baseline, of both."""
    from awq_tools.calib import CalibrationError
    from awq_tools.evaluate import EvalError, evaluate_models

    models = [model] + ([baseline] if baseline else [])
    try:
        results = evaluate_models(models, dataset, seqlen=seqlen, max_samples=max_samples, dtype=dtype)
    except (CalibrationError, EvalError) as exc:
        raise click.ClickException(str(exc))
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in results], indent=2))
        return
    for role, r in zip(("model", "baseline"), results):
        click.echo(f"{role:<9} {r.model}: perplexity {r.perplexity:.4f} ({r.tokens} tokens, {r.windows} windows "
                   f"of {seqlen})")
    if baseline:
        click.echo(f"ratio model/baseline: {results[0].perplexity / results[1].perplexity:.4f}")


def _load_config(model: Path) -> dict:
    try:
        return read_json_object(model / "config.json" if model.is_dir() else model)
    except JsonFileError as exc:
        hint = " (give a checkpoint folder, its config.json or a model from `hub_cli models`)" if exc.missing else ""
        raise click.ClickException(f"{exc}{hint}") from None


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def _parse_memory(ctx, param, value: str | None) -> int | None:
    if value is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{value!r}: give a size such as 24GiB, 24GB or 80G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@main.command()
@click.argument("model")
@click.option("--w-group-size", type=click.IntRange(8, 4096), default=None,
              show_default="an AWQ checkpoint's own, else 128", help="AWQ group size of the W4A16 estimate.")
@click.option("--tokens", type=click.IntRange(0), default=0, help="Also show the KV cache for this many tokens.")
@click.option("--memory", callback=_parse_memory, default=None,
              help="Memory size (24GiB, 24GB, 80G): print the longest session that fits beside the weights.")
@click.option("--reserve", callback=_parse_memory, default="1GiB", show_default=True,
              help="Kept free for activations and the runtime when --memory is given.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def estimate(model: str, w_group_size: int | None, tokens: int, memory: int | None, reserve: int,
             as_json: bool) -> None:
    """Weights (fp16 vs W4A16) and KV cache per token (quant policy 0/8/4) of MODEL: a folder, its config.json,
    or a model of the catalogue (`hub_cli models`, by name or repo id)."""
    from internvl_plugin.awq_checkpoint import find_quantization_config, group_size_or_default
    from internvl_plugin.memory import LLMShape, awq_linear_bytes, estimate_from_config

    path = Path(model)
    entry = None
    if not path.exists():
        from hub_cli.catalogue import find

        entry = find(model)
    if entry is not None:
        w_group_size = w_group_size or 128
        fp16, w4 = entry.weights("fp16", w_group_size), entry.weights("w4a16", w_group_size)
        llm = entry.llm
    else:
        config = _load_config(path)
        if w_group_size is None:
            found = find_quantization_config(config, path if path.is_dir() else path.parent)
            w_group_size = group_size_or_default(found.config if found is not None and found.is_awq else None)
        try:
            fp16 = estimate_from_config(config, weight_format="fp16", group_size=w_group_size)
            w4 = estimate_from_config(config, weight_format="w4a16", group_size=w_group_size)
            llm = LLMShape.from_hf_config(config.get("llm_config") or config)
        except KeyError as exc:
            raise click.ClickException(f"{model}: config.json lacks {exc.args[0]!r}; not an InternVL/XComposer2/LLM "
                                       "config")
    int4_linears = llm.layers * sum(awq_linear_bytes(k, n, w_group_size) for k, n in llm.linear_shapes())
    sessions = None
    if memory is not None:
        sessions = {fmt: {q: max(0, (memory - reserve - est.total_bytes) // per_token)
                          for q, per_token in est.kv_bytes_per_token.items()}
                    for fmt, est in (("fp16", fp16), ("w4a16", w4))}
    if as_json:
        out = {"fp16": fp16.as_dict(), "w4a16": w4.as_dict(), "tokens": tokens,
               "w4a16_int4_linear_bytes": int4_linears}
        if entry is not None:
            out["catalogue"] = entry.hf_id
        if sessions is not None:
            out["memory_bytes"], out["reserve_bytes"] = memory, reserve
            out["max_session_tokens"] = {fmt: {str(q): n for q, n in v.items()} for fmt, v in sessions.items()}
        click.echo(json.dumps(out, indent=2))
        return
    if entry is not None:
        click.echo(f"{entry.hf_id} (catalogue: {entry.llm.name} + {entry.vision.name})")
    rows = [("vision tower (fp16)", fp16.vision_bytes, w4.vision_bytes),
            ("projector (fp16)", fp16.projector_bytes, w4.projector_bytes),
            ("language model", fp16.llm_bytes, w4.llm_bytes),
            ("  of which int4", None, int4_linears),
            ("fp16 extras", fp16.extra_bytes, w4.extra_bytes),
            ("total weights", fp16.total_bytes, w4.total_bytes)]
    click.echo(f"{'part':<22}{'fp16 GiB':>10}{'GB':>8}{'W4A16 GiB':>12}{'GB':>8}")
    for name, a, b in rows:
        if name == "fp16 extras" and not a:
            continue
        left = f"{a / GiB:>10.2f}{a / 1e9:>8.1f}" if a is not None else f"{'':>18}"
        click.echo(f"{name:<22}{left}{b / GiB:>12.2f}{b / 1e9:>8.1f}")
    click.echo("KV cache per token: " + ", ".join(
        f"quant_policy {q}: {n / 1024:.1f} KiB" for q, n in fp16.kv_bytes_per_token.items()))
    if tokens:
        click.echo(f"KV cache for {tokens} tokens: " + ", ".join(
            f"quant_policy {q}: {n * tokens / GiB:.2f} GiB" for q, n in fp16.kv_bytes_per_token.items()))
    if sessions is not None:
        click.echo(f"Longest session in {memory / GiB:.1f} GiB ({memory / 1e9:.1f} GB), {reserve / GiB:.1f} GiB "
                   "reserved, weights resident:")
        for fmt, per_q in sessions.items():
            click.echo(f"  {fmt + ' weights':<14}" + ", ".join(
                f"quant_policy {q}: {n:,} tokens" if n else f"quant_policy {q}: does not fit"
                for q, n in per_q.items()))


if __name__ == "__main__":
    sys.exit(main())
