"""Tests of the K-packed W4A16 layout (internvl_kernels.w4a16_packed): packing, and its two Triton
kernels (the tensor-core kernel for any number of tokens and the CUDA-core GEMV for one token) run
for real on the CPU under Triton's interpreter, in one subprocess as in test_kernels.py.

The interpreter runs the plain-integer form of the nibble extraction and widens bf16 dot operands to
fp32 (exact); the PTX and bf16 tensor-core forms are checked on the GPU by benchmarks/pk_explore.py.
Tolerances (||out - ref|| / ||ref||, ref in float64 from the AWQ tensors): the GEMV and the exact
mode keep the 4-bit values exact until the output rounding (fp16 1e-3, bf16 6e-3); the scale-in-A
mode also rounds (q - z) * s to x.dtype (fp16 2e-3, bf16 1.2e-2).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from interp_helpers import assert_case, case_result, run_worker

from internvl_kernels import can_pack, dequantize_awq, pack_w4a16, quantize_awq, unpack_awq_int4, unpack_w4a16

TOLERANCE = {
    ("gemv", "float16"): 1e-3,
    ("gemv", "bfloat16"): 6e-3,
    ("exact", "float16"): 1e-3,
    ("exact", "bfloat16"): 6e-3,
    ("scaled", "float16"): 2e-3,
    ("scaled", "bfloat16"): 1.2e-2,
    ("dequant", "float16"): 2e-3,
    ("dequant", "bfloat16"): 1.2e-2,
}


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
    assert can_pack(256, 128) and not can_pack(192, 64) and not can_pack(256, 256)
    qweight, qzeros, scales = _awq(16, 192, 64)
    with pytest.raises(ValueError, match="K a multiple of 128 .* got K=192"):
        pack_w4a16(qweight, qzeros, scales, 64)
    qweight, qzeros, scales = _awq(16, 256, 64)
    with pytest.raises(ValueError, match="scales must be float16 or bfloat16, got torch.float32"):
        pack_w4a16(qweight, qzeros, scales.float(), 64)


def test_fit_tiles_takes_the_largest_dividing_power_of_two():
    from internvl_kernels.w4a16_packed import _fit_tiles

    assert [_fit_tiles(8, t) for t in (32, 28, 6, 7, 112)] == [8, 4, 2, 1, 8]
    assert _fit_tiles(2, 3) == 1 and _fit_tiles(1, 5) == 1


def test_default_configs_follow_tokens_and_weight_shape():
    from internvl_kernels.w4a16_packed import (PACKED_BIG_128_CONFIG, PACKED_CONFIGS, PACKED_DEQUANT_CONFIG,
                                               PACKED_GEMV2_CONFIG, PACKED_GEMV_CONFIG, PACKED_FEW_BIG_CONFIG,
                                               PACKED_SQUARE_CONFIG, PACKED_WIDE_CONFIG, pick_packed_config)

    assert pick_packed_config(1, 4096, 4096) is PACKED_GEMV_CONFIG and PACKED_GEMV_CONFIG.rows == 1
    # Two tokens through weights under 2**24 (1.8B wqkv, wo): the GEMV, two rows a program.
    assert pick_packed_config(2, 4096, 2048) is PACKED_GEMV2_CONFIG and PACKED_GEMV2_CONFIG.rows == 2
    assert pick_packed_config(3, 4096, 2048) is PACKED_CONFIGS[0][1]
    # 2-16 tokens: exact mode, two K tiles a step on weights of 2**26 or more (7B and 20B w13, 20B w2).
    small = pick_packed_config(2, 4096, 4096)
    assert small is PACKED_CONFIGS[0][1] and pick_packed_config(16, 4096, 14336) is small  # 7B w2
    assert small.exact and small.tiles == 1
    big = pick_packed_config(2, 28672, 4096)
    assert big is PACKED_FEW_BIG_CONFIG and big.exact and big.tiles == 2
    assert pick_packed_config(16, 6144, 16384) is big and pick_packed_config(17, 28672, 4096) is PACKED_CONFIGS[1][1]
    assert pick_packed_config(128, 4096, 6144) is PACKED_CONFIGS[-1][1]
    # 65-128 tokens: 128-column blocks on weights of 2**26 or more.
    assert pick_packed_config(65, 28672, 4096) is PACKED_BIG_128_CONFIG  # 7B w13
    assert pick_packed_config(128, 6144, 16384) is PACKED_BIG_128_CONFIG  # 20B w2
    assert pick_packed_config(128, 16384, 2048) is PACKED_CONFIGS[-1][1]  # 1.8B w13
    assert pick_packed_config(64, 28672, 4096) is PACKED_CONFIGS[2][1]
    # 129-256 tokens: fused (256-column blocks from N = 6144) except on weights under 2**24.
    assert pick_packed_config(129, 4096, 4096) is PACKED_SQUARE_CONFIG
    assert pick_packed_config(256, 2048, 2048) is PACKED_DEQUANT_CONFIG  # 1.8B wo
    assert pick_packed_config(256, 4096, 14336) is PACKED_SQUARE_CONFIG  # 7B w2
    assert pick_packed_config(256, 6144, 16384) is PACKED_WIDE_CONFIG  # 20B w2
    # 257-512 tokens: fused where N >= 8192, else dequantize + cuBLAS; always that above 512.
    assert pick_packed_config(257, 4096, 14336) is PACKED_DEQUANT_CONFIG
    assert pick_packed_config(512, 28672, 4096) is PACKED_WIDE_CONFIG  # 7B w13
    assert pick_packed_config(513, 28672, 4096) is PACKED_DEQUANT_CONFIG


def test_packed_split_keeps_full_grids_whole_when_asked():
    from internvl_kernels.w4a16_packed import PackedConfig, _packed_split

    cpu = torch.device("cpu")  # w4a16._sm_count: 4 "multiprocessors" off CUDA
    keep = PackedConfig(waves=2.0, split_full_grids=False)
    assert _packed_split(keep, 4, 8, cpu) == 1  # a full grid: whole
    assert _packed_split(keep, 2, 8, cpu) == 4  # half a grid: split for two waves
    assert _packed_split(PackedConfig(waves=2.0), 4, 8, cpu) == 2
    assert _packed_split(PackedConfig(split_k=3, split_full_grids=False), 4, 8, cpu) == 3
    # The wide config splits only grids under half a wave (2 of the 4 here).
    from internvl_kernels.w4a16_packed import PACKED_WIDE_CONFIG

    assert _packed_split(PACKED_WIDE_CONFIG, 2, 8, cpu) == 1 and _packed_split(PACKED_WIDE_CONFIG, 1, 8, cpu) == 2


def test_packed_matmul_names_bad_inputs():
    from internvl_kernels import w4a16_packed_matmul
    from internvl_kernels.w4a16_packed import PackedGemvConfig

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
    from internvl_kernels.w4a16_packed import (PackedConfig, PackedDequantConfig, PackedGemvConfig,
                                               pick_packed_config, w4a16_packed_matmul)

    results = {}
    for name, path, cfg, dtype, lead, k, n, gs, use_bias in _cases():
        seed = sum(map(ord, name))
        g = torch.Generator().manual_seed(seed)
        dt = getattr(torch, dtype)
        qweight, qzeros, scales = quantize_awq(torch.randn(n, k, generator=g) * 0.05, gs, scale_dtype=dt)
        qk, meta = pack_w4a16(qweight, qzeros, scales, gs)
        x = (torch.randn(*lead, k, generator=g) + 0.3).to(dt)  # a mean, so zero points matter
        bias = torch.randn(n, generator=g).to(dt) if use_bias else None
        kinds = {"gemv": PackedGemvConfig, "dequant": PackedDequantConfig, "tc": PackedConfig}
        config = None if cfg is None else kinds[path](**cfg)
        m = x.numel() // k
        out = torch.full((m, n), float("nan"), dtype=dt)
        w4a16_packed_matmul(x, qk, meta, gs, bias, out=out, config=config)
        y = w4a16_packed_matmul(x, qk, meta, gs, bias, config=config)
        ref = x.double() @ dequantize_awq(qweight, qzeros, scales, gs, dtype=torch.float64)
        if bias is not None:
            ref = ref + bias.double()
        chosen = config or pick_packed_config(m, n, k)
        kind = ("gemv" if isinstance(chosen, PackedGemvConfig) else "dequant" if isinstance(chosen, PackedDequantConfig)
                else "exact" if chosen.exact else "scaled")
        results[name] = case_result(kind, y, out, ref, lead, n, dt)
    results["plugin"] = _plugin_layer()
    results["compile"] = _compiled_ops()
    print(json.dumps(results))


def _compiled_ops():
    """Both torch operators traced by torch.compile (fullgraph, dynamic batch): the same values as the
    eager launchers, for token counts that take different kernels, without recompiling."""
    import torch._dynamo

    from internvl_kernels import w4a16_awq_mm, w4a16_matmul, w4a16_packed_matmul, w4a16_packed_mm

    g = torch.Generator().manual_seed(11)
    k, n, gs = 256, 24, 128
    qweight, qzeros, scales = quantize_awq(torch.randn(n, k, generator=g) * 0.05, gs, scale_dtype=torch.float16)
    qk, meta = pack_w4a16(qweight, qzeros, scales, gs)
    bias = torch.randn(n, generator=g).half()

    def f(x):
        return w4a16_packed_mm(x, qk, meta, gs, bias) - w4a16_awq_mm(x, qweight, qzeros, scales, gs, None)

    torch._dynamo.reset()
    frames = []
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=lambda gm, ex: frames.append(gm) or gm)
    diffs = {}
    for m in (1, 2, 5, 20):  # GEMV, exact tensor-core (one step a program, then several), scale-in-A
        x = torch.randn(m, k, generator=g).half()
        expect = (w4a16_packed_matmul(x, qk, meta, gs, bias) - w4a16_matmul(
            x, qweight, qzeros, scales, gs)).float()
        diffs[m] = float((compiled(x).float() - expect).abs().max())
    ops = sorted({str(node.target) for gm in frames for node in gm.graph.nodes if node.op == "call_function"})
    return dict(diffs=diffs, graphs=len(frames), ops=ops)


def _plugin_layer():
    """The plugin's linear method on one layer: AWQ layout kept on CPU, then (as on CUDA) repacked."""
    from internvl_plugin.quant import AWQW4A16Config
    from internvl_plugin.quant_linear import AWQW4A16LinearMethod, repack_layer, use_packed_layout

    g = torch.Generator().manual_seed(5)
    k, n, gs = 256, 48, 64
    qweight, qzeros, scales = quantize_awq(torch.randn(n, k, generator=g) * 0.05, gs, scale_dtype=torch.bfloat16)
    layer = torch.nn.Module()
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        layer.register_parameter(name, torch.nn.Parameter(t.clone(), requires_grad=False))
    method = AWQW4A16LinearMethod(AWQW4A16Config(gs))
    method.process_weights_after_loading(layer)
    cpu_keeps_awq = hasattr(layer, "qweight") and not hasattr(layer, "qk") and not use_packed_layout(
        layer.qweight, layer.scales, gs)
    x = (torch.randn(2, 3, k, generator=g) + 0.3).to(torch.bfloat16)
    ref = x.double() @ dequantize_awq(qweight, qzeros, scales, gs, dtype=torch.float64)
    y_cpu = method.apply(layer, x)
    repack_layer(layer, gs)
    y = method.apply(layer, x)
    return dict(cpu_keeps_awq=cpu_keeps_awq,
                awq_freed=not any(hasattr(layer, name) for name in ("qweight", "qzeros", "scales")),
                packed_bytes=layer.qk.numel() * 4, awq_bytes=qweight.numel() * 4, meta_shape=list(layer.meta.shape),
                meta_dtype=str(layer.meta.dtype), shape=list(y.shape),
                err_cpu=float((y_cpu.double() - ref).norm() / ref.norm()),
                err_packed=float((y.double() - ref).norm() / ref.norm()))


