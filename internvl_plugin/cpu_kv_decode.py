"""Fused decode attention over vLLM's int8/int4 per-token-head KV cache on CPU (Numba).

A decode step reads every context token's K and V once; with the cache in 8 or 4 bits that read is 2-3.5x
smaller than the 16-bit cache's, which is where a quantized cache pays on CPU. So the kernel reads the packed
cells in place through the block table: per (sequence, KV head, slice of the context) and block it dots the
query heads of the GQA group with each K row (the per-token scale applied to the score, not to the row), runs
the online softmax and accumulates the V rows, then a second pass merges the slices (flash-decoding). Nothing
is dequantized into memory. The dot products and the V sums are explicit vector loops (cpu_kv_simd.py); while
a block is read, the next one (wherever the block table puts it) is fetched into the cache ahead of use, which
the hardware prefetcher cannot guess.

int4 needs no rotation inside the kernel: the cache holds H·K and H·V (H the format's randomized Hadamard
transform, H^T H = b·I), so q·k = (Hq)·(Hk) / b and Σ p_i v_i = H^T (Σ p_i H v_i) / b. The caller rotates
the queries once and rotates the output back once. The zero point is folded out of the inner loops:
Σ q_d (n_d - zp) = Σ q_d n_d - zp Σ q_d, and the V side subtracts Σ p·step·zp once per output. The kernel's
own copy of a query keeps its even and odd elements apart ([q_0, q_2, ..., q_1, q_3, ...]) so that the low and
high nibbles of each byte meet contiguous query elements; the output is written back in natural order.

The query and the output may be the model's own bfloat16 tensors (as uint16 bits): with the softmax scale
applied inside, an int8 decode step needs no torch op around the kernel (a decode step's handful of small
torch ops cost more than the attention at short contexts). ``write_cells`` quantizes new tokens into the
cache the same way, in one loop. One parallel launch per call: a launch of Numba's work queue costs about
0.1 ms on the 2-core VM.

Hand-written because no library reads this format on CPU. Numba (a vLLM dependency) compiles it for the
machine it runs on (AVX2, AVX-512, NEON alike) and caches the machine code (``cache=True``: next to this file,
else in the user's cache directory, or where ``NUMBA_CACHE_DIR`` points). Numba checks only this file's time
stamp for that cache: after editing cpu_kv_simd.py alone, touch this file too. This module knows nothing of
vLLM.
"""

from __future__ import annotations

import math
import os
import sys

import torch

# Numba sizes its thread pool once, when imported; the engine's CPU threads are torch's (vLLM sets them per worker
# from its core binding), so the same count unless someone chose one.
if "numba" not in sys.modules and "NUMBA_NUM_THREADS" not in os.environ:
    os.environ["NUMBA_NUM_THREADS"] = str(torch.get_num_threads())

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

from internvl_plugin.cpu_kv_simd import (  # noqa: E402
    acc1_i8, acc1_u4, acc2_i8, acc2_u4, scores1_i8, scores1_u4, scores2_i8, scores2_u4)


def _share_torchs_openmp() -> bool:
    """Put the OpenMP runtime that torch loaded (its own libgomp) into the process's global symbol scope, so that
    Numba's "omp" threading layer, whose library links a libgomp of its own, binds to torch's instead: one pool
    of OpenMP threads for torch's ops and this kernel. vLLM does the same for its CPU workers (LD_PRELOAD of
    torch's libgomp, vllm/platforms/cpu.py), where this is a no-op. False where torch has no libgomp loaded."""
    import ctypes
    import glob

    here = os.path.dirname(torch.__file__)
    for path in sorted(glob.glob(os.path.join(here, "lib", "libgomp*.so*"))
                       + glob.glob(os.path.join(os.path.dirname(here), "torch.libs", "libgomp*.so*"))):
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)      # only if already loaded: never a 2nd copy
            return True
        except OSError:
            continue
    return False


def _omp_layer_loads() -> bool:
    try:
        from numba.np.ufunc import omppool  # noqa: F401   (needs a libgomp.so.1.0.0 of the system's)
    except ImportError:
        return False
    return True


