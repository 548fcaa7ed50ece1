"""Time the W4A16 kernels on the InternLM2-7B/20B linear shapes against cuBLAS bf16 and tinygemm.

    python3 benchmarks/bench_w4a16.py [--json benchmarks/results/w4a16-h100.json] [--models 7B 20B]
    python3 benchmarks/bench_w4a16.py --sweep [--json sweep.json]     # time candidate configs

Timing: every call is captured in a CUDA graph (no launch overhead), cycling over enough copies of
the weights that each call reads them from HBM, not L2 (copies x bytes >= 3 x L2); the time per
call is the median over replays of the graph. (triton.testing.do_bench clears L2 before each rep by
writing 256 MB, and the dirty lines it leaves are written back during the next kernel: that adds
up to ~15 us to a small kernel, so it is used here only for the copy bandwidth.)
Columns (microseconds):
  bf16_us      torch F.linear with the dense bf16 weight [N, K] (cuBLAS)
  tinygemm_us  torch.ops.aten._weight_int4pack_mm (same 4-bit values and scales, tinygemm layout)
  ours_us      what the plugin runs on CUDA: the weight repacked by pack_w4a16, then
               internvl_kernels.w4a16_packed_matmul (launcher's choice of kernel and config)
  awq_us       internvl_kernels.w4a16_matmul on the AWQ layout itself, for comparison
  floor_us     bytes that must move (int4 weight + 16-bit scales + packed zeros + x + out) over the
               device-to-device copy bandwidth measured at the start of the run
Activations are bf16, group size 128.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from _shim import INTERNLM2_SHAPES, import_kernels

K_ = import_kernels()
from internvl_kernels.w4a16 import DequantConfig, GemmConfig, GemvConfig  # noqa: E402

GROUP = 128
MS = [1, 4, 16, 32, 64, 128, 512]


def l2_bytes() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size


def copies_for(nbytes: int) -> int:
    """How many copies of a weight make a rotation that always misses L2."""
    return max(1, min(64, -(-3 * l2_bytes() // nbytes)))


def graph_us(calls, min_calls=24, replays=15) -> float:
    """Median time per call of `calls` (zero-argument functions, used round-robin) in a CUDA graph."""
    for c in calls:  # compile / warm up outside the capture
        c()
    torch.cuda.synchronize()
    n = len(calls) * -(-min_calls // len(calls))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for i in range(n):
                calls[i % len(calls)]()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    times.sort()
    del graph
    return times[len(times) // 2]


def time_configs(time_fn, configs, check=None):
    """[(us, config)] fastest first: time_fn(config) for each config, check(config) first when given.
    A config that fails to compile or launch (resources and the like) is reported and left out."""
    res = []
    for cfg in configs:
        try:
            if check is not None:
                check(cfg)
            res.append((time_fn(cfg), cfg))
        except Exception as e:  # resources and the like
            print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    return sorted(res, key=lambda t: t[0])


def median_us(fn, rep=200) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    a.random_()
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=50, rep=500, return_mode="median") * 1e-3
    del a, b
    return 2 * (2 << 30) / t


def check_random(gen, shapes, ms, configs, run, scale_dtype=None):
    """Correctness sweep on fresh random inputs for the explore scripts: groups 32/64/128, fp16 and
    bf16, the (K, N) `shapes` and token counts `ms`, every config of `configs(m)`. `run(qw, qz, sc, g)`
    returns a function f(x, bias, out, cfg) that writes x @ W into out (NaN-poisoned first). The
    relative error against the fp64 product of the AWQ tensors must stay within fp16 2e-3 / bf16
    1.2e-2. Returns (failures, cases, worst error per dtype)."""
    worst, fails, cases = {}, 0, 0
    for g in (32, 64, 128):
        for dt in (torch.float16, torch.bfloat16):
            for k, n in shapes:
                w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
                qw, qz, sc = K_.quantize_awq(w, g, scale_dtype=scale_dtype or dt)
                dense = K_.dequantize_awq(qw, qz, sc, g, dtype=torch.float64)
                bias = torch.randn(n, device="cuda", generator=gen).to(dt)
                f = run(qw, qz, sc, g)
                for m in ms:
                    for cfg in configs(m):
                        x = torch.randn(m, k, device="cuda", generator=gen).to(dt)
                        use_bias = (m + k + cases) % 2 == 1
                        ref = x.double() @ dense + (bias.double() if use_bias else 0)
                        out = torch.full((m, n), float("nan"), device="cuda", dtype=dt)
                        f(x, bias if use_bias else None, out, cfg)
                        err = float((out.double() - ref).norm() / ref.norm())
                        key = str(dt).split(".")[-1]
                        worst[key] = max(worst.get(key, 0.0), err)
                        cases += 1
                        if not (err <= (2e-3 if dt == torch.float16 else 1.2e-2)):
                            fails += 1
                            print(f"FAIL g={g} {dt} K={k} N={n} M={m} {cfg}: rel err {err:.2e}", flush=True)
    print(f"check: {cases} cases, {fails} failed, worst {worst}", flush=True)
    return fails, cases, worst


class Layer:
    """One linear: random weight, its AWQ tensors, the dense bf16 copy and the tinygemm copy, each
    with enough clones for an L2-missing rotation (see copies_for)."""

    def __init__(self, k, n, gen, packed=False):
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        self.k, self.n = k, n
        # bf16 scales, as a bf16 model's checkpoint loads (the packed layout takes x's dtype)
        self.qweight, self.qzeros, self.scales = K_.quantize_awq(w, GROUP, scale_dtype=torch.bfloat16)
        dense = K_.dequantize_awq(self.qweight, self.qzeros, self.scales, GROUP, dtype=torch.float32)  # [K, N]
        self.dense_nk = dense.t().contiguous().to(torch.bfloat16)
        del dense
        self.tinygemm = _tinygemm_prepare(self.qweight, self.qzeros, self.scales)
        r4 = copies_for(self.floor_bytes(0))
        self.awq_copies = [(self.qweight, self.qzeros, self.scales)] + [
            (self.qweight.clone(), self.qzeros.clone(), self.scales.clone()) for _ in range(r4 - 1)]
        self.dense_copies = [self.dense_nk] + [self.dense_nk.clone() for _ in range(copies_for(2 * k * n) - 1)]
        self.packed_copies = None
        if packed:
            pk = K_.pack_w4a16(self.qweight, self.qzeros, self.scales, GROUP)
            self.packed_copies = [pk] + [tuple(t.clone() for t in pk) for _ in range(r4 - 1)]
        self.tg_copies = None
        if self.tinygemm is not None:
            self.tg_copies = [self.tinygemm] + [tuple(t.clone() for t in self.tinygemm) for _ in range(r4 - 1)]

    def time_awq(self, x, config=None):
        return graph_us([lambda t=t: K_.w4a16_matmul(x, *t, GROUP, config=config) for t in self.awq_copies])

    def time_packed(self, x, config=None):
        return graph_us([lambda t=t: K_.w4a16_packed_matmul(x, *t, GROUP, config=config) for t in self.packed_copies])

    def time_bf16(self, x):
        return graph_us([lambda w=w: F.linear(x, w) for w in self.dense_copies])

    def time_tinygemm(self, x):
        return graph_us([lambda t=t: torch.ops.aten._weight_int4pack_mm(x, t[0], GROUP, t[1]) for t in self.tg_copies])

    def floor_bytes(self, m):
        weight = self.k * self.n // 2 + self.scales.numel() * 2 + self.qzeros.numel() * 4
        return weight + m * self.k * 2 + m * self.n * 2


def _tinygemm_prepare(qweight, qzeros, scales):
    """tinygemm computes w = (q - 8) * scale + zero with a [K/G, N, 2] bf16 scale-and-zero tensor and
    q packed by torch._convert_weight_to_int4pack from uint8 [N, K/2] (two values per byte, the even
    k in the high nibble). AWQ's (q - z) * s is the same with zero = (8 - z) * s."""
    try:
        q = K_.unpack_awq_int4(qweight).t().contiguous()  # [N, K], 0..15
        z = K_.unpack_awq_int4(qzeros).float()  # [K/G, N]
        s = scales.float()
        packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        w = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16).contiguous()
        return w, sz
    except Exception as e:  # report, keep benchmarking the rest
        print(f"tinygemm unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def tinygemm_mm(layer, x):
    w, sz = layer.tinygemm
    return torch.ops.aten._weight_int4pack_mm(x, w, GROUP, sz)


def bench(models, gen):
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for model in models:
        for name, k, n in INTERNLM2_SHAPES[model]:
            layer = Layer(k, n, gen, packed=True)
            tg_err = None
            for m in MS:
                x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
                ref = x.float() @ layer.dense_nk.float().t()
                ours = K_.w4a16_packed_matmul(x, *layer.packed_copies[0], GROUP)
                err = float((ours.float() - ref).norm() / ref.norm())
                row = dict(model=model, shape=name, K=k, N=n, M=m, rel_err=err)
                row["bf16_us"] = layer.time_bf16(x)
                if layer.tinygemm is not None:
                    tg_err = float((tinygemm_mm(layer, x).float() - ref).norm() / ref.norm())
                    row["tinygemm_us"] = layer.time_tinygemm(x)
                    row["tinygemm_rel_err"] = tg_err
                else:
                    row["tinygemm_us"] = None
                row["ours_us"] = layer.time_packed(x)
                row["awq_us"] = layer.time_awq(x)
                row["floor_us"] = layer.floor_bytes(m) / bw * 1e6
                rows.append(row)
                print(_fmt(row), flush=True)
            del layer
            torch.cuda.empty_cache()
    return bw, rows


def _fmt(r):
    tg = f"{r['tinygemm_us']:8.1f}" if r.get("tinygemm_us") else "     n/a"
    return (f"{r['model']:>3s} {r['shape']:5s} K={r['K']:5d} N={r['N']:5d} M={r['M']:3d}  "
            f"bf16 {r['bf16_us']:8.1f}  tinygemm {tg}  ours {r['ours_us']:8.1f}  awq {r['awq_us']:8.1f}  "
            f"floor {r['floor_us']:7.1f}  "
            f"x{r['bf16_us'] / r['ours_us']:5.2f} vs bf16  err {r['rel_err']:.1e}")


def summary(rows):
    print("\nmodel shape     M   bf16_us  tinygemm_us  ours_us   awq_us  floor_us  bf16/ours  tg/ours  ours/floor")
    for r in rows:
        tg = r.get("tinygemm_us")
        print(f"{r['model']:>5s} {r['shape']:5s} {r['M']:4d} {r['bf16_us']:9.1f} {tg if tg else float('nan'):12.1f} "
              f"{r['ours_us']:8.1f} {r['awq_us']:8.1f} {r['floor_us']:9.1f} {r['bf16_us'] / r['ours_us']:10.2f} "
              f"{(tg / r['ours_us']) if tg else float('nan'):8.2f} {r['ours_us'] / r['floor_us']:11.2f}")


# ------------------------------------------------------------------------------------------------
# --sweep: candidate configs per M bucket; the winners go into kernels/w4a16.py's tables.
# ------------------------------------------------------------------------------------------------

SWEEP_SHAPES = [("7B", "wo", 4096, 4096), ("7B", "w13", 4096, 28672), ("7B", "w2", 14336, 4096)]


def sweep_candidates(m):
    if m <= 4:
        for nw in (1, 2, 4):
            for resident in (12, 16, 24):
                yield GemvConfig(block_k=8, num_warps=nw, resident_warps=resident)
    if m >= 2:
        bm = max(16, min(128, triton.next_power_of_2(m)))
        for bm_ in ([bm] if m <= 64 else [64, 128]):
            for bn in ((32, 64, 128) if bm_ <= 64 else (64, 128)):
                for bk in ((64, 128) if bm_ <= 64 else (64,)):
                    for sad in (True, False):
                        yield GemmConfig(block_m=bm_, block_n=bn, block_k=bk, num_warps=4, num_stages=3,
                                         scale_after_dot=sad)
    if m >= 128:
        for bk, bw, nw in ((64, 32, 8), (64, 16, 4), (128, 16, 8)):
            yield DequantConfig(block_k=bk, block_w=bw, num_warps=nw)


def sweep(gen, ms):
    out = []
    for model, name, k, n in SWEEP_SHAPES:
        layer = Layer(k, n, gen)
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            bf16 = layer.time_bf16(x)
            results = []
            for cfg in sweep_candidates(m):
                try:
                    results.append((layer.time_awq(x, cfg), cfg))
                except Exception as e:  # out of shared memory and the like
                    print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            results.sort(key=lambda t: t[0])
            default = layer.time_awq(x)
            print(f"{model} {name} M={m:3d} bf16 {bf16:7.1f} default {default:7.1f}  best:", flush=True)
            for t, cfg in results[:3]:
                print(f"     {t:7.1f}  {cfg}")
            out.append(dict(model=model, shape=name, K=k, N=n, M=m, bf16_us=bf16, default_us=default,
                            top=[dict(us=t, config=repr(c)) for t, c in results[:6]]))
        del layer
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--models", nargs="+", default=["7B", "20B"])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-ms", type=int, nargs="+", default=[1, 2, 4, 16, 64, 128, 512])
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                group_size=GROUP, activation_dtype="bfloat16")
    if args.sweep:
        result = dict(meta, sweep=sweep(gen, args.sweep_ms))
    else:
        bw, rows = bench(args.models, gen)
        summary(rows)
        result = dict(meta, copy_bandwidth_TBps=bw / 1e12, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
