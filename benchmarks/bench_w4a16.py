"""Times the W4A16 path the plugin runs against cuBLAS bf16, PyTorch's tinygemm and the HBM floor.

    python3 benchmarks/bench_w4a16.py [--models 1.8B 7B 20B] [--ms 1 2 4 16 ...] [--out w4a16-h200.json]
                                      [--baseline DIR]

Per InternLM2 linear and token count M (bf16 activations, group 128), in microseconds:
  bf16_us      F.linear with the dense bf16 weight [N, K] (cuBLAS)
  tinygemm_us  torch.ops.aten._weight_int4pack_mm on the same 4-bit values and scales (tinygemm layout)
  ours_us      the weight repacked by pack_w4a16, then w4a16_packed_matmul with its default config
               (pick_packed_config; the config is in the JSON)
  floor_us     the bytes that must move (the AWQ checkpoint's int4 weight, 16-bit scales and packed
               zeros, plus x and out) over the device-to-device copy bandwidth measured at the start
  base_us      (--baseline DIR) the same call through another copy of kernels/ (e.g. the last landed
               commit: `git archive <commit> kernels | tar -x -C benchmarks/_base --strip-components=1`,
               carried to the device), loaded as the package internvl_kernels_base, on the same inputs;
               its packing and matmul must have this tree's API (pack_w4a16 -> (qk, meta),
               w4a16_packed_matmul(x, qk, meta, G, bias)). Versions timed in separate device calls differ
               by the run's spread (a few percent); timed in one run they do not.
Ratios printed: bf16 / ours, tinygemm / ours, ours / floor (and ours / base).

Timing: every call is captured in a CUDA graph (no launch overhead), cycling over enough copies of
the weights that each call reads them from HBM, not L2 (copies x bytes >= 3 x L2); the time per
call is the median over replays of the graph. triton.testing.do_bench is used only for the copy
bandwidth: it clears L2 before each rep by writing 256 MB, and the write-back of those dirty lines
lands in the next kernel (up to ~15 us on a small one).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from _shim import INTERNLM2_SHAPES, import_kernels

GROUP = 128
MS = [1, 2, 4, 16, 32, 64, 128, 256, 512]
# ||out - ref|| / ||ref|| against x @ the dense bf16 weight in fp32: the check's loosest bound (bf16,
# scale-in-A and dequantize + cuBLAS); the check itself is check_w4a16_gpu.py.
MAX_REL_ERR = 1.2e-2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(INTERNLM2_SHAPES), default=["1.8B", "7B", "20B"])
    ap.add_argument("--ms", type=int, nargs="+", default=MS, help="token counts")
    ap.add_argument("--out", help="write the rows as JSON")
    ap.add_argument("--baseline", type=Path, help="a kernels/ copy to time beside this tree's (module docstring)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_w4a16: needs a CUDA device (run it through the device tool)", file=sys.stderr)
        return 2
    import triton

    kernels = import_kernels()
    base = load_baseline(args.baseline) if args.baseline else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw, rows = bench(kernels, args.models, args.ms, gen, base)
    summary(rows)
    wrong = [r for r in rows if not (r["rel_err"] <= MAX_REL_ERR and r.get("base_rel_err", 0.0) <= MAX_REL_ERR)]
    for r in wrong:
        print(f"WRONG {r['model']} {r['shape']} M={r['M']}: rel err ours {r['rel_err']:.2e} "
              f"base {r.get('base_rel_err', float('nan')):.2e} (bound {MAX_REL_ERR:.0e})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           group_size=GROUP, activation_dtype="bfloat16", copy_bandwidth_TBps=bw / 1e12,
                           baseline=str(args.baseline) if base else None, rows=rows), f, indent=1)
    return 1 if wrong else 0


def load_baseline(path: Path):
    """The kernels/ copy at `path` as the package internvl_kernels_base (its torch operator is not
    registered twice: ops.py registers once per process)."""
    spec = importlib.util.spec_from_file_location("internvl_kernels_base", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["internvl_kernels_base"] = module
    spec.loader.exec_module(module)
    return module


def bench(kernels, models, ms, gen, base=None):
    from internvl_kernels.w4a16 import pick_packed_config

    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for model in models:
        for name, k, n in INTERNLM2_SHAPES[model]:
            layer = Layer(kernels, k, n, gen, base)
            for m in ms:
                x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
                ref = x.float() @ layer.dense_nk.float().t()
                ours = kernels.w4a16_packed_matmul(x, *layer.packed_copies[0], GROUP)
                row = dict(model=model, shape=name, K=k, N=n, M=m, config=repr(pick_packed_config(m, n, k)),
                           rel_err=_rel_err(ours, ref))
                row["bf16_us"] = layer.time_bf16(x)
                row["tinygemm_us"] = row["tinygemm_rel_err"] = None
                if layer.tg_copies is not None:
                    row["tinygemm_rel_err"] = _rel_err(layer.tinygemm(x, layer.tg_copies[0]), ref)
                    row["tinygemm_us"] = layer.time_tinygemm(x)
                row["ours_us"] = layer.time_packed(x)
                row["floor_us"] = layer.floor_bytes(m) / bw * 1e6
                if base is not None:
                    row["base_rel_err"] = _rel_err(base.w4a16_packed_matmul(x, *layer.base_copies[0], GROUP), ref)
                    row["base_us"] = layer.time_base(x)
                rows.append(row)
                print(_line(row), flush=True)
            del layer
            torch.cuda.empty_cache()
    return bw, rows


def summary(rows):
    has_base = any("base_us" in r for r in rows)
    print("\nmodel shape     M   bf16_us  tinygemm_us  ours_us  floor_us  bf16/ours  tg/ours  ours/floor"
          + ("  base_us  ours/base" if has_base else ""))
    for r in rows:
        tg = r["tinygemm_us"]
        line = (f"{r['model']:>5s} {r['shape']:5s} {r['M']:4d} {r['bf16_us']:9.1f} {tg or float('nan'):12.1f} "
                f"{r['ours_us']:8.1f} {r['floor_us']:9.1f} {r['bf16_us'] / r['ours_us']:10.2f} "
                f"{(tg / r['ours_us']) if tg else float('nan'):8.2f} {r['ours_us'] / r['floor_us']:11.2f}")
        if "base_us" in r:
            line += f" {r['base_us']:8.1f} {r['ours_us'] / r['base_us']:10.3f}"
        print(line)
    if has_base:
        print("\nours / base by M (min, median, max over the linears):")
        for m in sorted({r["M"] for r in rows}):
            ratios = sorted(r["ours_us"] / r["base_us"] for r in rows if r["M"] == m and "base_us" in r)
            print(f"  M={m:4d}  {ratios[0]:.3f}  {ratios[len(ratios) // 2]:.3f}  {ratios[-1]:.3f}")


def _line(r):
    tg = f"{r['tinygemm_us']:8.1f}" if r["tinygemm_us"] else "     n/a"
    base = (f"  base {r['base_us']:8.1f} (ours/base {r['ours_us'] / r['base_us']:.3f}, err {r['base_rel_err']:.1e})"
            if "base_us" in r else "")
    return (f"{r['model']:>4s} {r['shape']:5s} K={r['K']:5d} N={r['N']:5d} M={r['M']:3d}  bf16 {r['bf16_us']:8.1f}  "
            f"tinygemm {tg}  ours {r['ours_us']:8.1f}  floor {r['floor_us']:7.1f}  "
            f"x{r['bf16_us'] / r['ours_us']:5.2f} vs bf16  err {r['rel_err']:.1e}{base}")


def _rel_err(out, ref) -> float:
    return float((out.float() - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


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


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    from triton.testing import do_bench

    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    a.random_()
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=50, rep=500, return_mode="median") * 1e-3
    del a, b
    return 2 * (2 << 30) / t


class Layer:
    """One linear: a random weight quantized to AWQ, its packed form (also by the baseline's packing,
    if given), the dense bf16 copy and the tinygemm copy, each with enough clones for an L2-missing
    rotation (copies_for)."""

    def __init__(self, kernels, k, n, gen, base=None):
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        self.kernels, self.k, self.n = kernels, k, n
        # bf16 scales, as a bf16 model's checkpoint loads (the packed layout takes x's dtype)
        self.qweight, self.qzeros, self.scales = kernels.quantize_awq(w, GROUP, scale_dtype=torch.bfloat16)
        del w
        dense = kernels.dequantize_awq(self.qweight, self.qzeros, self.scales, GROUP, dtype=torch.float32)  # [K, N]
        self.dense_nk = dense.t().contiguous().to(torch.bfloat16)
        del dense
        copies = copies_for(self.floor_bytes(0))
        packed = kernels.pack_w4a16(self.qweight, self.qzeros, self.scales, GROUP)
        self.packed_copies = [packed] + [tuple(t.clone() for t in packed) for _ in range(copies - 1)]
        self.base = base
        if base is not None:
            bpacked = base.pack_w4a16(self.qweight, self.qzeros, self.scales, GROUP)
            self.base_copies = [bpacked] + [tuple(t.clone() for t in bpacked) for _ in range(copies - 1)]
        self.dense_copies = [self.dense_nk] + [self.dense_nk.clone() for _ in range(copies_for(2 * k * n) - 1)]
        tg = _tinygemm_prepare(kernels, self.qweight, self.qzeros, self.scales)
        self.tg_copies = None if tg is None else [tg] + [tuple(t.clone() for t in tg) for _ in range(copies - 1)]

    def time_packed(self, x, config=None):
        mm = self.kernels.w4a16_packed_matmul
        return graph_us([lambda t=t: mm(x, *t, GROUP, config=config) for t in self.packed_copies])

    def time_base(self, x):
        mm = self.base.w4a16_packed_matmul
        return graph_us([lambda t=t: mm(x, *t, GROUP) for t in self.base_copies])

    def time_bf16(self, x):
        return graph_us([lambda w=w: F.linear(x, w) for w in self.dense_copies])

    def time_tinygemm(self, x):
        return graph_us([lambda t=t: self.tinygemm(x, t) for t in self.tg_copies])

    @staticmethod
    def tinygemm(x, tg):
        return torch.ops.aten._weight_int4pack_mm(x, tg[0], GROUP, tg[1])

    def floor_bytes(self, m):
        weight = self.k * self.n // 2 + self.scales.numel() * 2 + self.qzeros.numel() * 4
        return weight + m * self.k * 2 + m * self.n * 2


def _tinygemm_prepare(kernels, qweight, qzeros, scales):
    """tinygemm computes w = (q - 8) * scale + zero with a [K/G, N, 2] bf16 scale-and-zero tensor and
    q packed by torch._convert_weight_to_int4pack from uint8 [N, K/2] (two values per byte, the even
    k in the high nibble). AWQ's (q - z) * s is the same with zero = (8 - z) * s."""
    try:
        q = kernels.unpack_awq_int4(qweight).t().contiguous()  # [N, K], 0..15
        z = kernels.unpack_awq_int4(qzeros).float()  # [K/G, N]
        s = scales.float()
        packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        w = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16).contiguous()
        return w, sz
    except Exception as e:  # report, keep benchmarking the rest
        print(f"tinygemm unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
