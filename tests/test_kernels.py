"""Tests of internvl_kernels: the AWQ format helpers, the torch reference and the Triton W4A16 kernels.

The Triton kernels run here for real, on the CPU, under Triton's interpreter (TRITON_INTERPRET=1).
The variable must be set before triton is imported, and other test files import vLLM (which imports
triton), so the interpreted cases run in one subprocess: this file run as a script (`--worker`)
computes every case and prints JSON, and the parametrized tests below check one case each.

What the interpreter cannot show: speed, and bf16 tl.dot, which Triton 3.9's interpreter computes
wrongly (it multiplies raw bits); there the GEMM and tensor-core paths widen their bf16 operands to
fp32 before tl.dot (exact, the same products), so on CPU the bf16 GEMM is checked up to that
widening. Nor inline PTX: the tensor-core kernel's nibble extraction (_byte_pair) runs its plain
integer form here (the same values by construction); its asm form is checked on the GPU. The GEMV and
the dequantize kernel run their bf16 code unchanged. On CUDA benchmarks/check_w4a16_gpu.py covers the
real bf16 tensor-core path.

Tolerances (||out - ref|| / ||ref||, ref in float64): the GEMV accumulates the exact 4-bit values in
fp32, so only the final rounding to x.dtype counts (fp16 1e-3, bf16 6e-3); the GEMM and the dequant
path also round to x.dtype inside (fp16 2e-3, bf16 1.2e-2).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from interp_helpers import assert_case, case_result, run_worker

from internvl_kernels import (
    AWQ_ORDER,
    AWQ_REVERSE_ORDER,
    dequantize_awq,
    pack_awq_int4,
    quantize_awq,
    unpack_awq_int4,
    w4a16_linear,
    w4a16_matmul_ref,
)

TOLERANCE = {
    ("gemv", "float16"): 1e-3,
    ("gemv", "bfloat16"): 6e-3,
    ("gemm", "float16"): 2e-3,
    ("gemm", "bfloat16"): 1.2e-2,
    ("tc", "float16"): 2e-3,
    ("tc", "bfloat16"): 1.2e-2,
    ("dequant", "float16"): 2e-3,
    ("dequant", "bfloat16"): 1.2e-2,
}


# ------------------------------------------------------------------------------------------------
# Format
# ------------------------------------------------------------------------------------------------


def test_awq_orders_are_inverse_permutations():
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    assert AWQ_REVERSE_ORDER == (0, 4, 1, 5, 2, 6, 3, 7)
    assert all(AWQ_REVERSE_ORDER[AWQ_ORDER[i]] == i for i in range(8))


def test_spec_nibble_order_vector():
    # spec B2.2: logical q[0..7] = [12, 15, 5, 0, 3, 11, 3, 7] packs to 0x7b0f335c
    q = torch.tensor([[12, 15, 5, 0, 3, 11, 3, 7]], dtype=torch.int32)
    word = pack_awq_int4(q)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert int(word) & 0xFFFFFFFF == 0x7B0F335C
    assert torch.equal(unpack_awq_int4(word), q)


def test_pack_stores_words_signed():
    q = torch.full((1, 8), 15, dtype=torch.int32)
    assert int(pack_awq_int4(q)) == -1  # 0xffffffff as int32


@pytest.mark.parametrize("rows,cols", [(1, 8), (5, 64), (33, 200)])
def test_pack_unpack_round_trip(rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int32)
    packed = pack_awq_int4(q)
    assert packed.shape == (rows, cols // 8)
    assert torch.equal(unpack_awq_int4(packed), q)
    # nibble i of word c holds column 8c + AWQ_ORDER[i]
    word = int(packed[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(q[0, AWQ_ORDER[i]]) for i in range(8)]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_awq_int4(torch.zeros(2, 7, dtype=torch.int32))
    with pytest.raises(ValueError):
        pack_awq_int4(torch.full((1, 8), 16, dtype=torch.int32))


def test_quantizer_follows_spec_b18():
    g = torch.Generator().manual_seed(0)
    n, k, gs = 16, 64, 32
    w = torch.randn(n, k, generator=g)
    qweight, qzeros, scales = quantize_awq(w, gs, scale_dtype=torch.float32)
    assert qweight.shape == (k, n // 8) and qzeros.shape == (k // gs, n // 8) and scales.shape == (k // gs, n)
    q = unpack_awq_int4(qweight)  # [K, N]
    z = unpack_awq_int4(qzeros)  # [K/G, N]
    wg = w.view(n, k // gs, gs)
    scale = (wg.amax(-1) - wg.amin(-1)).clamp(min=1e-5) / 15  # [N, K/G]
    zero = (-torch.round(wg.amin(-1) / scale)).clamp(0, 15)
    assert torch.allclose(scales, scale.t())
    assert torch.equal(z, zero.t().to(torch.int32))
    expect_q = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp(0, 15).view(n, k).t()
    assert torch.equal(q, expect_q.to(torch.int32))
    # round to nearest: every weight within half a step (plus clamping at the range ends, which
    # the min/max choice of scale and zero keeps within one step)
    err = (dequantize_awq(qweight, qzeros, scales, gs, dtype=torch.float32) - w.t()).abs()
    assert bool((err <= scale.t().repeat_interleave(gs, 0) * 1.0 + 1e-6).all())


def test_shape_checks_name_the_problem():
    qweight, qzeros, scales = quantize_awq(torch.randn(16, 64), 32)
    with pytest.raises(ValueError, match="group_size"):
        dequantize_awq(qweight, qzeros, scales, 48)
    with pytest.raises(ValueError, match="scales"):
        dequantize_awq(qweight, qzeros, scales[:, :8], 32)


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------


def _dequant_float64_by_hand(qweight, qzeros, scales, gs):
    """Independent of awq_format: bit extraction in Python integers, float64 throughout."""
    k, words = qweight.shape
    w = torch.empty(k, words * 8, dtype=torch.float64)
    for r in range(k):
        for c in range(words):
            word = int(qweight[r, c]) & 0xFFFFFFFF
            zword = int(qzeros[r // gs, c]) & 0xFFFFFFFF
            for j in range(8):
                shift = 4 * AWQ_REVERSE_ORDER[j]
                q, z = (word >> shift) & 0xF, (zword >> shift) & 0xF
                w[r, 8 * c + j] = (q - z) * float(scales[r // gs, 8 * c + j])
    return w


@pytest.mark.parametrize("gs", [32, 64])
def test_reference_matches_float64_by_hand(gs):
    g = torch.Generator().manual_seed(gs)
    n, k = 24, 128
    qweight, qzeros, scales = quantize_awq(torch.randn(n, k, generator=g), gs, scale_dtype=torch.float16)
    w64 = _dequant_float64_by_hand(qweight, qzeros, scales, gs)
    assert torch.equal(dequantize_awq(qweight, qzeros, scales, gs, dtype=torch.float64), w64)
    x = torch.randn(3, k, generator=g)
    bias = torch.randn(n, generator=g)
    ref = w4a16_matmul_ref(x, qweight, qzeros, scales, gs, bias)
    expect = x.double() @ w64 + bias.double()
    assert ref.dtype == torch.float32
    assert float((ref.double() - expect).norm() / expect.norm()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_on_cpu_is_the_reference(dtype):
    g = torch.Generator().manual_seed(7)
    qweight, qzeros, scales = quantize_awq(torch.randn(40, 256, generator=g), 64, scale_dtype=torch.float16)
    x = torch.randn(2, 3, 256, generator=g).to(dtype)
    bias = torch.randn(40, generator=g).to(dtype)
    out = w4a16_linear(x, qweight, qzeros, scales, 64, bias)
    assert out.shape == (2, 3, 40) and out.dtype == dtype
    assert torch.equal(out, w4a16_matmul_ref(x, qweight, qzeros, scales, 64, bias))


# ------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess)
# ------------------------------------------------------------------------------------------------


def _interpreter_cases():
    """(name, path, config kwargs, dtype, lead shape, K, N, group, bias)."""
    cases = []
    for dtype in ("float16", "bfloat16"):
        for gs in (32, 64, 128):
            k = 256
            # GEMV: one program (split 1) and split-K (partials + reduce kernel); N not a multiple of
            # the program's 256 columns; M = 1, 2 and leading batch dims.
            cases.append(("gemv", dict(block_k=8, num_warps=1, split_k=1), dtype, (1,), k, 72, gs, True))
            cases.append(("gemv", dict(block_k=4, num_warps=1, split_k=3), dtype, (2,), k, 264, gs, False))
            cases.append(("gemv", dict(block_k=8, num_warps=1), dtype, (1, 1), k, 40, gs, gs == 64))
            # GEMM: M tiles partly masked, split-K, both dequantization modes.
            cases.append(("gemm", dict(block_m=16, block_n=32, block_k=32, split_k=1, scale_after_dot=True),
                          dtype, (3,), k, 72, gs, True))
            cases.append(("gemm", dict(block_m=16, block_n=64, block_k=32, split_k=2, scale_after_dot=False),
                          dtype, (2, 9), k, 136, gs, False))
            # Tensor-core kernel: exact tiles closed per K tile, and scale-in-A; byte lanes split over
            # programs (bytes 2 and 1); M tiles partly masked; N not a multiple of the program's columns.
            cases.append(("tc", dict(block_m=16, block_w=16, block_k=32, num_warps=1, bytes=4, scale_in_a=False,
                                     split_k=1), dtype, (3,), k, 136, gs, True))
            cases.append(("tc", dict(block_m=16, block_w=16, block_k=32, num_warps=1, bytes=2, scale_in_a=True,
                                     split_k=2), dtype, (2, 9), k, 64, gs, False))
            cases.append(("tc", dict(block_m=16, block_w=16, block_k=32, num_warps=1, bytes=1, scale_in_a=False,
                                     split_k=3), dtype, (5,), k, 264, gs, gs == 32))
        cases.append(("dequant", dict(block_k=32, block_w=8), dtype, (5,), 128, 200, 64, True))
    # the launcher's own choice of kernel and config
    for dtype in ("float16", "bfloat16"):
        cases.append(("auto", None, dtype, (1,), 256, 64, 128, False))
        cases.append(("auto", None, dtype, (4, 5), 256, 48, 64, True))
        cases.append(("auto", None, dtype, (4,), 256, 80, 32, True))
    return [(f"{path}-{i}-{dtype}-g{gs}", path, cfg, dtype, lead, k, n, gs, bias)
            for i, (path, cfg, dtype, lead, k, n, gs, bias) in enumerate(cases)]


def _worker():
    """Run every interpreter case; print one JSON line of results."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from internvl_kernels.w4a16 import DequantConfig, GemmConfig, GemvConfig, TcConfig, pick_config, w4a16_matmul

    make = {"gemv": GemvConfig, "gemm": GemmConfig, "tc": TcConfig, "dequant": DequantConfig}
    results = {}
    for name, path, cfg, dtype, lead, k, n, gs, use_bias in _interpreter_cases():
        seed = sum(map(ord, name))
        g = torch.Generator().manual_seed(seed)
        dt = getattr(torch, dtype)
        qweight, qzeros, scales = quantize_awq(torch.randn(n, k, generator=g) * 0.05, gs, scale_dtype=torch.float16)
        x = (torch.randn(*lead, k, generator=g) + 0.3).to(dt)  # a mean, so zero points matter
        bias = torch.randn(n, generator=g).to(dt) if use_bias else None
        config = make[path](**cfg) if cfg is not None else None
        m = x.numel() // k
        out = torch.full((m, n), float("nan"), dtype=dt)
        w4a16_matmul(x, qweight, qzeros, scales, gs, bias, out=out, config=config)
        y = w4a16_matmul(x, qweight, qzeros, scales, gs, bias, config=config)
        ref = x.double() @ dequantize_awq(qweight, qzeros, scales, gs, dtype=torch.float64)
        if bias is not None:
            ref = ref + bias.double()
        chosen = config or pick_config(m, n, k, gs, x.device)
        kind = {GemvConfig: "gemv", GemmConfig: "gemm", TcConfig: "tc", DequantConfig: "dequant"}[type(chosen)]
        results[name] = case_result(kind, y, out, ref, lead, n, dt)
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    return run_worker(__file__)


@pytest.mark.parametrize("case", [c[0] for c in _interpreter_cases()])
def test_triton_kernel_under_interpreter(interpreted, case):
    assert_case(interpreted[case], TOLERANCE)


def test_tensor_core_config_rejects_bad_byte_split():
    from internvl_kernels.w4a16 import TcConfig, w4a16_matmul

    qweight, qzeros, scales = quantize_awq(torch.randn(64, 128), 64, scale_dtype=torch.float16)
    x = torch.randn(2, 128).to(torch.float16)
    with pytest.raises(ValueError, match="TcConfig.bytes must be 1, 2 or 4, got 3"):
        w4a16_matmul(x, qweight, qzeros, scales, 64, config=TcConfig(bytes=3))


def test_interpreter_covers_the_launcher_paths(interpreted):
    kinds = {r["kind"] for name, r in interpreted.items() if name.startswith("auto")}
    assert kinds == {"gemv", "gemm", "tc"}


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