def _start_threads() -> None:
    """Start Numba's pool now, then give torch back its thread count: the omp layer's start-up sets the OpenMP
    thread count to Numba's, and the runtime being torch's, torch's count would follow."""
    threads = torch.get_num_threads()
    numba.get_num_threads()                      # the first call launches the pool
    if torch.get_num_threads() != threads:
        torch._C.set_num_threads(threads)       # not torch.set_num_threads: vLLM's CPU worker makes it a no-op


# Two OpenMP runtimes (torch's and another) spin against each other: on the 2-core VM Numba's own "omp" layer
# beside torch's made a decode step 28 ms instead of 0.8, and even the work queue (which does not spin) lost
# half its speed in a real engine to torch's threads spinning after every linear. So: torch's runtime if it can
# be shared, else the work queue, unless someone chose a layer. GNU OpenMP is not fork-safe: a process forked
# after the kernel ran must not run it (the same holds for torch's own ops). This module is imported only for an
# int8/int4 cache.
_shared = _share_torchs_openmp()     # also when someone chose "omp": then it is the only runtime it binds to
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "omp" if _shared and _omp_layer_loads() else "workqueue"
_start_threads()

__all__ = ["decode_attention", "split_count", "write_cells"]


@intrinsic
def _bits_as_float(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (the int4 scale word keeps zp in its low bits)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.int32), codegen


