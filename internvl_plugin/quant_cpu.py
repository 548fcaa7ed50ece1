"""The CPU matmul of ``awq_w4a16``: AWQ weights repacked once, after loading, into one library int4
kernel's format, and the operator that runs it.

The kernels are library code; this module converts layouts, probes what runs here, and dispatches.

``w4a8-amx``   vLLM's int4 GEMM with 8-bit activations (``_C.int4_scaled_mm_cpu``, from SGLang; what
               stock ``--quantization awq`` runs on CPU by default, ``VLLM_CPU_INT4_W4A8=1``), in vLLM's
               AVX-512 builds, used (as stock does) only with bfloat16 activations on an AMX CPU.
               ``_C.convert_weight_packed_scale_zp`` turns AWQ's tensors into blocks of 32 output
               columns: uint8 weights with a per-column int32 compensation per K block, int8 zero
               points and float32 scales [N/32, K/G, 32] (0.57 bytes a weight at G = 128, 0.78 at 32).
               Each call quantizes the activations per row to int8 (symmetric: step max|x| / 127),
               multiplies them with the zero-point-corrected weights in int32 (exact), then scales by
               the row's and the group's scales in float32. So the weights are exact; the only error is
               the activations' 8-bit rounding, at most max|x| / 254 an input (tests/test_quant_cpu.py
               holds it to that bound; the engine tests measure the logprob drift). VNNI dot products for few rows, AMX for many: the fastest at every row count
               measured here. Needs N % 32 == 0 and G in {32, 64, 128, 256} (G = 192 computes garbage).
``int4pack``   PyTorch's CPU int4 GEMM (``aten._convert_weight_to_int4pack_for_cpu`` +
               ``aten._weight_int4pack_mm_for_cpu``; what gpt-fast and torchao run on CPU). Weight
               uint8 [N, K/2] in the kernel's own blocked order; per group and column a
               (scale, zero') pair [K/G, N, 2] in the activations' dtype, dequantizing
               ``w = (q - 8) * scale + zero'``. AWQ's ``w = (q - z) * s`` is the same with
               ``zero' = (8 - z) * s``: exact in float32 for the 16-bit scales checkpoints store (s has
               at most 11 significant bits, 8 - z at most 4, so zero' and every partial result are
               representable); in bfloat16 zero' is rounded to 8 significant bits (by at most
               |8 - z| * s / 256: under 1/32 of a quantization step).
               Vectorised (AVX2, AVX-512, NEON) for bfloat16 activations only; float32 and float16
               run a scalar loop, 10-100x slower. Fast when few rows: it dequantizes in registers,
               so its cost grows with the rows (at 64 rows 10x a dense bfloat16 GEMM with AMX).
               Needs N % 16 == 0 and G in {32, 64, 128, 256}. The kernel for float32 (exact) and
               for machines without vLLM's AVX-512 kernels (AVX2, Arm).
``wna16``      vLLM's CPUWNA16 with 16-bit activations (``_C.cpu_gemm_wna16``), in vLLM's AVX-512
               builds. Weight int32 [N/16, 2K] (for each block of 16 output columns and each k, 16
               nibbles in natural order), zero points int32 [K/G, N/8] (natural order), scales [K/G, N].
               Each call dequantizes L2-sized column slices to the activations' dtype and multiplies
               them: AMX tiles for bfloat16 where the CPU has them (``wna16-amx``), else AVX-512
               (``wna16-vec``). Its cost hardly depends on the rows (at one row 3-4x int4pack's).
               bfloat16 and float16 only; needs K and N multiples of 32 and an even G.

Each layer keeps one format (``KERNELS`` names them; a plan is one kernel): the AWQ tensors are freed as
soon as the layer is converted, and nothing else is kept. Then glibc is asked to hand the freed pages
back (``malloc_trim``): its mmap threshold rises after the first large free, so the loader's later AWQ
tensors come from the heap, which keeps their pages after they are freed (0.49 GiB of the 1.8B's 24
layers, measured with benchmarks/bench_cpu.py).

``choose_plan`` takes the first plan of ``PREFERENCE[dtype]`` that the probe found working in this
process and that takes the layer's shape; ``VLLM_INTERNVL_CPU_INT4=<plan>`` puts one first (e.g.
``int4pack`` for bfloat16 without the int8 rounding of the activations). The probe
(``available_kernels``) calls each operator on a tiny layer and compares the result with the float
reference: an operator missing from the build, or one that computes something else, is not used. A
layer no plan takes gets ``None`` (the caller's dense fallback).

The preference, measured with benchmarks/bench_cpu.py (InternLM2-1.8B shapes, 24 layers, bfloat16, a
2-core Sapphire Rapids VM with AMX shared with other work; decode tokens/s at batch 1 / batch 8, time to
first token of 1024 tokens; benchmarks/README.md has the runs and their load):

    dense bfloat16          5.4 / 40.8    2.83 s
    w4a8-amx                11.6 / 61.8   2.67 s    (stock --quantization awq, the same kernel: 11.6 / 62.6, 2.84 s)
    int4pack                10.6 / 37.6   20.0 s    (an earlier run; wna16-amx there: 4.3 / 32.7, 2.63 s)
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch

from internvl_kernels import dequantize_awq, unpack_awq_int4

__all__ = ["KERNELS", "PREFERENCE", "CpuInt4Weight", "available_kernels", "choose_plan", "plan_accepts",
           "pack_awq", "cpu_int4_mm", "cpu_int4_linear", "repack_layer", "apply_layer", "activation_bound"]

logger = logging.getLogger(f"vllm.{__name__}")

KERNELS = ("w4a8-amx", "int4pack", "wna16-amx", "wna16-vec")
PREFERENCE: dict[torch.dtype, tuple[str, ...]] = {
    # int4pack before wna16: faster at few rows, and wna16-vec (AVX-512 without AMX) measured behind it at
    # every row count; wna16 only for shapes int4pack refuses (e.g. G = 96)
    torch.bfloat16: ("w4a8-amx", "int4pack", "wna16-amx", "wna16-vec"),
    torch.float16: ("wna16-vec", "int4pack"),  # int4pack has no vectorised float16 path
    torch.float32: ("int4pack",),  # the only float32 kernel (scalar; exact)
}
ENV_PLAN = "VLLM_INTERNVL_CPU_INT4"
# Output columns converted at a time: bounds the temporary int32 copy of the 4-bit values (4 K bytes a
# column); a multiple of every kernel's column block (int4pack 64, wna16 16, w4a8 32).
CHUNK = 1024
NAMESPACE = "internvl_cpu"
_LOGGED: set = set()


class CpuInt4Weight(NamedTuple):
    """One layer's weight in the format of a plan (``pack_awq``)."""

    plan: str
    weight: torch.Tensor  # int4pack: uint8 [N, K/2]; wna16: int32 [N/16, 2K]; w4a8: uint8 [N/32, K/Bk, ...]
    scales: torch.Tensor  # int4pack: [K/G, N, 2] (scale, zero'); wna16: [K/G, N]; w4a8: float32 [N/32, K/G, 32]
    zeros: torch.Tensor | None  # int4pack: None; wna16: int32 [K/G, N/8]; w4a8: int8 [N/32, K/G, 32]


