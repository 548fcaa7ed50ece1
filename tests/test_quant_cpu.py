"""The CPU int4 matmul of awq_w4a16 (internvl_plugin/quant_cpu.py) and the CPU dtype choice
(internvl_plugin/cpu_dtype.py), without an engine.

Exactness: with the identity as input a kernel returns its dequantized weight, so the layout
conversions and the asymmetric zero points are checked bit for bit against
``internvl_kernels.dequantize_awq`` (float32: equal; bfloat16: equal to the kernel's stated rounding).
Random inputs: the error of a kernel is held to ``TOLERANCE[dtype] * max(|x| @ |W|)``, the scale of the
partial sums: float32 1e-5 (summation order only), bfloat16 8e-3 (two roundings to 8 significant bits,
2^-8 each: of the weight or zero', then of the output), float16 2e-3 (the same with 11 bits); w4a8-amx
(8-bit activations) may add, per output, ``quant_cpu.activation_bound``: half an activation step
(max|x| / 254 of the row) times sum_k |w|. With the identity as input its activations (0 and 1) are exact, so it too returns the weight.
"""

from __future__ import annotations

import pytest
import torch

from internvl_kernels import dequantize_awq, quantize_awq, unpack_awq_int4
from internvl_plugin import quant_cpu
from internvl_plugin.cpu_dtype import bf16_hardware, choose_cpu_dtype
from internvl_plugin.quant_cpu import (KERNELS, activation_bound, apply_layer, available_kernels, choose_plan,
                                       cpu_int4_linear, pack_awq, plan_accepts, repack_layer)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}


