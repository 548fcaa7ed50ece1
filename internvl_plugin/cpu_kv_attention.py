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

Reading: the blocks the batch's sequences use are gathered and dequantized with torch ops into a small
16-bit scratch cache in ``CPU_ATTN``'s own layout, and vLLM's CPU attention kernel (the same call the
16-bit cache gets, with its per-machine ISA: AMX, AVX-512, AVX2, NEON) runs on that. Writing quantizes
with torch ops. Hand-written because no library writes or reads this format on CPU; torch ops only, so
it runs on every CPU vLLM runs on (nothing here needs AVX-512).

vLLM internals touched (vLLM 0.32; ``tests/test_kv_cpu_format.py`` fails when they change):
``CPUAttentionBackend`` / ``CPUAttentionBackendImpl`` / ``CPUAttentionMetadataBuilder`` are subclassed,
and the builder is built with ``cache_config.cache_dtype`` shown as ``"auto"``: its ISA choice and
scheduler metadata are for the 16-bit scratch cache, and vLLM's ISA check would otherwise refuse a
quantized dtype on AVX2 machines.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch

__all__ = ["PER_TOKEN_HEAD_DTYPES", "RHT_SEED", "CPUKVQuantAttentionBackend", "check_head_size",
           "cell_bytes", "rht", "quantize_int8", "quantize_int4", "dequantize_int8", "dequantize_int4",
           "write_cells", "read_blocks"]

PER_TOKEN_HEAD_DTYPES = ("int8_per_token_head", "int4_per_token_head")
# vLLM 0.32 int4_per_token_head._get_rht_signs: torch.Generator(cpu).manual_seed(0x9E3779B9), Bernoulli(0.5)
RHT_SEED = 0x9E3779B9
_SCALE_BYTES = 4
_SCALE_FLOOR = 1e-6


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


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


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


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scale [...])."""
    x = x.float()
    scale = (x.abs().amax(-1) / 127.0).clamp_min(_SCALE_FLOOR)
    q = _round_half_away(x * (1.0 / scale)[..., None]).clamp(-128, 127)
    return q.to(torch.int8), scale


def quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (already rotated) -> (packed uint8 [..., D/2], float32 scale with zp in its low 4 bits [...])."""
    x = x.float()
    mn, mx = x.amin(-1), x.amax(-1)
    scale = ((mx - mn) / 15.0).clamp_min(_SCALE_FLOOR)
    zp = _round_half_away(-mn / scale).clamp(0, 15)
    q = _round_half_away(x * (1.0 / scale)[..., None] + zp[..., None]).clamp(0, 15).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    bits = (scale.view(torch.int32) & -16) | zp.to(torch.int32)
    return packed, bits.view(torch.float32)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Back to the rotated space (what vLLM's kernel multiplies the rotated Q with)."""
    bits = scale.view(torch.int32)
    zp = (bits & 0xF).to(torch.float32)
    step = (bits & -16).view(torch.float32)
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).to(torch.float32)
    return ((q - zp[..., None]) * step[..., None]).to(dtype)


def _encode(kv_cache_dtype: str, x: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] -> the [data | scale] half-cell bytes [T, H, data + 4] as int8."""
    if kv_cache_dtype == "int4_per_token_head":
        data, scale = quantize_int4(rht(x).to(x.dtype))
    else:
        data, scale = quantize_int8(x)
    return torch.cat([data.view(torch.int8), scale.unsqueeze(-1).view(torch.int8)], dim=-1)


def write_cells(kv_cache_dtype: str, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Quantize key/value [T, H, D] into the cache [blocks, H, block_size, cell] at ``slot_mapping``."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    if slot_mapping.numel() == 0:
        return
    block_size = kv_cache.shape[2]
    cells = torch.cat([_encode(kv_cache_dtype, key), _encode(kv_cache_dtype, value)], dim=-1)
    slot_mapping = slot_mapping.long()
    kv_cache.view(torch.int8)[slot_mapping // block_size, :, slot_mapping % block_size] = cells


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


def used_blocks(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the cache block ids the sequences use, in order; the block table renumbered into that list)."""
    counts = (seq_lens.long() + block_size - 1) // block_size
    used = torch.arange(block_table.shape[1])[None, :] < counts[:, None]
    ids = block_table[used]
    local = torch.zeros_like(block_table)
    local[used] = torch.arange(ids.numel(), dtype=block_table.dtype)
    return ids.long(), local


# ---------------------------------------------------------------------------------------------------------
# The vLLM backend (vLLM 0.32 CPU_ATTN classes, subclassed)
# ---------------------------------------------------------------------------------------------------------
from vllm import _custom_ops as ops  # noqa: E402
from vllm.logger import init_logger  # noqa: E402
from vllm.v1.attention.backend import AttentionType  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import (  # noqa: E402
    CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder)
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


class CPUKVQuantMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's builder, built as for the 16-bit scratch cache the kernel reads."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        cache_config = vllm_config.cache_config
        real = cache_config.cache_dtype
        if real in PER_TOKEN_HEAD_DTYPES:
            cache_config.cache_dtype = "auto"  # vLLM 0.32 reads it here for the ISA and scheduler metadata only
        try:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        finally:
            cache_config.cache_dtype = real


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
        if self.kv_format:
            check_head_size(self.kv_format, head_size)
            self.kv_cache_dtype = self.kv_format
            logger.info_once(f"{self.kv_format} KV cache on CPU: written and read by the plugin's "
                             "CPUKVQuantAttentionBackend (vLLM's own CPU attention has no such cache)")

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
        n_tok = attn_metadata.num_actual_tokens
        block_size = kv_cache.shape[2]
        ids, local_table = used_blocks(attn_metadata.block_table, attn_metadata.seq_lens, block_size)
        # kv_cache[ids], not index_select: about 10x faster for these wide rows (torch 2.13 CPU)
        key_16, value_16 = read_blocks(self.kv_format, kv_cache[ids], self.head_size, query.dtype)
        # the kernel's cache layout depends on its ISA (AMX packs K), so vLLM's own writer fills the scratch
        scratch = torch.empty((ids.numel(), self.num_kv_heads, 2 * block_size, self.head_size), dtype=query.dtype)
        key_cache, value_cache = scratch.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key_16, value_16, key_cache, value_cache,
                                       torch.arange(key_16.shape[0], dtype=torch.int64), layer.isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

        q, scale = query[:n_tok], self.scale
        rotated = self.kv_format == "int4_per_token_head"
        if rotated:
            b = rht_block(self.head_size)
            q, scale = rht(q).to(query.dtype), scale / b
        out = output[:n_tok]
        if self.sinks is not None and self.sinks.dtype not in (torch.bfloat16, torch.float32):
            self.sinks = self.sinks.to(torch.float32)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=attn_metadata.query_start_loc, seq_lens=attn_metadata.seq_lens, scale=scale,
            causal=attn_metadata.causal, alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
            block_table=local_table, softcap=self.logits_soft_cap,
            scheduler_metadata=attn_metadata.scheduler_metadata, s_aux=self.sinks,
            dynamic_causal=attn_metadata.dynamic_causal, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        if rotated:
            out.copy_((rht(out.view(n_tok, -1, self.head_size), inverse=True) / b).view(out.shape))
        return output