def plan_accepts(plan: str, k: int, n: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether `plan`'s kernel takes K inputs, N outputs, group size G, `dtype` activations."""
    _check_plan(plan)
    if plan == "w4a8-amx":
        return dtype == torch.bfloat16 and n % 32 == 0 and group_size in (32, 64, 128, 256) and k % group_size == 0
    if plan == "int4pack":
        return n % 16 == 0 and group_size in (32, 64, 128, 256) and k % group_size == 0
    if plan == "wna16-amx" and dtype != torch.bfloat16:
        return False  # vLLM's AMX micro-GEMM takes bfloat16 only (with float16 it aborts the process)
    return dtype in (torch.bfloat16, torch.float16) and k % 32 == 0 and n % 32 == 0 and group_size % 2 == 0


def choose_plan(k: int, n: int, group_size: int, dtype: torch.dtype) -> str | None:
    """The plan for a layer: the first of PREFERENCE[dtype] (the env override first) whose kernel works
    here and takes the shape; None when none does."""
    order = list(PREFERENCE.get(dtype, ()))
    forced = os.environ.get(ENV_PLAN, "").strip()
    if forced:
        _check_plan(forced)  # a one-line error for an unknown name
        order = [forced] + [p for p in order if p != forced]
    working = available_kernels(dtype)
    for plan in order:
        if plan in working and plan_accepts(plan, k, n, group_size, dtype):
            return plan
    return None


@functools.cache
def available_kernels(dtype: torch.dtype) -> tuple[str, ...]:
    """The kernels whose operator exists in this process and reproduces the float reference on a tiny
    layer with `dtype` activations (probed once per process and dtype)."""
    working = []
    for kernel in KERNELS:
        ok, why = _probe(kernel, dtype)
        logger.debug("CPU int4 kernel %s with %s activations: %s", kernel, dtype, why)
        if ok:
            working.append(kernel)
    return tuple(working)


def pack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, plan: str,
             dtype: torch.dtype | None = None) -> CpuInt4Weight:
    """Convert AWQ gemm tensors (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales [K/G, N]) to the
    format of `plan` for activations in `dtype` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    k, n = qweight.shape[0], scales.shape[1]
    if not plan_accepts(plan, k, n, group_size, dtype):
        raise ValueError(f"CPU int4 plan {plan} does not take K={k}, N={n}, group_size={group_size}, {dtype}")
    if plan == "int4pack":
        return CpuInt4Weight(plan, *_pack_int4pack(qweight, qzeros, scales, dtype), None)
    if plan == "w4a8-amx":
        # vLLM's own conversion (the AWQ nibble order is what its AWQ mode reads)
        weight, zeros, scales = torch.ops._C.convert_weight_packed_scale_zp(
            qweight.contiguous(), qzeros.contiguous(), scales.to(dtype).contiguous(), 0)  # 0: CPUQuantAlgo.AWQ
        return CpuInt4Weight(plan, weight, scales, zeros)
    return CpuInt4Weight(plan, *_pack_wna16(qweight, qzeros, scales, dtype))


def activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The largest error w4a8's 8-bit activations can add to x [..., K] @ w [K, N] (float32, per output):
    each input moves by at most half a step, max|x| / 127 / 2 of its row, times sum_k |w|."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    return (x2.abs().amax(-1, keepdim=True) / 254) * w.float().abs().sum(0)


def cpu_int4_linear(x: torch.Tensor, w: CpuInt4Weight, group_size: int, bias: torch.Tensor | None = None):
    """x [..., K] @ W + bias with W from ``pack_awq``: the operator ``torch.ops.internvl_cpu.int4_mm``."""
    return cpu_int4_mm(x, w.plan, w.weight, w.scales, w.zeros, group_size, bias)


def repack_layer(layer: torch.nn.Module, group_size: int, plan: str) -> None:
    """Replace a layer's AWQ parameters (qweight, qzeros, scales) by the format of `plan` (parameters
    ``cpu_int4_weight``, ``cpu_int4_scales``, ``cpu_int4_zeros``); ``layer.cpu_int4_plan`` names the plan."""
    w = pack_awq(layer.qweight.data, layer.qzeros.data, layer.scales.data, group_size, plan)
    dtype = layer.scales.dtype
    if (plan, dtype) not in _LOGGED:
        _LOGGED.add((plan, dtype))
        logger.info("awq_w4a16 on CPU: %s with %s activations (kernels that run here: %s)", plan,
                    str(dtype).removeprefix("torch."), ", ".join(available_kernels(dtype)))
    del layer.qweight, layer.qzeros, layer.scales
    for name in ("weight", "scales", "zeros"):
        tensor = getattr(w, name)
        if tensor is not None:
            layer.register_parameter("cpu_int4_" + name, torch.nn.Parameter(tensor, requires_grad=False))
    layer.cpu_int4_plan = plan
    _release_freed_heap()


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_heap() -> None:
    """Give the heap pages freed AWQ tensors leave back to the OS (module docstring)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def apply_layer(layer: torch.nn.Module, x: torch.Tensor, group_size: int, bias: torch.Tensor | None = None):
    """The matmul of a layer that ``repack_layer`` converted."""
    if layer.cpu_int4_plan == "w4a8-amx":
        # vLLM's C++ operator called directly, as stock's apply does (it has a fake for torch.compile): the
        # Python operator around it costs a few microseconds a call, about 1% of a 4-layer decode step
        return _w4a8_mm(x, layer.cpu_int4_weight, layer.cpu_int4_scales, layer.cpu_int4_zeros, bias)
    return cpu_int4_mm(x, layer.cpu_int4_plan, layer.cpu_int4_weight, layer.cpu_int4_scales,
                       getattr(layer, "cpu_int4_zeros", None), group_size, bias)


