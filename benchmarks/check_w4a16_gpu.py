"""Correctness check of the W4A16 path the plugin runs: the K-packed kernels through w4a16_packed_matmul.

    python3 benchmarks/check_w4a16_gpu.py [--quick] [--suites grid race models] [--out check.json]
    python3 benchmarks/check_w4a16_gpu.py --cpu-smoke          # CPU, Triton's interpreter, seconds

Three suites of cases (--quick keeps a covering subset of each):
  grid    small weights x groups 32/64/128/256 (those can_pack takes) x fp16/bf16 x token counts that
          fill the tensor-core blocks exactly and ones that do not x configs: the default
          (pick_packed_config), every config of the default table, explicit split-K and two-row ones
  race    bf16 tensor-core blocks x split-K x token counts on two InternLM2-sized weights: the sweep
          that found a wgmma register race on the H200 (wrong sums only with K split and M filling
          the blocks; benchmarks/README.md)
  models  the default path on the InternLM2-1.8B/7B/20B linears, group 128
Every case draws fresh random x (and a random weight and bias per weight shape; never zeros), poisons
out= with NaN (an element the kernel skips fails) and compares ||out - ref|| / ||ref|| with the bounds
of tests/test_kernels_packed.py, ref = x @ dequant(W) (+ bias) in float64 from the AWQ tensors.
Default cases also go through the torch operator the plugin calls, which must give the same bits.

Triton's compilations take most of the time (about a second each on the GPU machine; about 100 for
--quick, 600 for the whole check), so the cases run in --jobs processes, split by (config, dtype) so
that each compilation happens in one of them.
Prints one line per failure, then `N cases, F failures, worst fp16 X bf16 Y`; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from _shim import INTERNLM2_SHAPES, import_kernels

# ||out - ref|| / ||ref|| bounds by path. The GEMV and the exact mode keep the 4-bit values exact until
# the output is rounded to x.dtype; scale-in-A and dequantize + cuBLAS also round (q - z) * s to it.
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
DTYPES = (torch.float16, torch.bfloat16)
GROUPS = (32, 64, 128, 256)
# Token counts: 16, 64, 128, 256 and 512 fill the tensor-core blocks exactly (their EVEN_M variants).
GRID_MS = (1, 2, 6, 16, 40, 64, 128, 200, 256, 512)
GRID_MS_FULL = (1, 2, 3, 6, 16, 33, 40, 64, 100, 128, 200, 256, 300, 512)
# (K, N): N = 200 leaves the last column block of every config partly masked; K = 576 is not a
# multiple of 128 (its cases run where can_pack takes it, else they are counted as skipped).
GRID_SHAPES = ((384, 200), (1024, 4608), (576, 136))
# (block_m, block_n, warps, stages). The race hit 64 x 128 with 8 warps; the offline SASS showed the
# same hazard in every config of 128 columns or more a block, hence 128 x 256.
RACE_BLOCKS = ((64, 128, 8, 3), (64, 128, 8, 4), (64, 64, 4, 3), (64, 128, 4, 3), (32, 128, 8, 4),
               (128, 128, 8, 4), (32, 64, 4, 4), (128, 256, 8, 3))
RACE_SPLITS = (1, 2, 5)
RACE_MS = (64, 63, 32, 128)
RACE_SHAPES = ((16384, 6144), (4096, 4096))
MODEL_MS = (1, 2, 4, 16, 32, 64, 65, 128, 200, 256, 512, 600)


@dataclass(frozen=True)
class Case:
    suite: str
    k: int
    n: int
    group: int
    dtype: torch.dtype
    m: int
    config: object | None  # None: the launcher's choice (pick_packed_config)
    bias: bool


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a covering subset of each suite")
    ap.add_argument("--suites", nargs="+", choices=["grid", "race", "models"], default=["grid", "race", "models"])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="a few small cases on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set here)")
    ap.add_argument("--jobs", type=int,
                    help="worker processes (default: up to 8 on CUDA, 1 with --cpu-smoke; 1 runs in this process)")
    ap.add_argument("--out", help="write the summary and every case as JSON")
    ap.add_argument("--shard", help=argparse.SUPPRESS)  # "i/n": a worker's share (see run_jobs)
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton (kernels/ imports it)
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("check_w4a16_gpu: no CUDA device; --cpu-smoke runs a few cases under the interpreter", file=sys.stderr)
        return 2
    kernels = import_kernels()
    packed = importlib.import_module("internvl_kernels.w4a16")
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = list_cases(kernels, packed, args)
    t0 = time.time()
    if args.shard:
        index, count = map(int, args.shard.split("/"))
        rows = check(kernels, packed, shard(packed, cases, count)[index], device, seed=1234 + index)
        Path(args.out).write_text(json.dumps(rows))
        return 0
    jobs = args.jobs or (1 if args.cpu_smoke else min(8, os.cpu_count() or 1))
    if jobs > 1:
        rows = run_jobs(argv if argv is not None else sys.argv[1:], jobs)
    else:
        rows = check(kernels, packed, cases, device, seed=1234)
    return summarize(rows, skipped=sum(not _packable(kernels, c) for c in cases), seconds=time.time() - t0,
                     device=device, args=args)


# ------------------------------------------------------------------------------------------------
# Case lists
# ------------------------------------------------------------------------------------------------


def list_cases(kernels, packed, args) -> list[Case]:
    if args.cpu_smoke:
        return list(smoke_cases(packed))
    make = {"grid": grid_cases, "race": race_cases, "models": model_cases}
    return [c for name in args.suites for c in make[name](kernels, packed, args.quick)]


def table_configs(packed):
    """Every config pick_packed_config returns for the InternLM2 linears and the grid's weights."""
    shapes = [(k, n) for model in INTERNLM2_SHAPES.values() for _, k, n in model] + list(GRID_SHAPES)
    ms = (1, 2, 3, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513)
    return list(dict.fromkeys(packed.pick_packed_config(m, n, k) for m in ms for k, n in shapes))