@pytest.fixture(scope="module")
def interpreted():
    return run_worker(__file__)


@pytest.mark.parametrize("case", [c[0] for c in _cases()])
def test_packed_kernel_under_interpreter(interpreted, case):
    assert_case(interpreted[case], TOLERANCE)


def test_plugin_repacks_layer_and_matches_reference(interpreted):
    r = interpreted["plugin"]
    assert r["cpu_keeps_awq"]  # CPU tensors stay in the AWQ layout (the torch reference path)
    assert r["awq_freed"] and r["packed_bytes"] == r["awq_bytes"]  # same bytes, AWQ copy gone
    assert r["meta_shape"] == [256 // 64, 2 * 48] and r["meta_dtype"] == "torch.bfloat16"
    assert r["shape"] == [2, 3, 48]
    assert r["err_cpu"] < 5e-3 and r["err_packed"] < TOLERANCE[("exact", "bfloat16")]


def test_ops_trace_as_single_nodes_under_torch_compile(interpreted):
    r = interpreted["compile"]
    # fullgraph: no break. Two graphs: torch.compile specializes a size of 1 (M=1), and one dynamic
    # graph serves M = 2, 5 and 20, which take three different kernels inside the operator.
    assert r["graphs"] == 2
    assert {"internvl_kernels.w4a16_packed_mm", "internvl_kernels.w4a16_awq_mm"} <= set(r["ops"])
    assert all(d == 0.0 for d in r["diffs"].values()), r["diffs"]


def test_packed_launcher_routes_to_every_kernel(interpreted):
    kinds = {r["kind"] for name, r in interpreted.items() if name.startswith("auto")}
    assert kinds == {"gemv", "exact", "scaled", "dequant"}


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