def _check_plan(plan: str) -> None:
    if plan not in KERNELS:
        raise ValueError(f"{ENV_PLAN}={plan!r}: choose one of {', '.join(KERNELS)}")


# ----------------------------------------------------------------------------------------- packing


def _columns(n: int):
    """(AWQ word slice, column slice) of CHUNK output columns at a time."""
    for c0 in range(0, n, CHUNK):
        c1 = min(n, c0 + CHUNK)
        yield slice(c0 // 8, c1 // 8), slice(c0, c1)


def _pack_int4pack(qweight, qzeros, scales, dtype):
    # The packed layout is blocked along N (64 columns on AVX-512, 32 on AVX2), so column chunks that
    # are multiples of the block pack independently (the tests check chunked == whole).
    parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_awq_int4(qweight[:, words]).t().contiguous(), 1)
             for words, _ in _columns(scales.shape[1])]
    weight = parts[0] if len(parts) == 1 else torch.cat(parts)
    s = scales.to(torch.float32)
    zero = (8.0 - unpack_awq_int4(qzeros).to(torch.float32)) * s
    return weight, torch.stack([s, zero], dim=-1).to(dtype).contiguous()


def _natural_pack(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] values 0..15 -> int32 [R, C/8], nibble i of word c holding column 8c + i."""
    v = values.to(torch.int64).view(values.shape[0], -1, 8)
    word = (v << (4 * torch.arange(8, dtype=torch.int64))).sum(dim=-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _pack_wna16(qweight, qzeros, scales, dtype):
    k, n = qweight.shape[0], scales.shape[1]
    weight = torch.empty((n // 16, 2 * k), dtype=torch.int32)
    for words, cols in _columns(n):
        natural = _natural_pack(unpack_awq_int4(qweight[:, words]))  # [K, c/8]
        # blocks of 16 columns, each block's K pairs of words contiguous (vLLM's CPUWNA16 layout)
        weight[cols.start // 16: cols.stop // 16] = natural.view(k, -1, 2).permute(1, 0, 2).reshape(-1, 2 * k)
    return weight, scales.to(dtype).contiguous(), _natural_pack(unpack_awq_int4(qzeros))


# ----------------------------------------------------------------------------------------- operator


def _out_features(plan: str, weight: torch.Tensor, scales: torch.Tensor) -> int:
    if plan == "int4pack":
        return weight.shape[0]
    if plan == "w4a8-amx":
        return scales.shape[0] * scales.shape[-1]
    return scales.shape[1]


def _int4_mm_impl(x, plan, weight, scales, zeros, group_size, bias):
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    n = _out_features(plan, weight, scales)
    if plan == "int4pack":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group_size, scales)
        if bias is not None:
            y = y + bias
    elif plan == "w4a8-amx":
        return _w4a8_mm(x, weight, scales, zeros, bias)
    else:
        y = torch.empty((x2.shape[0], n), dtype=x.dtype)
        torch.ops._C.cpu_gemm_wna16(x2, weight, y, scales, zeros, bias, 8, plan.removeprefix("wna16-"))
    return y.view(*x.shape[:-1], n)


def _w4a8_mm(x, weight, scales, zeros, bias):
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops._C.int4_scaled_mm_cpu(x2, weight, zeros, scales, None if bias is None else bias.float())
    return y.view(*x.shape[:-1], y.shape[-1])


def _int4_mm_fake(x, plan, weight, scales, zeros, group_size, bias):
    return x.new_empty((*x.shape[:-1], _out_features(plan, weight, scales)))


def _registered() -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), "int4_mm")
        return True
    except (AttributeError, RuntimeError):
        return False


# An operator, so that vLLM's torch.compile traces one opaque call; registered through
# torch.library.Library, whose CPU dispatch calls the Python function directly (a few microseconds a call).
if not _registered():
    _LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
    _LIB.define("int4_mm(Tensor x, str plan, Tensor weight, Tensor scales, Tensor? zeros, int group_size, "
                "Tensor? bias) -> Tensor")
    _LIB.impl("int4_mm", _int4_mm_impl, "CPU")
    torch.library.register_fake(f"{NAMESPACE}::int4_mm", _int4_mm_fake, lib=_LIB)

cpu_int4_mm = torch.ops.internvl_cpu.int4_mm


# ----------------------------------------------------------------------------------------- probe


def _load_vllm_cpu_ops() -> None:
    """vLLM loads its CPU extension (``vllm._C``, ``_C_AVX512`` or ``_C_AVX2``, by the CPU) in its
    workers; outside them (tests, benchmarks) this does the same."""
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            current_platform.import_kernels()
    except Exception as e:  # no vLLM, or a build without CPU kernels: only the PyTorch kernel is left
        logger.debug("vLLM CPU kernels not loaded: %r", e)


_VLLM_OPS = {"w4a8-amx": ("int4_scaled_mm_cpu", "convert_weight_packed_scale_zp"),
             "wna16-amx": ("cpu_gemm_wna16",), "wna16-vec": ("cpu_gemm_wna16",)}


def _probe(kernel: str, dtype: torch.dtype) -> tuple[bool, str]:
    k, n, group_size = 128, 64, 32
    if not plan_accepts(kernel, k, n, group_size, dtype):
        return False, "not for this dtype"
    if kernel in _VLLM_OPS:
        _load_vllm_cpu_ops()
        missing = [op for op in _VLLM_OPS[kernel] if not hasattr(torch.ops._C, op)]
        if missing:
            return False, f"this vLLM build has no _C.{missing[0]}"
        if kernel.endswith("-amx") and not torch.cpu._is_amx_tile_supported():
            return False, "no AMX tiles on this CPU (or not enabled by the OS)"  # AMX would fault
    from internvl_kernels import quantize_awq

    gen = torch.Generator().manual_seed(0)
    qweight, qzeros, scales = quantize_awq(torch.randn(n, k, generator=gen), group_size, scale_dtype=dtype)
    x = torch.randn(3, k, generator=gen).to(dtype)
    try:
        y = cpu_int4_linear(x, pack_awq(qweight, qzeros, scales, group_size, kernel, dtype), group_size)
    except Exception as e:
        return False, f"failed: {str(e).splitlines()[0][:200] if str(e) else repr(e)}"
    ref = x.float() @ dequantize_awq(qweight, qzeros, scales, group_size, dtype=torch.float32)
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    if not err <= tolerance:  # also catches NaN
        return False, f"wrong results (max error {err:.2g} of the largest output, tolerance {tolerance:g})"
    return True, f"works (max error {err:.2g} of the largest output)"
