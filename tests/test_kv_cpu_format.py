"""The CPU per-token-head KV cache (internvl_plugin/cpu_kv_attention.py): bytes, scales, read-back, attention.

The test vectors are worked out by hand from vLLM 0.32's format definition (specs/internvl-and-quant.md
B4.2-B4.3; triton_attn.py, triton_reshape_and_cache_flash.py, int4_per_token_head.py), with inputs chosen
away from rounding ties so that the order of float operations cannot change a byte. The last group checks
the vLLM internals the module relies on, so a vLLM upgrade that changes them fails here.
"""

from __future__ import annotations

import inspect
import math
import struct
from types import SimpleNamespace

import pytest
import torch

from internvl_plugin import cpu_kv_attention as kvq

INT8, INT4 = kvq.PER_TOKEN_HEAD_DTYPES
CACHE_DTYPE = {INT8: torch.int8, INT4: torch.uint8}


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def le32(n: int) -> list[int]:
    return list(n.to_bytes(4, "little"))


def sylvester(b: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def cache_for(fmt, blocks, heads, block_size, head_size):
    return torch.zeros(blocks, heads, block_size, kvq.cell_bytes(fmt, head_size), dtype=CACHE_DTYPE[fmt])


def cell(cache, slot, head=0):
    block_size = cache.shape[2]
    return cache.view(torch.uint8)[slot // block_size, head, slot % block_size].tolist()


# ------------------------------------------------------------- the write path in torch ops (a second oracle)
# The format's definition as torch tensor ops, on whole tensors: the plugin writes with a Numba loop
# (test_kv_cpu_decode checks the two give the same bytes on random inputs, ties included).

SCALE_FLOOR = 1e-6


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def torch_quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scale [...])."""
    x = x.float()
    scale = (x.abs().amax(-1) / 127.0).clamp_min(SCALE_FLOOR)
    q = round_half_away(x * (1.0 / scale)[..., None]).clamp(-128, 127)
    return q.to(torch.int8), scale


def torch_quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (already rotated) -> (packed uint8 [..., D/2], float32 scale with zp in its low 4 bits [...])."""
    x = x.float()
    mn, mx = x.amin(-1), x.amax(-1)
    scale = ((mx - mn) / 15.0).clamp_min(SCALE_FLOOR)
    zp = round_half_away(-mn / scale).clamp(0, 15)
    q = round_half_away(x * (1.0 / scale)[..., None] + zp[..., None]).clamp(0, 15).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    bits = (scale.view(torch.int32) & -16) | zp.to(torch.int32)
    return packed, bits.view(torch.float32)


def torch_write_cells(fmt: str, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep].long()

    def encode(x):
        data, scale = torch_quantize_int4(kvq.rht(x).to(x.dtype)) if fmt == INT4 else torch_quantize_int8(x)
        return torch.cat([data.view(torch.int8), scale.unsqueeze(-1).view(torch.int8)], dim=-1)

    block_size = kv_cache.shape[2]
    cells = torch.cat([encode(key), encode(value)], dim=-1)
    kv_cache.view(torch.int8)[slot_mapping // block_size, :, slot_mapping % block_size] = cells


# ------------------------------------------------------------------------------------------ write path bytes


def test_int8_cell_bytes():
    # scale = max|x| / 127 = 3/127; q = round_half_away(x·127/3), clamped to [-128, 127]
    k = torch.tensor([-1, 0, 0.5, 3, 2.2, -0.5, 1, 1.4])
    v = -2 * k                                     # scale 6/127, the same q negated
    q = [-42, 0, 21, 127, 93, -21, 42, 59]
    cache = cache_for(INT8, 2, 1, 32, 8)
    kvq.write_cells(INT8, cache, k.view(1, 1, 8), v.view(1, 1, 8), torch.tensor([37]))
    expect = ([x & 0xFF for x in q] + le32(f32_bits(3 / 127))
              + [(-x) & 0xFF for x in q] + le32(f32_bits(6 / 127)))
    assert cell(cache, 37) == expect
    cache.view(torch.uint8)[1, 0, 5] = 0
    assert not cache.any()                          # nothing else written


def test_int4_cell_bytes_after_the_rotation():
    """K is chosen so that its RHT is y = [-1, 0, 0.5, 3, 2.25, -0.5, 1, 1.5] exactly: x = d ⊙ (H·y) / 8."""
    gen = torch.Generator().manual_seed(0x9E3779B9)   # the sign vector as vLLM's format defines it
    signs = 2.0 * torch.bernoulli(torch.full((8,), 0.5), generator=gen) - 1.0
    assert signs.tolist() == [1, -1, 1, 1, -1, -1, -1, -1]
    y = torch.tensor([-1, 0, 0.5, 3, 2.25, -0.5, 1, 1.5])
    k = signs * (sylvester(8) @ y) / 8
    # scale = 4/15, zp = round(1/scale) = 4, q = round(y/scale + 4) = [0 4 6 15 12 2 8 10], pairs (2i, 2i+1)
    # low nibble first; the zero point replaces the scale's 4 low mantissa bits
    packed = [0x40, 0xF6, 0x2C, 0xA8]
    assert f32_bits(4 / 15) == 0x3E888889 and f32_bits(8 / 15) == 0x3F088889
    cache = cache_for(INT4, 1, 2, 32, 8)
    kv = torch.stack([k, k])[None]                # two heads, same data
    kvq.write_cells(INT4, cache, kv, 2 * kv, torch.tensor([5]))
    for head in (0, 1):
        assert cell(cache, 5, head) == packed + le32(0x3E888884) + packed + le32(0x3F088884)


def test_padding_slots_are_not_written():
    cache = cache_for(INT8, 1, 1, 32, 8)
    kvq.write_cells(INT8, cache, torch.ones(2, 1, 8), torch.ones(2, 1, 8), torch.tensor([-1, 3]))
    assert cell(cache, 3)[:8] == [127] * 8
    cache[0, 0, 3] = 0
    assert not cache.any()


def test_scale_floor_and_constant_heads():
    """An all-zero head gets scale 1e-6 (the format's floor) and decodes to zeros; a constant head is exact."""
    x = torch.zeros(1, 1, 8)
    data, scale = torch_quantize_int4(x)
    assert (struct.unpack("<I", scale.numpy().tobytes())[0] & ~0xF) == f32_bits(1e-6) & ~0xF
    assert kvq.dequantize_int4(data, scale, torch.float32).abs().max() < 1e-5
    q8, s8 = torch_quantize_int8(torch.full((1, 8), -0.75))
    assert q8.tolist() == [[-127] * 8] and kvq.dequantize_int8(q8, s8, torch.float32).allclose(torch.tensor(-0.75))


# ------------------------------------------------------------------------------------------ read path


def dequant_reference(fmt, cells, head_size):
    """Decode cells [..., cell] with plain Python-level ops, straight from the format definition."""
    raw = cells.view(torch.uint8).reshape(-1, cells.shape[-1])
    d = head_size // 2 if fmt == INT4 else head_size
    out = []
    for row in raw.tolist():
        sides = []
        for off in (0, d + 4):
            data = row[off:off + d]
            bits = int.from_bytes(bytes(row[off + d:off + d + 4]), "little")
            if fmt == INT8:
                scale = struct.unpack("<f", bits.to_bytes(4, "little"))[0]
                sides.append([(b - 256 if b > 127 else b) * scale for b in data])
            else:
                scale = struct.unpack("<f", (bits & ~0xF).to_bytes(4, "little"))[0]
                zp = bits & 0xF
                sides.append([((b >> s) & 0xF) * scale - zp * scale for b in data for s in (0, 4)])
        out.append(sides)
    t = torch.tensor(out)                                      # [cells, 2, D]
    return t.reshape(*cells.shape[:-1], 2, head_size)


@pytest.mark.parametrize("fmt", kvq.PER_TOKEN_HEAD_DTYPES)
@pytest.mark.parametrize("head_size", [64, 96])
def test_read_back_matches_the_reference_and_the_input(fmt, head_size):
    g = torch.Generator().manual_seed(1)
    tokens, heads, block_size = 40, 2, 32
    k, v = torch.randn(tokens, heads, head_size, generator=g), torch.randn(tokens, heads, head_size, generator=g)
    cache = cache_for(fmt, 3, heads, block_size, head_size)
    kvq.write_cells(fmt, cache, k, v, torch.arange(tokens) + 20)
    got_k, got_v = kvq.read_blocks(fmt, cache, head_size, torch.float32)       # token-major, all 96 slots
    ref = dequant_reference(fmt, cache, head_size).transpose(1, 2).reshape(-1, heads, 2, head_size)
    torch.testing.assert_close(got_k, ref[:, :, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got_v, ref[:, :, 1], rtol=0, atol=1e-6)
    got = torch.stack([got_k, got_v])[:, 20:20 + tokens]
    if fmt == INT4:   # stored in the rotated space: H·(d ⊙ x), undone by d ⊙ (H·y) / b
        b = kvq.rht_block(head_size)
        got = kvq.rht(got, inverse=True) / b
        step = torch.stack([kvq.rht(k), kvq.rht(v)])
        step = (step.amax(-1) - step.amin(-1)) / 15                            # per (token, head) scale
        bound = step[..., None] / 2 * math.sqrt(b)                             # worst case after un-rotating
    else:
        bound = torch.stack([k, v]).abs().amax(-1, keepdim=True) / 127 / 2 * 1.0001
    err = (got - torch.stack([k, v])).abs()
    assert (err <= bound).all()
    assert err.mean() < (0.09 if fmt == INT4 else 0.006)      # ~step/4 for unit Gaussians


# ------------------------------------------------------------------------------------------ attention


def attention_reference(q, k, v, scale, seq_lens, query_lens, window=None):
    """Causal attention per sequence in float64; k/v [tokens of all seqs (full sequences), H_kv, D]."""
    out, start_q, start_k = [], 0, 0
    group = q.shape[1] // k.shape[1]
    for seq_len, q_len in zip(seq_lens, query_lens):
        qs = q[start_q:start_q + q_len].double()
        ks = k[start_k:start_k + seq_len].double().repeat_interleave(group, 1)
        vs = v[start_k:start_k + seq_len].double().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        pos_q = torch.arange(seq_len - q_len, seq_len)[:, None]
        pos_k = torch.arange(seq_len)[None, :]
        mask = pos_k > pos_q
        if window is not None:
            mask |= pos_k <= pos_q - window
        s = s.masked_fill(mask, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vs))
        start_q += q_len
        start_k += seq_len
    return torch.cat(out)


def isas():
    found = ["vec"]                                 # what AVX2 machines get (vLLM's _get_attn_isa)
    if torch.cpu._is_amx_tile_supported():
        found.append("amx")
    return found


@pytest.mark.parametrize("fmt", kvq.PER_TOKEN_HEAD_DTYPES)
@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("window", [None, 24])
def test_attention_over_the_quantized_cache(fmt, isa, window, monkeypatch):
    """Three sequences (a decode step, a prefill chunk after a cached context, a whole prefill) through the
    backend's write and forward, against float64 attention over the dequantized cache."""
    from vllm import _custom_ops as ops

    from vllm.v1.attention.backends import cpu_attn

    dtype = torch.bfloat16 if isa == "amx" else torch.float32
    # the impl only reads the model dtype from the engine's config (for zentorch)
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: SimpleNamespace(
        model_config=SimpleNamespace(dtype=dtype)))
    heads, kv_heads, head_size, block_size = 4, 2, 64, 32
    seq_lens, query_lens = [70, 45, 33], [1, 13, 33]
    impl = kvq.CPUKVQuantAttentionImpl(heads, head_size, head_size ** -0.5, kv_heads, None, window, fmt)
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    g = torch.Generator().manual_seed(2)
    cache = cache_for(fmt, 12, kv_heads, block_size, head_size)
    tables = [[7, 2, 9], [4, 11, 0], [5, 1, 0]]       # blocks out of order; padding entries after the used ones
    ks, vs, qs, slots_all = [], [], [], []
    for seq_len, table in zip(seq_lens, tables):
        ks.append(torch.randn(seq_len, kv_heads, head_size, generator=g).to(dtype))
        vs.append(torch.randn(seq_len, kv_heads, head_size, generator=g).to(dtype))
        slots_all.append(torch.tensor([table[i // block_size] * block_size + i % block_size
                                       for i in range(seq_len)]))
    # the cached context first, then this step's tokens, as the engine writes them
    for k, v, s, q_len in zip(ks, vs, slots_all, query_lens):
        impl.do_kv_cache_update(layer, k[:-q_len], v[:-q_len], cache, s[:-q_len])
    for k, v, s, q_len in zip(ks, vs, slots_all, query_lens):
        qs.append(torch.randn(q_len, heads, head_size, generator=g).to(dtype))
    impl.do_kv_cache_update(layer, torch.cat([k[-n:] for k, n in zip(ks, query_lens)]),
                            torch.cat([v[-n:] for v, n in zip(vs, query_lens)]), cache,
                            torch.cat([s[-n:] for s, n in zip(slots_all, query_lens)]))
    q = torch.cat(qs)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    metadata = SimpleNamespace(
        num_actual_tokens=q.shape[0], query_start_loc=query_start_loc, seq_lens=seq_lens_t,
        block_table=torch.tensor(tables, dtype=torch.int32), causal=True, dynamic_causal=None,
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=3, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_size, seq_lens=seq_lens_t,
            dtype=dtype, query_start_loc=query_start_loc, causal=True,
            sliding_window_size=-1 if window is None else window, isa=isa, enable_kv_split=False))
    out = torch.full((q.shape[0], heads, head_size), float("nan"), dtype=dtype)
    impl.forward(layer, q, None, None, cache, metadata, out)

    # reference: the cache decoded by the format definition, back in the model's space
    deq = dequant_reference(fmt, cache, head_size)                 # [blocks, H, block_size, 2, D]
    k_ref, v_ref = [], []
    for s in slots_all:
        rows = deq[s // block_size, :, s % block_size]             # [seq, H, 2, D]
        k_ref.append(rows[:, :, 0])
        v_ref.append(rows[:, :, 1])
    k_ref, v_ref = torch.cat(k_ref), torch.cat(v_ref)
    if fmt == INT4:
        b = kvq.rht_block(head_size)
        k_ref, v_ref = kvq.rht(k_ref, inverse=True) / b, kvq.rht(v_ref, inverse=True) / b
    ref = attention_reference(q.float(), k_ref, v_ref, head_size ** -0.5, seq_lens, query_lens, window)
    atol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)
    # and the quantization itself is small against attention over the original K, V
    exact = attention_reference(q.float(), torch.cat(ks).float(), torch.cat(vs).float(), head_size ** -0.5,
                                seq_lens, query_lens, window)
    assert (out.double() - exact).abs().mean() < (0.05 if fmt == INT4 else 0.01)


def test_head_sizes_the_layout_cannot_pack_fail_in_one_line():
    with pytest.raises(ValueError, match=r"^--kv-cache-dtype int4_per_token_head needs a head size divisible by 8 "
                                         r"[^\n]*head size 36$"):
        kvq.check_head_size(INT4, 36)
    kvq.check_head_size(INT8, 36)
    with pytest.raises(ValueError, match="divisible by 4"):
        kvq.check_head_size(INT8, 34)


# ------------------------------------------------------------------------------------------ vLLM internals


@pytest.mark.parametrize("head_size", [64, 96, 128])
def test_rotation_is_vllms(head_size):
    from vllm.v1.attention.ops.int4_per_token_head import single_rht

    x = torch.randn(5, 3, head_size, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(kvq.rht(x), single_rht(x.clone()), rtol=0, atol=1e-4)
    torch.testing.assert_close(kvq.rht(x, inverse=True), single_rht(x.clone(), inverse=True), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", kvq.PER_TOKEN_HEAD_DTYPES)
def test_page_and_scale_placement_are_vllms(fmt):
    """Our page cell equals vLLM's Triton backend's, and its scale views read the scales we wrote."""
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

    assert STR_DTYPE_TO_TORCH_DTYPE[fmt] == CACHE_DTYPE[fmt]
    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=128, dtype=CACHE_DTYPE[fmt],
                             kv_quant_mode=get_kv_quant_mode(fmt))
    ours, theirs = kvq.CPUKVQuantAttentionBackend.customize_spec(spec), TritonAttentionBackend.customize_spec(spec)
    assert ours == theirs and ours.page_size_bytes == 2 * 32 * kvq.cell_bytes(fmt, 128)
    # capacity at head size 128 (the engine's block count is KV space // page size; test_kv_cpu_engine checks
    # that at head sizes 64 and 32): the issue's >= 1.8x (int8) and >= 3x (int4) of the 16-bit cache
    bf16 = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=128, dtype=torch.bfloat16)
    assert bf16.page_size_bytes / ours.page_size_bytes >= (3 if fmt == INT4 else 1.8)

    cache = cache_for(fmt, 2, 2, 32, 128)
    triton_impl = TritonAttentionImpl.__new__(TritonAttentionImpl)
    triton_impl._kv_quant_mode = get_kv_quant_mode(fmt)
    triton_impl._ensure_scale_caches(cache)                # vLLM's own fp32 views into the page (filled with 1.0)
    k, v = torch.randn(2, 7, 2, 128).unbind(0)
    kvq.write_cells(fmt, cache, k, v, torch.arange(30, 37))
    quant = torch_quantize_int4 if fmt == INT4 else torch_quantize_int8
    rot = kvq.rht if fmt == INT4 else (lambda t: t)
    for got, x in ((triton_impl._k_scale_cache, k), (triton_impl._v_scale_cache, v)):
        slots = got.reshape(-1, 2)[30:37]                  # (block, slot) -> flat slot, per head
        assert torch.equal(slots.view(torch.int32), quant(rot(x))[1].view(torch.int32))
    key_cache, _ = triton_impl._pth_key_value_caches(cache)
    assert torch.equal(key_cache[1, 0, :, :kvq.data_bytes(fmt, 128)].view(torch.uint8),
                       quant(rot(k))[0][2].view(torch.uint8))   # token 2 -> slot 32 = block 1, slot 0


def test_vllm_internals_relied_on():
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.attention.ops import triton_reshape_and_cache_flash as writer

    # the write rule: int8 range and rounding of vLLM's per-token-head writer
    assert writer._PER_TOKEN_HEAD_QUANT_PARAMS[torch.int8] == (127.0, -128.0)
    assert "k_q + 0.5" in inspect.getsource(writer._reshape_cache_per_token_head)
    # the builder reads the KV dtype from the config for its ISA and scheduler metadata (shown "auto" to it)
    assert "vllm_config.cache_config.cache_dtype" in inspect.getsource(cpu_attn.CPUAttentionMetadataBuilder.__init__)
    # vLLM's own CPU backend still lacks these dtypes (else the override could go)
    assert not set(kvq.PER_TOKEN_HEAD_DTYPES) & set(cpu_attn.CPUAttentionBackend.supported_kv_cache_dtypes)
    # the kernel's cache layout is ISA-specific: our scratch is written by vLLM's writer with the layer's ISA
    assert "isa" in inspect.signature(cpu_attn.ops.cpu_attn_reshape_and_cache).parameters


def test_the_plugin_registers_the_backend():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import internvl_plugin

    internvl_plugin.register()
    assert AttentionBackendEnum.CPU_ATTN.get_class() is kvq.CPUKVQuantAttentionBackend
    assert kvq.CPUKVQuantAttentionBackend.supports_kv_cache_dtype(INT4)
    assert kvq.CPUKVQuantAttentionBackend.supports_kv_cache_dtype("fp8")


def test_engines_start_after_numba_was_imported():
    """vLLM 0.32's CPU worker init scans every module for Triton kernels and trips over llvmlite (imported by our
    Numba decode kernel); the plugin runs that scan without numba/llvmlite (cpu_kv_vllm_fix.py)."""
    import numba  # noqa: F401
    from vllm.triton_utils import dispatcher

    import internvl_plugin
    from internvl_plugin.cpu_kv_vllm_fix import apply

    internvl_plugin.register()
    apply()
    wrapped = dispatcher._rebind_kernels
    assert wrapped._internvl_skips_numba
    # the wrapped function is still the module-level name register_kernels calls, and still trips unwrapped
    assert "_rebind_kernels(" in inspect.getsource(dispatcher.register_kernels)
    with pytest.raises(AttributeError, match="_lib_fn_wrapper"):
        wrapped.__wrapped__([])
    wrapped([])
    assert "numba" in __import__("sys").modules


def test_the_rebind_fix_is_cpu_only_and_survives_a_vllm_without_it(monkeypatch):
    """Not applied on other platforms; where vLLM has no ``_rebind_kernels`` the plugin still registers, and one
    line says the fix was skipped."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import dispatcher

    import internvl_plugin
    from internvl_plugin import cpu_kv_vllm_fix

    def sentinel(overrides):
        return None

    monkeypatch.setattr(dispatcher, "_rebind_kernels", sentinel)
    monkeypatch.setattr(internvl_plugin, "_registered", False)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    internvl_plugin.register()
    assert dispatcher._rebind_kernels is sentinel
    warned = []
    monkeypatch.setattr(cpu_kv_vllm_fix.logger, "warning", lambda msg, *a: warned.append(msg % a))
    monkeypatch.delattr(dispatcher, "_rebind_kernels")
    monkeypatch.setattr(current_platform, "is_cpu", lambda: True)
    monkeypatch.setattr(internvl_plugin, "_registered", False)
    internvl_plugin.register()
    assert internvl_plugin._registered
    assert len(warned) == 1 and "_rebind_kernels" in warned[0] and "vLLM 0.32" in warned[0]
    cpu_kv_vllm_fix.apply()