def explicit_configs(packed):
    """What the defaults do not reach on small weights: the GEMV split and two rows a program, the
    exact mode split, scale-in-A with 128-column blocks whole and split."""
    return [
        packed.PackedGemvConfig(block_n=32, num_warps=2, split_k=3, stages=2),
        packed.PackedGemvConfig(block_n=16, num_warps=2, tiles=4, stages=4, rows=2),
        packed.PackedConfig(block_m=16, block_n=64, num_warps=4, split_k=3, exact=True),
        packed.PackedConfig(block_m=64, block_n=128, num_warps=8, num_stages=3),
        packed.PackedConfig(block_m=64, block_n=128, num_warps=8, num_stages=3, split_k=2),
    ]


def grid_cases(kernels, packed, quick):
    """Full: the default config over every (shape, group) and every token count, the table's and the
    explicit configs over every token count with (shape, group) rotating through the token counts.
    Quick: the default and the explicit configs, one (shape, group) for each config and dtype, rotating
    (a compilation per config, dtype, group and token-count class: fewer of them)."""
    weights = [(k, n, g) for (k, n), g in itertools.product(GRID_SHAPES, GROUPS) if _packable_kg(kernels, k, g)]
    configs = [None] + explicit_configs(packed) + ([] if quick else table_configs(packed))
    for ci, cfg in enumerate(dict.fromkeys(configs)):
        for mi, m in enumerate(GRID_MS if quick else GRID_MS_FULL):
            for di, dtype in enumerate(DTYPES):
                if quick:
                    chosen = [weights[(2 * ci + di) % len(weights)]]
                else:
                    chosen = weights if cfg is None else [weights[(ci + mi + di) % len(weights)]]
                for k, n, g in chosen:
                    yield Case("grid", k, n, g, dtype, m, cfg, bias=(mi + ci) % 2 == 1)
    # Shapes can_pack refuses are listed too (as one case each), so that the summary counts them.
    for (k, n), g in itertools.product(GRID_SHAPES, GROUPS):
        if k % g == 0 and not _packable_kg(kernels, k, g):
            yield Case("grid", k, n, g, torch.float16, 1, None, bias=False)


def race_cases(kernels, packed, quick):
    """The config x split-K x M sweep: bf16, group 128, no bias."""
    if quick:  # the combinations that raced before the drain, for both block widths that hold it
        blocks, splits, ms, shapes = ((64, 128, 8, 3), (128, 256, 8, 3)), (5,), (64, 128), ((4096, 4096),)
    else:
        blocks, splits, ms, shapes = RACE_BLOCKS, RACE_SPLITS, RACE_MS, RACE_SHAPES
    for (k, n), m, (bm, bn, nw, ns), split in itertools.product(shapes, ms, blocks, splits):
        cfg = packed.PackedConfig(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, split_k=split)
        yield Case("race", k, n, 128, torch.bfloat16, m, cfg, bias=False)


def model_cases(kernels, packed, quick):
    """The default path on the InternLM2 linears at every token count of MODEL_MS. Quick: each config
    of the default table once per dtype, on the first linear and token count that picks it."""
    seen = set()
    for linears in INTERNLM2_SHAPES.values():
        for (_, k, n), dtype in itertools.product(linears, DTYPES):
            for mi, m in enumerate(MODEL_MS):
                cfg = packed.pick_packed_config(m, n, k)
                if not (quick and (cfg, dtype) in seen):
                    seen.add((cfg, dtype))
                    yield Case("models", k, n, 128, dtype, m, None, bias=mi % 2 == 1)


