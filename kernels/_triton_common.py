"""Launcher and Triton helpers shared by the W4A16 kernels (w4a16.py): I/O checks, split-K, constants.

Private to the package. The split-K scheme: when the output alone would not give every multiprocessor
enough programs, K is split; each split writes fp32 partial sums to a [split, M, N] workspace that
_splitk_reduce_kernel sums (with the bias) into the output, so results are deterministic.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch references and the packing need no Triton
    triton = None


def _prepare_io(name: str, x, k: int, n: int, bias, out):
    """Check x [..., K] (fp16/bf16), bias [N] and out against the weight's K and N; return
    (leading dims of x, x as a [M, K] view with unit stride, out as a [M, N] view, allocated if None)."""
    if x.shape[-1] != k:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, the weight expects K={k}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: x must be float16 or bfloat16, got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{name}: bias must have shape ({n},), got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.dtype != x.dtype or out.numel() != m * n or not out.is_contiguous():
        raise ValueError(f"{name}: out must be a contiguous {x.dtype} tensor of {m}x{n} elements")
    return lead, x2, out.view(m, n)


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: small grids, still split
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _waves_split(split_k: int, waves: float, programs: int, k_steps: int, device) -> int:
    """How many ways to split K: split_k if given, else enough programs for `waves` per
    multiprocessor, each keeping at least two K steps."""
    if split_k:
        return max(1, min(split_k, k_steps))
    want = int(waves * _sm_count(device))
    if programs >= want:
        return 1
    return max(1, min(-(-want // programs), k_steps // 2))


def _split_dest(out, split: int, k_steps: int):
    """(split, K steps per split, destination): the split evened out so no program is empty, and
    out itself or a fp32 [split, M, N] workspace for _reduce_partials."""
    per_split = triton.cdiv(k_steps, split)
    split = triton.cdiv(k_steps, per_split)
    m, n = out.shape
    dest = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=out.device)
    return split, per_split, dest


def _magic(dtype) -> float:
    """MAGIC for x.dtype: the power of two whose low mantissa bits _byte_pair fills with q (MAGIC + q
    exact), 2**7 for bf16 and 2**10 for fp16. Passed to the kernels as a constexpr argument."""
    return 128.0 if dtype == torch.bfloat16 else 1024.0


def _dense_matmul(x, w, bias, out):
    """out = x @ w (+ bias) through cuBLAS, w [K, N] dense in x.dtype (any strides)."""
    if bias is not None:
        torch.addmm(bias.to(x.dtype), x, w, out=out)
    else:
        torch.matmul(x, w, out=out)


def _reduce_partials(partials, bias, out):
    split, m, n = partials.shape
    split_p2 = triton.next_power_of_2(split)
    # All of a column's partial sums in one [split, block] tile: one load round trip per program.
    block = max(16, min(1024, 4096 // split_p2))
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        partials, bias if bias is not None else partials, out, m * n, n, split,
        HAS_BIAS=bias is not None, SPLIT=split_p2, BLOCK=block, num_warps=4,
    )


if triton is not None:

    @triton.jit
    def _store_out(ptrs, acc, mask, bias_ptrs, bias_mask, HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr):
        """Every kernel's fp32 result: as it is (WRITE_PARTIAL: ptrs point into the split's slice of
        the workspace), else plus the bias (bias_ptrs broadcast against acc), in the output's dtype."""
        if WRITE_PARTIAL:
            tl.store(ptrs, acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptrs, mask=bias_mask, other=0.0).to(tl.float32)
            tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _byte_pair(wt, BYTE: tl.constexpr, BF16: tl.constexpr, USE_ASM: tl.constexpr):
        """Nibbles 2*BYTE and 2*BYTE+1 of every word of wt, each as MAGIC + q in bf16 (BF16, MAGIC =
        128) or fp16 (MAGIC = 1024): the smallest power of two whose unit in the last place is 1,
        so MAGIC + q is exact. Elementwise; on the GPU two words go through one asm block (pack=2):
        PRMT puts byte BYTE of both words in the two halves of a register, and one LOP3 per nibble
        ORs it under the bits of MAGIC, which gives both 16-bit values in one register."""
        if USE_ASM:
            if BYTE == 0:
                SEL: tl.constexpr = "0x4400"
            elif BYTE == 1:
                SEL: tl.constexpr = "0x5511"
            elif BYTE == 2:
                SEL: tl.constexpr = "0x6622"
            else:
                SEL: tl.constexpr = "0x7733"
            if BF16:
                BITS: tl.constexpr = "0x43004300"
            else:
                BITS: tl.constexpr = "0x64006400"
            ASM: tl.constexpr = ("{ .reg .b32 t, u; prmt.b32 t, $2, $3, " + SEL + "; "
                                 "lop3.b32 $0, t, 0x000F000F, " + BITS + ", 0xea; "
                                 "shr.u32 u, t, 4; lop3.b32 $1, u, 0x000F000F, " + BITS + ", 0xea; }")
            if BF16:
                lo, hi = tl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,r,r", args=[wt],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
            else:
                lo, hi = tl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,r,r", args=[wt],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
        else:
            if BF16:
                MAGIC: tl.constexpr = 128
                DTYPE: tl.constexpr = tl.bfloat16
            else:
                MAGIC: tl.constexpr = 1024
                DTYPE: tl.constexpr = tl.float16
            # (through fp32: the interpreter converts int32 to bf16 wrongly)
            lo = (((wt >> (8 * BYTE)) & 0xF) + MAGIC).to(tl.float32).to(DTYPE)
            hi = (((wt >> (8 * BYTE + 4)) & 0xF) + MAGIC).to(tl.float32).to(DTYPE)
        return lo, hi

    @triton.jit
    def _tc_dot(a, xt, acc, DOT_FP32: tl.constexpr):
        """tl.dot(a, xt, acc); acc None starts from zero."""
        if DOT_FP32:
            return tl.dot(a.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, xt, acc)

    @triton.jit
    def _magic_scaled(a, zm, s, DOT_FP32: tl.constexpr):
        """(q - z) * s in a's dtype from a = MAGIC + q and the per-row zm = MAGIC + z and s [rows]: the
        subtraction is exact, the product rounds once. (DOT_FP32, the interpreter: through fp32,
        exact until the cast: the same values.)"""
        if DOT_FP32:
            return ((a.to(tl.float32) - zm.to(tl.float32)[:, None]) * s.to(tl.float32)[:, None]).to(a.dtype)
        return (a - zm.to(a.dtype)[:, None]) * s.to(a.dtype)[:, None]

    @triton.jit
    def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, MN, N, split, HAS_BIAS: tl.constexpr,
                              SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """out = sum over the split of the fp32 partials [split, M*N] (+ bias), cast to out's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        rows = tl.arange(0, SPLIT)
        part = tl.load(part_ptr + rows[:, None].to(tl.int64) * MN + offs[None, :],
                       mask=(rows < split)[:, None] & mask[None, :], other=0.0)
        acc = tl.sum(part, axis=0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
