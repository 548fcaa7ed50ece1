"""Tests of internvl_kernels: the AWQ format helpers, the torch reference, and the packed Triton kernels
on the shapes outside the layout's plainest case (K not a multiple of 128, groups wider than a K tile).

The Triton kernels run here for real, on the CPU, under Triton's interpreter (TRITON_INTERPRET=1).
The variable must be set before triton is imported, and other test files import vLLM (which imports
triton), so the interpreted cases run in one subprocess: this file run as a script (`--worker`)
computes every case and prints JSON, and the parametrized tests below check one case each
(interp_helpers.py; the tolerances are there).

What the interpreter cannot show: speed, inline PTX (the nibble extraction _byte_pair runs its plain
integer form here, the same values by construction) and bf16 tl.dot, which Triton 3.9's interpreter
computes wrongly (it multiplies raw bits): there the tensor-core kernel widens its bf16 operands to
fp32 first (exact, the same products). The GPU check is benchmarks/check_w4a16_gpu.py.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from interp_helpers import assert_case, packed_case, run_worker

from internvl_kernels import (
    AWQ_ORDER,
    AWQ_REVERSE_ORDER,
    dequantize_awq,
    pack_awq_int4,
    quantize_awq,
    unpack_awq_int4,
    w4a16_matmul_ref,
)


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


# ------------------------------------------------------------------------------------------------
# Packed kernels on padded K and wide groups, under the interpreter (subprocess)
# ------------------------------------------------------------------------------------------------

# (group size, K): K padded to the next multiple of 128 (G 32, 64), or groups over two to three K tiles.
SHAPES = [(32, 96), (32, 160), (32, 352), (64, 192), (64, 320), (256, 256), (256, 512), (256, 768)]
# The launcher's own choice, one token count a shape (1 to 300 tokens: GEMV, exact, scale-in-A, dequantize).
AUTO_M = [2, 3, 17, 40, 70, 300, 1, 2]


def _interpreter_cases():
    """(name, path, config kwargs, dtype, lead shape, K, N, group, bias): every kernel on every shape,
    N not a multiple of the program's columns, split K where K has more than one 128-deep tile."""
    cases = []
    for dtype in ("float16", "bfloat16"):
        for i, (gs, k) in enumerate(SHAPES):
            tiles = -(-k // 128)
            split = 2 if tiles > 1 else 1
            cases += [
                ("gemv", dict(block_n=16, num_warps=1, split_k=split), dtype, (1,), k, 40, gs, True),
                ("gemv", dict(block_n=8, num_warps=1, rows=2, tiles=2), dtype, (3,), k, 24, gs, False),
                ("tc", dict(block_m=16, block_n=32, num_warps=1, tiles=2, split_k=split, exact=True), dtype, (17,),
                 k, 72, gs, i % 2 == 0),
                ("tc", dict(block_m=32, block_n=32, num_warps=1, split_k=3 - split), dtype, (2, 20), k, 40, gs,
                 i % 2 == 1),
                ("dequant", dict(block_n=16, num_warps=1), dtype, (70,), k, 24, gs, True),
                ("auto", None, dtype, (AUTO_M[i],), k, 56, gs, i % 3 == 0),
            ]
    return [(f"{path}-{i}-{dtype}-g{gs}-k{k}", path, cfg, dtype, lead, k, n, gs, bias)
            for i, (path, cfg, dtype, lead, k, n, gs, bias) in enumerate(cases)]


def _worker():
    """Run every interpreter case; print one JSON line of results."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps({case[0]: packed_case(*case) for case in _interpreter_cases()}))


@pytest.fixture(scope="module")
def interpreted():
    return run_worker(__file__)


@pytest.mark.parametrize("case", [c[0] for c in _interpreter_cases()])
def test_packed_kernel_on_padded_k_and_wide_groups(interpreted, case):
    assert_case(interpreted[case])


def test_interpreter_covers_the_launcher_paths(interpreted):
    kinds = {r["kind"] for name, r in interpreted.items() if name.startswith("auto")}
    assert kinds == {"gemv", "exact", "scaled", "dequant"}


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
