"""CPU attention for vLLM's ``int8_per_token_head`` / ``int4_per_token_head`` KV caches.

vLLM 0.32 implements these two KV dtypes only in its GPU Triton backend. Its CPU backend (``CPU_ATTN``)
accepts ``int8_per_token_head`` and computes wrong attention (its kernels know fp8 only, and it stops on
machines without AVX-512 / AMX), and has no int4. The plugin registers :class:`CPUKVQuantAttentionBackend`
in place of ``CPU_ATTN`` (``register_backend``, vllm-plugin-guide.md §5): a subclass that handles the two
dtypes and leaves every other KV dtype to vLLM's own code path untouched.

The cache is vLLM's own format, byte for byte, so a cache means the same on CPU and GPU
(vLLM 0.32: ``triton_attn.py`` ``customize_spec`` / ``_ensure_scale_caches``,
``ops/triton_reshape_and_cache_flash.py`` ``_reshape_cache_per_token_head``,
``ops/int4_per_token_head.py``):

* One page cell per (block, KV head, slot) holds ``[K data | K scale fp32 | V data | V scale fp32]``.
* int8: symmetric; scale = max(absmax / 127, 1e-6); q = x / scale rounded half away from zero, clamped to
  [-128, 127].
* int4: K and V are first rotated with a randomized Hadamard transform (RHT, below) and rounded to the
  model dtype; then per (token, head) scale = max((max - min) / 15, 1e-6), zero point
  zp = clamp(round_half_away(-min / scale), 0, 15), q = clamp(round_half_away(x / scale + zp), 0, 15);
  values 2i and 2i+1 share byte i (low nibble first); zp sits in the scale's 4 low mantissa bits.
  Attention runs in the rotated space: Q is rotated, the softmax scale divided by b, and the output
  rotated back and divided by b (b = the largest power-of-two divisor of the head size).

Reading, decode (query length 1, the step that repeats): ``cpu_kv_decode.py``'s fused kernel reads the packed
cells in place through the block table (Numba, compiled for the machine: AVX2, AVX-512, NEON alike), so a
decode step reads 2-3.5x fewer bytes than with the 16-bit cache. Reading, prefill and chunked prefill: the
blocks those sequences use (in their window; shared prefix blocks once) are dequantized with torch ops into a
16-bit scratch cache in ``CPU_ATTN``'s own layout, and vLLM's CPU attention kernel (the call the 16-bit cache
gets, with its per-machine ISA: AMX, AVX-512, AVX2, NEON) runs on that. Which rows go where, the scratch's block
list and the kernel's scheduler metadata are worked out once per step by the metadata builder
(:func:`plan_step`), not per layer. Writing is one Numba loop (int4's rotation a torch matmul). Hand-written
because no library writes or reads this format on CPU; nothing here needs AVX-512.

vLLM internals touched (vLLM 0.32; ``tests/test_kv_cpu_format.py`` fails when they change):
``CPUAttentionBackend`` / ``CPUAttentionBackendImpl`` / ``CPUAttentionMetadataBuilder`` are subclassed,
and the builder is built with ``cache_config.cache_dtype`` shown as ``"auto"``: its ISA choice and
scheduler metadata are for the 16-bit scratch cache, and vLLM's ISA check would otherwise refuse a
quantized dtype on AVX2 machines.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy as np
import torch

__all__ = ["PER_TOKEN_HEAD_DTYPES", "RHT_SEED", "CPUKVQuantAttentionBackend", "check_head_size",
           "cell_bytes", "rht", "dequantize_int8", "dequantize_int4",
           "write_cells", "read_blocks", "plan_step"]

PER_TOKEN_HEAD_DTYPES = ("int8_per_token_head", "int4_per_token_head")
# vLLM 0.32 int4_per_token_head._get_rht_signs: torch.Generator(cpu).manual_seed(0x9E3779B9), Bernoulli(0.5)
RHT_SEED = 0x9E3779B9
_SCALE_BYTES = 4


def _kernel():
    """``cpu_kv_decode``, imported on first use: it imports numba and picks Numba's threading layer and thread pool
    for the whole process, which only an engine with an int8/int4 cache should do (vLLM's own n-gram proposer runs
    Numba parallel code too)."""
    from internvl_plugin import cpu_kv_decode

    return cpu_kv_decode


_KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy without a copy; bfloat16 (which numpy lacks) as its uint16 bits."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


# ---------------------------------------------------------------------------------------------------------
# The format (torch only)
# ---------------------------------------------------------------------------------------------------------
def check_head_size(kv_cache_dtype: str, head_size: int) -> None:
    """One-line ValueError for a head size the format cannot lay out (the fp32 scales must stay aligned)."""
    need = 8 if kv_cache_dtype == "int4_per_token_head" else 4
    if head_size % need:
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} needs a head size divisible by {need} (its fp32 "
                         f"per-token scales follow each head's packed data); this model has head size {head_size}")


def data_bytes(kv_cache_dtype: str, head_size: int) -> int:
    return head_size // 2 if kv_cache_dtype == "int4_per_token_head" else head_size


def cell_bytes(kv_cache_dtype: str, head_size: int) -> int:
    """Bytes of one (block, head, slot) cell: K data, K scale, V data, V scale (vLLM's customize_spec)."""
    return 2 * (data_bytes(kv_cache_dtype, head_size) + _SCALE_BYTES)


_RHT_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _rht_matrices(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, inverse) b x b float32 matrices for row vectors: y = x @ F is H·(d ⊙ x); x·b = y @ I."""
    if b not in _RHT_CACHE:
        gen = torch.Generator(device="cpu").manual_seed(RHT_SEED)
        signs = 2.0 * torch.bernoulli(torch.full((b,), 0.5), generator=gen) - 1.0
        h = torch.ones(1, 1)
        while h.shape[0] < b:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        # H is symmetric: H·(d ⊙ x) as a row vector is x @ diag(d) @ H; the inverse H·y then ⊙ d is y @ H @ diag(d)
        _RHT_CACHE[b] = (signs[:, None] * h).contiguous(), (h * signs[None, :]).contiguous()
    return _RHT_CACHE[b]


def rht_block(head_size: int) -> int:
    """b: the RHT is applied block-diagonally in chunks of the largest power-of-two divisor of the head size."""
    return head_size & -head_size


def rht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """vLLM's ``single_rht`` on the last dim, in float32 (unnormalized: the inverse returns b·x)."""
    d = x.shape[-1]
    b = rht_block(d)
    fwd, inv = _rht_matrices(b)
    y = x.float().reshape(*x.shape[:-1], d // b, b) @ (inv if inverse else fwd)
    return y.reshape(x.shape)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Back to the rotated space (what vLLM's kernel multiplies the rotated Q with)."""
    bits = scale.view(torch.int32)
    zp = (bits & 0xF).to(torch.float32)
    step = (bits & -16).view(torch.float32)
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).to(torch.float32)
    return ((q - zp[..., None]) * step[..., None]).to(dtype)


def write_cells(kv_cache_dtype: str, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Quantize key/value [T, H, D] into the cache [blocks, H, block_size, cell] at ``slot_mapping`` (< 0: skipped).

    int4 rotates with torch (one matmul) and rounds to the model dtype, as vLLM does; the quantization and the
    stores are one Numba loop (cpu_kv_decode.write_cells): torch's chain of small ops cost 0.1-0.2 ms a call,
    which every layer of every decode step pays.
    """
    int4 = kv_cache_dtype == "int4_per_token_head"
    key, value = (rht(key).to(key.dtype), rht(value).to(value.dtype)) if int4 else (key, value)
    _kernel().write_cells(kv_cache.numpy(), key.float().contiguous().numpy(), value.float().contiguous().numpy(),
                          slot_mapping.long().contiguous().numpy(), int4)


def read_blocks(kv_cache_dtype: str, cells: torch.Tensor, head_size: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize cells [n, H, block_size, cell] -> K, V [n·block_size, H, D] (token-major, like the model's K, V)."""
    cells = cells.transpose(1, 2).reshape(-1, cells.shape[1], cells.shape[3]).view(torch.int8)
    d = data_bytes(kv_cache_dtype, head_size)
    half = d + _SCALE_BYTES
    out = []
    for i in range(2):  # K, V
        data = cells[..., i * half:i * half + d]
        scale = cells[..., i * half + d:(i + 1) * half].contiguous().view(torch.float32).squeeze(-1)
        if kv_cache_dtype == "int4_per_token_head":
            out.append(dequantize_int4(data.view(torch.uint8), scale, dtype))
        else:
            out.append(dequantize_int8(data, scale, dtype))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------
# The vLLM backend (vLLM 0.32 CPU_ATTN classes, subclassed)
# ---------------------------------------------------------------------------------------------------------
from vllm import _custom_ops as ops  # noqa: E402
from vllm.config import get_layers_from_vllm_config  # noqa: E402
from vllm.logger import init_logger  # noqa: E402
from vllm.model_executor.layers.attention import Attention  # noqa: E402
from vllm.v1.attention.backend import AttentionType  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import (  # noqa: E402
    CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadata, CPUAttentionMetadataBuilder)
from vllm.v1.kv_cache_interface import AttentionSpec, KVQuantMode  # noqa: E402

# a "vllm." name: vLLM configures (handler, level) only its own logger tree
logger = init_logger(f"vllm.{__name__}")

_MODES = {KVQuantMode.INT8_PER_TOKEN_HEAD: "int8_per_token_head",
          KVQuantMode.INT4_PER_TOKEN_HEAD: "int4_per_token_head"}


class CPUKVQuantAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` plus the int8/int4 per-token-head KV caches (registered in place of vLLM's class)."""

    supported_kv_cache_dtypes: ClassVar[list] = [*CPUAttentionBackend.supported_kv_cache_dtypes,
                                                 *PER_TOKEN_HEAD_DTYPES]

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """The page cell of vLLM's Triton backend: data and one fp32 scale per K and V side."""
        dtype = _MODES.get(spec.kv_quant_mode)
        if dtype is None or spec.state_content_bytes is not None:
            return spec
        check_head_size(dtype, spec.head_size)
        if spec.head_size_v != spec.head_size:
            raise ValueError(f"--kv-cache-dtype {dtype} on CPU needs equal K and V head sizes "
                             f"(this model has {spec.head_size} and {spec.head_size_v})")
        return replace(spec, state_content_bytes=cell_bytes(dtype, spec.head_size))

    @staticmethod
    def get_impl_cls() -> type[CPUKVQuantAttentionImpl]:
        return CPUKVQuantAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CPUKVQuantMetadataBuilder]:
        return CPUKVQuantMetadataBuilder


@dataclass
class StepPlan:
    """What every layer of a step reads the per-token-head cache with, worked out once per step.

    Decode rows (query length 1) go to the fused kernel (cpu_kv_decode.py); the other sequences (prefill and
    chunked prefill) to vLLM's kernel over a 16-bit scratch copy of only the blocks they use, each block once.
    """
    block_table: np.ndarray             # [seqs, max_blocks] int32, for the fused kernel
    seq_lens: np.ndarray                # [seqs] int32
    decode_rows: np.ndarray             # [seqs] int32: the sequence's row in ``decode_tokens``, -1 if not decoding
    decode_query_rows: np.ndarray       # [seqs] int32: the sequence's row in the step's query, -1 if not decoding
    decode_tokens: torch.Tensor         # [d] int64: the query rows that decode
    splits: int
    prefill_tokens: torch.Tensor | None   # [p] int64: query rows of the other sequences (None: there are none)
    prefill_query_start_loc: torch.Tensor | None = None
    prefill_seq_lens: torch.Tensor | None = None
    prefill_blocks: torch.Tensor | None = None       # cache block ids to dequantize, each once
    prefill_table: torch.Tensor | None = None        # the prefill sequences' block table over that list
    prefill_scheduler_metadata: torch.Tensor | None = None


def plan_step(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int,
              window: int, fused: bool, scheduler_args: dict) -> StepPlan:
    """The per-step structures (``scheduler_args``: vLLM's scheduler-metadata arguments other than the batch)."""
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    decode = (query_lens == 1) if fused else torch.zeros_like(query_lens, dtype=torch.bool)
    rows = torch.full_like(query_lens, -1)
    rows[decode] = torch.arange(int(decode.sum()), dtype=rows.dtype)
    decode_tokens = query_start_loc[:-1][decode].long()
    table = block_table.to(torch.int32).contiguous()
    kernel = _kernel()
    # slices over the longest decoding context, not the table's width (that is the model's whole length)
    longest = int(seq_lens[decode].max()) if decode_tokens.numel() else 0
    splits = kernel.split_count(decode_tokens.numel(), scheduler_args["num_kv_heads"], -(-longest // block_size),
                                kernel.use_threads(torch.get_num_threads()))
    query_rows = torch.full_like(query_lens, -1)
    query_rows[decode] = query_start_loc[:-1][decode]
    plan = StepPlan(table.numpy(), seq_lens.to(torch.int32).contiguous().numpy(), rows.to(torch.int32).numpy(),
                    query_rows.to(torch.int32).numpy(), decode_tokens, splits, None)
    other = (~decode & (query_lens > 0)).nonzero().flatten()
    if other.numel() == 0:
        return plan
    q_lens, s_lens = query_lens[other], seq_lens[other]
    plan.prefill_tokens = torch.cat([torch.arange(int(a), int(a) + int(n)) for a, n in
                                     zip(query_start_loc[other].tolist(), q_lens.tolist())])
    loc = torch.zeros(other.numel() + 1, dtype=query_start_loc.dtype)
    torch.cumsum(q_lens, 0, out=loc[1:])
    plan.prefill_query_start_loc, plan.prefill_seq_lens = loc, s_lens.contiguous()
    sub = block_table[other].long()
    pos = torch.arange(sub.shape[1])[None, :]
    used = pos < ((s_lens.long() + block_size - 1) // block_size)[:, None]
    if window > 0:   # blocks wholly before every query's window are never read
        used &= (pos + 1) * block_size > (s_lens.long() - q_lens.long() - window + 1)[:, None]
    ids, inverse = torch.unique(sub[used], return_inverse=True)
    local = torch.zeros_like(sub)
    local[used] = inverse
    plan.prefill_blocks, plan.prefill_table = ids, local.to(block_table.dtype)
    plan.prefill_scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=other.numel(), seq_lens=plan.prefill_seq_lens, query_start_loc=loc, **scheduler_args)
    return plan


@dataclass
class CPUKVQuantMetadata(CPUAttentionMetadata):
    plan: StepPlan | None = None


class CPUKVQuantMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's builder, built as for the 16-bit scratch cache the kernel reads, plus the step's read plan."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        cache_config = vllm_config.cache_config
        real = cache_config.cache_dtype
        if real in PER_TOKEN_HEAD_DTYPES:
            cache_config.cache_dtype = "auto"  # vLLM 0.32 reads it here for the ISA and scheduler metadata only
        try:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        finally:
            cache_config.cache_dtype = real
        self.kv_format = real if real in PER_TOKEN_HEAD_DTYPES else None
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        self.fused = all(isinstance(x.impl, CPUKVQuantAttentionImpl) and x.impl.fused for x in layers.values())

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.kv_format is None or self.is_encoder_only_attention or metadata.dynamic_causal is not None:
            return metadata
        plan = plan_step(metadata.query_start_loc, metadata.seq_lens, metadata.block_table, self.block_size,
                         self.window_size, self.fused, dict(
                             num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                             dtype=self.dtype, causal=metadata.causal, sliding_window_size=self.window_size,
                             isa=self.isa, enable_kv_split=False))
        return with_plan(metadata, plan)


def with_plan(metadata: CPUAttentionMetadata, plan: StepPlan) -> CPUKVQuantMetadata:
    """vLLM's metadata with the step's plan (every dataclass field passed on; a test checks they are the
    constructor's arguments)."""
    return CPUKVQuantMetadata(**{f.name: getattr(metadata, f.name) for f in fields(CPUAttentionMetadata)}, plan=plan)


class CPUKVQuantAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention; for a per-token-head cache it writes vLLM's format and reads via a scratch cache."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        quantized = kv_cache_dtype in PER_TOKEN_HEAD_DTYPES
        # encoder attention keeps no cache: vLLM's own 16-bit path
        self.kv_format = kv_cache_dtype if quantized and attn_type == AttentionType.DECODER else None
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         "auto" if quantized else kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, sinks)
        # the fused decode kernel has no ALiBi, sinks or soft cap: such layers read through the scratch path
        self.fused = alibi_slopes is None and sinks is None and not logits_soft_cap
        if self.kv_format:
            check_head_size(self.kv_format, head_size)
            self.kv_cache_dtype = self.kv_format
            logger.info_once(f"{self.kv_format} KV cache on CPU: written and read by the plugin's "
                             "CPUKVQuantAttentionBackend (vLLM's own CPU attention has no such cache)")
            if self.fused:   # the model is built before the server reports healthy; the first request is not
                int4 = self.kv_format == "int4_per_token_head"   # the model is built under its dtype
                kernel = _kernel()
                kernel.warm(int4, not int4 and torch.get_default_dtype() == torch.bfloat16)
                logger.info_once(f"{self.kv_format} decode steps: fused CPU kernel (Numba, up to "
                                 f"{kernel.numba.config.NUMBA_NUM_THREADS} threads, "
                                 f"{kernel.numba.threading_layer()} threading layer)")

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.kv_format is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        write_cells(self.kv_format, kv_cache, key, value, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if self.kv_format is None or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with a per-token-head KV cache")
        plan = getattr(attn_metadata, "plan", None)
        if plan is None:                # metadata not from our builder (direct calls): the same plan, per call
            fused = self.fused and getattr(attn_metadata, "dynamic_causal", None) is None
            plan = plan_step(attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table,
                             kv_cache.shape[2], self.sliding_window, fused, dict(
                                 num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_size,
                                 dtype=query.dtype, causal=attn_metadata.causal,
                                 sliding_window_size=self.sliding_window, isa=layer.isa, enable_kv_split=False))
        if plan.decode_tokens.numel():
            self._decode(query, kv_cache, plan, output)
        if plan.prefill_tokens is not None:
            self._prefill(layer, query, kv_cache, attn_metadata, plan, output)
        return output

    def _decode(self, query, kv_cache, plan: StepPlan, output) -> None:
        """The fused kernel: one query row per sequence, the packed cache read in place. int8 reads the query and
        writes the output in place (bfloat16 or float32): a decode step's torch ops cost more than its attention."""
        kernel = _kernel()
        kernel.use_threads(torch.get_num_threads())     # as planned (Numba's count is per thread)
        cache = kv_cache.numpy()
        if self.kv_format == "int4_per_token_head":     # rotated like K (b from H^T H = b·I); back after
            b = rht_block(self.head_size)
            q = rht(query.index_select(0, plan.decode_tokens))
            out = torch.empty(q.shape, dtype=torch.float32)
            kernel.decode_attention(cache, q.numpy(), plan.block_table, plan.seq_lens, plan.decode_rows,
                                    self.sliding_window, True, out.numpy(), plan.splits, self.scale / b)
            out = rht(out, inverse=True) / b
            output.view(-1, self.num_heads, self.head_size).index_copy_(0, plan.decode_tokens, out.to(output.dtype))
            return
        q = query.view(-1, self.num_heads, self.head_size)
        out = output.view(-1, self.num_heads, self.head_size)
        if query.dtype in _KERNEL_DTYPES and output.dtype == query.dtype and out.is_contiguous():
            kernel.decode_attention(cache, _as_numpy(q.contiguous()), plan.block_table, plan.seq_lens,
                                    plan.decode_query_rows, self.sliding_window, False, _as_numpy(out), plan.splits,
                                    self.scale)
            return
        q32 = q.float().contiguous()                     # float16: the kernel reads float32 or bfloat16
        o32 = torch.empty(q32.shape, dtype=torch.float32)
        kernel.decode_attention(cache, q32.numpy(), plan.block_table, plan.seq_lens, plan.decode_query_rows,
                                self.sliding_window, False, o32.numpy(), plan.splits, self.scale)
        out.index_copy_(0, plan.decode_tokens, o32.index_select(0, plan.decode_tokens).to(out.dtype))

    def _prefill(self, layer, query, kv_cache, attn_metadata, plan: StepPlan, output) -> None:
        """vLLM's kernel over a 16-bit scratch copy of the blocks the prefilling sequences use."""
        block_size = kv_cache.shape[2]
        ids = plan.prefill_blocks
        # kv_cache[ids], not index_select: about 10x faster for these wide rows (torch 2.13 CPU)
        key_16, value_16 = read_blocks(self.kv_format, kv_cache[ids], self.head_size, query.dtype)
        # the kernel's cache layout depends on its ISA (AMX packs K), so vLLM's own writer fills the scratch
        scratch = torch.empty((ids.numel(), self.num_kv_heads, 2 * block_size, self.head_size), dtype=query.dtype)
        key_cache, value_cache = scratch.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key_16, value_16, key_cache, value_cache,
                                       torch.arange(key_16.shape[0], dtype=torch.int64), layer.isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        q, scale = query.index_select(0, plan.prefill_tokens), self.scale
        rotated = self.kv_format == "int4_per_token_head"
        if rotated:
            b = rht_block(self.head_size)
            q, scale = rht(q).to(query.dtype), scale / b
        out = torch.empty_like(q)
        if self.sinks is not None and self.sinks.dtype not in (torch.bfloat16, torch.float32):
            self.sinks = self.sinks.to(torch.float32)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=plan.prefill_query_start_loc, seq_lens=plan.prefill_seq_lens, scale=scale,
            causal=attn_metadata.causal, alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
            block_table=plan.prefill_table, softcap=self.logits_soft_cap,
            scheduler_metadata=plan.prefill_scheduler_metadata, s_aux=self.sinks,
            dynamic_causal=attn_metadata.dynamic_causal, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        if rotated:
            out = (rht(out, inverse=True) / b).to(out.dtype)
        output.view(-1, self.num_heads, self.head_size).index_copy_(0, plan.prefill_tokens, out)
