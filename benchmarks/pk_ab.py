"""Same-run A/B of the K-packed path (what the plugin runs on CUDA) against an earlier copy of kernels/.

Two versions compared across device calls differ by the card's and the run's spread (about 5%);
timed in one run they do not. Make the baseline copy here, then carry it in the device call:

    git archive <commit> kernels | tar -x -C benchmarks/_base     # e.g. the last landed commit
    python3 benchmarks/pk_ab.py --baseline benchmarks/_base/kernels [--ms 1 4 16 ...] [--shapes 7B:w13 ...]
                                [--check] [--json F]

Per shape and token count it times cuBLAS bf16, the baseline's default path, this tree's default path
and this tree's candidate configs (`candidates`), with the CUDA-graph method of bench_w4a16.py, and
prints x vs bf16 and new / base. `--check` first runs pk_explore's quick correctness check on this
tree. The baseline may use the earlier API (pack_w4a16 -> (qk, zeros), matmul(x, qk, zeros, scales, G)).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from _shim import import_kernels, linear_shape
from bench_w4a16 import GROUP, Layer, copy_bandwidth, graph_us, time_configs

K_ = import_kernels()
from internvl_kernels.w4a16_packed import PackedConfig, PackedDequantConfig  # noqa: E402


def load_baseline(path: Path):
    spec = importlib.util.spec_from_file_location("internvl_kernels_base", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["internvl_kernels_base"] = module
    spec.loader.exec_module(module)
    return module


def baseline_pack(base, qweight, qzeros, scales, group_size=GROUP):
    """The baseline's packed tensors, as its w4a16_packed_matmul takes them after x (either API)."""
    packed = base.pack_w4a16(qweight, qzeros, scales, group_size)
    if packed[1].dtype == torch.uint8:  # (qk, zeros) + scales: the API before the meta words
        packed = (*packed, scales)
    return packed


def baseline_calls(base, layer):
    """The baseline's packed tensors for each weight copy of the layer."""
    return [baseline_pack(base, *awq) for awq in layer.awq_copies]


def candidates(m, which="sweep"):
    """Configs of this tree to time beside its default: "sweep" (M > 2) or "exact" (the exact-mode
    tensor-core kernel against the GEMV for M <= 16, one or two K tiles a step)."""
    if which == "exact":
        if m <= 16:
            for tiles, ns in ((1, 4), (1, 3), (1, 6), (2, 3)):
                yield PackedConfig(block_m=16, block_n=64, tiles=tiles, num_warps=4, num_stages=ns, waves=4.0,
                                   exact=True)
        return
    if m <= 2:
        return
    if m <= 16:
        for bn, tiles, nw, ns, waves, exact in ((64, 1, 4, 4, 4.0, False), (64, 2, 4, 3, 4.0, False),
                                                (64, 1, 4, 6, 4.0, False), (64, 1, 4, 4, 8.0, False),
                                                (64, 1, 4, 4, 2.0, False), (128, 1, 8, 4, 2.0, False),
                                                (64, 2, 4, 3, 4.0, True), (64, 1, 4, 4, 4.0, True)):
            yield PackedConfig(block_m=16, block_n=bn, tiles=tiles, num_warps=nw, num_stages=ns, waves=waves,
                               exact=exact)
    elif m <= 32:
        for bn, nw, ns in ((64, 4, 4), (64, 4, 6), (128, 8, 4)):
            yield PackedConfig(block_m=32, block_n=bn, num_warps=nw, num_stages=ns, waves=4.0)
    elif m <= 128:
        bm = 64 if m <= 64 else 128
        for bn, nw, ns, waves in ((128, 8, 3, 2.0), (128, 8, 4, 2.0), (64, 4, 4, 1.0), (64, 4, 3, 1.0)):
            yield PackedConfig(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, waves=waves,
                               split_full_grids=False)
    else:
        for bn, nw, ns in ((256, 8, 3), (256, 8, 4), (128, 8, 4)):
            yield PackedConfig(block_m=128, block_n=bn, num_warps=nw, num_stages=ns, waves=0.5)
        yield PackedDequantConfig()


def _rel_err(out, ref):
    return float((out.float() - ref).norm() / ref.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--shapes", nargs="+", default=[f"{m}:{s}" for m in ("7B", "20B")
                                                      for s in ("wqkv", "wo", "w13", "w2")])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--set", default="sweep", choices=["sweep", "exact"], help="candidate configs (candidates)")
    ap.add_argument("--json")
    ap.add_argument("--budget", type=float, default=480.0, help="stop after this many seconds")
    args = ap.parse_args()
    t0 = time.time()
    base = load_baseline(args.baseline)
    gen = torch.Generator(device="cuda").manual_seed(7)
    fails = 0
    if args.check:
        from pk_explore import check

        fails, cases, worst = check(gen, quick=True)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s  ({time.time() - t0:.0f}s)")
    rows = []
    for spec in args.shapes:
        model, name, k, n = linear_shape(spec)
        layer = Layer(k, n, gen, packed=True)
        base_copies = baseline_calls(base, layer)
        for m in args.ms:
            if time.time() - t0 > args.budget:
                print("budget spent, stopping", flush=True)
                break
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            ref = x.float() @ layer.dense_nk.float().t()
            err_base = _rel_err(base.w4a16_packed_matmul(x, *base_copies[0], GROUP), ref)
            err_new = _rel_err(K_.w4a16_packed_matmul(x, *layer.packed_copies[0], GROUP), ref)
            bf16 = layer.time_bf16(x)
            base_us = graph_us([lambda t=t: base.w4a16_packed_matmul(x, *t, GROUP) for t in base_copies])
            new_us = layer.time_packed(x)
            bad = []

            def verify(cfg):
                err = _rel_err(K_.w4a16_packed_matmul(x, *layer.packed_copies[0], GROUP, config=cfg), ref)
                if not err < 1.2e-2:
                    print(f"  FAIL {cfg}: rel err {err:.2e}", flush=True)
                    bad.append(cfg)

            res = time_configs(lambda cfg: layer.time_packed(x, cfg), candidates(m, args.set), verify)
            fails += len(bad)
            floor = layer.floor_bytes(m) / bw * 1e6
            print(f"{model:>3} {name:4} M={m:3d} bf16 {bf16:6.1f} base {base_us:6.1f} new {new_us:6.1f} "
                  f"(x{bf16 / new_us:.2f} bf16, new/base {new_us / base_us:.2f}) floor {floor:5.1f} "
                  f"err base {err_base:.1e} new {err_new:.1e}  {time.time() - t0:.0f}s", flush=True)
            fails += sum(not e < 1.2e-2 for e in (err_base, err_new))
            for t, c in res[:3]:
                print(f"        {t:6.1f} (x{bf16 / t:.2f}) {c}", flush=True)
            rows.append(dict(model=model, shape=name, K=k, N=n, M=m, bf16_us=bf16, base_us=base_us, new_us=new_us,
                             floor_us=floor, err_base=err_base, err_new=err_new,
                             top=[dict(us=t, config=repr(c)) for t, c in res[:6]]))
        del layer, base_copies
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=bw, rows=rows, check_failures=fails), f,
                      indent=1)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