@intrinsic
def _float_bits(typingctx, x):
    """The int32 bit pattern of the float32 ``x``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))
    return types.int32(types.float32), codegen


def _widen(x):
    """An element of a float32 array or of a bfloat16 one seen as uint16 (numpy has no bfloat16), as float32."""


@overload(_widen, inline="always")
def _widen_impl(x):
    if x == types.uint16:
        return lambda x: _bits_as_float(np.int32(x) << 16)
    return lambda x: np.float32(x)


def _narrow(v, like):
    """float32 ``v`` as an element of ``like``'s array: bfloat16 bits rounded to nearest even (torch's rounding)."""


@overload(_narrow, inline="always")
def _narrow_impl(v, like):
    if like == types.uint16:
        def to_bf16(v, like):
            if v != v:
                return np.uint16(0x7FC0)
            b = np.uint32(_float_bits(v))
            return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return to_bf16
    return lambda v, like: np.float32(v)


# no nnan/ninf: the kernel's running maxima start at a finite sentinel, but keep comparisons exact
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
_NEG = np.float32(-1e30)                        # "no score yet": finite, so exp(_NEG - m) is a clean 0


@njit(fastmath=_FAST, cache=True, nogil=True, inline="always")
def _exp(x):
    """exp for float32 x <= 0 in plain arithmetic (libm's expf is a scalar call per score; this vectorizes):
    2^n by the exponent bits, 2^f (|f| <= 1/2) by Cephes' exp2f polynomial, relative error ~2e-7."""
    t = max(x, np.float32(-87.0)) * np.float32(1.4426950408889634)
    n = np.floor(t + np.float32(0.5))
    f = t - n
    p = np.float32(1.535336188319500e-4)
    p = p * f + np.float32(1.339887440266574e-3)
    p = p * f + np.float32(9.618437357674640e-3)
    p = p * f + np.float32(5.550332471162809e-2)
    p = p * f + np.float32(2.402264791363012e-1)
    p = p * f + np.float32(6.931472028550421e-1)
    p = p * f + np.float32(1.0)
    return p * _bits_as_float((np.int32(n) + np.int32(127)) << 23)


@njit(fastmath=_FAST | {"nnan", "ninf"}, cache=True, nogil=True)
def _scale(scores, k_step, n, q_sum, int4):
    """Raw dot products -> scores (times the token's K step; int4: less zp · Σq first), and their maximum.
    Separate from _attend for its flags: with no NaN or inf assumed, the maximum vectorizes."""
    best = _NEG
    for j in range(n):
        s = (scores[j] - k_step[1, j] * q_sum) * k_step[0, j] if int4 else scores[j] * k_step[0, j]
        scores[j] = s
        best = max(best, s)
    return best


@njit(fastmath=_FAST, cache=True, nogil=True)
def _attend(cells, words, row0_of, q, q_sum, table_row, first, last, int4, scores, v_step, acc, m_l):
    """Online softmax over context tokens [first, last) of one (sequence, KV head) for the G query rows of ``q``.

    ``cells``/``words``: the cache as [cells x 2, half] bytes / int32 words, row 2r the K half of cell r and
    2r+1 its V half (data, then the scale word); cell r of table entry b is ``b * row0_of[0] + row0_of[1] +
    slot``. Accumulates into ``acc`` [G, D] and ``m_l`` [2, G] (running max, running sum). The query heads go
    in pairs through the vector loops (cpu_kv_simd), so each K and V byte is widened once per pair.
    """
    group, dim = q.shape
    block_size = scores.shape[1]
    half = cells.shape[1]
    data = dim // 2 if int4 else dim
    at = data // 4                             # the scale word's index in a half row
    zsum = np.zeros(group, dtype=np.float32)   # int4: Σ weight·zp of V, subtracted once at the end
    block_max = np.empty(group, dtype=np.float32)
    k_step = np.empty((2, block_size), dtype=np.float32)
    t = first
    while t < last:
        off0 = t % block_size
        n = min(block_size - off0, last - t)
        row0 = table_row[t // block_size] * row0_of[0] + row0_of[1] + off0
        ahead = -1                             # the next block's first byte, fetched while this one is read
        ahead_len = 2 * half * min(block_size, last - t - n)
        if t + n < last:
            ahead = 2 * (table_row[(t + n) // block_size] * row0_of[0] + row0_of[1]) * half
        k_at = 2 * row0 * half
        for g in range(0, group - 1, 2):      # this block's raw scores, two query heads per pass
            if int4:
                scores2_u4(cells, k_at, 2 * half, q, g * dim, (g + 1) * dim, data, n, scores, g * block_size,
                           (g + 1) * block_size)
            else:
                scores2_i8(cells, k_at, 2 * half, q, g * dim, (g + 1) * dim, data, n, scores, g * block_size,
                           (g + 1) * block_size)
        if group % 2:
            g = group - 1
            if int4:
                scores1_u4(cells, k_at, 2 * half, q, g * dim, g * dim, data, n, scores, g * block_size,
                           g * block_size)
            else:
                scores1_i8(cells, k_at, 2 * half, q, g * dim, g * dim, data, n, scores, g * block_size,
                           g * block_size)
        for j in range(n):                     # the per-token scales
            r = 2 * (row0 + j)
            bits = words[r, at]
            vbits = words[r + 1, at]
            if int4:
                k_step[0, j] = _bits_as_float(bits & -16)
                k_step[1, j] = np.float32(bits & 15)
                v_step[0, j] = _bits_as_float(vbits & -16)
                v_step[1, j] = np.float32(vbits & 15)
            else:
                k_step[0, j] = _bits_as_float(bits)
                v_step[0, j] = _bits_as_float(vbits)
        for g in range(group):
            block_max[g] = _scale(scores[g], k_step, n, q_sum[g], int4)
        for g in range(group):                 # rescale the running sums once per block; weights x V step
            m_old = m_l[0, g]
            m_new = max(m_old, block_max[g])
            alpha = _exp(m_old - m_new)
            m_l[0, g] = m_new
            for i in range(dim):
                acc[g, i] *= alpha
            total = np.float32(0.0)
            for j in range(n):
                e = _exp(scores[g, j] - m_new)
                total += e
                scores[g, j] = e * v_step[0, j]
            m_l[1, g] = m_l[1, g] * alpha + total
            if int4:
                zs = np.float32(0.0)
                for j in range(n):
                    zs += scores[g, j] * v_step[1, j]
                zsum[g] = zsum[g] * alpha + zs
        v_at = (2 * row0 + 1) * half
        fetch = ahead                          # the first V pass also asks for the next block, spread over it
        for g in range(0, group - 1, 2):
            if int4:
                acc2_u4(acc, g * dim, (g + 1) * dim, cells, v_at, 2 * half, scores, g * block_size,
                        (g + 1) * block_size, n, data, fetch, ahead_len)
            else:
                acc2_i8(acc, g * dim, (g + 1) * dim, cells, v_at, 2 * half, scores, g * block_size,
                        (g + 1) * block_size, n, data, fetch, ahead_len)
            fetch = -1
        if group % 2:
            g = group - 1
            if int4:
                acc1_u4(acc, g * dim, g * dim, cells, v_at, 2 * half, scores, g * block_size, g * block_size, n,
                        data, fetch, ahead_len)
            else:
                acc1_i8(acc, g * dim, g * dim, cells, v_at, 2 * half, scores, g * block_size, g * block_size, n,
                        data, fetch, ahead_len)
        t += n
    if int4:
        for g in range(group):
            for i in range(dim):
                acc[g, i] -= zsum[g]


@njit(fastmath=_FAST, cache=True, nogil=True, inline="always")
def _emit(out, row, first_head, o, inv, int4):
    """One query head's normalized output ``o * inv`` into ``out[row, first_head]`` (int4: back from the split
    order, values 2i and 2i + 1 from o[i] and o[D/2 + i])."""
    dim = o.shape[0]
    if int4:
        half = dim // 2
        for i in range(half):
            out[row, first_head, 2 * i] = _narrow(o[i] * inv, out[row, first_head, 0])
            out[row, first_head, 2 * i + 1] = _narrow(o[half + i] * inv, out[row, first_head, 0])
    else:
        for i in range(dim):
            out[row, first_head, i] = _narrow(o[i] * inv, out[row, first_head, 0])


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def _decode_kernel(cells, words, kv_heads, block_size, query, q_scale, block_table, seq_lens, rows, window, splits,
                   int4, out):
    """See decode_attention. One parallel launch: each launch of Numba's work queue costs about 0.1 ms on the
    2-core VM, as much as a short context's whole attention."""
    num_seqs = rows.shape[0]
    heads, dim = query.shape[1], query.shape[2]
    group = heads // kv_heads
    half = dim // 2
    items = num_seqs * kv_heads * splits
    part_ml = np.empty((items, 2, group), dtype=np.float32)     # np.empty: np.zeros/np.full would be launches
    part_acc = np.empty((items, group, dim), dtype=np.float32)
    for item in prange(items):
        seq = item // (kv_heads * splits)
        head = (item // splits) % kv_heads
        part = item % splits
        for g in range(group):
            part_ml[item, 0, g] = _NEG
            part_ml[item, 1, g] = 0.0
        row = rows[seq]
        if row < 0:
            continue
        seq_len = seq_lens[seq]
        first = max(0, seq_len - window) if window > 0 else 0
        # slices of whole blocks so that each is read by one worker
        first_block = first // block_size
        n_blocks = (seq_len + block_size - 1) // block_size - first_block
        per = (n_blocks + splits - 1) // splits
        lo = max(first, (first_block + part * per) * block_size)
        hi = min(seq_len, (first_block + (part + 1) * per) * block_size)
        if lo >= hi:
            continue
        # the group's query rows, scaled, contiguous (the inner loops vectorize); int4: even elements first, so
        # that a byte's low and high nibbles meet contiguous query elements
        q = np.empty((group, dim), dtype=np.float32)
        q_sum = np.zeros(group, dtype=np.float32)
        for g in range(group):
            h = head * group + g
            for i in range(dim):
                x = _widen(query[row, h, i]) * q_scale
                q[g, (i >> 1) + (i & 1) * half if int4 else i] = x
                q_sum[g] += x
        acc = np.zeros((group, dim), dtype=np.float32)
        scores = np.empty((group, block_size), dtype=np.float32)
        v_step = np.empty((2, block_size), dtype=np.float32)
        row0_of = np.empty(2, dtype=np.int64)
        row0_of[0] = kv_heads * block_size
        row0_of[1] = head * block_size
        m_l = part_ml[item]
        _attend(cells, words, row0_of, q, q_sum, block_table[seq], lo, hi, int4, scores, v_step, acc, m_l)
        if splits == 1:
            for g in range(group):
                _emit(out, row, head * group + g, acc[g], np.float32(1.0) / m_l[1, g], int4)
        else:
            for g in range(group):
                for i in range(dim):
                    part_acc[item, g, i] = acc[g, i]
    if splits > 1:
        o = np.empty(dim, dtype=np.float32)
        for pair in range(num_seqs * kv_heads):   # merge the slices: little work, on the calling thread
            seq = pair // kv_heads
            head = pair % kv_heads
            row = rows[seq]
            if row < 0:
                continue
            base = pair * splits
            for g in range(group):
                m_all = part_ml[base, 0, g]
                for p in range(1, splits):
                    m_all = max(m_all, part_ml[base + p, 0, g])
                total = np.float32(0.0)
                o[:] = 0.0
                for p in range(splits):
                    if part_ml[base + p, 1, g] > 0:
                        w = np.float32(math.exp(part_ml[base + p, 0, g] - m_all))
                        total += w * part_ml[base + p, 1, g]
                        for i in range(dim):
                            o[i] += w * part_acc[base + p, g, i]
                _emit(out, row, head * group + g, o, np.float32(1.0) / total, int4)


@njit(cache=True, nogil=True, inline="always")
def _round_clamp(v, lo, hi):
    """The format's rounding: half away from zero, then clamped to [lo, hi] (float32)."""
    r = np.trunc(v + np.float32(0.5)) if v >= 0 else np.trunc(v - np.float32(0.5))
    return min(max(r, np.float32(lo)), np.float32(hi))


@njit(cache=True, nogil=True)     # no fastmath: the bytes must equal the format's (tests: torch_quantize_*)
def _write_kernel(cells, words, x, slots, kv_heads, block_size, side, int4):
    """Quantize x [T, H, D] (float32; int4: already rotated and rounded to the model dtype) into the K (side 0)
    or V (side 1) halves of the cells at ``slots`` (< 0: skipped)."""
    tokens, heads, dim = x.shape
    data = dim // 2 if int4 else dim
    at = data // 4
    floor = np.float32(1e-6)
    for t in range(tokens):
        slot = slots[t]
        if slot < 0:
            continue
        for h in range(heads):
            r = 2 * ((slot // block_size * kv_heads + h) * block_size + slot % block_size) + side
            if int4:
                mn = x[t, h, 0]
                mx = x[t, h, 0]
                for i in range(dim):
                    mn = min(mn, x[t, h, i])
                    mx = max(mx, x[t, h, i])
                scale = max((mx - mn) / np.float32(15.0), floor)
                inv = np.float32(1.0) / scale
                z = -mn / scale
                zp = _round_clamp(z, 0.0, 15.0)
                for i in range(data):
                    lo = _round_clamp(x[t, h, 2 * i] * inv + zp, 0.0, 15.0)
                    hi = _round_clamp(x[t, h, 2 * i + 1] * inv + zp, 0.0, 15.0)
                    cells[r, i] = np.uint8(np.int32(lo) | (np.int32(hi) << 4))
                words[r, at] = (_float_bits(scale) & -16) | np.int32(zp)
            else:
                m = np.float32(0.0)
                for i in range(dim):
                    m = max(m, abs(x[t, h, i]))
                scale = max(m / np.float32(127.0), floor)
                inv = np.float32(1.0) / scale
                for i in range(dim):
                    cells[r, i] = np.int8(_round_clamp(x[t, h, i] * inv, -128.0, 127.0))
                words[r, at] = _float_bits(scale)


def _halves(cache: np.ndarray) -> np.ndarray:
    """The cache [blocks, H, block_size, cell] as [cells x 2, cell / 2]: row 2r cell r's K half, 2r + 1 its V half
    (a view: vLLM's cache is one contiguous tensor; a copy would lose the writes)."""
    if not cache.flags.c_contiguous:
        raise ValueError("the per-token-head KV cache must be C-contiguous")
    return cache.reshape(-1, cache.shape[3] // 2)


def write_cells(cache: np.ndarray, key: np.ndarray, value: np.ndarray, slots: np.ndarray, int4: bool) -> None:
    """Quantize key/value [T, H, D] float32 (int4: rotated) into the cache at ``slots`` (int64, < 0 skipped),
    the bytes of cpu_kv_attention.write_cells. One loop per call: a decode step writes a token or a few per
    layer, where torch's chain of quantization ops costs 0.1-0.2 ms."""
    if key.shape != value.shape or key.shape[0] != slots.shape[0]:
        raise ValueError(f"KV cache write: key {key.shape}, value {value.shape} and {slots.shape[0]} slots differ")
    halves = _halves(cache)
    cells = halves.view(np.uint8) if int4 else halves.view(np.int8)
    for side, x in enumerate((key, value)):
        _write_kernel(cells, halves.view(np.int32), x, slots, cache.shape[1], cache.shape[2], side, bool(int4))


def split_count(num_seqs: int, kv_heads: int, max_blocks: int, threads: int) -> int:
    """Context slices per (sequence, KV head): enough work items for every thread, slices of >= 4 blocks."""
    if num_seqs == 0 or num_seqs * kv_heads >= 2 * threads:
        return 1
    want = -(-2 * threads // (num_seqs * kv_heads))
    return max(1, min(want, max_blocks // 4))


def decode_attention(cache: np.ndarray, query: np.ndarray, block_table: np.ndarray, seq_lens: np.ndarray,
                     rows: np.ndarray, window: int, int4: bool, out: np.ndarray, splits: int = 1,
                     scale: float = 1.0) -> None:
    """Attention of one query row per sequence over its cached context, written into ``out``.

    cache: the layer's cache [blocks, kv_heads, block_size, cell] (int8 or uint8, vLLM's per-token-head cells);
    query/out [tokens, heads, D]: float32, or bfloat16 seen as uint16 (``t.view(torch.int16).numpy().view(
    np.uint16)``), so the model's own tensors go in and out without copies; the query is multiplied by
    ``scale`` (int4: pass it rotated, like the cache; ``out`` comes back rotated); block_table [seqs,
    max_blocks] int32; seq_lens [seqs] int32 (the query row is the last position); rows [seqs] int32: each
    sequence's row in query and out, -1 to skip it; window: keys within the last ``window`` positions only
    (<= 0: all).
    """
    halves = _halves(cache)
    _decode_kernel(halves.view(np.uint8) if int4 else halves.view(np.int8), halves.view(np.int32), cache.shape[1],
                   cache.shape[2], query, np.float32(scale), block_table, seq_lens, rows, int(window), int(splits),
                   bool(int4), out)


_WARM: set[tuple[bool, bool]] = set()


def warm(int4: bool, bf16: bool = False) -> None:
    """Compile (or load from Numba's on-disk cache) the kernel for one format and query type, once per process.

    vLLM's start-up dummy runs have no query of length 1 and write no cache, so without this the first request
    would pay the compile (about 8 s per format on a 2-core VM): the decode kernel and the writer. The types
    match the engine's call: a C-contiguous cache, int32 tables, a float32 or (``bf16``) bfloat16-bits query and
    output. Cheap when the disk cache is warm (a load and one launch over a one-token cache).
    """
    if (int4, bf16) in _WARM:
        return
    head_size, block_size = 8, 4
    cell = 2 * ((head_size // 2 if int4 else head_size) + 4)
    cache = np.zeros((1, 1, block_size, cell), dtype=np.uint8 if int4 else np.int8)
    cache.view(np.int32)[..., (cell // 2 - 4) // 4] = np.float32(1.0).view(np.int32)   # K scale
    cache.view(np.int32)[..., (cell - 4) // 4] = np.float32(1.0).view(np.int32)        # V scale
    query = np.zeros((1, 1, head_size), dtype=np.uint16 if bf16 else np.float32)
    out = np.empty_like(query)
    one = np.ones(1, dtype=np.int32)
    decode_attention(cache, query, np.zeros((1, 1), dtype=np.int32), one, one - 1, 0, int4, out)
    x = np.zeros((1, 1, head_size), dtype=np.float32)
    write_cells(cache, x, x, np.full(1, -1, dtype=np.int64), int4)
    _WARM.add((int4, bf16))


def use_threads(wanted: int) -> int:
    """Numba's thread count for the kernel in this thread: ``wanted`` (torch's, the engine's cores) capped by
    Numba's pool; returned, for planning the context slices."""
    n = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n
