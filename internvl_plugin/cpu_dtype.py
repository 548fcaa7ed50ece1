"""The dtype a model runs in on CPU when the user does not pass ``--dtype``: bfloat16 where the CPU
computes it natively, float32 where bfloat16 would be emulated; AWQ (W4A16) checkpoints bfloat16
everywhere.

Why (measured on a 2-core Sapphire Rapids VM; "AVX2" = the same CPU with PyTorch, oneDNN and MKL
capped to AVX2 through ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS):

* With AVX512-BF16 or AMX-BF16 (x86) or BF16 (Arm ``FEAT_BF16``) bfloat16 GEMMs run on bfloat16
  instructions. vLLM, InternLM2-1.8B shapes (benchmarks/bench_cpu.py): bfloat16 decodes 1.8x (batch 1)
  and 2.2x (batch 8) float32's speed and fills a 1024-token prompt 4.3x faster; float16 is within 10% of
  float32 there.
* Without them PyTorch/oneDNN convert bfloat16 in software. One decoder layer's linears, AVX2:
  bfloat16 vs float32 7.6 vs 9.0 ms at 1 row (half the bytes), 32.6 vs 20.5 at 8 rows, 236 vs 57 at 64.
* W4A16 is the exception: PyTorch's int4 kernel (``quant_cpu.py``) is vectorised for bfloat16
  activations only; with float32 it runs a scalar loop (AVX2: 56 ms a layer at 1 row against 3.5 in
  bfloat16, 2.6x faster than dense float32), so an AWQ checkpoint runs in bfloat16 even where bfloat16
  is emulated for the rest of the model.

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