def smoke_cases(packed):
    """Small cases for the interpreter: each kernel, split-K, masked blocks, both dtypes, and group 256
    and K = 320 (not a multiple of 128) where can_pack takes them."""
    explicit = [packed.PackedConfig(block_m=16, block_n=32, num_warps=1, split_k=2),
                packed.PackedConfig(block_m=16, block_n=32, num_warps=1, split_k=2, exact=True),
                packed.PackedGemvConfig(block_n=16, num_warps=1, split_k=2, rows=2)]
    for dtype in DTYPES:
        for m, g in ((1, 64), (2, 128), (5, 32), (33, 64), (300, 128)):  # GEMV, two rows, exact, scaled, dequant
            yield Case("smoke", 256, 72, g, dtype, m, None, bias=m % 2 == 1)
        for m, cfg in zip((16, 3, 3), explicit):
            yield Case("smoke", 384, 40, 128, dtype, m, cfg, bias=False)
        yield Case("smoke", 512, 40, 256, dtype, 4, None, bias=True)
        yield Case("smoke", 320, 40, 64, dtype, 17, None, bias=True)


def _packable_kg(kernels, k, g) -> bool:
    return k % g == 0 and kernels.can_pack(k, g)


def _packable(kernels, case: Case) -> bool:
    return _packable_kg(kernels, case.k, case.group)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def shard(packed, cases: list[Case], count: int) -> list[list[Case]]:
    """Split the cases into `count` lists, keeping each (config, dtype) family in one list (each
    compilation happens once) and balancing the lists by number of cases."""
    families: dict[tuple, list[Case]] = {}
    for c in cases:
        cfg = c.config or packed.pick_packed_config(c.m, c.n, c.k)
        families.setdefault((_config_text(cfg), str(c.dtype)), []).append(c)
    shards: list[list[Case]] = [[] for _ in range(count)]
    for family in sorted(families.values(), key=len, reverse=True):
        min(shards, key=len).extend(family)
    return shards


