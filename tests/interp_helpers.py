"""Shared machinery of the interpreter tests (test_kernels.py, test_kernels_packed.py).

TRITON_INTERPRET=1 must be set before triton is imported, and other test files import vLLM (which
imports triton), so each kernel test file computes its interpreted cases in one subprocess: the file
run as a script with `--worker` prints one JSON line of per-case results, and parametrized tests
check one case each.

Tolerances (||out - ref|| / ||ref||, ref = w4a16_matmul_ref in float64 activations): the GEMV and the
exact mode keep the 4-bit values exact until the output rounding (fp16 1e-3, bf16 6e-3); the scale-in-A
mode and dequantize + matmul also round (q - z) * s to x.dtype (fp16 2e-3, bf16 1.2e-2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

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


def run_worker(test_file: str) -> dict:
    """Run `test_file --worker` under TRITON_INTERPRET=1 and return its JSON results."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, test_file, "--worker"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def packed_case(name: str, path: str, cfg: dict | None, dtype: str, lead: tuple, k: int, n: int, gs: int,
                use_bias: bool) -> dict:
    """One interpreted case (in the worker): a random AWQ weight [K, N] of group size gs, packed, and
    x [*lead, K] through w4a16_packed_matmul with the config of kind `path` made from `cfg` (None: the
    launcher's choice), twice (into a NaN-poisoned out=, and returned), against w4a16_matmul_ref."""
    from internvl_kernels import pack_w4a16, quantize_awq, w4a16_matmul_ref
    from internvl_kernels.w4a16 import (PackedConfig, PackedDequantConfig, PackedGemvConfig, pick_packed_config,
                                        w4a16_packed_matmul)

    g = torch.Generator().manual_seed(sum(map(ord, name)))
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
    ref = w4a16_matmul_ref(x.double(), qweight, qzeros, scales, gs, None if bias is None else bias.double())
    chosen = config or pick_packed_config(m, n, qk.shape[1] * 8)
    kind = ("gemv" if isinstance(chosen, PackedGemvConfig) else "dequant" if isinstance(chosen, PackedDequantConfig)
            else "exact" if chosen.exact else "scaled")
    return case_result(kind, y, out, ref, lead, n, dt)


def case_result(kind: str, y, out, ref, lead, n: int, dtype) -> dict:
    """What a case records: y the returned tensor, out the NaN-poisoned out= tensor, ref float64."""
    return dict(kind=kind, dtype=str(dtype).split(".")[-1], rel_err=float((y.double() - ref).norm() / ref.norm()),
                all_written=bool(torch.isfinite(out).all()),
                out_equal=bool(torch.equal(out.view_as(y), y)),
                shape_ok=tuple(y.shape) == (*lead, n) and y.dtype == dtype)


def assert_case(r: dict, tolerances: dict = TOLERANCE) -> None:
    """One case's checks; the error bound is tolerances[(kind, dtype name)]."""
    tolerance = tolerances[(r["kind"], r["dtype"])]
    assert r["shape_ok"]
    assert r["all_written"], "the kernel left output elements unwritten (NaN poison survived)"
    assert r["out_equal"], "out= and the returned tensor differ"
    assert r["rel_err"] <= tolerance, r
