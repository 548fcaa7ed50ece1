"""Checks of a model folder that ``hub_cli serve`` runs before starting vLLM, each failure one line naming the file.

Standard library only (no torch, no vLLM): config sections an InternVL checkpoint needs, safetensors files read
from their headers (truncated file, a tensor whose bytes do not match its shape, an unreadable header), a
sharded checkpoint's index against its shards (a shard or tensor missing, a tensor the index does not list), and
the tokenizer files. What needs the model itself (a tensor the model lacks or expects, a wrong shape for the
model) is vLLM's to find at load time; :func:`engine_failure_line` picks its one line out of the server log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hub_cli.errors import IntegrityError, UsageError
from internvl_plugin.safetensors_check import DamagedSafetensors
from internvl_plugin.safetensors_check import safetensors_header as _safetensors_header

__all__ = ["check_checkpoint", "safetensors_header", "engine_failure_line"]

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json")


def check_checkpoint(model_dir: str | Path, config: dict[str, Any] | None = None) -> None:
    """Raise a HubCliError with one line naming the file (and tensor) when ``model_dir`` cannot load.

    IntegrityError (exit 5) for a damaged weight file, UsageError (exit 2) for a folder that is not a complete
    checkpoint.
    """
    model_dir = Path(model_dir)
    if config is None:
        try:
            config = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError):
            return  # serve's own config reader names that problem
    _check_config(model_dir, config)
    headers = {p.name: safetensors_header(p) for p in sorted(model_dir.glob("*.safetensors"))}
    _check_index(model_dir, headers)
    _check_tokenizer(model_dir)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file, checked against the file; IntegrityError (exit 5) when damaged."""
    try:
        return _safetensors_header(path)
    except DamagedSafetensors as exc:
        raise IntegrityError(str(exc)) from None


def _check_config(model_dir: Path, config: dict[str, Any]) -> None:
    archs = config.get("architectures") or []
    if config.get("model_type") == "internvl_chat" or "InternVLChatModel" in archs:
        for key in ("llm_config", "vision_config"):
            if not isinstance(config.get(key), dict):
                raise UsageError(f"{model_dir / 'config.json'} has no {key}: an InternVL checkpoint needs both "
                                 "llm_config and vision_config")


def _check_index(model_dir: Path, headers: dict[str, dict[str, Any]]) -> None:
    index_path = model_dir / INDEX_NAME
    if not index_path.is_file():
        if not headers and not any(model_dir.glob("*.bin")) and not any(model_dir.glob("*.pt")):
            raise UsageError(f"{model_dir} has no weights (*.safetensors or *.bin)")
        return
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{index_path} is not a safetensors index (no weight_map)") from None
    for name, shard in weight_map.items():
        if shard not in headers:
            raise UsageError(f"{index_path} puts tensor {name!r} in {shard}, which is missing from {model_dir}")
        if name not in headers[shard]:
            raise UsageError(f"{model_dir / shard} lacks tensor {name!r}, which {INDEX_NAME} lists there")
    for shard, tensors in headers.items():
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise UsageError(f"{model_dir / shard} holds tensor {extra[0]!r}, which {INDEX_NAME} does not list"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _check_tokenizer(model_dir: Path) -> None:
    present = [n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    cfg_path = model_dir / "tokenizer_config.json"
    try:
        cls = json.loads(cfg_path.read_text()).get("tokenizer_class", "") if cfg_path.is_file() else ""
    except (OSError, ValueError, AttributeError):
        raise UsageError(f"{cfg_path} is not valid JSON") from None
    if "InternLM2" in str(cls) and "tokenizer.model" not in present:
        raise UsageError(f"{model_dir / 'tokenizer.model'} is missing: tokenizer_config.json names {cls}, "
                         "which reads it")
    if "vocab.json" in present and "tokenizer.json" not in present and not (model_dir / "merges.txt").is_file():
        raise UsageError(f"{model_dir / 'merges.txt'} is missing (vocab.json needs it)")
    if not present:
        raise UsageError(f"{model_dir} has no tokenizer file ({', '.join(TOKENIZER_FILES)})")


_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
# vLLM's prefixes: "(Worker pid=N) ERROR 12-06 00:23:55 [file.py:953] "
_PREFIX = re.compile(r"^(?:\(\w+ pid=\d+\)\s*)?(?:(ERROR|WARNING|INFO|DEBUG) [\d-]+ [\d:]+ \[[^\]]*\]\s*)?")
_WRAPPERS = ("initialization failed", "See root cause above", "See stack trace for root cause",
             "Engine process failed")


def engine_failure_line(log_lines: Iterable[str]) -> str | None:
    """The root-cause exception line of a vLLM server that stopped while starting, or None.

    vLLM prints the worker's and engine core's tracebacks and then the API server's ("Engine core initialization
    failed. See root cause above"); the last exception line that is not such a wrapper is the cause (the last,
    because a chained exception prints its cause first).
    """
    found = None
    for line in log_lines:
        prefix = _PREFIX.match(line.strip())
        if prefix.group(1) in ("WARNING", "INFO", "DEBUG"):
            continue
        m = _ERROR_LINE.match(line.strip()[prefix.end():])
        if m and not any(w in m.group(2) for w in _WRAPPERS):
            found = f"{m.group(1)}: {m.group(2).split('. The available', 1)[0]}"[:400]
    return found
