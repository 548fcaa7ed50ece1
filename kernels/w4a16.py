"""The K-packed W4A16 layout and its Triton matmul: packing from AWQ, kernels, launcher, default configs.

Packed layout (pack_w4a16), for group size G = 32, 64 or a multiple of 128 and K any multiple of G,
with K' = K rounded up to a multiple of 128 (TILE_K):

    qk     int32 [N, K'/8]      word (n, 16 t + j), nibble i (bits 4i..4i+3) holds q[128 t + 16 i + j, n]
    meta   fp16/bf16 [K'/G, 2N]  (zero point, scale) pairs: meta[g, 2n] = z[g, n] (0..15, exact),
                                meta[g, 2n + 1] = scales[g, n]; in the scales' dtype, which must be x's

Rows K..K'-1 (only where G is 32 or 64 and K is not a multiple of 128) hold q = 0 with zero point 0 and
scale 0, so their weights are 0, and the launcher pads x with zeros to K' (x keeps its K features).

In each 128-deep K tile t the 16 words j of a column give, for nibble i, the sixteen consecutive
inputs 128 t + 16 i + j: the nibble-i slice of a [columns, 16] word tile is a dot operand of depth 16
whose partner is the contiguous slice x[:, 128 t + 16 i : +16]. A tile holds 128 / G groups (G <= 128)
or lies inside group t // (G / 128); two nibbles of a byte (32 inputs) always share a group. Unlike
AWQ's layout, which packs eight *output columns* into a word and so needs one accumulator per nibble
position in a kernel that keeps the weight in registers, every dot adds into the same accumulator.
The weight words take the same bytes as AWQ's; a group's scale and zero point of a column share one
32-bit word (4 bytes a group and column against AWQ's 2.5, +0.09 bits a weight at G = 128), because
the kernels load that word through the software pipeline's asynchronous copies (cp.async), which move
4, 8 or 16 bytes a thread: a 2-byte scale and a 1-byte zero point would be loaded synchronously, a
memory latency or two a step (benchmarks/README.md).

The tensor-core kernel (_pk_kernel, configured by PackedConfig) computes out^T = W^T x^T over programs
of block_n columns x block_m tokens: per 128-deep tile it loads the [block_n, 16] words, extracts each
byte's two nibbles as MAGIC + q with _byte_pair (inline PTX) and joins the eight nibble slices into one
[block_n, 128] register operand (tl.join/permute/reshape; the compiled code keeps it in registers).
Either (scale-in-A) it forms (q - z) * s in x.dtype (the subtraction exact, the product rounded once,
as a dense 16-bit copy of the weight would be) and accumulates one dot over all of K, or (exact, for
2-16 tokens) it runs one dot per group and tile on the exact q - z ((MAGIC + q) - (MAGIC + z)) and
scales it in fp32 (Triton re-issues the meta load for that scale outside the software pipeline, in
the accumulator's layout; its latency overlaps the dot). Before a scale-in-A step writes its A operand
the kernel waits for the wgmma still in flight (_wgmma_drain): they read those registers. One token
goes to _pk_gemv_kernel (CUDA cores, PackedGemvConfig; two through small weights), many to
dequantization (_pk_dequant_kernel) + cuBLAS (PackedDequantConfig) unless the weight is wide;
PACKED_TABLE has the rules. Small grids split K (fp32 partial sums reduced by _splitk_reduce_kernel,
_triton_common.py). The reference is awq_format.w4a16_matmul_ref on the AWQ tensors; unpack_w4a16
inverts the packing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton_common import (_dense_matmul, _interpreting, _magic, _prepare_io, _reduce_partials, _sm_count,
                             _split_dest, _waves_split, triton)
from .awq_format import check_awq_shapes, unpack_awq_int4

if triton is not None:
    import triton.language as tl

    from ._triton_common import _byte_pair, _magic_scaled, _store_out, _tc_dot

__all__ = ["can_pack", "packed_available", "pack_w4a16", "unpack_w4a16", "w4a16_packed_matmul", "PackedConfig",
           "PackedGemvConfig", "PackedDequantConfig", "PACKED_TABLE", "pick_packed_config", "TILE_K"]

TILE_K = 128  # inputs per packed tile: 16 words x 8 nibbles
_WORDS = TILE_K // 8


def can_pack(k: int, group_size: int) -> bool:
    """Whether a [K, N] AWQ weight with this group size has a packed form: G 32, 64 or a multiple of
    128, and K a multiple of G (the packed form pads K to a multiple of 128)."""
    return group_size > 0 and k > 0 and k % group_size == 0 and (group_size in (32, 64) or group_size % TILE_K == 0)


def packed_available(device) -> bool:
    """Whether w4a16_packed_matmul serves tensors on `device`: Triton is installed and the device is
    CUDA (Triton's interpreter also runs the kernels on CPU, for tests, far too slowly to serve)."""
    return triton is not None and torch.device(device).type == "cuda"


def pack_w4a16(qweight, qzeros, scales, group_size: int, *, chunk: int = 4096):
    """AWQ (qweight [K, N/8], qzeros [K/G, N/8], scales fp16/bf16 [K/G, N]) -> (qk int32 [N, K'/8],
    meta [K'/G, 2N] in scales.dtype: (zero point, scale) pairs), K' = K rounded up to a multiple of 128
    with zero weights (module docstring).

    Plain torch on the tensors' device, `chunk` output columns at a time (temporary memory about
    12 * K * chunk bytes). The scales are copied as they are: activations must have their dtype."""
    k, n = check_awq_shapes(qweight, qzeros, scales, group_size)
    if not can_pack(k, group_size):
        raise ValueError(f"pack_w4a16: needs group size 32, 64 or a multiple of {TILE_K}; "
                         f"got K={k}, group_size={group_size}")
    if scales.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"pack_w4a16: scales must be float16 or bfloat16, got {scales.dtype}")
    kp = _padded_k(k)
    qk = torch.empty((n, kp // 8), dtype=torch.int32, device=qweight.device)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=qweight.device).view(1, 1, 8, 1)
    for c0 in range(0, n // 8, chunk // 8):
        c1 = min(n // 8, c0 + chunk // 8)
        q = unpack_awq_int4(qweight[:, c0:c1]).t().to(torch.int64)  # [cols, K]
        if kp != k:
            q = F.pad(q, (0, kp - k))
        q = q.reshape(q.shape[0], kp // TILE_K, 8, _WORDS) << shifts  # [cols, tile, nibble, word]
        word = q.sum(dim=2)  # the nibbles do not overlap: the sum is the OR
        word = torch.where(word >= 2**31, word - 2**32, word)
        qk[8 * c0:8 * c1] = word.reshape(word.shape[0], kp // 8).to(torch.int32)
    meta = torch.stack((unpack_awq_int4(qzeros).to(scales.dtype), scales), dim=2)  # [K/G, N, 2]
    if kp != k:  # zero point 0 and scale 0: the padded rows' weights are 0
        meta = F.pad(meta, (0, 0, 0, 0, 0, (kp - k) // group_size))
    return qk, meta.reshape(kp // group_size, 2 * n)


def unpack_w4a16(qk, meta):
    """The packed form back to plain values: (q int32 [K', N], zeros int32 [K'/G, N], scales [K'/G, N]),
    with the padded rows (module docstring) included."""
    n, kw = qk.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qk.device).view(1, 1, 8, 1)
    q = (qk.view(n, kw // _WORDS, 1, _WORDS) >> shifts) & 0xF  # [N, tile, nibble, word]
    return q.reshape(n, kw * 8).t().contiguous(), meta[:, 0::2].to(torch.int32), meta[:, 1::2].contiguous()


def w4a16_packed_matmul(x, qk, meta, group_size: int, bias=None, *, out=None, config=None):
    """x [..., K] (fp16/bf16) @ the packed weight (qk, meta from pack_w4a16) -> [..., N] in x.dtype,
    through Triton.

    x has the weight's K features, or K' (already padded with zeros): any multiple of the group size
    that rounds up to the packed K' is taken (the rows past the weight's own K are zero). CUDA tensors,
    or CPU tensors under TRITON_INTERPRET=1; `config` (a PackedConfig, PackedGemvConfig or
    PackedDequantConfig) overrides pick_packed_config."""
    if triton is None:
        raise RuntimeError("w4a16_packed_matmul needs triton")
    if qk.dtype != torch.int32 or qk.dim() != 2 or meta.dim() != 2:
        raise ValueError("w4a16_packed_matmul: qk must be int32 [N, K/8] and meta [K/G, 2N] (pack_w4a16)")
    n, kp = qk.shape[0], qk.shape[1] * 8
    if not can_pack(kp, group_size) or tuple(meta.shape) != (kp // group_size, 2 * n):
        raise ValueError(f"w4a16_packed_matmul: with qk {tuple(qk.shape)} and group_size {group_size} expected "
                         f"meta {(kp // group_size, 2 * n)}, got {tuple(meta.shape)}")
    if meta.dtype != x.dtype:
        raise ValueError(f"w4a16_packed_matmul: meta holds {meta.dtype} scales but x is {x.dtype}; "
                         f"pack the weight with scales of the activations' dtype")
    k = x.shape[-1]
    if k != kp:
        if k % group_size or _padded_k(k) != kp:
            padded = f" (or a multiple of {group_size} from {kp - TILE_K + group_size})" if group_size < TILE_K else ""
            raise ValueError(f"w4a16_packed_matmul: x has {k} features, the weight expects K={kp}{padded}")
        x = F.pad(x, (0, kp - k))  # the weight's rows past K are zero
    lead, x2, out = _prepare_io("w4a16_packed_matmul", x, kp, n, bias, out)
    qk, meta = (t if t.stride(-1) == 1 else t.contiguous() for t in (qk, meta))
    if x2.shape[0]:
        # The kernels read a (zero, scale) pair as one int32 word.
        _launch_packed(x2, qk, meta.view(torch.int32), group_size, bias, out,
                       config or pick_packed_config(x2.shape[0], n, kp))
    return out.view(*lead, n)


def _padded_k(k: int) -> int:
    """K' of a packed weight: K rounded up to whole 128-deep tiles (a multiple of G where can_pack holds:
    G 32 or 64 divides 128, and a multiple of 128 divides K already)."""
    return -(-k // TILE_K) * TILE_K


# ------------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedConfig:
    """A program covers block_n output columns (the dot's M side: 16 per warp with mma.sync, 64 per
    4 warps with wgmma) and block_m tokens (16..256), `tiles` 128-deep K tiles per loop iteration."""

    block_m: int = 16
    block_n: int = 128
    tiles: int = 1
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 0  # 0: derived from the grid (see _waves_split)
    waves: float = 2.0  # programs per multiprocessor that _waves_split aims for
    # False: no split-K once the grid has a program for every multiprocessor.
    split_full_grids: bool = True
    # True: each group's dot runs on the exact integers q - z and is scaled in fp32 (fewer
    # instructions a weight, more an output: for few tokens). False: (q - z) * s is formed in x.dtype
    # and the dots accumulate over all of K (for many tokens).
    exact: bool = False


@dataclass(frozen=True)
class PackedGemvConfig:
    """The decode kernel on the packed layout (_pk_gemv_kernel): CUDA cores; a program covers `rows`
    rows of x, block_n output columns and its share of K (all of it unless the grid is too small
    for `waves` programs a multiprocessor, then K is split), `tiles` 128-deep K tiles a step."""

    block_n: int = 8
    num_warps: int = 1
    # Rows of x a program, 1 or 2 (each weight load serves both). Four were instruction-bound and lost
    # to the tensor-core kernel at M = 4 and 8 on the H100 (results/pk-gemv2-h100.json), two lost to it
    # at M = 2 on the H200 once its loads were pipelined (results/pk-ab2-h200.json).
    rows: int = 1
    tiles: int = 8  # K tiles (16 words of each column) a step; fewer where they do not divide K/128
    stages: int = 3  # steps in flight (software pipeline through shared memory)
    split_k: int = 0
    waves: float = 2.0


@dataclass(frozen=True)
class PackedDequantConfig:
    """Many tokens: _pk_dequant_kernel writes the dense weight [N, K] in x.dtype, then cuBLAS
    (x @ W^T, the layout of F.linear). The dense copy is made on every call and freed after it."""

    # 32 columns, 4 warps, one tile: 32 registers a thread and 216 instructions in the offline sm_90
    # compile with Triton 3.6 (`tests/sass_count.py pkdq 32,4,1`). On the H100, 64 columns or two tiles a
    # program were within 1% (results/pk-explore2-h100.json).
    block_n: int = 32
    tiles: int = 1  # K tiles a program
    num_warps: int = 4


# Weight sizes (K x N) the rules below split on: "big" from 2**26 (InternLM2-7B and -20B w13, 20B w2),
# "small" under 2**24 (InternLM2-1.8B wqkv and wo).
PACKED_BIG = 1 << 26
PACKED_SMALL = 1 << 24

PACKED_GEMV_CONFIG = PackedGemvConfig(block_n=8, num_warps=1, rows=1, tiles=8, stages=3, waves=2.0)
PACKED_GEMV2_CONFIG = PackedGemvConfig(block_n=8, num_warps=1, rows=2, tiles=8, stages=3, waves=2.0)
PACKED_FEW_BIG_CONFIG = PackedConfig(block_m=16, block_n=64, tiles=2, num_warps=4, num_stages=3, waves=4.0,
                                     exact=True)
PACKED_FEW_CONFIG = PackedConfig(block_m=16, block_n=64, tiles=1, num_warps=4, num_stages=4, waves=4.0, exact=True)
PACKED_M32_CONFIG = PackedConfig(block_m=32, block_n=64, num_warps=4, num_stages=4, waves=4.0)
PACKED_M64_CONFIG = PackedConfig(block_m=64, block_n=128, num_warps=8, num_stages=3, waves=2.0, split_full_grids=False)
PACKED_M128_CONFIG = PackedConfig(block_m=128, block_n=64, num_warps=4, num_stages=3, waves=1.0)
PACKED_BIG_128_CONFIG = PackedConfig(block_m=128, block_n=128, num_warps=8, num_stages=4, waves=2.0,
                                     split_full_grids=False)
PACKED_WIDE_CONFIG = PackedConfig(block_m=128, block_n=256, num_warps=8, num_stages=3, waves=0.5)
PACKED_SQUARE_CONFIG = PackedConfig(block_m=128, block_n=128, num_warps=8, num_stages=4, waves=0.5)
PACKED_DEQUANT_CONFIG = PackedDequantConfig()

PackedRule = Callable[[int, int, int], bool]

# The default config for m tokens through a [K, N] weight: the first row whose rule (m, n, k) holds.
# Measured with the benchmarks on the InternLM2-1.8B/7B/20B linears (wqkv, wo, w13, w2; bf16, group
# 128, Triton 3.6) on the card each row names; times per call, result files in benchmarks/results/.
PACKED_TABLE: list[tuple[PackedRule, PackedConfig | PackedGemvConfig | PackedDequantConfig]] = [
    # 1 token: the GEMV (8 columns and all of K a one-warp program). H100, all eight 7B/20B linears
    # (pk-gemv-h100.json, pk-gemv2-h100.json); H200 against the tensor-core kernel with its loads
    # pipelined: 7B w13 22.5 us against 25.8 (pk-ab2-h200.json).
    (lambda m, n, k: m <= 1, PACKED_GEMV_CONFIG),
    # 2 tokens through weights under 2**24: the GEMV, two rows a program. H200, 1.8B wo 4.8 us against
    # 5.2 for the tensor-core kernel (pk-ab-1p8b-h200.json); on the 7B/20B linears it lost (7B w13 33.2
    # against 26.1, pk-ab2-h200.json).
    (lambda m, n, k: m == 2 and n * k < PACKED_SMALL, PACKED_GEMV2_CONFIG),
    # 2-16 tokens through weights of 2**26 or more: exact mode, two K tiles a step. H200, 7B w13 M=4
    # 26.5 us against 29.5 with one, 20B w13 40.7 against 47.1 (pk-ab-h200.json, pk-ab2-h200.json).
    (lambda m, n, k: m <= 16 and n * k >= PACKED_BIG, PACKED_FEW_BIG_CONFIG),
    # 65-128 tokens through weights of 2**26 or more: 128-column blocks. H200, 7B w13 74.5 us against
    # 78.1, 20B w2 72.2 against 85.8, 20B w13 111.4 against 121.9; smaller weights lost with them (20B
    # wqkv 43.1 against 37.1, 1.8B w13 34.8 against 23.2; pk-ab-h200.json, pk-ab-1p8b-h200.json).
    (lambda m, n, k: 64 < m <= 128 and n * k >= PACKED_BIG, PACKED_BIG_128_CONFIG),
    # 2-16 tokens, other weights: exact mode, one K tile a step. H200, 7B wqkv 9.7 us against 10.1 with
    # two, 20B wo 12.6 against 12.9 (pk-ab-h200.json, pk-ab2-h200.json).
    (lambda m, n, k: m <= 16, PACKED_FEW_CONFIG),
    # 17-32 tokens: scale-in-A, 32 x 64 blocks; H200, best or within a few percent of the best on most
    # of the eight 7B/20B linears (pk-ab-h200.json).
    (lambda m, n, k: m <= 32, PACKED_M32_CONFIG),
    # 33-64 tokens: 64 x 128 blocks, split K (2-9 ways) only while the grid has fewer programs than
    # multiprocessors. H100, 7B w13 61.4 us split in two, 50.1 whole (pk-explore2-h100.json); blocks
    # from the H200 A/B (pk-ab-h200.json).
    (lambda m, n, k: m <= 64, PACKED_M64_CONFIG),
    # 65-128 tokens, other weights: 128 x 64 blocks, one wave. H200 (pk-ab-h200.json, pk-ab-1p8b-h200.json:
    # 1.8B w13 23.2 us against 34.8 with 128 x 128).
    (lambda m, n, k: m <= 128, PACKED_M128_CONFIG),
    # 129-256 tokens, N >= 6144: the fused kernel, 128 x 256 blocks, K split only for grids under half a
    # wave. H200, 7B w13 115.5 us, 20B w2 119.1 against 132.0 dequantized (pk-ab-h200.json); the split on
    # the H100: 20B wqkv 59.6 us against 82.5 aiming for one wave, 20B w2 136.5 against 177.6, 1.8B w13
    # 33.8 against 59.3; tied on 7B/20B w13, lost on 1.8B w2 (16 programs: 34 or more against 28.3;
    # pk-wide-split-h100.json).
    (lambda m, n, k: m <= 256 and n >= 6144, PACKED_WIDE_CONFIG),
    # 129-256 tokens, N < 6144, weights of 2**24 or more: fused, 128 x 128 blocks. H200, 7B w2 59.6 us
    # against 74.7 with 256 columns, 7B wo 23.1 against 29.0 (pk-ab-h200.json).
    (lambda m, n, k: m <= 256 and n * k >= PACKED_SMALL, PACKED_SQUARE_CONFIG),
    # 129-256 tokens, weights under 2**24: dequantize + cuBLAS. H200, 1.8B wo 10.3 us against 12.8 fused,
    # 1.8B wqkv 14.7 against 16.1 (pk-ab-1p8b-h200.json).
    (lambda m, n, k: m <= 256, PACKED_DEQUANT_CONFIG),
    # 257-512 tokens, N >= 8192: fused, 128 x 256 blocks. H200, 7B w13 235.4 us, 20B wqkv 86.9 against
    # 100.6 dequantized (pk-ab-h200.json).
    (lambda m, n, k: m <= 512 and n >= 8192, PACKED_WIDE_CONFIG),
    # 257-512 tokens, N < 8192, and every M above 512: dequantize + cuBLAS. H200, 7B wqkv 52.2 us
    # against 58.9 fused (7B w2 the exception: 109.4 fused against 118.5; pk-ab-h200.json); above 512
    # its fixed cost shrinks against the product's (not timed). Every row here loses to cuBLAS on a
    # 16-bit weight (0.5-0.85x).
    (lambda m, n, k: True, PACKED_DEQUANT_CONFIG),
]


def pick_packed_config(m: int, n: int, k: int):
    """The default config for m tokens through a [K, N] weight (the first PACKED_TABLE row that holds)."""
    return next(cfg for rule, cfg in PACKED_TABLE if rule(m, n, k))


def _fit_tiles(tiles: int, k_tiles: int) -> int:
    """The largest power of two up to `tiles` that divides the K tile count (e.g. 28 tiles of a
    3584-wide Qwen2.5-7B layer take 4 a step where 8 were asked)."""
    while k_tiles % tiles:
        tiles //= 2
    return tiles


def _launch_packed_gemv(x, qk, meta, group_size, bias, out, cfg: PackedGemvConfig):
    if cfg.tiles not in (1, 2, 4, 8):
        raise ValueError(f"packed GEMV: PackedGemvConfig.tiles must be 1, 2, 4 or 8, got {cfg.tiles}")
    if cfg.rows not in (1, 2):
        raise ValueError(f"packed GEMV: PackedGemvConfig.rows must be 1 or 2, got {cfg.rows}")
    m, k = x.shape
    n = out.shape[1]
    k_tiles = k // TILE_K
    tiles = _fit_tiles(cfg.tiles, k_tiles)
    steps = k_tiles // tiles
    grid_m, n_blocks = triton.cdiv(m, cfg.rows), triton.cdiv(n, cfg.block_n)
    split, per_split, dest = _split_dest(out, _waves_split(cfg.split_k, cfg.waves, grid_m * n_blocks, steps, x.device),
                                         steps)
    _pk_gemv_kernel[(grid_m, n_blocks, split)](
        x, qk, meta, bias if bias is not None else out, dest,
        m, n, x.stride(0), qk.stride(0), meta.stride(0), n, m * n, per_split * tiles, k_tiles,
        GROUP_SIZE=group_size, BLOCK_N=cfg.block_n, ROWS=cfg.rows, TILES=tiles, STAGES=cfg.stages,
        HAS_BIAS=bias is not None and split == 1, WRITE_PARTIAL=split > 1, EVEN_N=n % cfg.block_n == 0,
        num_warps=cfg.num_warps,
    )
    if split > 1:
        _reduce_partials(dest, bias, out)


def _launch_packed_dequant(x, qk, meta, group_size, bias, out, cfg: PackedDequantConfig):
    n, k = qk.shape[0], qk.shape[1] * 8
    k_tiles = k // TILE_K
    tiles = _fit_tiles(cfg.tiles, k_tiles)
    w = torch.empty((n, k), dtype=x.dtype, device=x.device)
    interp = _interpreting()
    _pk_dequant_kernel[(triton.cdiv(n, cfg.block_n), k_tiles // tiles)](
        qk, meta, w, n, k, qk.stride(0), meta.stride(0),
        GROUP_SIZE=group_size, BLOCK_N=cfg.block_n, TILES=tiles, USE_ASM=not interp,
        DOT_FP32=interp and x.dtype == torch.bfloat16, EVEN_N=n % cfg.block_n == 0, MAGIC=_magic(x.dtype),
        num_warps=cfg.num_warps,
    )
    _dense_matmul(x, w.t(), bias, out)


_HOPPER: dict[int, bool] = {}


def _is_hopper(device) -> bool:
    """sm_90: the dot compiles to wgmma (asynchronous, A in registers), and PTX wgmma.wait_group exists.
    Other GPUs (Ampere, Ada: sm_80-89) get mma.sync, which has neither."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _HOPPER:
        _HOPPER[idx] = torch.cuda.get_device_capability(idx)[0] == 9
    return _HOPPER[idx]


def _packed_split(cfg: PackedConfig, programs: int, steps: int, device) -> int:
    """Ways to split K for a grid of `programs` tiles of `steps` K steps each (_waves_split, unless the
    config keeps full grids whole)."""
    if not cfg.split_k and not cfg.split_full_grids and programs >= _sm_count(device):
        return 1
    return _waves_split(cfg.split_k, cfg.waves, programs, steps, device)


def _launch_packed(x, qk, meta, group_size, bias, out, cfg: PackedConfig | PackedGemvConfig | PackedDequantConfig):
    if isinstance(cfg, PackedGemvConfig):
        return _launch_packed_gemv(x, qk, meta, group_size, bias, out, cfg)
    if isinstance(cfg, PackedDequantConfig):
        return _launch_packed_dequant(x, qk, meta, group_size, bias, out, cfg)
    m, k = x.shape
    n = out.shape[1]
    k_tiles = k // TILE_K
    tiles = _fit_tiles(cfg.tiles, k_tiles)
    steps = k_tiles // tiles
    programs = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split, per_split, dest = _split_dest(out, _packed_split(cfg, programs, steps, x.device), steps)
    interp = _interpreting()
    _pk_kernel[(programs, split)](
        x, qk, meta, bias if bias is not None else out, dest,
        m, n, x.stride(0), qk.stride(0), meta.stride(0), n, m * n, per_split * tiles, k_tiles,
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TILES=tiles,
        HAS_BIAS=bias is not None and split == 1, WRITE_PARTIAL=split > 1,
        # The interpreter runs no PTX (plain integer nibble extraction, same values) and gets bf16
        # tl.dot wrong in Triton 3.9 (the operands are widened to fp32 there, exactly).
        USE_ASM=not interp, DOT_FP32=interp and x.dtype == torch.bfloat16,
        EVEN_N=n % cfg.block_n == 0, EVEN_M=m % cfg.block_m == 0, EXACT=cfg.exact,
        DRAIN=not interp and _is_hopper(x.device), MAGIC=_magic(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        _reduce_partials(dest, bias, out)


if triton is not None:

    @triton.jit
    def _pk_cat(a, b):
        """[R, W] tiles -> [R, 2W]: a's columns, then b's (the K order of the dot operand)."""
        j = tl.join(a, b)  # [R, W, 2]
        return tl.reshape(tl.permute(j, (0, 2, 1)), [j.shape[0], 2 * j.shape[1]])

    @triton.jit
    def _pk_nib(v, zm, s, SCALE: tl.constexpr, DOT_FP32: tl.constexpr):
        if SCALE:
            return _magic_scaled(v, zm, s, DOT_FP32)
        # (MAGIC + q) - (MAGIC + z): the integer q - z, exact (through fp32 under the interpreter,
        # whose bf16 arithmetic is not to be trusted: the same values)
        if DOT_FP32:
            return (v.to(tl.float32) - zm.to(tl.float32)[:, None]).to(v.dtype)
        return v - zm[:, None]

    @triton.jit
    def _wgmma_drain(v):
        """Wait for every wgmma in flight (PTX wgmma.wait_group 0); v is any small tensor (the asm runs
        once per element a thread holds). The dot's A operand lives in registers, and Triton 3.6 lets up
        to seven wgmma run on over a loop's back edge while the next step writes its A operand into the
        same registers: wrong sums once the loop runs without stalls (seen on the H200 with 64 x 128
        blocks, 8 warps, split K; benchmarks/README.md). Waiting before the step's dequantization
        keeps those registers until the wgmma are done."""
        return tl.inline_asm_elementwise("mov.b32 $0, $1; wgmma.wait_group.sync.aligned 0;", "=r,r", [v],
                                         dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _pk_meta(m, BF16: tl.constexpr):
        """(scale, zero point) in fp32 from meta words m (int32: the scale's 16 bits high, the zero
        point's low, both in x.dtype)."""
        if BF16:
            s = (m & -65536).to(tl.float32, bitcast=True)
            z = (m << 16).to(tl.float32, bitcast=True)
        else:
            s = (m >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            z = m.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return s, z

    @triton.jit
    def _pk_group(meta_ptr, offs_n, mask_n, stride_meta, g, BF16: tl.constexpr):
        """Scales and zero points [BN] of group g in fp32 (zero where masked)."""
        m = tl.load(meta_ptr + g * stride_meta + offs_n, mask=mask_n, other=0)
        return _pk_meta(m, BF16)

    @triton.jit
    def _pk_part(w, s, z, P: tl.constexpr, NP: tl.constexpr, MAGIC: tl.constexpr, DTYPE: tl.constexpr,
                 USE_ASM: tl.constexpr, DOT_FP32: tl.constexpr, SCALE: tl.constexpr):
        """Part P of NP of a K tile as a dot operand [BN, 128 / NP]: nibbles [8P/NP, 8(P+1)/NP) of the
        words w [BN, 16], column 16 i + j from nibble i of word j (relative to the part). Each nibble
        is the exact q - z, or with SCALE (q - z) * s, in DTYPE, with the group's scales s and zero
        points z [BN] (_pk_group)."""
        BF16: tl.constexpr = DTYPE == tl.bfloat16
        zm = (z + MAGIC).to(DTYPE)
        if SCALE:
            s = s.to(DTYPE)
        else:
            s = 0.0
        if NP == 4:
            l0, h0 = _byte_pair(w, P, BF16, USE_ASM)
            return _pk_cat(_pk_nib(l0, zm, s, SCALE, DOT_FP32), _pk_nib(h0, zm, s, SCALE, DOT_FP32))
        elif NP == 2:
            l0, h0 = _byte_pair(w, 2 * P, BF16, USE_ASM)
            l1, h1 = _byte_pair(w, 2 * P + 1, BF16, USE_ASM)
            return _pk_cat(_pk_cat(_pk_nib(l0, zm, s, SCALE, DOT_FP32), _pk_nib(h0, zm, s, SCALE, DOT_FP32)),
                           _pk_cat(_pk_nib(l1, zm, s, SCALE, DOT_FP32), _pk_nib(h1, zm, s, SCALE, DOT_FP32)))
        else:
            l0, h0 = _byte_pair(w, 0, BF16, USE_ASM)
            l1, h1 = _byte_pair(w, 1, BF16, USE_ASM)
            l2, h2 = _byte_pair(w, 2, BF16, USE_ASM)
            l3, h3 = _byte_pair(w, 3, BF16, USE_ASM)
            lo = _pk_cat(_pk_cat(_pk_nib(l0, zm, s, SCALE, DOT_FP32), _pk_nib(h0, zm, s, SCALE, DOT_FP32)),
                         _pk_cat(_pk_nib(l1, zm, s, SCALE, DOT_FP32), _pk_nib(h1, zm, s, SCALE, DOT_FP32)))
            hi = _pk_cat(_pk_cat(_pk_nib(l2, zm, s, SCALE, DOT_FP32), _pk_nib(h2, zm, s, SCALE, DOT_FP32)),
                         _pk_cat(_pk_nib(l3, zm, s, SCALE, DOT_FP32), _pk_nib(h3, zm, s, SCALE, DOT_FP32)))
            return _pk_cat(lo, hi)

    @triton.jit
    def _pk_scaled_part(w, meta_ptr, offs_n, mask_n, stride_meta, g, P: tl.constexpr, NP: tl.constexpr,
                        MAGIC: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr, DOT_FP32: tl.constexpr):
        s, z = _pk_group(meta_ptr, offs_n, mask_n, stride_meta, g, DTYPE == tl.bfloat16)
        return _pk_part(w, s, z, P, NP, MAGIC, DTYPE, USE_ASM, DOT_FP32, True)

    @triton.jit
    def _pk_scaled_tile(w, meta_ptr, offs_n, mask_n, stride_meta, t, NP: tl.constexpr, TPG: tl.constexpr,
                        MAGIC: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr, DOT_FP32: tl.constexpr):
        """K tile t as one dot operand [BN, 128] of (q - z) * s in DTYPE: NP groups per tile, or (TPG > 1)
        part of group t // TPG."""
        if TPG > 1:
            g = t // TPG
        else:
            g = t * NP
        if NP == 2:
            return _pk_cat(
                _pk_scaled_part(w, meta_ptr, offs_n, mask_n, stride_meta, g, 0, 2, MAGIC, DTYPE, USE_ASM, DOT_FP32),
                _pk_scaled_part(w, meta_ptr, offs_n, mask_n, stride_meta, g + 1, 1, 2, MAGIC, DTYPE, USE_ASM, DOT_FP32))
        elif NP == 4:
            return _pk_cat(
                _pk_cat(_pk_scaled_part(w, meta_ptr, offs_n, mask_n, stride_meta, g, 0, 4, MAGIC, DTYPE, USE_ASM,
                                        DOT_FP32),
                        _pk_scaled_part(w, meta_ptr, offs_n, mask_n, stride_meta, g + 1, 1, 4, MAGIC, DTYPE, USE_ASM,
                                        DOT_FP32)),
                _pk_cat(_pk_scaled_part(w, meta_ptr, offs_n, mask_n, stride_meta, g + 2, 2, 4, MAGIC, DTYPE, USE_ASM,
                                        DOT_FP32),
                        _pk_scaled_part(w, meta_ptr, offs_n, mask_n, stride_meta, g + 3, 3, 4, MAGIC, DTYPE, USE_ASM,
                                        DOT_FP32)))
        return _pk_scaled_part(w, meta_ptr, offs_n, mask_n, stride_meta, g, 0, 1, MAGIC, DTYPE, USE_ASM, DOT_FP32)

    # The GEMV multiplies x by 2**(PK_PRESCALE - e) for a nibble read as the float q * 2**(e - 149), so
    # every product is x q 2**(PK_PRESCALE - 149), undone with the scale: in the normal range, so exact
    # while |x q| >= 2**-52, and x may reach 2**53 before overflowing.
    PK_PRESCALE = tl.constexpr(75)

    @triton.jit
    def _pk_nibble_f32(w, hi, I: tl.constexpr):
        """Nibble I of the words w as the float q * 2**(e - 149) (hi = w >> 8 for nibbles 6 and 7)."""
        if I < 6:
            q = (w & (0xF << (4 * I))).to(tl.float32, bitcast=True)
        else:
            q = (hi & (0xF << (4 * I - 8))).to(tl.float32, bitcast=True)
        return q

    @triton.jit
    def _pk_prescale(I: tl.constexpr):
        """2**(PK_PRESCALE - e) for nibble I, e its bit position when read (see _pk_nibble_f32)."""
        if I < 6:
            E: tl.constexpr = 4 * I
        else:
            E: tl.constexpr = 4 * I - 8
        return 2.0 ** (PK_PRESCALE - E)

    @triton.jit
    def _pk_gemv_row(w, hi, x_ptrs, row, M, s, z, P: tl.constexpr, NIBS: tl.constexpr, BLOCK_N: tl.constexpr,
                     W: tl.constexpr):
        """One row of x against the step's words w [BN, W], group part P: s (sum x q - z sum x) per
        column and 4-word quad, [BN, W/4] (x_ptrs [1, W] at nibble 0 of the step's words)."""
        a = tl.zeros([BLOCK_N, W], dtype=tl.float32)
        xs = tl.zeros([1, W], dtype=tl.float32)
        x_mask = (tl.zeros([1, W], dtype=tl.int32) + row) < M
        for i in tl.static_range(P * NIBS, P * NIBS + NIBS):
            xi = tl.load(x_ptrs + 16 * i, mask=x_mask, other=0.0).to(tl.float32)
            xs += xi
            a += _pk_nibble_f32(w, hi, i) * (xi * _pk_prescale(i))
        a4 = tl.sum(tl.reshape(a, [BLOCK_N, W // 4, 4]), axis=2)
        xs4 = tl.sum(tl.reshape(xs, [1, W // 4, 4]), axis=2) * (2.0 ** (PK_PRESCALE - 149))
        return s * (a4 - z * xs4)

    @triton.jit
    def _pk_gemv_store(out_ptr, bias_ptr, row, M, stride_om, stride_split, pid_k, offs_n, mask_n, acc,
                       HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr):
        col = tl.sum(acc, axis=1) * (2.0 ** (149 - PK_PRESCALE))
        out_row = out_ptr + row.to(tl.int64) * stride_om + offs_n
        if WRITE_PARTIAL:
            out_row += pid_k.to(tl.int64) * stride_split
        _store_out(out_row, col, mask_n & ((tl.zeros_like(offs_n) + row) < M), bias_ptr + offs_n, mask_n, HAS_BIAS,
                   WRITE_PARTIAL)

    @triton.jit
    def _pk_gemv_kernel(
        x_ptr, qk_ptr, meta_ptr, bias_ptr, out_ptr,
        M, N, stride_xm, stride_qk, stride_meta, stride_om, stride_split, t_per_split, T,
        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr,
        STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, EVEN_N: tl.constexpr,
    ):
        """Program (m, n, split): rows [ROWS m, ROWS m + ROWS) of x (1 or 2), BLOCK_N columns,
        K tiles [split * t_per_split, ...), TILES tiles (W = 16 TILES words of each column,
        contiguous) a step, STAGES steps in flight.

        Each thread holds 4 consecutive words of several columns. Nibble i becomes a float with one
        AND (masked in place it reads as the subnormal q * 2**(4i - 149); nibbles 6 and 7 after a
        shift by 8), so a weight costs one LOP3 and one FMA per row, the x values (pre-scaled per
        nibble) being shared by the thread's columns. A thread's 4 words lie in one K tile, so their
        sums are closed together, once per group: s (sum x q - z sum x)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        if GROUP_SIZE > 128:
            NP: tl.constexpr = 1
            TPG: tl.constexpr = GROUP_SIZE // 128  # K tiles per group
        else:
            NP: tl.constexpr = 128 // GROUP_SIZE  # groups per K tile
            TPG: tl.constexpr = 1
        NIBS: tl.constexpr = 8 // NP  # nibbles of a word per group
        W: tl.constexpr = 16 * TILES
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_w = tl.arange(0, W)
        w_ptrs = qk_ptr + offs_n[:, None].to(tl.int64) * stride_qk + offs_w[None, :]  # [BN, W]
        # x index of nibble 0 of word w of a step: 128 (w // 16) + w % 16; nibble i adds 16 i.
        row0 = pid_m * ROWS
        x0 = x_ptr + row0.to(tl.int64) * stride_xm + ((offs_w // 16) * 128 + offs_w % 16)[None, :]  # [1, W]
        quad_tile = (tl.arange(0, W // 4) // 4)[None, :]  # [1, W/4]: the K tile of each 4-word quad
        acc0 = tl.zeros([BLOCK_N, W // 4], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, W // 4], dtype=tl.float32)
        t_lo = pid_k * t_per_split
        t_hi = tl.minimum(t_lo + t_per_split, T)
        for t0 in tl.range(t_lo, t_hi, TILES, num_stages=STAGES):
            if EVEN_N:
                w = tl.load(w_ptrs + t0 * 16)
            else:
                w = tl.load(w_ptrs + t0 * 16, mask=mask_n[:, None], other=0)
            hi = w >> 8
            xt = x0 + t0 * 128
            for p in tl.static_range(NP):
                if TPG > 1:
                    g = (t0 + quad_tile) // TPG
                else:
                    g = (t0 + quad_tile) * NP + p
                s, z = _pk_meta(tl.load(meta_ptr + g * stride_meta + offs_n[:, None], mask=mask_n[:, None], other=0),
                                x_ptr.dtype.element_ty == tl.bfloat16)
                acc0 += _pk_gemv_row(w, hi, xt, row0, M, s, z, p, NIBS, BLOCK_N, W)
                if ROWS == 2:
                    acc1 += _pk_gemv_row(w, hi, xt + stride_xm, row0 + 1, M, s, z, p, NIBS, BLOCK_N, W)
        _pk_gemv_store(out_ptr, bias_ptr, row0, M, stride_om, stride_split, pid_k, offs_n, mask_n, acc0,
                       HAS_BIAS, WRITE_PARTIAL)
        if ROWS == 2:
            _pk_gemv_store(out_ptr, bias_ptr, row0 + 1, M, stride_om, stride_split, pid_k, offs_n, mask_n, acc1,
                           HAS_BIAS, WRITE_PARTIAL)

    @triton.jit
    def _pk_dequant_kernel(qk_ptr, meta_ptr, w_ptr, N, K, stride_qk, stride_meta,
                           GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
                           USE_ASM: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_N: tl.constexpr,
                           MAGIC: tl.constexpr):
        """W^T [N, K] = (q - z) s in w_ptr's dtype (one rounding), for BLOCK_N columns x TILES K tiles."""
        DTYPE: tl.constexpr = w_ptr.dtype.element_ty
        pid_n = tl.program_id(0)
        pid_t = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w_rows = qk_ptr + offs_n[:, None].to(tl.int64) * stride_qk + tl.arange(0, 16)[None, :]  # [BN, 16]
        out_rows = w_ptr + offs_n[:, None].to(tl.int64) * K + tl.arange(0, 128)[None, :]  # [BN, 128]
        if GROUP_SIZE > 128:
            NP: tl.constexpr = 1
            TPG: tl.constexpr = GROUP_SIZE // 128  # K tiles per group
        else:
            NP: tl.constexpr = 128 // GROUP_SIZE  # groups per K tile
            TPG: tl.constexpr = 1
        for u in tl.static_range(TILES):
            t = pid_t * TILES + u
            if EVEN_N:
                w = tl.load(w_rows + t * 16)
            else:
                w = tl.load(w_rows + t * 16, mask=mask_n[:, None], other=0)
            a = _pk_scaled_tile(w, meta_ptr, offs_n, mask_n, stride_meta, t, NP, TPG, MAGIC, DTYPE, USE_ASM, DOT_FP32)
            tl.store(out_rows + t * 128, a, mask=mask_n[:, None])

    @triton.jit
    def _pk_kernel(
        x_ptr, qk_ptr, meta_ptr, bias_ptr, out_ptr,
        M, N, stride_xm, stride_qk, stride_meta, stride_om, stride_split, t_per_split, T,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
        HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, USE_ASM: tl.constexpr, DOT_FP32: tl.constexpr,
        EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EXACT: tl.constexpr, DRAIN: tl.constexpr,
        MAGIC: tl.constexpr,
    ):
        """Program (tile, split): out[m, n] for block_m tokens x block_n columns over K tiles
        [split * t_per_split, ...); see the module docstring for the layout."""
        DTYPE: tl.constexpr = x_ptr.dtype.element_ty
        BF16: tl.constexpr = DTYPE == tl.bfloat16
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        # M tiles vary fastest: the programs that read one weight tile run side by side.
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        x_cols = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + tl.arange(0, 128)[:, None]  # [128, BM]
        w_rows = qk_ptr + offs_n[:, None].to(tl.int64) * stride_qk + tl.arange(0, 16)[None, :]  # [BN, 16]
        if GROUP_SIZE > 128:
            NP: tl.constexpr = 1
            TPG: tl.constexpr = GROUP_SIZE // 128  # K tiles per group
        else:
            NP: tl.constexpr = 128 // GROUP_SIZE  # groups per K tile
            TPG: tl.constexpr = 1
        W: tl.constexpr = 128 // NP
        x_part = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + tl.arange(0, W)[:, None]  # [W, BM]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        t_lo = pid_k * t_per_split
        t_hi = tl.minimum(t_lo + t_per_split, T)
        for t0 in range(t_lo, t_hi, TILES):
            for u in tl.static_range(TILES):
                t = t0 + u
                if EVEN_N:
                    w = tl.load(w_rows + t * 16)
                else:
                    w = tl.load(w_rows + t * 16, mask=mask_n[:, None], other=0)
                if EXACT:
                    # One dot per group on the exact q - z, scaled in fp32.
                    for p in tl.static_range(NP):
                        # (Triton re-issues this load for s, whose use is in the accumulator's layout,
                        # outside the pipeline; its latency overlaps the dot, and loading it a step ahead
                        # gained nothing on the H200: results/pk-ab2-h200.json)
                        if TPG > 1:
                            g = t // TPG
                        else:
                            g = t * NP + p
                        s, z = _pk_group(meta_ptr, offs_n, mask_n, stride_meta, g, BF16)
                        if EVEN_M:
                            xp = tl.load(x_part + t * 128 + p * W)
                        else:
                            xp = tl.load(x_part + t * 128 + p * W, mask=mask_m[None, :], other=0.0)
                        a = _pk_part(w, s, z, p, NP, MAGIC, DTYPE, USE_ASM, DOT_FP32, False)
                        acc += _tc_dot(a, xp, None, DOT_FP32) * s[:, None]
                else:
                    if EVEN_M:
                        xt = tl.load(x_cols + t * 128)
                    else:
                        xt = tl.load(x_cols + t * 128, mask=mask_m[None, :], other=0.0)
                    if DRAIN:  # sm_90 only (_is_hopper)
                        _wgmma_drain(offs_n)
                    a = _pk_scaled_tile(w, meta_ptr, offs_n, mask_n, stride_meta, t, NP, TPG, MAGIC, DTYPE, USE_ASM,
                                        DOT_FP32)
                    acc = _tc_dot(a, xt, acc, DOT_FP32)

        out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        if WRITE_PARTIAL:
            out_ptrs += pid_k.to(tl.int64) * stride_split
        _store_out(out_ptrs, acc, mask_m[None, :] & mask_n[:, None], (bias_ptr + offs_n)[:, None], mask_n[:, None],
                   HAS_BIAS, WRITE_PARTIAL)