def run_jobs(argv: list[str], jobs: int) -> list[dict]:
    """Run the cases in `jobs` worker processes (this script with --shard i/jobs); their rows, merged.
    A worker that dies (a CUDA error poisons its context) fails all of its cases."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp, f"shard{i}.json") for i in range(jobs)]
        procs = [subprocess.Popen([sys.executable, __file__, *_without_out(argv), "--jobs", "1",
                                   "--shard", f"{i}/{jobs}", "--out", str(outs[i])]) for i in range(jobs)]
        rows = []
        for i, proc in enumerate(procs):
            rc = proc.wait()
            if rc == 0 and outs[i].exists():
                rows += json.loads(outs[i].read_text())
            else:
                print(f"FAIL worker {i}/{jobs} exited with {rc}: its cases were not checked", flush=True)
                rows.append(dict(suite="worker", ok=False, error=f"worker {i} exited with {rc}"))
    return rows


def _without_out(argv: list[str]) -> list[str]:
    """The command line less --out and --jobs (the parent's; each worker gets its own)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out" or a == "--jobs":
            skip = True
        elif not (a.startswith("--out=") or a.startswith("--jobs=")):
            out.append(a)
    return out


class Weight:
    """One random weight in AWQ form, packed, with its float64 dense copy and a bias."""

    def __init__(self, kernels, k, n, g, dtype, gen, device):
        w = torch.randn(n, k, device=device, generator=gen) * 0.02
        qweight, qzeros, scales = kernels.quantize_awq(w, g, scale_dtype=dtype)
        self.qk, self.meta = kernels.pack_w4a16(qweight, qzeros, scales, g)
        self.dense = kernels.dequantize_awq(qweight, qzeros, scales, g, dtype=torch.float64)  # [K, N]
        self.bias = torch.randn(n, device=device, generator=gen).to(dtype)


def check(kernels, packed, cases: list[Case], device, seed: int) -> list[dict]:
    """Run the cases (those can_pack takes), one weight at a time; a row per case."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    cases = sorted((c for c in cases if _packable(kernels, c)), key=lambda c: (c.k, c.n, c.group, str(c.dtype)))
    for (k, n, g, dtype), same_weight in itertools.groupby(cases, lambda c: (c.k, c.n, c.group, c.dtype)):
        weight = Weight(kernels, k, n, g, dtype, gen, device)
        for case in same_weight:
            try:
                row = check_case(kernels, packed, case, weight, gen, device)
            except Exception as e:  # a launch that raises fails its case; the run goes on
                row = dict(_describe(packed, case), ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
            if not row["ok"]:
                print("FAIL " + " ".join(f"{key}={row[key]}" for key in ("suite", "K", "N", "M", "group", "dtype"))
                      + f" {row['config']} " + (row.get("error") or f"rel_err {row['rel_err']:.2e} (tol "
                      f"{row['tol']:.0e}) written {row['all_written']} out= {row['out_is_result']} "
                      f"op {row.get('op_equal', '-')}"), flush=True)
        del weight
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_case(kernels, packed, case: Case, weight: Weight, gen, device) -> dict:
    x = torch.randn(case.m, case.k, device=device, generator=gen).to(case.dtype)
    bias = weight.bias if case.bias else None
    ref = x.double() @ weight.dense + (bias.double() if bias is not None else 0)
    out = torch.full((case.m, case.n), float("nan"), device=device, dtype=case.dtype)
    y = kernels.w4a16_packed_matmul(x, weight.qk, weight.meta, case.group, bias, out=out, config=case.config)
    row = _describe(packed, case, k_packed=weight.qk.shape[1] * 8)
    row["all_written"] = bool(torch.isfinite(out).all())
    row["out_is_result"] = y.data_ptr() == out.data_ptr()
    row["rel_err"] = float((out.double() - ref).norm() / ref.norm())
    row["tol"] = TOLERANCE[(row["kind"], row["dtype"])]
    if case.config is None:  # what the plugin calls: torch.ops.internvl_kernels.w4a16_packed_mm
        row["op_equal"] = bool(torch.equal(kernels.w4a16_packed_mm(x, weight.qk, weight.meta, case.group, bias), out))
    row["ok"] = (row["all_written"] and row["out_is_result"] and row.get("op_equal", True)
                 and row["rel_err"] <= row["tol"])
    return row


def _describe(packed, case: Case, k_packed: int | None = None) -> dict:
    """A case's row: what it ran, with the config the launcher picks (from the packed K, which the
    packing may round up) for a default case."""
    cfg = case.config or packed.pick_packed_config(case.m, case.n, k_packed or case.k)
    if isinstance(cfg, packed.PackedGemvConfig):
        kind = "gemv"
    elif isinstance(cfg, packed.PackedDequantConfig):
        kind = "dequant"
    else:
        kind = "exact" if cfg.exact else "scaled"
    return dict(suite=case.suite, K=case.k, N=case.n, M=case.m, group=case.group, dtype=str(case.dtype)[6:],
                config=_config_text(cfg), default=case.config is None, bias=case.bias, kind=kind)


def _config_text(cfg) -> str:
    """A config's fields that differ from the class defaults, e.g. PackedConfig(block_m=64, split_k=5)."""
    fields = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
              if getattr(cfg, f.name) != f.default]
    return f"{type(cfg).__name__}({', '.join(fields)})"


def summarize(rows: list[dict], skipped: int, seconds: float, device, args) -> int:
    failures = sum(not r["ok"] for r in rows)
    worst, by_kind, by_suite = {"float16": 0.0, "bfloat16": 0.0}, {}, {}
    for r in rows:
        by_suite[r["suite"]] = by_suite.get(r["suite"], 0) + 1
        if "rel_err" in r:
            err = r["rel_err"] if r["rel_err"] == r["rel_err"] else float("inf")  # NaN: an unwritten element
            worst[r["dtype"]] = max(worst[r["dtype"]], err)
            by_kind[(r["kind"], r["dtype"])] = max(by_kind.get((r["kind"], r["dtype"]), 0.0), err)
    print(f"{len(rows)} cases, {failures} failures, worst fp16 {worst['float16']:.2e} bf16 {worst['bfloat16']:.2e}")
    print(f"  {', '.join(f'{s} {n}' for s, n in by_suite.items())}; {skipped} not run (can_pack refuses); "
          f"{seconds:.0f} s")
    for (kind, dt), e in sorted(by_kind.items()):
        print(f"  worst {kind:7s} {dt:8s} {e:.2e}  (bound {TOLERANCE[(kind, dt)]:.0e})")
    if args.out:
        import triton

        summary = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
                       torch=torch.__version__, triton=triton.__version__, quick=args.quick,
                       cpu_smoke=args.cpu_smoke, cases=len(rows), failures=failures, skipped=skipped,
                       worst=worst, worst_by_kind={f"{k}/{d}": e for (k, d), e in sorted(by_kind.items())},
                       seconds=seconds)
        Path(args.out).write_text(json.dumps(dict(summary, rows=rows), indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
