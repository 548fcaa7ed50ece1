"""A checkpoint's JSON files read with one-line errors naming the file.

Imports no vLLM: ``awq_tools`` (which may quantize on a machine without vLLM) and ``hub_cli`` use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonFileError(ValueError):
    """One line naming the file; ``missing`` tells a caller it may add a hint about what to give."""

    def __init__(self, message: str, *, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a config.json and the like)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise JsonFileError(f"{path}: no such file", missing=True) from None
    except OSError as exc:
        raise JsonFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_json_object(data, path)


def parse_json_object(data: bytes, path: str | Path) -> dict[str, Any]:
    """The JSON object in ``data``, read from ``path`` (for callers that also keep the bytes, e.g. to hash)."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise JsonFileError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise JsonFileError(f"{path}: not a JSON object")
    return obj
