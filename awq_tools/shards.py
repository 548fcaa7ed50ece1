"""Streaming safetensors IO: a checkpoint's tensor index from its headers, reading a few tensors at a time,
writing shards atomically, and the input fingerprint that resuming is checked against.

Only the headers are read here (``internvl_plugin.safetensors_check``, shared with hub_cli and the plugin)
because the quantizer must refuse a truncated or damaged shard in one line before it starts, and must know
every tensor's shape and size without loading it; the tensors themselves are read with ``safetensors.safe_open``,
one layer at a time, each file opened only while it is read so that its mapped pages leave the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from internvl_plugin.safetensors_check import DamagedSafetensors, safetensors_header_bytes

__all__ = ["TensorInfo", "CheckpointIndex", "BadCheckpoint", "save_shard_atomically", "write_text_atomically",
           "write_json_atomically", "copy_file_atomically", "fsync_dir", "tensor_digest"]

INDEX_FILE = "model.safetensors.index.json"


class BadCheckpoint(ValueError):
    """A missing, truncated or inconsistent checkpoint file (the message names it)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class CheckpointIndex:
    """Every tensor of a safetensors checkpoint folder (sharded with an index, or *.safetensors files)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index_file = folder / INDEX_FILE
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BadCheckpoint(f"{index_file}: not a safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            if any(folder.glob("*.bin")):
                raise BadCheckpoint(f"{folder}: only PyTorch .bin weights; convert the checkpoint to safetensors")
            raise BadCheckpoint(f"{folder}: no *.safetensors weights")
        self.tensors: dict[str, TensorInfo] = {}
        self.headers: dict[str, bytes] = {}
        for fname in files:
            for info in self._read_header(fname):
                if info.name in self.tensors:
                    raise BadCheckpoint(f"{folder / fname}: tensor {info.name!r} is also in {self.tensors[info.name].file}")
                self.tensors[info.name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise BadCheckpoint(f"{index_file}: lists {missing[0]!r}, which is in no shard "
                                    f"({len(missing)} such tensor(s))")

    def _read_header(self, fname: str) -> list[TensorInfo]:
        path = self.folder / fname
        if not path.is_file():
            raise BadCheckpoint(f"{path}: no such file (named by {INDEX_FILE})")
        try:
            header, self.headers[fname] = safetensors_header_bytes(path)
        except DamagedSafetensors as exc:
            raise BadCheckpoint(str(exc)) from None
        return [TensorInfo(name, fname, e["dtype"], tuple(e["shape"]), e["data_offsets"][1] - e["data_offsets"][0])
                for name, e in header.items()]

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, as stored (each file opened only for this read)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out = {}
        for fname, group in by_file.items():
            try:
                with safe_open(str(self.folder / fname), framework="pt") as f:
                    for name in group:
                        out[name] = f.get_tensor(name)
            except SafetensorError as exc:
                raise BadCheckpoint(f"{self.folder / fname}: cannot read ({exc})") from None
        return out

    def fingerprint(self) -> str:
        """sha256 over every shard's name, size and header: changes when any tensor's name, shape, dtype or
        place changes; the tensors' bytes are hashed layer by layer as they are read (see quantize.py)."""
        h = hashlib.sha256()
        for fname in sorted(self.headers):
            h.update(fname.encode() + b"\0" + str((self.folder / fname).stat().st_size).encode() + b"\0")
            h.update(self.headers[fname])
        return h.hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` into a temporary name in the same folder, fsync, rename: the file is whole or absent, and a
    failure at any step removes the temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_shard_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    _write_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                  metadata={"format": "pt"}))


def write_text_atomically(text: str, path: Path) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def copy_file_atomically(src: Path, path: Path) -> None:
    """A copied tokenizer or processor file: whole or absent."""
    _write_atomically(path, lambda tmp: shutil.copy2(src, tmp))


def write_json_atomically(obj, path: Path) -> None:
    write_text_atomically(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX: the directory entry is data of the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)
