"""Explore configs of the K-packed tensor-core kernel (w4a16_packed._pk_kernel) against cuBLAS bf16
and the AWQ-layout default path, after a correctness check. One device call:

    python3 benchmarks/pk_explore.py [--ms 1 4 16 32 64 128 512] [--shapes 7B:w13 ...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _shim import import_kernels, linear_shape
from bench_w4a16 import Layer, check_random, copy_bandwidth, time_configs

K_ = import_kernels()
from internvl_kernels.w4a16_packed import (PACKED_WIDE_CONFIG, PackedConfig, PackedDequantConfig,  # noqa: E402
                                           PackedGemvConfig)


def check(gen, quick=False):
    """Fresh random inputs over shapes, dtypes, group sizes, token counts and configs (the default
    and check_configs): relative error against an fp64 reference of the AWQ tensors."""
    shapes = ((128, 64), (384, 200), (1024, 4096 + 512)) if not quick else ((384, 200), (1024, 4096 + 512))
    # Token counts that fill the tensor-core kernels' blocks exactly (16, 64, 128, 256: their EVEN_M
    # variants) and that do not.
    ms = (1, 2, 3, 16, 33, 64, 100, 128, 256, 300) if not quick else (1, 2, 6, 16, 40, 64, 128, 200, 256)

    def run(qw, qz, sc, g):
        qk, meta = K_.pack_w4a16(qw, qz, sc, g)
        return lambda x, bias, out, cfg: K_.w4a16_packed_matmul(x, qk, meta, g, bias, out=out, config=cfg)

    return check_random(gen, shapes, ms, lambda m: [None, *check_configs()], run)


def check_configs():
    yield PackedGemvConfig(block_n=32, num_warps=2, split_k=3, stages=2)
    yield PackedGemvConfig(block_n=16, num_warps=2, tiles=4, stages=4, rows=2)
    yield PackedConfig(block_m=16, block_n=64, num_warps=4, split_k=3, exact=True)
    yield PackedConfig(block_m=64, block_n=128, num_warps=8, num_stages=3)
    yield PackedConfig(block_m=64, block_n=128, num_warps=8, num_stages=3, split_k=2)
    yield PACKED_WIDE_CONFIG


def candidates(m):
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    if m <= 2:
        gemv = {1: [(8, 1, 8, 2), (8, 1, 8, 3), (8, 1, 8, 4), (16, 1, 4, 2), (16, 1, 4, 3), (16, 1, 4, 4),
                    (16, 1, 8, 3), (16, 2, 8, 3), (4, 1, 8, 3), (8, 1, 4, 3)],
                2: [(8, 1, 8, 2), (8, 1, 8, 3), (8, 1, 4, 3), (16, 2, 8, 3), (16, 1, 4, 3), (4, 1, 8, 3)]}
        for rows in range(1, m + 1):
            for bn, nw, tiles, stages in gemv[rows]:
                yield PackedGemvConfig(block_n=bn, num_warps=nw, tiles=tiles, stages=stages, rows=rows, waves=2.0)
    if m <= 32:  # exact mode, one or two tiles a step, against scale-in-A
        for tiles, ns, exact in ((1, 4, True), (2, 3, True), (1, 4, False), (2, 3, False)):
            yield PackedConfig(block_m=max(bm, 16), block_n=64, num_warps=4, tiles=tiles, num_stages=ns, waves=4.0,
                               exact=exact)
    elif m <= 128:  # wider blocks (x is read once per block of columns)
        for bm_, bn, nw, ns in ((128, 64, 4, 3), (128, 128, 8, 4), (64, 128, 8, 3), (128, 256, 8, 3)):
            for split in (0, 1):
                yield PackedConfig(block_m=min(bm_, bm), block_n=bn, num_warps=nw, num_stages=ns, waves=1.0,
                                   split_k=split)
    else:  # the fused kernel against dequantize + cuBLAS
        for bm_, bn, nw, ns in ((256, 128, 8, 3), (128, 256, 8, 3), (128, 128, 8, 4)):
            yield PackedConfig(block_m=bm_, block_n=bn, num_warps=nw, num_stages=ns, waves=0.5)
        for bn, tiles, nw in ((32, 1, 4), (64, 1, 4), (32, 2, 4), (64, 2, 8)):
            yield PackedDequantConfig(block_n=bn, tiles=tiles, num_warps=nw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 16, 32, 64, 128, 512])
    ap.add_argument("--shapes", nargs="+", default=[f"{m}:{s}" for m in ("7B", "20B")
                                                      for s in ("wqkv", "wo", "w13", "w2")])
    ap.add_argument("--json")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--quick-check", action="store_true")
    ap.add_argument("--defaults-only", action="store_true", help="time only the default configs")
    ap.add_argument("--budget", type=float, default=540.0, help="stop sweeping after this many seconds")
    args = ap.parse_args()
    t_start = time.time()
    gen = torch.Generator(device="cuda").manual_seed(7)
    fails, cases, worst = (0, 0, {}) if args.no_check else check(gen, args.quick_check)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s  ({time.time() - t_start:.0f}s)")
    rows = []
    for spec in args.shapes:
        model, name, k, n = linear_shape(spec)
        layer = Layer(k, n, gen, packed=True)
        for m in args.ms:
            if time.time() - t_start > args.budget:
                print("budget spent, stopping", flush=True)
                break
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            bf16 = layer.time_bf16(x)
            default = layer.time_awq(x)
            packed_default = layer.time_packed(x)
            res = time_configs(lambda cfg: layer.time_packed(x, cfg), [] if args.defaults_only else candidates(m))
            if not res:
                res = [(packed_default, "default")]
            floor = layer.floor_bytes(m) / bw * 1e6
            print(f"{model} {name} M={m:3d} bf16 {bf16:7.1f} awq-default {default:7.1f} packed-default "
                  f"{packed_default:7.1f} floor {floor:6.1f} best {res[0][0]:7.1f} (x{bf16 / res[0][0]:.2f} vs bf16, "
                  f"default x{bf16 / packed_default:.2f})  {time.time() - t_start:.0f}s", flush=True)
            for t, c in res[:3]:
                print(f"      {t:7.1f} {c}")
            rows.append(dict(model=model, shape=name, M=m, bf16_us=bf16, awq_default_us=default,
                             packed_default_us=packed_default, floor_us=floor,
                             top=[dict(us=t, config=repr(c)) for t, c in res[:5]]))
        del layer
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, check_failures=fails, check_cases=cases,
                           check_worst=worst), f, indent=1)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
