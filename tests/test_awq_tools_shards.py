"""awq_tools.shards.copy_file_atomically: the tokenizer and processor files copied into a quantized checkpoint are
whole or absent. The copy goes to a temporary name, is fsynced, then renamed; a copy that fails midway leaves
neither the destination nor the temporary file."""

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
