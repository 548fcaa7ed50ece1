"""Check the Triton W4A16 kernels against the float reference on CUDA, over many shapes.

    python3 benchmarks/check_w4a16_gpu.py [--quick] [--json results.json]

For every case: fresh random x, weight and bias (never zeros), AWQ-quantized with the project's
quantizer; the output buffer is poisoned with NaN first, so an element the kernel misses fails.
The reference is x @ dequant(W) in float64 for small shapes and float32 (TF32 off) for the large
InternLM2 shapes. Prints the relative error ||out - ref|| / ||ref|| per case; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _shim import INTERNLM2_SHAPES, import_kernels

K_ = import_kernels()
from internvl_kernels.w4a16 import DequantConfig, GemmConfig, GemvConfig, TcConfig, pick_config  # noqa: E402

# ||out - ref|| / ||ref|| bounds. The GEMV accumulates in fp32 from the exact 4-bit values, so only
# the final rounding to x.dtype counts; the GEMM also rounds each dequantized weight to x.dtype
# before the tensor-core product.
TOLERANCE = {
    ("gemv", torch.float16): 1e-3,
    ("gemv", torch.bfloat16): 6e-3,
    ("gemm", torch.float16): 2e-3,
    ("gemm", torch.bfloat16): 1.2e-2,
    ("tc", torch.float16): 2e-3,
    ("tc", torch.bfloat16): 1.2e-2,
}


def cases(quick: bool):
    small = [(128, 8), (256, 200), (384, 1032), (512, 1000), (1024, 776), (2048, 3000)]
    ms = [1, 2, 3, 5, 16, 17, 33, 64, 100, 128, 300]
    for k, n in small:
        for g in (32, 64, 128):
            if k % g:
                continue
            for m in (ms if not quick else [1, 3, 17, 100]):
                yield k, n, m, g, None
    big = [(k, n) for model in ("7B", "20B") for _, k, n in INTERNLM2_SHAPES[model]]
    for k, n in big:
        for g in ((128,) if quick else (32, 64, 128)):
            for m in ((1, 16, 512) if g != 128 else (1, 2, 4, 16, 32, 64, 128, 512)):
                yield k, n, m, g, None
    # Both kernels outside the M range the launcher gives them.
    for k, n in [(4096, 4096), (1024, 776)]:
        for m in (1, 4, 9):
            yield k, n, m, 128, GemmConfig(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4)
            yield k, n, m, 128, GemvConfig(block_k=8, num_warps=4)
            yield k, n, m, 128, GemvConfig(block_k=4, num_warps=1, split_k=1)
            yield k, n, m, 128, DequantConfig(block_k=64, block_w=32)
        # The tensor-core kernel in every mode (byte lanes, scale placement, wgmma and mma.sync tiles).
        for m in (1, 9, 40):
            yield k, n, m, 128, TcConfig(block_m=16, block_w=32, num_warps=2, bytes=4, scale_in_a=False)
            yield k, n, m, 64, TcConfig(block_m=16, block_w=64, num_warps=4, bytes=2, scale_in_a=True)
            yield k, n, m, 32, TcConfig(block_m=64, block_w=64, num_warps=4, bytes=1, scale_in_a=True, split_k=2)


def run_case(k, n, m, g, dtype, cfg, gen):
    dev = "cuda"
    weight = torch.randn(n, k, device=dev, generator=gen) * 0.02
    qweight, qzeros, scales = K_.quantize_awq(weight, g, scale_dtype=torch.float16)
    x = torch.randn(m, k, device=dev, generator=gen).to(dtype)
    bias = torch.randn(n, device=dev, generator=gen).to(dtype) if (k + m) % 2 else None
    w = K_.dequantize_awq(qweight, qzeros, scales, g, dtype=torch.float32)
    if k * n <= 4096 * 4096:
        ref = x.double() @ w.double() + (bias.double() if bias is not None else 0)
    else:
        ref = (x.float() @ w + (bias.float() if bias is not None else 0)).double()
    out = torch.full((m, n), float("nan"), device=dev, dtype=dtype)
    K_.w4a16_matmul(x, qweight, qzeros, scales, g, bias, out=out, config=cfg)
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(out).all())
    err = float((out.double() - ref).norm() / ref.norm())
    # DequantConfig rounds the weight to x.dtype like the GEMM: same tolerance.
    chosen = cfg or pick_config(m, n, k, g, x.device)
    path = "gemv" if isinstance(chosen, GemvConfig) else ("tc" if isinstance(chosen, TcConfig) else "gemm")
    return path, err, finite


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(1234)
    rows, failures = [], 0
    worst = {}
    t0 = time.time()
    for k, n, m, g, cfg in cases(args.quick):
        for dtype in (torch.float16, torch.bfloat16):
            path, err, finite = run_case(k, n, m, g, dtype, cfg, gen)
            tol = TOLERANCE[(path, dtype)]
            ok = finite and err <= tol
            failures += not ok
            key = (path, str(dtype).replace("torch.", ""))
            worst[key] = max(worst.get(key, 0.0), err)
            rows.append(dict(K=k, N=n, M=m, group=g, dtype=key[1], path=path, forced=cfg is not None,
                             rel_err=err, tol=tol, all_written=finite, ok=ok))
            if not ok or k * n > 4096 * 4096 or cfg is not None:
                print(f"{'ok  ' if ok else 'FAIL'} K={k:5d} N={n:5d} M={m:3d} G={g:3d} {key[1]:8s} {path} "
                      f"{'forced ' if cfg else ''}rel_err={err:.2e} (tol {tol:.0e}){'' if finite else ' NaN/unwritten'}")
    print(f"\n{len(rows)} cases, {failures} failed, {time.time() - t0:.0f} s")
    for (path, dt), e in sorted(worst.items()):
        print(f"  worst rel_err {path} {dt:8s} {e:.2e}  (tol {TOLERANCE[(path, getattr(torch, dt))]:.0e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=__import__("triton").__version__, failures=failures,
                           worst={f"{p}/{d}": e for (p, d), e in worst.items()}, cases=rows), f, indent=1)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
