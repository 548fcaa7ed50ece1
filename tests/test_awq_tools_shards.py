"""awq_tools.shards' atomic writers: the shards, JSON files and the tokenizer and processor files of a quantized
checkpoint are whole or absent. Each goes to a temporary name, is fsynced, then renamed; a write that fails
midway leaves neither the destination nor the temporary file."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from awq_tools import shards

DATA = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit: more than one read of any copy loop


def _src(tmp_path):
    src = tmp_path / "src" / "tokenizer.model"
    src.parent.mkdir()
    src.write_bytes(DATA)
    return src


def test_the_copy_has_the_source_bytes_and_no_temporary_file(tmp_path):
    src, out = _src(tmp_path), tmp_path / "out"
    out.mkdir()
    shards.copy_file_atomically(src, out / "tokenizer.model")
    assert (out / "tokenizer.model").read_bytes() == DATA
    assert [p.name for p in out.iterdir()] == ["tokenizer.model"]


def test_the_written_file_is_fsynced_whole_before_the_rename(tmp_path, monkeypatch):
    src, out = _src(tmp_path), tmp_path / "out"
    out.mkdir()
    dst, tmp = out / "tokenizer.model", out / "tokenizer.model.tmp"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", target, open(target, "rb").read() if os.path.isfile(target) else None))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.fspath(a), os.fspath(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    shards.copy_file_atomically(src, dst)
    # the temporary file, holding every byte, is fsynced; then renamed; then the folder's entry is made durable
    assert events == [("fsync", str(tmp), DATA), ("replace", str(tmp), str(dst)), ("fsync", str(out), None)]


def _half_copy(src, dst, **_):
    with open(src, "rb") as r, open(dst, "wb") as w:
        w.write(r.read(len(DATA) // 2))
    raise OSError(errno.ENOSPC, "No space left on device")


def _failing_fsync(fd):
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("fail", ["copy-midway", "fsync"])
def test_a_failed_copy_leaves_neither_the_file_nor_a_temporary(fail, tmp_path, monkeypatch):
    src, out = _src(tmp_path), tmp_path / "out"
    out.mkdir()
    if fail == "copy-midway":
        monkeypatch.setattr(shutil, "copy2", _half_copy)
    else:
        monkeypatch.setattr(os, "fsync", _failing_fsync)
    with pytest.raises(OSError, match="No space left" if fail == "copy-midway" else "Input/output error"):
        shards.copy_file_atomically(src, out / "tokenizer.model")
    assert list(out.iterdir()) == []
    assert src.read_bytes() == DATA


def _half_save(tensors, filename, metadata=None):
    with open(filename, "wb") as w:
        w.write(b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", ["shard", "text"])
def test_a_failed_shard_or_text_write_leaves_neither_the_file_nor_a_temporary(writer, tmp_path, monkeypatch):
    import torch

    if writer == "shard":
        monkeypatch.setattr(shards, "save_file", _half_save)
        call = lambda: shards.save_shard_atomically({"w": torch.ones(4)}, tmp_path / "model.safetensors")  # noqa
    else:
        monkeypatch.setattr(os, "fsync", _failing_fsync)
        call = lambda: shards.write_text_atomically("{}", tmp_path / "config.json")  # noqa: E731
    with pytest.raises(OSError):
        call()
    assert list(tmp_path.iterdir()) == []


def test_a_shard_and_a_text_file_are_written_whole(tmp_path):
    import torch
    from safetensors.torch import load_file

    shards.save_shard_atomically({"w": torch.arange(6.0).view(2, 3)}, tmp_path / "model.safetensors")
    shards.write_text_atomically("héllo\n", tmp_path / "a.txt")
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], torch.arange(6.0).view(2, 3))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "model.safetensors"]
