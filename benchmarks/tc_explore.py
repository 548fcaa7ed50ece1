"""Explore configs of the tensor-core W4A16 kernel (_tc_kernel) against cuBLAS bf16 and the current
default path, with a correctness check first. One device call:

    python3 benchmarks/tc_explore.py [--ms 1 4 16 32 64] [--shapes 7B:w13 7B:wo ...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _shim import import_kernels, linear_shape
from bench_w4a16 import Layer, check_random, copy_bandwidth, time_configs

K_ = import_kernels()
from internvl_kernels.w4a16 import TcConfig  # noqa: E402


def check(gen):
    """Fresh random inputs over shapes, dtypes, group sizes and configs; worst relative error."""
    def run(qw, qz, sc, g):
        return lambda x, bias, out, cfg: K_.w4a16_matmul(x, qw, qz, sc, g, bias, out=out, config=cfg)

    return check_random(gen, ((256, 512), (512, 1536), (1024, 4096 + 512)), (1, 3, 16, 33, 64, 100),
                        lambda m: candidates(m, quick=True), run, scale_dtype=torch.float16)[0]


def candidates(m, quick=False, fine=False):
    if quick:
        bm = 16 if m <= 16 else 64
        yield TcConfig(block_m=bm, block_w=64, block_k=64, num_warps=4, bytes=4 if bm <= 16 else 1)
        yield TcConfig(block_m=16, block_w=16, block_k=64, num_warps=1, bytes=4, split_k=3, scale_in_a=False)
        yield TcConfig(block_m=32, block_w=32, block_k=64, num_warps=2, bytes=2, split_k=2)
        return
    if fine and m <= 16:
        for bw, nw in ((32, 2), (16, 1), (64, 4), (128, 8)):
            for bk in (64, 128):
                for by in (4, 2):
                    for sia in (False, True):
                        for waves in (1.0, 2.0, 4.0):
                            if by == 2 and (sia or bk == 128):
                                continue
                            yield TcConfig(block_m=16, block_w=bw, block_k=bk, num_warps=nw, num_stages=3, bytes=by,
                                           scale_in_a=sia, waves=waves)
        return
    if m <= 16:
        for bw, nw in ((64, 4), (32, 2), (16, 1)):
            for bk in (64, 128):
                for sia in (True, False):
                    for waves in (2.0, 4.0):
                        yield TcConfig(block_m=16, block_w=bw, block_k=bk, num_warps=nw, scale_in_a=sia, waves=waves)
    elif m <= 32:
        for bw, nw in ((64, 4), (32, 2)):
            for by in (4, 2):
                for waves in (2.0, 4.0):
                    yield TcConfig(block_m=32, block_w=bw, block_k=64, num_warps=nw, bytes=by, waves=waves)
    else:
        for bm in (64, 128, 256):
            if bm > 2 * m:
                continue
            for bw, nw in ((64, 4), (128, 8), (64, 8)):
                for by in (2, 1):
                    if bm >= 128 and by == 2:
                        continue
                    for ns in (3, 4):
                        yield TcConfig(block_m=bm, block_w=bw, block_k=64, num_warps=nw, num_stages=ns, bytes=by)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    ap.add_argument("--shapes", nargs="+", default=["7B:wqkv", "7B:wo", "7B:w13", "7B:w2"])
    ap.add_argument("--json")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--fine", action="store_true", help="the finer M <= 16 sweep")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(1)
    fails = 0 if args.no_check else check(gen)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for spec in args.shapes:
        model, name, k, n = linear_shape(spec)
        layer = Layer(k, n, gen)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            bf16 = layer.time_bf16(x)
            default = layer.time_awq(x)
            res = time_configs(lambda cfg: layer.time_awq(x, cfg), candidates(m, fine=args.fine))
            floor = layer.floor_bytes(m) / bw * 1e6
            print(f"{model} {name} M={m:3d} bf16 {bf16:7.1f} default {default:7.1f} floor {floor:6.1f} "
                  f"best {res[0][0]:7.1f} (x{bf16 / res[0][0]:.2f} vs bf16)", flush=True)
            for t, c in res[:3]:
                print(f"      {t:7.1f} {c}")
            rows.append(dict(model=model, shape=name, M=m, bf16_us=bf16, default_us=default, floor_us=floor,
                             top=[dict(us=t, config=repr(c)) for t, c in res[:5]]))
        del layer
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, check_failures=fails), f, indent=1)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
