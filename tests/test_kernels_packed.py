"""Tests of the K-packed W4A16 layout (internvl_kernels.w4a16): packing, the default config table, the
plugin's choice of a layer's layout, and the Triton kernels (the tensor-core kernel for any number of
tokens, the CUDA-core GEMV for one or two, dequantize + matmul for many) run for real on the CPU under
Triton's interpreter, in one subprocess as in test_kernels.py (tolerances: interp_helpers.py).

The interpreter runs the plain-integer form of the nibble extraction and widens bf16 dot operands to
fp32 (exact); the PTX and bf16 tensor-core forms are checked on the GPU by benchmarks/check_w4a16_gpu.py.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from interp_helpers import TOLERANCE, assert_case, packed_case, run_worker

from internvl_kernels import (can_pack, dequantize_awq, pack_w4a16, quantize_awq, unpack_awq_int4, unpack_w4a16,
                              w4a16_matmul_ref)


def _awq(n, k, gs, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return quantize_awq(torch.randn(n, k, generator=g) * 0.05, gs, scale_dtype=dtype)


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_pack_layout_follows_the_docstring(gs):
    """Word (n, 16 t + j), nibble i holds q[128 t + 16 i + j, n]; meta holds (zero, scale) pairs in the
    scales' dtype, one int32 word each (the scale's bits high); round trip exact."""
    n, k = 24, 384
    for dtype in (torch.float16, torch.bfloat16):
        qweight, qzeros, scales = _awq(n, k, gs, seed=gs, dtype=dtype)
        qk, meta = pack_w4a16(qweight, qzeros, scales, gs, chunk=8)  # several chunks
        q, z = unpack_awq_int4(qweight), unpack_awq_int4(qzeros)  # [K, N], [K/G, N]
        assert qk.dtype == torch.int32 and tuple(qk.shape) == (n, k // 8)
        for col, t, i, j in [(0, 0, 0, 0), (5, 1, 7, 15), (23, 2, 3, 9), (11, 0, 6, 1)]:
            word = int(qk[col, 16 * t + j]) & 0xFFFFFFFF
            assert (word >> (4 * i)) & 0xF == int(q[128 * t + 16 * i + j, col])
        assert meta.dtype == dtype and tuple(meta.shape) == (k // gs, 2 * n)
        words = meta.view(torch.int32)  # what the kernels load: [K/G, N]
        assert torch.equal((words >> 16) & 0xFFFF, scales.view(torch.int16).to(torch.int32) & 0xFFFF)
        assert torch.equal(words & 0xFFFF, z.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF)
        q2, z2, s2 = unpack_w4a16(qk, meta)
        assert torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, scales)
        assert (qk < 0).any(), "a top nibble >= 8 must make the stored int32 word negative"


def test_pack_rejects_what_it_cannot_hold():
    assert can_pack(256, 128) and can_pack(192, 64) and can_pack(96, 32) and can_pack(256, 256)
    assert can_pack(768, 384) and can_pack(512, 256)
    assert not can_pack(192, 96) and not can_pack(384, 48) and not can_pack(128, 16) and not can_pack(384, 256)
    assert not can_pack(0, 128) and not can_pack(128, 0)
    qweight, qzeros, scales = _awq(16, 192, 96)
    with pytest.raises(ValueError, match="group size 32, 64 or a multiple of 128; got K=192, group_size=96"):
        pack_w4a16(qweight, qzeros, scales, 96)
    qweight, qzeros, scales = _awq(16, 256, 64)
    with pytest.raises(ValueError, match="scales must be float16 or bfloat16, got torch.float32"):
        pack_w4a16(qweight, qzeros, scales.float(), 64)


@pytest.mark.parametrize("gs,k", [(32, 160), (64, 320), (32, 96)])
def test_pack_pads_k_to_whole_tiles_with_zero_weights(gs, k):
    """K not a multiple of 128: qk and meta hold K' = the next multiple of 128, the rows past K are
    q = 0, zero point 0, scale 0 (weights 0); the AWQ rows come back unchanged."""
    kp = -(-k // 128) * 128
    qweight, qzeros, scales = _awq(24, k, gs, seed=k)
    qk, meta = pack_w4a16(qweight, qzeros, scales, gs, chunk=8)
    assert tuple(qk.shape) == (24, kp // 8) and tuple(meta.shape) == (kp // gs, 48)
    q, z, s = unpack_w4a16(qk, meta)
    assert torch.equal(q[:k], unpack_awq_int4(qweight)) and not q[k:].any()
    assert torch.equal(z[:k // gs], unpack_awq_int4(qzeros)) and not z[k // gs:].any()
    assert torch.equal(s[:k // gs], scales) and not s[k // gs:].any()


def test_pack_keeps_wide_groups_whole():
    """G = 256: one meta row a group, over two K tiles; nothing padded."""
    qweight, qzeros, scales = _awq(16, 768, 256, seed=3)
    qk, meta = pack_w4a16(qweight, qzeros, scales, 256)
    assert tuple(qk.shape) == (16, 96) and tuple(meta.shape) == (3, 32)
    q, z, s = unpack_w4a16(qk, meta)
    assert torch.equal(q, unpack_awq_int4(qweight)) and torch.equal(z, unpack_awq_int4(qzeros))
    assert torch.equal(s, scales)


def test_fit_tiles_takes_the_largest_dividing_power_of_two():
    from internvl_kernels.w4a16 import _fit_tiles

    assert [_fit_tiles(8, t) for t in (32, 28, 6, 7, 112)] == [8, 4, 2, 1, 8]
    assert _fit_tiles(2, 3) == 1 and _fit_tiles(1, 5) == 1


def test_default_configs_follow_tokens_and_weight_shape():
    from internvl_kernels.w4a16 import (PACKED_BIG_128_CONFIG, PACKED_DEQUANT_CONFIG, PACKED_FEW_BIG_CONFIG,
                                        PACKED_FEW_CONFIG, PACKED_GEMV2_CONFIG, PACKED_GEMV_CONFIG, PACKED_M32_CONFIG,
                                        PACKED_M64_CONFIG, PACKED_M128_CONFIG, PACKED_SQUARE_CONFIG,
                                        PACKED_WIDE_CONFIG, pick_packed_config)

    assert pick_packed_config(1, 4096, 4096) is PACKED_GEMV_CONFIG and PACKED_GEMV_CONFIG.rows == 1
    # Two tokens through weights under 2**24 (1.8B wqkv, wo): the GEMV, two rows a program.
    assert pick_packed_config(2, 4096, 2048) is PACKED_GEMV2_CONFIG and PACKED_GEMV2_CONFIG.rows == 2
    assert pick_packed_config(3, 4096, 2048) is PACKED_FEW_CONFIG
    # 2-16 tokens: exact mode, two K tiles a step on weights of 2**26 or more (7B and 20B w13, 20B w2).
    small = pick_packed_config(2, 4096, 4096)
    assert small is PACKED_FEW_CONFIG and pick_packed_config(16, 4096, 14336) is small  # 7B w2
    assert small.exact and small.tiles == 1
    big = pick_packed_config(2, 28672, 4096)
    assert big is PACKED_FEW_BIG_CONFIG and big.exact and big.tiles == 2
    assert pick_packed_config(16, 6144, 16384) is big and pick_packed_config(17, 28672, 4096) is PACKED_M32_CONFIG
    assert pick_packed_config(128, 4096, 6144) is PACKED_M128_CONFIG
    # 65-128 tokens: 128-column blocks on weights of 2**26 or more.
    assert pick_packed_config(65, 28672, 4096) is PACKED_BIG_128_CONFIG  # 7B w13
    assert pick_packed_config(128, 6144, 16384) is PACKED_BIG_128_CONFIG  # 20B w2
    assert pick_packed_config(128, 16384, 2048) is PACKED_M128_CONFIG  # 1.8B w13
    assert pick_packed_config(64, 28672, 4096) is PACKED_M64_CONFIG
    # 129-256 tokens: fused (256-column blocks from N = 6144) except on weights under 2**24.
    assert pick_packed_config(129, 4096, 4096) is PACKED_SQUARE_CONFIG
    assert pick_packed_config(256, 2048, 2048) is PACKED_DEQUANT_CONFIG  # 1.8B wo
    assert pick_packed_config(256, 4096, 14336) is PACKED_SQUARE_CONFIG  # 7B w2
    assert pick_packed_config(256, 6144, 16384) is PACKED_WIDE_CONFIG  # 20B w2
    # 257-512 tokens: fused where N >= 8192, else dequantize + cuBLAS; always that above 512.
    assert pick_packed_config(257, 4096, 14336) is PACKED_DEQUANT_CONFIG
    assert pick_packed_config(512, 28672, 4096) is PACKED_WIDE_CONFIG  # 7B w13
    assert pick_packed_config(513, 28672, 4096) is PACKED_DEQUANT_CONFIG


# The choices of the rules pick_packed_config had before they became one table, per InternLM2 linear
# (K, N) and token count M = 1..1024: (first M, config name) runs.
_FEW, _M32, _M64, _M128 = "PACKED_FEW_CONFIG", "PACKED_M32_CONFIG", "PACKED_M64_CONFIG", "PACKED_M128_CONFIG"
_GEMV, _GEMV2, _DQ = "PACKED_GEMV_CONFIG", "PACKED_GEMV2_CONFIG", "PACKED_DEQUANT_CONFIG"
_WIDE, _SQUARE, _FEW_BIG, _BIG_128 = ("PACKED_WIDE_CONFIG", "PACKED_SQUARE_CONFIG", "PACKED_FEW_BIG_CONFIG",
                                      "PACKED_BIG_128_CONFIG")
_SMALL_RUNS = [(1, _GEMV), (2, _GEMV2), (3, _FEW), (17, _M32), (33, _M64), (65, _M128), (129, _DQ)]
_MID = [(1, _GEMV), (2, _FEW), (17, _M32), (33, _M64), (65, _M128)]
_BIG = [(1, _GEMV), (2, _FEW_BIG), (17, _M32), (33, _M64), (65, _BIG_128), (129, _WIDE)]
PINNED_CHOICES = {
    "1.8B wqkv": (2048, 4096, _SMALL_RUNS),
    "1.8B wo": (2048, 2048, _SMALL_RUNS),
    "1.8B w13": (2048, 16384, _MID + [(129, _WIDE), (513, _DQ)]),
    "1.8B w2": (8192, 2048, _MID + [(129, _SQUARE), (257, _DQ)]),
    "7B wqkv": (4096, 6144, _MID + [(129, _WIDE), (257, _DQ)]),
    "7B wo": (4096, 4096, _MID + [(129, _SQUARE), (257, _DQ)]),
    "7B w13": (4096, 28672, _BIG + [(513, _DQ)]),
    "7B w2": (14336, 4096, _MID + [(129, _SQUARE), (257, _DQ)]),
    "20B wqkv": (6144, 8192, _MID + [(129, _WIDE), (513, _DQ)]),
    "20B wo": (6144, 6144, _MID + [(129, _WIDE), (257, _DQ)]),
    "20B w13": (6144, 32768, _BIG + [(513, _DQ)]),
    "20B w2": (16384, 6144, _BIG + [(257, _DQ)]),
}
# Each named config's values as the rules had them.
PINNED_CONFIGS = {
    _GEMV: "PackedGemvConfig(block_n=8, num_warps=1, rows=1, tiles=8, stages=3, split_k=0, waves=2.0)",
    _GEMV2: "PackedGemvConfig(block_n=8, num_warps=1, rows=2, tiles=8, stages=3, split_k=0, waves=2.0)",
    _FEW_BIG: "PackedConfig(block_m=16, block_n=64, tiles=2, num_warps=4, num_stages=3, split_k=0, waves=4.0, "
              "split_full_grids=True, exact=True)",
    _FEW: "PackedConfig(block_m=16, block_n=64, tiles=1, num_warps=4, num_stages=4, split_k=0, waves=4.0, "
          "split_full_grids=True, exact=True)",
    _M32: "PackedConfig(block_m=32, block_n=64, tiles=1, num_warps=4, num_stages=4, split_k=0, waves=4.0, "
          "split_full_grids=True, exact=False)",
    _M64: "PackedConfig(block_m=64, block_n=128, tiles=1, num_warps=8, num_stages=3, split_k=0, waves=2.0, "
          "split_full_grids=False, exact=False)",
    _M128: "PackedConfig(block_m=128, block_n=64, tiles=1, num_warps=4, num_stages=3, split_k=0, waves=1.0, "
           "split_full_grids=True, exact=False)",
    _BIG_128: "PackedConfig(block_m=128, block_n=128, tiles=1, num_warps=8, num_stages=4, split_k=0, waves=2.0, "
              "split_full_grids=False, exact=False)",
    _WIDE: "PackedConfig(block_m=128, block_n=256, tiles=1, num_warps=8, num_stages=3, split_k=0, waves=0.5, "
           "split_full_grids=True, exact=False)",
    _SQUARE: "PackedConfig(block_m=128, block_n=128, tiles=1, num_warps=8, num_stages=4, split_k=0, waves=0.5, "
             "split_full_grids=True, exact=False)",
    _DQ: "PackedDequantConfig(block_n=32, tiles=1, num_warps=4)",
}


def test_config_table_keeps_every_choice():
    from internvl_kernels import w4a16

    assert {name: repr(getattr(w4a16, name)) for name in PINNED_CONFIGS} == PINNED_CONFIGS
    for linear, (k, n, runs) in PINNED_CHOICES.items():
        starts = [m for m, _ in runs] + [1025]
        expected = {m: name for (m0, name), m1 in zip(runs, starts[1:]) for m in range(m0, m1)}
        got = {m: next(name for name in PINNED_CONFIGS if w4a16.pick_packed_config(m, n, k) is getattr(w4a16, name))
               for m in range(1, 1025)}
        assert got == expected, linear
    assert w4a16.pick_packed_config(0, 4096, 4096) is w4a16.PACKED_GEMV_CONFIG


def test_packed_split_keeps_full_grids_whole_when_asked():
    from internvl_kernels.w4a16 import PackedConfig, _packed_split

    cpu = torch.device("cpu")  # _sm_count: 4 "multiprocessors" off CUDA
    keep = PackedConfig(waves=2.0, split_full_grids=False)
    assert _packed_split(keep, 4, 8, cpu) == 1  # a full grid: whole
    assert _packed_split(keep, 2, 8, cpu) == 4  # half a grid: split for two waves
    assert _packed_split(PackedConfig(waves=2.0), 4, 8, cpu) == 2
    assert _packed_split(PackedConfig(split_k=3, split_full_grids=False), 4, 8, cpu) == 3
    # The wide config splits only grids under half a wave (2 of the 4 here).
    from internvl_kernels.w4a16 import PACKED_WIDE_CONFIG

    assert _packed_split(PACKED_WIDE_CONFIG, 2, 8, cpu) == 1 and _packed_split(PACKED_WIDE_CONFIG, 1, 8, cpu) == 2


def test_packed_matmul_names_bad_inputs():
    from internvl_kernels import w4a16_packed_matmul
    from internvl_kernels.w4a16 import PackedGemvConfig

    qweight, qzeros, scales = _awq(16, 256, 128)
    qk, meta = pack_w4a16(qweight, qzeros, scales, 128)
    x = torch.randn(1, 256).to(torch.float16)
    with pytest.raises(ValueError, match="qk must be int32"):
        w4a16_packed_matmul(x, qk.to(torch.int64), meta, 128)
    with pytest.raises(ValueError, match="expects K=256"):
        w4a16_packed_matmul(torch.randn(1, 128).half(), qk, meta, 128)
    with pytest.raises(ValueError, match=r"expected meta \(4, 32\), got \(2, 32\)"):
        w4a16_packed_matmul(x, qk, meta, 64)
    with pytest.raises(ValueError, match="meta holds torch.float16 scales but x is torch.bfloat16"):
        w4a16_packed_matmul(x.to(torch.bfloat16), qk, meta, 128)
    with pytest.raises(ValueError, match="tiles must be 1, 2, 4 or 8, got 3"):
        w4a16_packed_matmul(x, qk, meta, 128, config=PackedGemvConfig(tiles=3))
    with pytest.raises(ValueError, match="rows must be 1 or 2, got 4"):
        w4a16_packed_matmul(x, qk, meta, 128, config=PackedGemvConfig(rows=4))
    # A padded weight (K = 160 of G = 32, packed K' = 256) takes x of 160 to 256 features in steps of 32.
    qk, meta = pack_w4a16(*_awq(16, 160, 32), 32)
    with pytest.raises(ValueError,
                       match=r"x has 120 features, the weight expects K=256 \(or a multiple of 32 from 160\)"):
        w4a16_packed_matmul(torch.randn(1, 120).half(), qk, meta, 32)
    with pytest.raises(ValueError, match="x has 150 features"):
        w4a16_packed_matmul(torch.randn(1, 150).half(), qk, meta, 32)


# ------------------------------------------------------------------------------------------------
# Kernels under the interpreter (subprocess)
# ------------------------------------------------------------------------------------------------


def _cases():
    """(path, config kwargs, dtype, lead shape, K, N, group, bias)."""
    cases = []
    for dtype in ("float16", "bfloat16"):
        for gs in (32, 64, 128):
            # GEMV: one step, split-K, several tiles per step; N not a multiple of the program.
            cases.append(("gemv", dict(block_n=16, num_warps=1, split_k=1), dtype, (1,), 256, 40, gs, True))
            cases.append(("gemv", dict(block_n=32, num_warps=1, split_k=3, tiles=1), dtype, (2,), 384, 72, gs, False))
            cases.append(("gemv", dict(block_n=16, num_warps=1, tiles=2), dtype, (1, 1), 512, 48, gs, gs == 64))
            # tiles=4 does not divide K/128 = 3: the launcher falls back to one tile a step; 8 and
            # K/128 = 6: two a step.
            cases.append(("gemv", dict(block_n=16, num_warps=1, tiles=4), dtype, (1,), 384, 24, gs, False))
            cases.append(("gemv", dict(block_n=8, num_warps=1, tiles=8), dtype, (1,), 768, 16, gs, True))
            # Several rows a program, the last program's rows partly past M.
            cases.append(("gemv", dict(block_n=8, num_warps=1, rows=2, stages=2), dtype, (3,), 256, 24, gs, True))
            cases.append(("gemv", dict(block_n=8, num_warps=1, rows=2, tiles=2, split_k=2), dtype, (1, 6), 512, 16,
                          gs, False))
            # Dequantize + cuBLAS: a masked N block, and tiles=2 falling back to 1 (K/128 = 3).
            cases.append(("dequant", dict(block_n=16, num_warps=1), dtype, (5,), 256, 40, gs, True))
            cases.append(("dequant", dict(block_n=16, num_warps=1, tiles=2), dtype, (2, 2), 384, 32, gs, False))
            # Tensor-core kernel, both modes: masked M and N tiles, split-K, two tiles per step; M filling
            # the blocks exactly (EVEN_M), whole and split, one step a program.
            for exact in (True, False):
                cases.append(("tc", dict(block_m=16, block_n=32, num_warps=1, split_k=1, exact=exact),
                              dtype, (3,), 256, 72, gs, True))
                cases.append(("tc", dict(block_m=16, block_n=16, num_warps=1, split_k=2, tiles=2, exact=exact),
                              dtype, (2, 9), 512, 40, gs, False))
                cases.append(("tc", dict(block_m=16, block_n=32, num_warps=1, split_k=1, exact=exact),
                              dtype, (16,), 384, 72, gs, True))
                cases.append(("tc", dict(block_m=16, block_n=16, num_warps=1, split_k=4, exact=exact),
                              dtype, (32,), 512, 40, gs, False))
        # The wide-block config of more than 128 tokens (masked N).
        cases.append(("tc", dict(block_m=128, block_n=256, num_warps=8), dtype, (130,), 256, 40, 128,
                      dtype == "float16"))
    for dtype in ("float16", "bfloat16"):  # the launcher's own choice
        cases.append(("auto", None, dtype, (1,), 256, 64, 128, False))
        cases.append(("auto", None, dtype, (2, 5), 256, 48, 64, True))
        cases.append(("auto", None, dtype, (40,), 256, 32, 32, True))
        cases.append(("auto", None, dtype, (300,), 256, 16, 128, True))
    return [(f"{path}-{i}-{dtype}-g{gs}", path, cfg, dtype, lead, k, n, gs, bias)
            for i, (path, cfg, dtype, lead, k, n, gs, bias) in enumerate(cases)]


def _worker():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {case[0]: packed_case(*case) for case in _cases()}
    results["plugin"] = _plugin_layers()
    results["compile"] = _compiled_op()
    print(json.dumps(results))


def _compiled_op():
    """The torch operator traced by torch.compile (fullgraph, dynamic batch): the same values as the eager
    launcher, for token counts that take different kernels, without recompiling; on a weight whose K
    (160) the operator pads to 256."""
    import torch._dynamo

    from internvl_kernels import w4a16_packed_matmul, w4a16_packed_mm

    g = torch.Generator().manual_seed(11)
    k, n, gs = 160, 24, 32
    qweight, qzeros, scales = quantize_awq(torch.randn(n, k, generator=g) * 0.05, gs, scale_dtype=torch.float16)
    qk, meta = pack_w4a16(qweight, qzeros, scales, gs)
    bias = torch.randn(n, generator=g).half()

    def f(x):
        return w4a16_packed_mm(x, qk, meta, gs, bias) * 2

    torch._dynamo.reset()
    frames = []
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=lambda gm, ex: frames.append(gm) or gm)
    diffs = {}
    for m in (1, 2, 5, 20):  # GEMV, two-row GEMV, exact tensor-core, scale-in-A
        x = torch.randn(m, k, generator=g).half()
        expect = (w4a16_packed_matmul(x, qk, meta, gs, bias) * 2).float()
        diffs[m] = float((compiled(x).float() - expect).abs().max())
    ops = sorted({str(node.target) for gm in frames for node in gm.graph.nodes if node.op == "call_function"})
    return dict(diffs=diffs, graphs=len(frames), ops=ops)


def _plugin_layers():
    """The plugin's linear method on small layers: process_weights_after_loading on CPU (repacked for
    the CPU int4 kernels, quant_cpu.py), then each layout weight_layout picks on CUDA, made by hand on
    CPU: packed (G 64; K 160 of G 32, padded), dense (G 96)."""
    from internvl_plugin import quant_linear
    from internvl_plugin.quant import AWQW4A16Config
    from internvl_plugin.quant_linear import AWQW4A16LinearMethod, dequantize_layer, repack_layer, weight_layout

    def make(k, n, gs, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        tensors = quantize_awq(torch.randn(n, k, generator=g) * 0.05, gs, scale_dtype=dtype)
        layer = torch.nn.Module()
        for name, t in zip(("qweight", "qzeros", "scales"), tensors):
            layer.register_parameter(name, torch.nn.Parameter(t.clone(), requires_grad=False))
        x = (torch.randn(2, 3, k, generator=g) + 0.3).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        return layer, tensors, x, bias, AWQW4A16LinearMethod(AWQW4A16Config(gs))

    def err(y, x, tensors, gs, bias):
        ref = w4a16_matmul_ref(x.double(), *tensors, gs, bias.double())
        return float((y.double() - ref).norm() / ref.norm())

    out = {}
    layer, tensors, x, bias, method = make(256, 48, 64, torch.bfloat16, 5)
    method.process_weights_after_loading(layer)
    out["cpu_int4"] = dict(awq_freed=not any(hasattr(layer, name) for name in ("qweight", "qzeros", "scales")),
                           plan=getattr(layer, "cpu_int4_plan", None), err=err(method.apply(layer, x, bias), x,
                                                                               tensors, 64, bias))
    layer, tensors, x, bias, method = make(256, 48, 64, torch.bfloat16, 5)
    repack_layer(layer, 64)
    y = method.apply(layer, x, bias)
    out["packed"] = dict(awq_freed=not any(hasattr(layer, name) for name in ("qweight", "qzeros", "scales")),
                         packed_bytes=layer.qk.numel() * 4, awq_bytes=tensors[0].numel() * 4,
                         meta_shape=list(layer.meta.shape), meta_dtype=str(layer.meta.dtype), shape=list(y.shape),
                         err=err(y, x, tensors, 64, bias))
    layer, tensors, x, bias, method = make(160, 40, 32, torch.float16, 6)
    repack_layer(layer, 32)
    y = method.apply(layer, x, bias)
    out["padded"] = dict(qk_shape=list(layer.qk.shape), meta_shape=list(layer.meta.shape), shape=list(y.shape),
                         err=err(y, x, tensors, 32, bias))
    out["dense"] = {}
    for dtype in (torch.bfloat16, torch.float32):
        layer, tensors, x, bias, method = make(192, 24, 96, dtype, 7)
        quant_linear.CHUNK, chunk = 8, quant_linear.CHUNK  # three chunks of columns
        dequantize_layer(layer, 96)
        quant_linear.CHUNK = chunk
        y = method.apply(layer, x, bias)
        dense = dequantize_awq(*tensors, 96).t().contiguous()
        out["dense"][str(dtype)] = dict(
            awq_freed=not any(hasattr(layer, name) for name in ("qweight", "qzeros", "scales")),
            weight_equal=torch.equal(layer.weight, dense), weight_dtype=str(layer.weight.dtype),
            linear=torch.equal(y, torch.nn.functional.linear(x, dense, bias)), shape=list(y.shape),
            err=err(y, x, tensors, 96, bias))
    cases = [("cpu", torch.bfloat16, 256, 128), ("cuda", torch.bfloat16, 256, 128), ("cuda:1", torch.float16, 160, 32),
             ("cuda", torch.bfloat16, 768, 256), ("cuda", torch.bfloat16, 192, 96), ("cuda", torch.float32, 256, 128),
             ("cpu", torch.bfloat16, 256, 128)]
    out["layouts"] = [weight_layout(*case, n) for case, n in zip(cases, [64] * 6 + [40])]  # N 40: no CPU kernel
    available, quant_linear.packed_available = quant_linear.packed_available, lambda device: False
    out["layout_without_triton"] = weight_layout("cuda", torch.bfloat16, 256, 128, 64)
    quant_linear.packed_available = available
    return out


@pytest.fixture(scope="module")
def interpreted():
    return run_worker(__file__)


@pytest.mark.parametrize("case", [c[0] for c in _cases()])
def test_packed_kernel_under_interpreter(interpreted, case):
    assert_case(interpreted[case])


def test_plugin_repacks_layer_and_matches_reference(interpreted):
    r = interpreted["plugin"]
    c = r["cpu_int4"]  # CPU: repacked for a library int4 kernel (tests/test_quant_cpu.py checks them closely)
    assert c["awq_freed"] and c["plan"] and c["err"] < TOLERANCE[("dequant", "bfloat16")]
    p = r["packed"]
    assert p["awq_freed"] and p["packed_bytes"] == p["awq_bytes"]  # same bytes, AWQ copy gone
    assert p["meta_shape"] == [256 // 64, 2 * 48] and p["meta_dtype"] == "torch.bfloat16"
    assert p["shape"] == [2, 3, 48] and p["err"] < TOLERANCE[("exact", "bfloat16")]


def test_plugin_repacks_padded_k(interpreted):
    p = interpreted["plugin"]["padded"]
    assert p["qk_shape"] == [40, 256 // 8] and p["meta_shape"] == [256 // 32, 2 * 40]  # K 160 -> 256
    assert p["shape"] == [2, 3, 40] and p["err"] < TOLERANCE[("exact", "float16")]


@pytest.mark.parametrize("dtype", ["torch.bfloat16", "torch.float32"])
def test_plugin_dequantizes_unpackable_layer_once(interpreted, dtype):
    d = interpreted["plugin"]["dense"][dtype]
    assert d["awq_freed"] and d["weight_equal"] and d["weight_dtype"] == dtype
    assert d["linear"] and d["shape"] == [2, 3, 24]
    assert d["err"] < (TOLERANCE[("dequant", "bfloat16")] if dtype == "torch.bfloat16" else 1e-6)


def test_plugin_layout_choice(interpreted):
    r = interpreted["plugin"]
    assert r["layouts"] == ["cpu_int4", "packed", "packed", "packed", "dense", "dense", "dense"]
    assert r["layout_without_triton"] == "dense"


def test_op_traces_as_single_node_under_torch_compile(interpreted):
    r = interpreted["compile"]
    # fullgraph: no break. Two graphs: torch.compile specializes a size of 1 (M=1), and one dynamic
    # graph serves M = 2, 5 and 20, which take three different kernels inside the operator.
    assert r["graphs"] == 2
    assert "internvl_kernels.w4a16_packed_mm" in r["ops"]
    assert all(d == 0.0 for d in r["diffs"].values()), r["diffs"]


def test_packed_launcher_routes_to_every_kernel(interpreted):
    kinds = {r["kind"] for name, r in interpreted.items() if name.startswith("auto")}
    assert kinds == {"gemv", "exact", "scaled", "dequant"}


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
