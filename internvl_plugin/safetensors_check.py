"""Reading a safetensors header and checking it against the file, without loading tensors or importing
vLLM: `hub_cli serve` runs it on a folder before vLLM starts, and the plugin's weight loader runs it to
name the damaged file when safetensors' own error ("incomplete metadata") names none."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

__all__ = ["DTYPE_BYTES", "DamagedSafetensors", "safetensors_header", "safetensors_header_bytes", "first_damaged"]

DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_HEADER_LIMIT = 100 << 20       # safetensors' own limit on a header


class DamagedSafetensors(ValueError):
    """A safetensors file that is truncated or whose header is unreadable or contradicts its data."""


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file (name -> dtype, shape, data_offsets); every one checked against the file."""
    return safetensors_header_bytes(path)[0]


def safetensors_header_bytes(path: Path) -> tuple[dict[str, Any], bytes]:
    """``safetensors_header`` and the header's raw JSON bytes (awq_tools fingerprints a checkpoint by them)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedSafetensors(f"{path} is truncated: {size} bytes, not even a safetensors header length")
        (length,) = struct.unpack("<Q", head)
        if length > _HEADER_LIMIT or 8 + length > size:
            raise DamagedSafetensors(f"{path} is truncated or not safetensors: its header claims {length} bytes, "
                                     f"the file has {size}")
        raw = f.read(length)
        try:
            header = json.loads(raw)
        except ValueError:
            raise DamagedSafetensors(f"{path} has an unreadable safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise DamagedSafetensors(f"{path} has an unreadable safetensors header (not a JSON object)")
    data_bytes = size - 8 - length
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in tensors.items():
        try:
            start, end = info["data_offsets"]
            want = DTYPE_BYTES[info["dtype"]]
            for dim in info["shape"]:
                want *= dim
        except (KeyError, TypeError, ValueError):
            raise DamagedSafetensors(f"{path}: tensor {name!r} has a malformed header entry") from None
        if end > data_bytes:
            raise DamagedSafetensors(f"{path} is truncated: tensor {name!r} needs {end} data bytes, the file holds "
                                     f"{data_bytes}; download it again")
        if end - start != want:
            raise DamagedSafetensors(f"{path}: tensor {name!r} of shape {info['shape']} ({info['dtype']}) needs "
                                     f"{want} bytes, the file stores {end - start}")
    return tensors, raw


def first_damaged(model_dir: str | Path) -> DamagedSafetensors | None:
    """The error of the first damaged ``*.safetensors`` file of ``model_dir``, or None."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            safetensors_header(path)
        except DamagedSafetensors as exc:
            return exc
    return None
