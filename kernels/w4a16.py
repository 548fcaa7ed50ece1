"""W4A16 matmul in Triton on the AWQ "gemm" format: y = x @ dequant(qweight, qzeros, scales) (+ bias).

Four paths, chosen from the number of rows M of x (tokens) and the width N by `pick_config`:

* `_gemv_kernel` (M <= GEMV_MAX_M, decode): CUDA-core split-K GEMV. A program covers 8 * BLOCK_W
  output columns, one row of x and a run of K "steps" (4 * BLOCK_K rows, never crossing a group).
  Its loads put one packed word per thread and all rows of a tile in the same thread, so every
  reduction stays in registers, and the four tiles of a step are loaded before any is used. A nibble
  becomes a float with one AND: masked in place it reads as the subnormal q * 2**(bit - 149), and x
  is pre-multiplied by 2**75 so the products land in the normal range; each weight costs one LOP3
  and one FMA (plus a shift per word for the two top nibbles). Scales and zero points are applied
  once per group and column:  sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k).
  Rows of x are a grid axis next to the columns, so the programs of one weight tile run together and
  share it through L2. The split is chosen to shorten the critical path (see _gemv_split).
* `_gemm_kernel` (up to 128 rows): tiled tl.dot GEMM (mma.sync for 16/32-row tiles, wgmma from 64).
  The [BLOCK_K, BLOCK_N/8] tile of words is dequantized nibble by nibble (constant shifts) and the
  eight results are joined into natural column order. With scale_after_dot the tile holds the exact
  integers (q - z) * 16**p (one AND+OR, one FADD a weight) and the scale multiplies the tile's fp32
  partial product; otherwise (q - z) * s is formed per weight (1.0-mantissa trick, one FMA).
* `_tc_kernel` (TcConfig; 3-8 rows, up to 16 rows when K * N >= 30M, up to 32 when >= 40M): tensor cores on the
  transposed product out^T = W^T x^T, one dot per nibble position, so the dequantized weight is the
  dot's first operand and stays in registers (no shared-memory round trip for it). The nibbles
  become 16-bit values with inline PTX, two words per asm block: a PRMT puts one byte of both words
  in the two halves of a register and one LOP3 per nibble ORs it under the exponent bits of MAGIC
  (128 for bf16, 1024 for fp16), giving MAGIC + q exactly; about 1 instruction per weight. Either
  each K tile's dot on MAGIC + q is closed in fp32 with the group's scale and zero point (exact
  until the output rounding), or (scale_in_a) the tile becomes (q - z) * s in x.dtype first and the
  dots accumulate over all of K. Large tiles split the word's byte lanes over sibling programs.
* `DequantConfig` (more rows): `_dequant_kernel` writes the dense weight in x.dtype, then cuBLAS;
  the dense copy is made and freed on every call.

The GEMV and GEMM split K when the output alone would not fill the GPU; the fp32 partial sums go to
a workspace that `_splitk_reduce_kernel` sums (with the bias) into the output, so results are
deterministic. Configurations are explicit tables below (GEMV_CONFIGS, GEMM_CONFIGS) with the shapes
they were tuned for. The plain-torch reference is awq_format.w4a16_matmul_ref.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .awq_format import check_awq_shapes, w4a16_matmul_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path (w4a16_linear) needs no Triton
    triton = None

__all__ = ["w4a16_matmul", "w4a16_linear", "GemvConfig", "GemmConfig", "TcConfig", "DequantConfig", "pick_config"]


def w4a16_matmul(x, qweight, qzeros, scales, group_size: int, bias=None, *, out=None, config=None):
    """x [..., K] (fp16/bf16) @ AWQ weight [K, N] -> [..., N] in x.dtype, through Triton.

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. `out` (contiguous, [M, N] or
    [..., N], x.dtype) receives the result; `config` (a GemvConfig or GemmConfig) overrides the
    table lookup, which benchmarks use to sweep.
    """
    if triton is None:
        raise RuntimeError("w4a16_matmul needs triton; use w4a16_linear for a CPU fallback")
    k, n = check_awq_shapes(qweight, qzeros, scales, group_size)
    lead, x2, out = _prepare_io("w4a16_matmul", x, k, n, bias, out)
    qweight, qzeros, scales = (t if t.stride(-1) == 1 else t.contiguous() for t in (qweight, qzeros, scales))
    m = x2.shape[0]
    if m == 0:
        return out.view(*lead, n)
    cfg = config or pick_config(m, n, k, group_size, x.device)
    if isinstance(cfg, GemvConfig):
        _launch_gemv(x2, qweight, qzeros, scales, group_size, bias, out, cfg)
    elif isinstance(cfg, DequantConfig):
        _dense_matmul(x2, _launch_dequant(qweight, qzeros, scales, group_size, x.dtype, cfg), bias, out)
    elif isinstance(cfg, TcConfig):
        _launch_tc(x2, qweight, qzeros, scales, group_size, bias, out, cfg)
    else:
        _launch_gemm(x2, qweight, qzeros, scales, group_size, bias, out, cfg)
    return out.view(*lead, n)


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


def w4a16_linear(x, qweight, qzeros, scales, group_size: int, bias=None):
    """The entry point for model code: Triton on CUDA fp16/bf16 tensors, else the torch reference.

    Stateless: the CPU path recomputes the float32 dequantization on every call (the reference math),
    so it is numerically identical to w4a16_matmul_ref.
    """
    if triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        # w4a16_matmul as a torch operator (ops.py): one opaque node under torch.compile
        return torch.ops.internvl_kernels.w4a16_awq_mm(x, qweight, qzeros, scales, group_size, bias)
    return w4a16_matmul_ref(x, qweight, qzeros, scales, group_size, bias)


# ------------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemvConfig:
    """The decode kernel: a program covers 32 * num_warps packed words (256 * num_warps columns)."""

    block_k: int = 8  # rows per load; a step loads 4 such tiles, and 4 * block_k divides the group size
    num_warps: int = 4
    split_k: int = 0  # 0: derived from the grid size and resident_warps (see _gemv_split)
    # Warps of this kernel that fit on one multiprocessor at once: Triton 3.6 gives it 164
    # registers a thread on sm_90, so 65536 / (164 * 32) -> 12.
    resident_warps: int = 12

    @property
    def block_w(self) -> int:
        return 32 * self.num_warps


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 64
    block_n: int = 128
    block_k: int = 64  # clipped to the group size
    num_warps: int = 4
    num_stages: int = 3
    # True: the tile is dequantized to the exact integers q - z and the scale multiplies each tile's
    # partial product (fewer operations per weight, one more per output element and K tile).
    # False: (q - z) * s is formed per weight and rounded to x.dtype before the dot.
    scale_after_dot: bool = True
    split_k: int = 0  # 0: derived from the grid size (see _gemm_split)


@dataclass(frozen=True)
class TcConfig:
    """The tensor-core kernel (_tc_kernel): out^T = W^T x^T, the weight as the register operand.

    A program covers block_m rows of x and 8 * block_w output columns (block_w packed words), for
    the byte lanes [byte0, byte0 + bytes) of every word: bytes=4 uses all eight nibbles, bytes=2 or 1
    leaves the other lanes to sibling programs that read the same words (through L2), which keeps
    the accumulators (8 * block_m * block_w / threads floats a thread) in registers for large M."""

    block_m: int = 16
    block_w: int = 64  # a multiple of 16 per warp (mma.sync) or 64 per 4 warps (wgmma)
    block_k: int = 64  # clipped to the group size
    num_warps: int = 4
    num_stages: int = 3
    bytes: int = 4
    # True: each weight is dequantized to (q - z) * s in x.dtype and the dots accumulate over all of
    # K; False: exact MAGIC + q tiles, each tile's dot closed with the scale in fp32 (_tc_close).
    scale_in_a: bool = True
    split_k: int = 0  # 0: derived from the grid size (see _waves_split)
    waves: float = 2.0  # programs per multiprocessor that _waves_split aims for
    maxnreg: int = 0  # 0: the compiler's choice; else a register cap (more programs per multiprocessor)


@dataclass(frozen=True)
class DequantConfig:
    """Large M: dequantize the whole weight to x.dtype with _dequant_kernel, then torch.matmul
    (cuBLAS). The dense copy is made on every call and freed after it; nothing is cached."""

    block_k: int = 64
    block_w: int = 32  # packed words per program (8 columns each)
    num_warps: int = 4


# Rows of x up to which the GEMV kernel is used.
GEMV_MAX_M = 2

# Tuned on one H100 80GB HBM3 (benchmarks/bench_w4a16.py --sweep, Triton 3.6) for the InternLM2-7B
# linears wo (K x N = 4096 x 4096), w13 (4096 x 28672) and w2 (14336 x 4096) at group size 128,
# bf16 activations; checked on the other 7B/20B shapes by the benchmark; the other group sizes and
# fp16 use the same tables.
GEMV_CONFIGS = {
    # M: config
    1: GemvConfig(block_k=8, num_warps=2),
    2: GemvConfig(block_k=8, num_warps=2),
}
# (largest M of the bucket, config), first match wins.
GEMM_CONFIGS = [
    (16, GemmConfig(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=3, scale_after_dot=True)),
    (32, GemmConfig(block_m=32, block_n=128, block_k=128, num_warps=4, num_stages=3, scale_after_dot=True)),
    (64, GemmConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3, scale_after_dot=True)),
    (128, GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3, scale_after_dot=False)),
    (1 << 62, DequantConfig(block_k=64, block_w=32, num_warps=8)),
]
# The tensor-core kernel, where it beat GEMM_CONFIGS on the H100 (benchmarks/tc_explore.py --fine,
# bf16, group 128; results/tc-explore-fine-h100.json): (largest M, smallest K * N, config). The
# configs are within 2% of the best of each M on 7B w13, w2, wo and 20B wo. From 3 to 8 rows on
# every shape (7B w13 M=4: 42 vs 75 us for the GEMM, wo 11 vs 15 us); up to 16 rows for weights of
# K * N >= 30M (w13 M=16: 44 vs 74 us, 20B wo: 24 vs 32 us), while on 7B wo (16.8M) the GEMM stays
# faster (M=16: 14.7 vs 16.2 us); 17-32 rows for K * N >= 40M (w13 M=32: 71 vs 92 us).
TC_CONFIGS = [
    (8, 0, TcConfig(block_m=16, block_w=32, block_k=64, num_warps=2, bytes=2, scale_in_a=False, waves=4.0)),
    (16, 30 << 20, TcConfig(block_m=16, block_w=32, block_k=128, num_warps=2, bytes=4, scale_in_a=False, waves=1.0)),
    (32, 40 << 20, TcConfig(block_m=32, block_w=32, block_k=64, num_warps=2, bytes=2, scale_in_a=True, waves=2.0)),
]


def pick_config(m: int, n: int, k: int, group_size: int, device):
    if m <= GEMV_MAX_M:
        return GEMV_CONFIGS[max(b for b in GEMV_CONFIGS if b <= m) if m >= 1 else 1]
    for bound, min_size, cfg in TC_CONFIGS:
        if m <= bound and k * n >= min_size:
            return cfg
    for bound, cfg in GEMM_CONFIGS:
        if m <= bound:
            return cfg
    raise AssertionError("unreachable")


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


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _gemv_split(cfg: GemvConfig, m: int, n: int, n_blocks: int, n_steps: int, device) -> int:
    """Split K into steps so that a program's critical path (waves x steps per program, each step
    one memory round trip) is shortest; every extra split writes and reads back m x n fp32 partial
    sums, charged at 0.05 step per 4096 columns (tuned: more splits also cost scheduling)."""
    if cfg.split_k:
        return max(1, min(cfg.split_k, n_steps))
    resident = _sm_count(device) * max(1, cfg.resident_warps // cfg.num_warps)
    best = None
    for split in range(1, n_steps + 1):
        per = -(-n_steps // split)
        split_eff = -(-n_steps // per)
        waves = -(-(m * n_blocks * split_eff) // resident)
        cost = (waves * per + 0.05 * split_eff * m * n / 4096, split_eff)
        if best is None or cost < best:
            best = cost
    return best[1]


def _launch_gemv(x, qweight, qzeros, scales, group_size, bias, out, cfg: GemvConfig):
    m, k = x.shape
    n = out.shape[1]
    block_k = cfg.block_k
    if group_size % (4 * block_k):
        raise ValueError(f"GEMV: 4 * block_k={block_k} must divide group_size={group_size}")
    n_steps = k // (4 * block_k)
    n_blocks = triton.cdiv(n // 8, cfg.block_w)
    split = _gemv_split(cfg, m, n, n_blocks, n_steps, x.device)
    split, per_split, dest = _split_dest(out, split, n_steps)
    _gemv_kernel[(m, n_blocks, split)](
        x, qweight, qzeros, scales, bias if bias is not None else scales, dest,
        n, x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), n, m * n,
        per_split, n_steps,
        GROUP_SIZE=group_size, BLOCK_K=block_k, BLOCK_W=cfg.block_w,
        HAS_BIAS=bias is not None and split == 1, WRITE_PARTIAL=split > 1,
        num_warps=cfg.num_warps,
    )
    if split > 1:
        _reduce_partials(dest, bias, out)


def _gemm_split(cfg: GemmConfig, tiles: int, k_tiles: int, device) -> int:
    if cfg.split_k:
        return max(1, min(cfg.split_k, k_tiles))
    sms = _sm_count(device)
    if tiles >= sms:
        return 1
    # Enough programs to cover the GPU twice, each keeping at least 4 K tiles.
    return max(1, min(-(-2 * sms // tiles), k_tiles // 4))


def _launch_gemm(x, qweight, qzeros, scales, group_size, bias, out, cfg: GemmConfig):
    m, k = x.shape
    n = out.shape[1]
    block_k = min(cfg.block_k, group_size)
    if group_size % block_k:
        raise ValueError(f"GEMM block_k={block_k} must divide group_size={group_size}")
    k_tiles = k // block_k
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split, per_split, dest = _split_dest(out, _gemm_split(cfg, tiles, k_tiles, x.device), k_tiles)
    _gemm_kernel[(tiles, split)](
        x, qweight, qzeros, scales, bias if bias is not None else scales, dest,
        m, n, k, x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), n, m * n,
        per_split * block_k,
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None and split == 1, WRITE_PARTIAL=split > 1,
        # Triton 3.9's interpreter computes bf16 tl.dot wrongly (it multiplies the raw bits); there the
        # bf16 operands are widened to fp32 first, which is exact, so the numerics are unchanged.
        DOT_FP32=_interpreting() and x.dtype == torch.bfloat16, SCALE_AFTER_DOT=cfg.scale_after_dot,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        _reduce_partials(dest, bias, out)


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


def _launch_tc(x, qweight, qzeros, scales, group_size, bias, out, cfg: TcConfig):
    m, k = x.shape
    n = out.shape[1]
    if cfg.bytes not in (1, 2, 4):
        raise ValueError(f"tensor-core kernel: TcConfig.bytes must be 1, 2 or 4, got {cfg.bytes}")
    block_k = min(cfg.block_k, group_size)
    if group_size % block_k:
        raise ValueError(f"tensor-core kernel: block_k={block_k} must divide group_size={group_size}")
    k_tiles = k // block_k
    num_m = triton.cdiv(m, cfg.block_m)
    lanes = 4 // cfg.bytes
    programs = num_m * triton.cdiv(n // 8, cfg.block_w) * lanes
    split, per_split, dest = _split_dest(out, _waves_split(cfg.split_k, cfg.waves, programs, k_tiles, x.device),
                                         k_tiles)
    interp = _interpreting()
    _tc_kernel[(programs, split)](
        x, qweight, qzeros, scales, bias if bias is not None else scales, dest,
        m, n, x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), n, m * n,
        per_split * block_k, k,
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_W=cfg.block_w, BLOCK_K=block_k, BYTES=cfg.bytes,
        HAS_BIAS=bias is not None and split == 1, WRITE_PARTIAL=split > 1,
        # The interpreter runs no PTX: the nibbles are extracted with plain integer ops there (same
        # values), and bf16 dots are widened to fp32 (Triton 3.9's interpreter gets bf16 tl.dot wrong).
        USE_ASM=not interp, DOT_FP32=interp and x.dtype == torch.bfloat16, SCALE_IN_A=cfg.scale_in_a,
        EVEN_W=(n // 8) % cfg.block_w == 0, MAGIC=_magic(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not interp else {}),
    )
    if split > 1:
        _reduce_partials(dest, bias, out)


def _launch_dequant(qweight, qzeros, scales, group_size, dtype, cfg: DequantConfig):
    k, n = qweight.shape[0], qweight.shape[1] * 8
    block_k = min(cfg.block_k, group_size)
    if group_size % block_k:
        raise ValueError(f"dequant block_k={block_k} must divide group_size={group_size}")
    w = torch.empty((k, n), dtype=dtype, device=qweight.device)
    _dequant_kernel[(k // block_k, triton.cdiv(n // 8, cfg.block_w))](
        qweight, qzeros, scales, w, n, qweight.stride(0), qzeros.stride(0), scales.stride(0),
        GROUP_SIZE=group_size, BLOCK_K=block_k, BLOCK_W=cfg.block_w, num_warps=cfg.num_warps,
    )
    return w


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


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

if triton is not None:

    # The GEMV multiplies x by 2**X_PRESCALE so that x * (subnormal nibble) lands in the normal range:
    # products keep full precision while |x * q| >= 2**-52, and x may reach 2**53 before overflowing.
    X_PRESCALE = tl.constexpr(75)

    @triton.jit
    def _subnormal(w, MASK: tl.constexpr):
        """The nibble under MASK (bits below 23) read as a float32 with a zero exponent field:
        exactly q * 2**(bit - 149), a subnormal. No shift, no int->float conversion."""
        return (w & MASK).to(tl.float32, bitcast=True)

    @triton.jit
    def _fma_nibbles(w, x_scaled, a0, a1, a2, a3, a4, a5, a6, a7):
        """a_i += x * q_i * 2**(4 * p_i + X_PRESCALE - 149) over a tile w [rows, words], where p_i is
        the nibble's position when read: i, but 4 and 5 for nibbles 6 and 7."""
        xc = x_scaled[:, None]
        a0 += xc * _subnormal(w, 0xF)
        a1 += xc * _subnormal(w, 0xF0)
        a2 += xc * _subnormal(w, 0xF00)
        a3 += xc * _subnormal(w, 0xF000)
        a4 += xc * _subnormal(w, 0xF0000)
        a5 += xc * _subnormal(w, 0xF00000)
        hi = w >> 8  # nibbles 6 and 7 would reach into the exponent field: move them to bits 16..23
        a6 += xc * _subnormal(hi, 0xF0000)
        a7 += xc * _subnormal(hi, 0xF00000)
        return a0, a1, a2, a3, a4, a5, a6, a7

    @triton.jit
    def _load_step(qw_ptr, w_offs, x_row, offs_k, stride_qw, mask_w, row0, BLOCK_K: tl.constexpr):
        """The four [BLOCK_K, words] weight tiles and the x values (pre-scaled fp32) of one step."""
        tile = qw_ptr + row0 * stride_qw + w_offs
        w0 = tl.load(tile, mask=mask_w[None, :], other=0)
        w1 = tl.load(tile + BLOCK_K * stride_qw, mask=mask_w[None, :], other=0)
        w2 = tl.load(tile + 2 * BLOCK_K * stride_qw, mask=mask_w[None, :], other=0)
        w3 = tl.load(tile + 3 * BLOCK_K * stride_qw, mask=mask_w[None, :], other=0)
        x0 = tl.load(x_row + row0 + offs_k).to(tl.float32) * (2.0 ** X_PRESCALE)
        x1 = tl.load(x_row + row0 + BLOCK_K + offs_k).to(tl.float32) * (2.0 ** X_PRESCALE)
        x2 = tl.load(x_row + row0 + 2 * BLOCK_K + offs_k).to(tl.float32) * (2.0 ** X_PRESCALE)
        x3 = tl.load(x_row + row0 + 3 * BLOCK_K + offs_k).to(tl.float32) * (2.0 ** X_PRESCALE)
        return w0, w1, w2, w3, x0, x1, x2, x3

    @triton.jit
    def _load_group(qz_ptr, s_ptr, offs_w, mask_w, stride_qz, stride_s, g):
        """Packed zero points and the 8 per-nibble scale vectors (fp32) of group g."""
        zw = tl.load(qz_ptr + g * stride_qz + offs_w, mask=mask_w, other=0)
        s_row = s_ptr + g * stride_s + offs_w * 8
        # nibble i holds logical column AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i]
        s0 = tl.load(s_row + 0, mask=mask_w, other=0.0).to(tl.float32)
        s1 = tl.load(s_row + 2, mask=mask_w, other=0.0).to(tl.float32)
        s2 = tl.load(s_row + 4, mask=mask_w, other=0.0).to(tl.float32)
        s3 = tl.load(s_row + 6, mask=mask_w, other=0.0).to(tl.float32)
        s4 = tl.load(s_row + 1, mask=mask_w, other=0.0).to(tl.float32)
        s5 = tl.load(s_row + 3, mask=mask_w, other=0.0).to(tl.float32)
        s6 = tl.load(s_row + 5, mask=mask_w, other=0.0).to(tl.float32)
        s7 = tl.load(s_row + 7, mask=mask_w, other=0.0).to(tl.float32)
        return zw, s0, s1, s2, s3, s4, s5, s6, s7

    @triton.jit
    def _group_close(a, xsum, zw, s, NIBBLE: tl.constexpr):
        """One group's contribution for the columns of nibble NIBBLE, whose scales are s:
        s * (sum_k x_k q_k - z * sum_k x_k); `a` comes from _fma_nibbles, `xsum` is unscaled."""
        z = ((zw >> (4 * NIBBLE)) & 0xF).to(tl.float32)
        UNSCALE: tl.constexpr = 2.0 ** (149 - X_PRESCALE - 4 * (NIBBLE - 2 * (NIBBLE // 6)))
        return s * (tl.sum(a, axis=0) * UNSCALE - z * xsum)

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
    def _store_column(row_ptr, bias_ptr, offs_w, acc, mask, COLUMN: tl.constexpr,
                      HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr):
        cols = offs_w * 8 + COLUMN
        _store_out(row_ptr + cols, acc, mask, bias_ptr + cols, mask, HAS_BIAS, WRITE_PARTIAL)

    @triton.jit(do_not_specialize=["stride_qw"])
    def _gemv_kernel(
        x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr,
        N, stride_xm, stride_qw, stride_qz, stride_s, stride_om, stride_split,
        steps_per_split, n_steps,
        GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
        HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    ):
        """Program (m, n, k): row m of x, 8 * BLOCK_W columns, steps [k * steps_per_split, ...) of
        4 * BLOCK_K rows each. A step never crosses a group; the sums of a group (or of the part
        of it this program holds, which is as good: the closing formula is linear in the rows)
        are closed with the group's scales and zero points."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        # stride_qw is not specialized, so its alignment is unknown and loads stay one word wide:
        # one 128-byte line per warp and row, one word (8 columns) and all rows per thread. Wider
        # loads would multiply the per-thread accumulators and spill.
        STEPS: tl.constexpr = GROUP_SIZE // (4 * BLOCK_K)
        offs_w = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)
        mask_w = offs_w < N // 8
        offs_k = tl.arange(0, BLOCK_K)
        w_offs = offs_k[:, None] * stride_qw + offs_w[None, :]
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm

        acc0 = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc4 = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc5 = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc6 = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc7 = tl.zeros([BLOCK_W], dtype=tl.float32)
        t_lo = pid_k * steps_per_split
        t_hi = tl.minimum(t_lo + steps_per_split, n_steps)
        for g in range(t_lo // STEPS, (t_hi - 1) // STEPS + 1):
            # The group's zero points and scales are loaded first, to be in flight with the weights.
            zw, s0, s1, s2, s3, s4, s5, s6, s7 = _load_group(qz_ptr, s_ptr, offs_w, mask_w, stride_qz, stride_s, g)
            # Per-thread partial sums over the rows of a tile; reduced once per group.
            a0 = tl.zeros([BLOCK_K, BLOCK_W], dtype=tl.float32)
            a1 = tl.zeros([BLOCK_K, BLOCK_W], dtype=tl.float32)
            a2 = tl.zeros([BLOCK_K, BLOCK_W], dtype=tl.float32)
            a3 = tl.zeros([BLOCK_K, BLOCK_W], dtype=tl.float32)
            a4 = tl.zeros([BLOCK_K, BLOCK_W], dtype=tl.float32)
            a5 = tl.zeros([BLOCK_K, BLOCK_W], dtype=tl.float32)
            a6 = tl.zeros([BLOCK_K, BLOCK_W], dtype=tl.float32)
            a7 = tl.zeros([BLOCK_K, BLOCK_W], dtype=tl.float32)
            xsum = tl.zeros([BLOCK_K], dtype=tl.float32)
            for t in range(tl.maximum(t_lo, g * STEPS), tl.minimum(t_hi, g * STEPS + STEPS)):
                # Four tiles' loads are issued before any of them is used: four in flight per thread.
                w0, w1, w2, w3, x0, x1, x2, x3 = _load_step(qw_ptr, w_offs, x_row, offs_k, stride_qw, mask_w,
                                                            t * 4 * BLOCK_K, BLOCK_K)
                xsum += (x0 + x1) + (x2 + x3)
                a0, a1, a2, a3, a4, a5, a6, a7 = _fma_nibbles(w0, x0, a0, a1, a2, a3, a4, a5, a6, a7)
                a0, a1, a2, a3, a4, a5, a6, a7 = _fma_nibbles(w1, x1, a0, a1, a2, a3, a4, a5, a6, a7)
                a0, a1, a2, a3, a4, a5, a6, a7 = _fma_nibbles(w2, x2, a0, a1, a2, a3, a4, a5, a6, a7)
                a0, a1, a2, a3, a4, a5, a6, a7 = _fma_nibbles(w3, x3, a0, a1, a2, a3, a4, a5, a6, a7)
            xs = tl.sum(xsum, axis=0) * (2.0 ** -X_PRESCALE)
            acc0 += _group_close(a0, xs, zw, s0, 0)
            acc1 += _group_close(a1, xs, zw, s1, 1)
            acc2 += _group_close(a2, xs, zw, s2, 2)
            acc3 += _group_close(a3, xs, zw, s3, 3)
            acc4 += _group_close(a4, xs, zw, s4, 4)
            acc5 += _group_close(a5, xs, zw, s5, 5)
            acc6 += _group_close(a6, xs, zw, s6, 6)
            acc7 += _group_close(a7, xs, zw, s7, 7)

        row_ptr = out_ptr + pid_m.to(tl.int64) * stride_om
        if WRITE_PARTIAL:
            row_ptr += pid_k.to(tl.int64) * stride_split
        # nibble i holds logical column AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i]
        _store_column(row_ptr, bias_ptr, offs_w, acc0, mask_w, 0, HAS_BIAS, WRITE_PARTIAL)
        _store_column(row_ptr, bias_ptr, offs_w, acc1, mask_w, 2, HAS_BIAS, WRITE_PARTIAL)
        _store_column(row_ptr, bias_ptr, offs_w, acc2, mask_w, 4, HAS_BIAS, WRITE_PARTIAL)
        _store_column(row_ptr, bias_ptr, offs_w, acc3, mask_w, 6, HAS_BIAS, WRITE_PARTIAL)
        _store_column(row_ptr, bias_ptr, offs_w, acc4, mask_w, 1, HAS_BIAS, WRITE_PARTIAL)
        _store_column(row_ptr, bias_ptr, offs_w, acc5, mask_w, 3, HAS_BIAS, WRITE_PARTIAL)
        _store_column(row_ptr, bias_ptr, offs_w, acc6, mask_w, 5, HAS_BIAS, WRITE_PARTIAL)
        _store_column(row_ptr, bias_ptr, offs_w, acc7, mask_w, 7, HAS_BIAS, WRITE_PARTIAL)

    @triton.jit
    def _dequant_nibble(w, zw, s, NIBBLE: tl.constexpr):
        """(q - z) * s in float32 for nibble NIBBLE of a tile w [rows, words]; s [words] holds the
        scales of that nibble's columns.

        The nibble is moved to mantissa bits 19..22 and OR-ed with the bits of 1.0, which reads as
        1 + q/16; one FMA with 16 s and (16 + z) s gives (q - z) s with a single rounding (the
        constant's own rounding is 2**-19 s at most, far below the later cast to 16 bits)."""
        SHIFT: tl.constexpr = 19 - 4 * NIBBLE
        if SHIFT >= 0:
            v = w << SHIFT
        else:
            v = w >> (-SHIFT)
        v = ((v & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
        z = ((zw >> (4 * NIBBLE)) & 0xF).to(tl.float32)
        return v * (16.0 * s)[None, :] - ((16.0 + z) * s)[None, :]

    @triton.jit
    def _split8(v):
        """[8W] -> eight [W] vectors: element j of every block of 8, for j = 0..7."""
        r = tl.reshape(v, [v.shape[0] // 8, 2, 2, 2])  # j = 4a + 2b + c, c last
        c0, c1 = tl.split(r)
        b0c0, b1c0 = tl.split(c0)
        b0c1, b1c1 = tl.split(c1)
        v0, v4 = tl.split(b0c0)
        v2, v6 = tl.split(b1c0)
        v1, v5 = tl.split(b0c1)
        v3, v7 = tl.split(b1c1)
        return v0, v1, v2, v3, v4, v5, v6, v7

    @triton.jit
    def _int_nibble(w, zw, NIBBLE: tl.constexpr):
        """(q - z) * 16**(NIBBLE % 4), exact, as float32, for nibble NIBBLE of a tile w [rows, words]
        (w and zw already shifted right by 16 for nibbles 4..7). The nibble is masked in place and
        OR-ed into the bits of 2**23, which reads as 2**23 + q * 16**p: one LOP3, no shift, no
        int->float conversion; the power of 16 (at most 2**12, so fp16 holds 15 * 2**12) is undone
        with the scale."""
        MASK: tl.constexpr = 0xF << (4 * (NIBBLE % 4))
        q = ((w & MASK) | 0x4B000000).to(tl.float32, bitcast=True)
        z = ((zw & MASK) | 0x4B000000).to(tl.float32, bitcast=True)
        return q - z[None, :]

    @triton.jit
    def _int_tile(w, zw):
        """A tile of packed words [rows, W] -> (q - z) * 16**p [rows, 8W] in logical column order
        (see _dequant_tile for the join order; p = nibble % 4, see _nibble_unscale)."""
        wh = w >> 16
        zh = zw >> 16
        lo = tl.join(tl.join(_int_nibble(w, zw, 0), _int_nibble(w, zw, 2)),
                     tl.join(_int_nibble(w, zw, 1), _int_nibble(w, zw, 3)))
        hi = tl.join(tl.join(_int_nibble(wh, zh, 4), _int_nibble(wh, zh, 6)),
                     tl.join(_int_nibble(wh, zh, 5), _int_nibble(wh, zh, 7)))
        t = tl.join(lo, hi)
        return tl.reshape(t, [t.shape[0], 8 * t.shape[1]])

    @triton.jit
    def _nibble_unscale(BLOCK_N: tl.constexpr):
        """16**-p for every column of a block, p = (nibble holding the column) % 4."""
        j = tl.arange(0, BLOCK_N) % 8
        nibble = ((j & 1) << 2) | (j >> 1)  # AWQ_REVERSE_ORDER[j]
        return tl.exp2(-4.0 * (nibble % 4).to(tl.float32))

    @triton.jit
    def _dequant_tile(w, zw, s):
        """A tile of packed words [rows, W] -> dequantized [rows, 8W] with columns in logical order;
        zw [W] the packed zero points, s [8W] the scales (fp32) of the tile's group.

        Each nibble is dequantized on its own (constant shifts); tl.join then puts them side by
        side, the last join outermost: position p of 8 gets nibble AWQ_REVERSE_ORDER[p].
        Nibble i holds logical column AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i]."""
        s0, s1, s2, s3, s4, s5, s6, s7 = _split8(s)
        lo = tl.join(tl.join(_dequant_nibble(w, zw, s0, 0), _dequant_nibble(w, zw, s4, 2)),
                     tl.join(_dequant_nibble(w, zw, s2, 1), _dequant_nibble(w, zw, s6, 3)))
        hi = tl.join(tl.join(_dequant_nibble(w, zw, s1, 4), _dequant_nibble(w, zw, s5, 6)),
                     tl.join(_dequant_nibble(w, zw, s3, 5), _dequant_nibble(w, zw, s7, 7)))
        t = tl.join(lo, hi)
        return tl.reshape(t, [t.shape[0], 8 * t.shape[1]])

    @triton.jit
    def _gemm_kernel(
        x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr,
        M, N, K, stride_xm, stride_qw, stride_qz, stride_s, stride_om, stride_split, k_per_split,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, DOT_FP32: tl.constexpr,
        SCALE_AFTER_DOT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        # M tiles vary fastest, so the programs that share a weight tile run side by side.
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        mask_w = offs_w < N // 8
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        unscale = _nibble_unscale(BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k in range(k_lo, k_hi, BLOCK_K):
            rows = k + offs_k
            a = tl.load(x_rows + rows[None, :], mask=mask_m[:, None], other=0.0)
            w = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_w[None, :],
                        mask=mask_w[None, :], other=0)
            g = k // GROUP_SIZE  # BLOCK_K divides GROUP_SIZE: one group per tile
            zw = tl.load(qz_ptr + g * stride_qz + offs_w, mask=mask_w, other=0)
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if SCALE_AFTER_DOT:
                # (q - z) * 16**p is exact in 16 bits; the scale (times 16**-p) multiplies this tile's
                # fp32 partial product.
                b = _int_tile(w, zw).to(x_ptr.dtype.element_ty)
                if DOT_FP32:
                    part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(a, b)
                acc += part * (s * unscale)[None, :]
            else:
                b = _dequant_tile(w, zw, s).to(x_ptr.dtype.element_ty)
                if DOT_FP32:
                    acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)

        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        if WRITE_PARTIAL:
            out_ptrs += pid_k.to(tl.int64) * stride_split
        _store_out(out_ptrs, acc, mask_m[:, None] & mask_n[None, :], (bias_ptr + offs_n)[None, :], mask_n[None, :],
                   HAS_BIAS, WRITE_PARTIAL)

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
    def _tc_column(NIB: tl.constexpr):
        """Nibble i of a word holds column AWQ_ORDER[i] = 2 * (i % 4) + i // 4 of its eight."""
        COL: tl.constexpr = 2 * (NIB % 4) + NIB // 4
        return COL

    @triton.jit
    def _tc_close(tot, part, zw, s_row, offs_w, mask_w, xs, NIB: tl.constexpr, MAGIC: tl.constexpr):
        """tot += s * (sum_k x_k (MAGIC + q_k) - (MAGIC + z) * sum_k x_k) for the columns of nibble
        NIB of the (lane-shifted) words; part [W, M] holds the first sum, xs [W, M] the second (every
        row the same)."""
        col = _tc_column(NIB)
        s = tl.load(s_row + offs_w * 8 + col, mask=mask_w, other=0.0).to(tl.float32)
        z = ((zw >> (4 * NIB)) & 0xF).to(tl.float32) + MAGIC
        return tot + part * s[:, None] - (s * z)[:, None] * xs

    @triton.jit
    def _tc_step(wt, xt, xs, ta, tb, zw, s_row, offs_w, mask_w, BYTE: tl.constexpr,
                 MAGIC: tl.constexpr, USE_ASM: tl.constexpr, DOT_FP32: tl.constexpr, SCALE_IN_A: tl.constexpr):
        a, b = _byte_pair(wt, BYTE, MAGIC == 128.0, USE_ASM)
        if SCALE_IN_A:
            ta = _tc_dot(_tc_scaled(a, zw, s_row, offs_w, mask_w, 2 * BYTE, MAGIC, DOT_FP32), xt, ta, DOT_FP32)
            tb = _tc_dot(_tc_scaled(b, zw, s_row, offs_w, mask_w, 2 * BYTE + 1, MAGIC, DOT_FP32), xt, tb, DOT_FP32)
        else:
            ta = _tc_close(ta, _tc_dot(a, xt, None, DOT_FP32), zw, s_row, offs_w, mask_w, xs, 2 * BYTE, MAGIC)
            tb = _tc_close(tb, _tc_dot(b, xt, None, DOT_FP32), zw, s_row, offs_w, mask_w, xs, 2 * BYTE + 1, MAGIC)
        return ta, tb

    @triton.jit
    def _magic_scaled(a, zm, s, DOT_FP32: tl.constexpr):
        """(q - z) * s in a's dtype from a = MAGIC + q and the per-row zm = MAGIC + z and s [rows]: the
        subtraction is exact, the product rounds once. (DOT_FP32, the interpreter: through fp32,
        exact until the cast: the same values.)"""
        if DOT_FP32:
            return ((a.to(tl.float32) - zm.to(tl.float32)[:, None]) * s.to(tl.float32)[:, None]).to(a.dtype)
        return (a - zm.to(a.dtype)[:, None]) * s.to(a.dtype)[:, None]

    @triton.jit
    def _tc_scaled(a, zw, s_row, offs_w, mask_w, NIB: tl.constexpr, MAGIC: tl.constexpr, DOT_FP32: tl.constexpr):
        """_magic_scaled for the columns of nibble NIB of the (lane-shifted) words."""
        col = _tc_column(NIB)
        s = tl.load(s_row + offs_w * 8 + col, mask=mask_w, other=0.0)
        z = ((zw >> (4 * NIB)) & 0xF).to(tl.float32) + MAGIC
        return _magic_scaled(a, z, s, DOT_FP32)

    @triton.jit
    def _tc_store(out_rows, bias_ptr, offs_w, mask_w, tot, msk, NIB: tl.constexpr,
                  HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr):
        col = _tc_column(NIB)
        _store_out(out_rows + col, tot, msk, (bias_ptr + offs_w * 8 + col)[:, None], mask_w[:, None], HAS_BIAS,
                   WRITE_PARTIAL)

    @triton.jit
    def _tc_kernel(
        x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr,
        M, N, stride_xm, stride_qw, stride_qz, stride_s, stride_om, stride_split, k_per_split, K,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
        BYTES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, USE_ASM: tl.constexpr,
        DOT_FP32: tl.constexpr, SCALE_IN_A: tl.constexpr, EVEN_W: tl.constexpr, MAGIC: tl.constexpr,
    ):
        """out[m, 8w + AWQ_ORDER[i]] for nibble i: the transposed product W_i^T [W, K] @ x^T [K, M]
        per nibble, so the dequantized weight is the dot's first (register) operand and needs no
        shared-memory round trip (_byte_pair extracts MAGIC + q; SCALE_IN_A: see TcConfig).
        With BYTES < 4 the programs of one weight tile split its byte lanes (lane = pid % LANES)."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        LANES: tl.constexpr = 4 // BYTES
        num_m = tl.cdiv(M, BLOCK_M)
        # byte lanes vary fastest, then M tiles: the programs that read one weight tile run together.
        lane = pid % LANES
        pid_m = (pid // LANES) % num_m
        pid_n = pid // (LANES * num_m)
        for LANE in tl.static_range(LANES):  # one branch per lane: its bytes stay compile-time constants
            if lane == LANE:
                _tc_run(x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr, M, N, stride_xm, stride_qw, stride_qz,
                        stride_s, stride_om, stride_split, k_per_split, K, pid_m, pid_n, pid_k, GROUP_SIZE, BLOCK_M,
                        BLOCK_W, BLOCK_K, LANE * BYTES, BYTES, HAS_BIAS, WRITE_PARTIAL, USE_ASM, DOT_FP32,
                        SCALE_IN_A, EVEN_W, MAGIC)

    @triton.jit
    def _tc_run(
        x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr,
        M, N, stride_xm, stride_qw, stride_qz, stride_s, stride_om, stride_split, k_per_split, K,
        pid_m, pid_n, pid_k,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
        BYTE0: tl.constexpr, NBYTES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
        USE_ASM: tl.constexpr, DOT_FP32: tl.constexpr, SCALE_IN_A: tl.constexpr, EVEN_W: tl.constexpr,
        MAGIC: tl.constexpr,
    ):
        """One program's work for bytes [BYTE0, BYTE0 + NBYTES) of its words. Without SCALE_IN_A,
        each K tile (inside one group) is closed with the group's scale and zero point in fp32
        (_tc_close), and sum_k x_k comes from one more dot with a ones tile, which lands in the
        accumulators' layout."""
        DTYPE: tl.constexpr = x_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_w = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_w = offs_w < N // 8
        x_cols = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
        ones = tl.full([BLOCK_W, BLOCK_K], 1.0, tl.float32).to(DTYPE)
        t0 = tl.zeros([BLOCK_W, BLOCK_M], dtype=tl.float32)
        t1 = tl.zeros([BLOCK_W, BLOCK_M], dtype=tl.float32)
        t2 = tl.zeros([BLOCK_W, BLOCK_M], dtype=tl.float32)
        t3 = tl.zeros([BLOCK_W, BLOCK_M], dtype=tl.float32)
        t4 = tl.zeros([BLOCK_W, BLOCK_M], dtype=tl.float32)
        t5 = tl.zeros([BLOCK_W, BLOCK_M], dtype=tl.float32)
        t6 = tl.zeros([BLOCK_W, BLOCK_M], dtype=tl.float32)
        t7 = tl.zeros([BLOCK_W, BLOCK_M], dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k in range(k_lo, k_hi, BLOCK_K):
            rows = k + offs_k
            xt = tl.load(x_cols + rows[:, None], mask=mask_m[None, :], other=0.0)  # [K, M]
            if EVEN_W:  # no mask: the copies of a thread's contiguous words can be 16 bytes wide
                wt = tl.load(qw_ptr + rows[None, :] * stride_qw + offs_w[:, None])
            else:
                wt = tl.load(qw_ptr + rows[None, :] * stride_qw + offs_w[:, None], mask=mask_w[:, None], other=0)
            g = k // GROUP_SIZE  # BLOCK_K divides GROUP_SIZE: one group per tile
            zw = tl.load(qz_ptr + g * stride_qz + offs_w, mask=mask_w, other=0)
            s_row = s_ptr + g * stride_s
            if SCALE_IN_A:
                xs = 0.0
            else:
                xs = _tc_dot(ones, xt, None, DOT_FP32)
            t0, t1 = _tc_step(wt, xt, xs, t0, t1, zw, s_row, offs_w, mask_w, BYTE0, MAGIC, USE_ASM, DOT_FP32, SCALE_IN_A)
            if NBYTES >= 2:
                t2, t3 = _tc_step(wt, xt, xs, t2, t3, zw, s_row, offs_w, mask_w, BYTE0 + 1, MAGIC, USE_ASM, DOT_FP32,
                                  SCALE_IN_A)
            if NBYTES == 4:
                t4, t5 = _tc_step(wt, xt, xs, t4, t5, zw, s_row, offs_w, mask_w, 2, MAGIC, USE_ASM, DOT_FP32, SCALE_IN_A)
                t6, t7 = _tc_step(wt, xt, xs, t6, t7, zw, s_row, offs_w, mask_w, 3, MAGIC, USE_ASM, DOT_FP32, SCALE_IN_A)

        out_rows = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_w[:, None] * 8
        if WRITE_PARTIAL:
            out_rows += pid_k.to(tl.int64) * stride_split
        msk = mask_m[None, :] & mask_w[:, None]
        _tc_store(out_rows, bias_ptr, offs_w, mask_w, t0, msk, 2 * BYTE0, HAS_BIAS, WRITE_PARTIAL)
        _tc_store(out_rows, bias_ptr, offs_w, mask_w, t1, msk, 2 * BYTE0 + 1, HAS_BIAS, WRITE_PARTIAL)
        if NBYTES >= 2:
            _tc_store(out_rows, bias_ptr, offs_w, mask_w, t2, msk, 2 * BYTE0 + 2, HAS_BIAS, WRITE_PARTIAL)
            _tc_store(out_rows, bias_ptr, offs_w, mask_w, t3, msk, 2 * BYTE0 + 3, HAS_BIAS, WRITE_PARTIAL)
        if NBYTES == 4:
            _tc_store(out_rows, bias_ptr, offs_w, mask_w, t4, msk, 4, HAS_BIAS, WRITE_PARTIAL)
            _tc_store(out_rows, bias_ptr, offs_w, mask_w, t5, msk, 5, HAS_BIAS, WRITE_PARTIAL)
            _tc_store(out_rows, bias_ptr, offs_w, mask_w, t6, msk, 6, HAS_BIAS, WRITE_PARTIAL)
            _tc_store(out_rows, bias_ptr, offs_w, mask_w, t7, msk, 7, HAS_BIAS, WRITE_PARTIAL)

    @triton.jit(do_not_specialize=["stride_qw"])
    def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, stride_qw, stride_qz, stride_s,
                        GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr):
        """W [K, N] = dequant(qweight) in w_ptr's dtype, one [BLOCK_K, 8 * BLOCK_W] tile a program."""
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_w = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_n = pid_n * (8 * BLOCK_W) + tl.arange(0, 8 * BLOCK_W)
        mask_w = offs_w < N // 8
        w = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_w[None, :], mask=mask_w[None, :], other=0)
        g = pid_k * BLOCK_K // GROUP_SIZE
        zw = tl.load(qz_ptr + g * stride_qz + offs_w, mask=mask_w, other=0)
        s = tl.load(s_ptr + g * stride_s + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        b = _dequant_tile(w, zw, s)
        tl.store(w_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :], b.to(w_ptr.dtype.element_ty),
                 mask=(offs_n < N)[None, :])

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
