"""The dtype a model runs in on CPU when the user does not pass ``--dtype``: bfloat16 where the CPU
computes it natively, float32 where bfloat16 would be emulated; AWQ (W4A16) checkpoints bfloat16
everywhere.

Why (benchmarks/bench_cpu.py and the microbenchmarks behind issue 13):

* With AVX512-BF16 or AMX-BF16 (x86) or BF16 (Arm ``FEAT_BF16``) the dense bfloat16 GEMMs run on
  bfloat16 instructions: 2-8x float32's speed at prefill, and decode reads half the bytes.
* Without them (AVX2, AVX-512 before Cooper Lake) PyTorch/oneDNN convert bfloat16 to float32 in
  software: a dense bfloat16 linear measured 2-3x slower than float32 on an AVX2 machine.
* W4A16 is the exception: the library int4 kernels (``quant_cpu.py``) are vectorised for bfloat16
  activations only (float32 runs PyTorch's scalar loop, 10-100x slower), so an AWQ checkpoint runs in
  bfloat16 even where bfloat16 is emulated for the rest of the model.

float16 is never chosen: no CPU int4 or dense path here is faster in float16 than in bfloat16.
"""

from __future__ import annotations

import platform
from typing import NamedTuple

__all__ = ["CpuDtypeChoice", "choose_cpu_dtype", "bf16_hardware"]

# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean bfloat16 arithmetic in hardware
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


class CpuDtypeChoice(NamedTuple):
    dtype: str  # a --dtype value
    reason: str  # one line for the log


def bf16_hardware(cpuinfo: str | None = None) -> tuple[bool, str]:
    """(whether the CPU has bfloat16 arithmetic, the evidence). Reads /proc/cpuinfo (or `cpuinfo`);
    where there is none, asks PyTorch."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if flags:
        found = [f for f in BF16_FLAGS if f in flags]
        return bool(found), (f"CPU flags {' '.join(found)}" if found else
                             f"no {'/'.join(BF16_FLAGS)} in the CPU flags ({_isa_summary(flags)})")
    try:
        import torch

        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return True, "PyTorch reports AVX512-BF16/AMX"
    except (ImportError, AttributeError):
        pass
    return False, f"no CPU flags readable on {platform.system() or 'this system'}"


def choose_cpu_dtype(requested: str | None = None, *, quantized: bool = False,
                     cpuinfo: str | None = None) -> CpuDtypeChoice:
    """The --dtype for a CPU server. `requested`: the user's --dtype (None or "auto": choose);
    `quantized`: the checkpoint is AWQ W4A16."""
    if requested and requested != "auto":
        return CpuDtypeChoice(requested, f"--dtype {requested} as given")
    native, evidence = bf16_hardware(cpuinfo)
    if native:
        return CpuDtypeChoice("bfloat16", f"bfloat16: native bfloat16 arithmetic ({evidence})")
    if quantized:
        return CpuDtypeChoice("bfloat16", f"bfloat16 although emulated ({evidence}): the CPU int4 kernels of "
                                          "W4A16 are vectorised for bfloat16 only")
    return CpuDtypeChoice("float32", f"float32: bfloat16 would be emulated ({evidence}), float32 is faster; "
                                     "--dtype bfloat16 halves the weights' memory")


def _isa_summary(flags: set[str]) -> str:
    best = [f for f in ("avx512f", "avx2", "asimd", "sve") if f in flags]
    return f"has {best[0]}" if best else "no SIMD flags known here"