def _awq(k, n, group_size, dtype, seed=0):
    """AWQ tensors of a random weight, shifted per group so that the zero points cover 0..15. Scales as
    checkpoints store them, in 16 bits (float16 for a float32 model, as vLLM loads it)."""
    gen = torch.Generator().manual_seed(seed)
    shift = 8.0 * torch.rand(n, k // group_size, 1, generator=gen) - 4.0
    w = (torch.randn(n, k // group_size, group_size, generator=gen) + shift).reshape(n, k)
    stored = torch.float16 if dtype == torch.float32 else dtype
    qweight, qzeros, scales = quantize_awq(w, group_size, scale_dtype=stored)
    return qweight, qzeros, scales.to(dtype)


def _runs_here(plan, dtype):
    """Whether `plan`'s kernel works in this process with `dtype` activations (the probe)."""
    return plan in available_kernels(dtype)


def test_probe_finds_pytorch_kernel_for_every_dtype():
    for dtype in DTYPES:
        assert "int4pack" in available_kernels(dtype), dtype
    assert "wna16-amx" not in available_kernels(torch.float16)  # never probed: it would abort the process


def _applicable(plan, dtype, shape):
    """The plan's kernels run here and take the shape (a SHAPES row, or a group size for 512 x 192); random
    inputs in float32 (int4pack: PyTorch's scalar loop) only up to 2^21 multiply-adds: the big ones are
    slow and check nothing the small ones miss."""
    if not isinstance(shape, tuple):
        return _runs_here(plan, dtype) and plan_accepts(plan, 512, 192, shape, dtype)
    k, n, group_size, rows, _ = shape
    if dtype == torch.float32 and k * n * rows[-1] > 2**21:
        return False
    return _runs_here(plan, dtype) and plan_accepts(plan, k, n, group_size, dtype)


def _cases(plans, shapes):
    """(plan, dtype, shape) for every combination that applies here (no skips: the rest are left out)."""
    return [pytest.param(p, d, s, id=f"{p}-{str(d)[6:]}-{s[-1] if isinstance(s, tuple) else s}")
            for p in plans for d in DTYPES for s in shapes if _applicable(p, d, s)]


@pytest.mark.parametrize("kernel,dtype,group_size", _cases(KERNELS, [32, 64, 128, 256]))
def test_identity_gives_the_dequantized_weight(kernel, dtype, group_size):
    k, n = 512, 192
    qweight, qzeros, scales = _awq(k, n, group_size, dtype)
    zeros = unpack_awq_int4(qzeros)
    assert zeros.min() == 0 and zeros.max() == 15  # the zero points cover the whole range
    got = cpu_int4_linear(torch.eye(k, dtype=dtype), pack_awq(qweight, qzeros, scales, group_size, kernel), group_size)
    exact = dequantize_awq(qweight, qzeros, scales, group_size, dtype=torch.float32)  # (q - z) * s
    if kernel == "int4pack" and dtype != torch.float32:
        # (q - 8) * s + zero' in float32, zero' = (8 - z) * s rounded to the activations' dtype
        q = unpack_awq_int4(qweight).float().view(k // group_size, group_size, n)
        s = scales.float()[:, None, :]
        zero = ((8 - zeros.float()) * scales.float()).to(dtype).float()[:, None, :]
        dequantized = ((q - 8) * s + zero).reshape(k, n)
        drift = ((dequantized - exact).abs() / scales.float().repeat_interleave(group_size, 0)).max()
        assert drift <= 1 / 32, f"zero' rounding moved a weight by {drift:.3f} of its quantization step"
        expected = dequantized.to(dtype)
    else:
        expected = exact.to(dtype)  # float32: exact; wna16, w4a8: the exact weight rounded once
    assert torch.equal(got, expected)


SHAPES = [  # (K, N, G, rows, id): tiny-model and InternLM2-1.8B-like shapes, odd row counts, 3-D inputs
    (256, 128, 32, (1,), "256x128g32"), (128, 256, 64, (3, 5), "128x256g64-3x5"),
    (512, 384, 128, (17,), "512x384g128-17"), (1024, 64, 256, (2, 9), "1024x64g256-2x9"),
    (2048, 512, 128, (1,), "2048x512g128-1"), (2048, 512, 128, (8,), "2048x512g128-8"),
    (2048, 512, 128, (64,), "2048x512g128-64"), (192, 96, 32, (40,), "192x96g32-40"),
    (192, 64, 96, (5,), "192x64g96-5"), (4096, 256, 32, (3,), "4096x256g32-3"),
]


@pytest.mark.parametrize("plan,dtype,shape", _cases(list(KERNELS), SHAPES))
def test_random_inputs_match_the_float_reference(plan, dtype, shape):
    k, n, group_size, rows, _ = shape
    qweight, qzeros, scales = _awq(k, n, group_size, dtype, seed=k + n)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*rows, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    got = cpu_int4_linear(x, pack_awq(qweight, qzeros, scales, group_size, plan), group_size, bias)
    w = dequantize_awq(qweight, qzeros, scales, group_size, dtype=torch.float32)
    ref = x.float() @ w + bias.float()
    assert got.shape == (*rows, n) and got.dtype == dtype
    err = (got.float() - ref).abs()
    if plan == "w4a8-amx":  # minus what the 8-bit activations may add (module docstring)
        err = (err - activation_bound(x, w).view(err.shape)).clamp(min=0)
    err = err.max().item()
    scale = (x.float().abs() @ w.abs()).max().item()
    assert err <= TOLERANCE[dtype] * scale, f"max error {err:.3g} = {err / scale:.2g} of the partial sums' scale"


@pytest.mark.parametrize("rows", [1, 8, 64] if _runs_here("w4a8-amx", torch.bfloat16) else [])
def test_w4a8_error_is_the_activations_rounding(rows):
    """w4a8-amx's weights are exact (the identity test); what its 8-bit activations add stays within
    activation_bound (plus bfloat16's output rounding), on a layer of 1024 inputs."""
    k, n, group_size = 1024, 256, 64
    qweight, qzeros, scales = _awq(k, n, group_size, torch.bfloat16, seed=3)
    w = dequantize_awq(qweight, qzeros, scales, group_size, dtype=torch.float32)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = cpu_int4_linear(x, pack_awq(qweight, qzeros, scales, group_size, "w4a8-amx"), group_size).float()
    ref = x.float() @ w
    assert ((got - ref).abs() <= activation_bound(x, w) + 2**-8 * ref.abs()).all()


def test_chunked_packing_equals_whole(monkeypatch):
    k, n, group_size = 128, 512, 32
    awq = _awq(k, n, group_size, torch.bfloat16)
    plans = [p for p in ("int4pack", "wna16-vec") if p in available_kernels(torch.bfloat16)]
    whole = {p: pack_awq(*awq, group_size, p) for p in plans}
    monkeypatch.setattr(quant_cpu, "CHUNK", 64)
    for p in plans:
        chunked = pack_awq(*awq, group_size, p)
        for a, b in zip(whole[p][1:], chunked[1:]):
            assert (a is None and b is None) or torch.equal(a, b), p


def test_choose_plan_order_shapes_and_override(monkeypatch):
    monkeypatch.delenv(quant_cpu.ENV_PLAN, raising=False)
    assert choose_plan(2048, 4096, 128, torch.float32) == "int4pack"
    working = available_kernels(torch.bfloat16)
    assert choose_plan(2048, 4096, 128, torch.bfloat16) == (
        "w4a8-amx" if "w4a8-amx" in working else "int4pack")
    if "w4a8-amx" in working:  # N % 32 != 0: w4a8 refuses it, int4pack takes N % 16 == 0
        assert choose_plan(256, 48, 32, torch.bfloat16) == "int4pack"
    # G = 96: int4pack refuses it, wna16 takes any even G
    assert choose_plan(192, 64, 96, torch.bfloat16) == next(
        (k for k in ("wna16-amx", "wna16-vec") if k in working), None)
    assert choose_plan(128, 40, 32, torch.bfloat16) is None  # N % 16: no kernel (dense fallback)
    monkeypatch.setenv(quant_cpu.ENV_PLAN, "int4pack")
    assert choose_plan(2048, 4096, 128, torch.bfloat16) == "int4pack"
    monkeypatch.setenv(quant_cpu.ENV_PLAN, "fastest")
    with pytest.raises(ValueError, match=r"^VLLM_INTERNVL_CPU_INT4='fastest': choose one of w4a8-amx, int4pack, "):
        choose_plan(2048, 4096, 128, torch.bfloat16)


def test_probe_refuses_a_kernel_that_computes_something_else(monkeypatch):
    real = quant_cpu._pack_int4pack

    def wrong_zero_point(qweight, qzeros, scales, dtype):
        weight, scales_zeros = real(qweight, qzeros, scales, dtype)
        scales_zeros[..., 1] = 0  # as if the zero points were ignored
        return weight, scales_zeros

    monkeypatch.setattr(quant_cpu, "_pack_int4pack", wrong_zero_point)
    ok, why = quant_cpu._probe("int4pack", torch.float32)
    assert not ok and why.startswith("wrong results"), why


def test_repack_layer_frees_the_awq_tensors_and_applies():
    k, n, group_size = 256, 128, 32
    plan = choose_plan(k, n, group_size, torch.bfloat16)
    qweight, qzeros, scales = _awq(k, n, group_size, torch.bfloat16)
    layer = torch.nn.Module()
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        layer.register_parameter(name, torch.nn.Parameter(t.clone(), requires_grad=False))
    repack_layer(layer, group_size, plan)
    names = {name for name, _ in layer.named_parameters()}
    assert names <= {"cpu_int4_weight", "cpu_int4_scales", "cpu_int4_zeros"} and layer.cpu_int4_plan == plan
    held = sum(p.numel() * p.element_size() for p in layer.parameters())
    # one copy of the 4-bit weights (K * N / 2 bytes) with its scales, zero points (and w4a8's compensation)
    assert k * n // 2 < held <= 0.8 * k * n, held
    x = torch.randn(2, 3, k).bfloat16()
    bias = torch.randn(n).bfloat16()
    expected = cpu_int4_linear(x, pack_awq(qweight, qzeros, scales, group_size, plan), group_size, bias)
    assert torch.equal(apply_layer(layer, x, group_size, bias), expected)


def test_operator_is_one_opaque_call_under_torch_compile():
    k, n, group_size = 128, 64, 32
    w = pack_awq(*_awq(k, n, group_size, torch.bfloat16), group_size, choose_plan(k, n, group_size, torch.bfloat16))
    compiled = torch.compile(lambda x: cpu_int4_linear(x, w, group_size) * 2, backend="aot_eager",
                             dynamic=True, fullgraph=True)
    for rows in (1, 8, 11, 40):
        x = torch.randn(rows, k).bfloat16()
        assert torch.equal(compiled(x), cpu_int4_linear(x, w, group_size) * 2), rows


# ---------------------------------------------------------------------------------------------- dtype


SPR = "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ICELAKE = "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni\n"
AVX2 = "flags\t\t: fpu sse2 avx avx2 fma f16c\n"
NEOVERSE_V1 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp sve bf16 i8mm\n"
GRAVITON2 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp\n"


@pytest.mark.parametrize("cpuinfo,quantized,expected", [
    (SPR, False, "bfloat16"), (SPR, True, "bfloat16"),
    (ICELAKE, False, "float32"), (ICELAKE, True, "bfloat16"),
    (AVX2, False, "float32"), (AVX2, True, "bfloat16"),
    (NEOVERSE_V1, False, "bfloat16"), (GRAVITON2, False, "float32"),
], ids=["spr", "spr-awq", "icelake", "icelake-awq", "avx2", "avx2-awq", "neoverse-v1", "graviton2"])
def test_cpu_dtype_follows_bf16_hardware(cpuinfo, quantized, expected):
    choice = choose_cpu_dtype(None, quantized=quantized, cpuinfo=cpuinfo)
    assert choice.dtype == expected, choice
    assert choice.reason.startswith(expected) and "\n" not in choice.reason


def test_cpu_dtype_reasons_name_the_evidence():
    assert "amx_bf16" in choose_cpu_dtype(cpuinfo=SPR).reason
    assert "emulated" in choose_cpu_dtype(cpuinfo=AVX2).reason and "has avx2" in choose_cpu_dtype(cpuinfo=AVX2).reason
    assert "int4" in choose_cpu_dtype(cpuinfo=AVX2, quantized=True).reason


@pytest.mark.parametrize("requested", ["float16", "float32", "bfloat16"])
def test_cpu_dtype_given_wins(requested):
    assert choose_cpu_dtype(requested, cpuinfo=AVX2).dtype == requested
    assert choose_cpu_dtype(requested, quantized=True, cpuinfo=SPR).dtype == requested
    assert choose_cpu_dtype("auto", cpuinfo=AVX2).dtype == "float32"


def test_bf16_hardware_on_this_machine_agrees_with_torch():
    native, evidence = bf16_hardware()
    assert native == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()), evidence
