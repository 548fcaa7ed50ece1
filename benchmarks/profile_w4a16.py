"""Run one W4A16 call repeatedly, for a profiler (Nsight Compute) to look at.

    ncu --clock-control none -k regex:_gemv_kernel -c 1 --section SpeedOfLight ... \
        python3 benchmarks/profile_w4a16.py --k 4096 --n 28672 --m 1
"""

from __future__ import annotations

import argparse

import torch

from _shim import import_kernels

K_ = import_kernels()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--config", help="a config repr, e.g. 'TcConfig(block_m=16, block_w=32, num_warps=2)'")
    args = ap.parse_args()
    w = torch.randn(args.n, args.k, device="cuda") * 0.02
    qweight, qzeros, scales = K_.quantize_awq(w, args.group, scale_dtype=torch.float16)
    x = torch.randn(args.m, args.k, device="cuda").to(torch.bfloat16)
    from internvl_kernels import w4a16

    cfg = eval(args.config, vars(w4a16)) if args.config else None  # noqa: S307 - a local command-line value
    for _ in range(args.reps):
        K_.w4a16_matmul(x, qweight, qzeros, scales, args.group, config=cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
