"""Correctness of the packed tensor-core kernel over block configs x split-K x token counts, this tree
against an earlier copy of kernels/ (see pk_ab.py for making one): the run that found the wgmma register
race (results/pk-race-h200.log; benchmarks/README.md).

    python3 benchmarks/pk_race.py --baseline benchmarks/_base/kernels > race.log

Prints one line per (K, N, M, config, split): "ok" or "BAD" (relative error above 1e-2 in either tree),
with both errors against the fp32 product of the dequantized weight. Exit 1 if any line is BAD.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from _shim import import_kernels
from pk_ab import baseline_pack, load_baseline

K_ = import_kernels()
from internvl_kernels.w4a16_packed import PackedConfig  # noqa: E402

BLOCKS = ((64, 128, 8, 3), (64, 128, 8, 4), (64, 64, 4, 3), (64, 128, 4, 3), (32, 128, 8, 4), (128, 128, 8, 4),
          (32, 64, 4, 4))  # block_m, block_n, warps, stages


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, required=True)
    args = ap.parse_args()
    base = load_baseline(args.baseline)
    gen = torch.Generator(device="cuda").manual_seed(3)
    bad = 0
    for k, n in ((16384, 6144), (4096, 4096)):
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        qw, qz, sc = K_.quantize_awq(w, 128, scale_dtype=torch.bfloat16)
        dense = K_.dequantize_awq(qw, qz, sc, 128, dtype=torch.float32)
        qk, meta = K_.pack_w4a16(qw, qz, sc, 128)
        base_packed = baseline_pack(base, qw, qz, sc, 128)
        for m in (64, 63, 32, 128):
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            ref = x.float() @ dense
            for (bm, bn, nw, ns), split in itertools.product(BLOCKS, (1, 2, 5)):
                kw = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, split_k=split)
                errs = []
                for fn in (lambda: K_.w4a16_packed_matmul(x, qk, meta, 128, config=PackedConfig(**kw)),
                           lambda: base.w4a16_packed_matmul(x, *base_packed, 128,
                                                            config=base.w4a16_packed.PackedConfig(**kw))):
                    y = fn().float()
                    errs.append(float((y - ref).norm() / ref.norm()))
                ok = all(e <= 1e-2 for e in errs)
                bad += not ok
                print(("ok  " if ok else "BAD ") + f"K={k} N={n} M={m} {kw} new {errs[0]} base {errs[1]}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
