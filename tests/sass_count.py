"""Compile a W4A16 kernel for sm_90 on a machine without a GPU and count the SASS of its loops.

Triton compiles for a named target offline and ships ptxas/cuobjdump, so register use, spills,
shared memory and the instruction mix of the main loop can be read here, at no device time:

    python3 tests/sass_count.py pkgemv 8,1[,8,3,1,128]         # GEMV: BLOCK_N,warps[,TILES,STAGES,ROWS,group]
    python3 tests/sass_count.py pk 128,128,1,8,3[,exact,group]  # tensor cores: BLOCK_M,BLOCK_N,TILES,warps,stages
    python3 tests/sass_count.py pkdq 32,4,1[,group]            # dequantizer: BLOCK_N,warps,TILES

Use the Triton version of the device machine (3.6) for numbers that match it: scripts/setup.sh makes
one on GPU-less machines, `.venv/triton-gpu/bin/python tests/sass_count.py ...`. Integer
arguments that the runtime would specialize (multiples of 16) are marked so here too, as they change
vectorization. `--batch` reads [[kernel, spec, dtype(, flags(, arch))], ...] as JSON on stdin
(tests/test_kernels_sm90.py). This checkout's kernels/ is loaded as internvl_kernels, installed or
not: the side venv of Triton 3.6 has no project installed.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _load_kernels():
    """kernels/ of this checkout as the package internvl_kernels (its submodules as internvl_kernels.<name>)."""
    loaded = sys.modules.get("internvl_kernels")
    if loaded is not None and Path(loaded.__file__).resolve().parent == KERNELS:
        return loaded
    spec = importlib.util.spec_from_file_location("internvl_kernels", KERNELS / "__init__.py",
                                                  submodule_search_locations=[str(KERNELS)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["internvl_kernels"] = module
    spec.loader.exec_module(module)
    return module


_load_kernels()
from internvl_kernels import w4a16  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTRS = {"x_ptr": "*bf16", "bias_ptr": "*fp16", "out_ptr": "*fp32", "qk_ptr": "*i32", "meta_ptr": "*i32",
        "w_ptr": "*bf16"}
DIV16 = set(PTRS) | {"N", "K", "stride_xm", "stride_om", "stride_split", "stride_qk", "stride_meta"}


def compile_sm90(fn, consts, num_warps, num_stages, unspecialized=(), dtype="bf16", arch=90):
    """Compile `fn` for sm_90 (or sm_`arch`) with x (and the dense weight) in `dtype`, the runtime's
    multiple-of-16 specializations on pointers and strides except `unspecialized`."""
    names = list(fn.arg_names)
    ptrs = dict(PTRS, x_ptr=f"*{dtype}", w_ptr=f"*{dtype}")
    if "MAGIC" in fn.arg_names:  # as the launchers pass it (_triton_common._magic)
        consts = dict(consts, MAGIC=128.0 if dtype == "bf16" else 1024.0)
    sig = {a: ptrs.get(a, "i32") for a in names if a not in consts}
    sig.update({k: "constexpr" for k in consts})
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a in DIV16 and a not in unspecialized}
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(kernel):
    """(registers, stack bytes, [(address, SASS instruction)]) of a compiled kernel, via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    return int(m.group(1)), int(m.group(2)), ins


def _reg(tok: str):
    m = re.match(r"R(\d+)", tok)
    return int(m.group(1)) if m else None


def wgmma_a_hazards(ins) -> list[str]:
    """Instructions that write a register still read by a wgmma in flight across the main loop's back
    edge (register A operand of HGMMA), before a WARPGROUP.DEPBAR.LE gsb0, 0x0 retires them: the
    wgmma reads its A registers while it runs, so such a write races with it. Empty for a safe loop."""
    loops = [(int(b.group(1), 16), a) for a, t in ins
             if (b := re.search(r"BRA .*0x([0-9a-f]+)", t)) and int(b.group(1), 16) < a]
    hits = []
    for lo, hi in loops:
        body = [(a, t) for a, t in ins if lo <= a <= hi]
        hg = [t for _, t in body if "HGMMA" in t]
        waits = [int(t.split("gsb0,")[1].strip().rstrip(";"), 16) for _, t in body if "WARPGROUP.DEPBAR" in t]
        if not hg or not waits or not waits[-1]:
            continue
        busy = set()
        for t in hg[len(hg) - waits[-1]:]:  # the wgmma the back edge leaves running
            a_op = t.split()[2].rstrip(",")
            if _reg(a_op) is not None:
                busy |= set(range(_reg(a_op), _reg(a_op) + 4))
        for _, t in body:
            if "HGMMA" in t or "WARPGROUP.DEPBAR.LE gsb0, 0x0" in t:
                break
            toks = t.split()
            if toks[0].startswith("@"):
                toks = toks[1:]
            d = _reg(toks[1].rstrip(",")) if len(toks) > 1 else None
            width = 4 if ".128" in toks[0] else 2 if ".64" in toks[0] else 1
            if d is not None and busy & set(range(d, d + width)):
                hits.append(t)
    return hits


def report(kernel):
    regs, stack, ins = resources(kernel)
    print(f"registers {regs}, stack {stack} B, shared {kernel.metadata.shared} B, {len(ins)} instructions")
    hazards = wgmma_a_hazards(ins)
    if hazards:
        print(f"  {len(hazards)} writes to A registers of wgmma in flight, e.g. {hazards[0]}")
    for addr, txt in ins:
        b = re.search(r"BRA .*0x([0-9a-f]+)", txt)
        if b and int(b.group(1), 16) < addr:  # a backward branch closes a loop
            lo = int(b.group(1), 16)
            c = collections.Counter(t.split()[1 if t.startswith("@") else 0].split(".")[0]
                                    for a, t in ins if lo <= a <= addr)
            print(f"  loop {lo:#x}-{addr:#x}: {sum(c.values())} instructions", dict(c.most_common(16)))


def compile_case(which: str, spec: list[int], dtype: str = "bf16", flags: dict | None = None, arch: int = 90):
    """Compile one kernel for sm_90 (or sm_`arch`); `which` and `spec` as on the command line (module
    docstring); `flags` overrides constexpr arguments (e.g. {"EVEN_N": False})."""
    if which == "pkgemv":
        bn, nw, tiles, stages, rows, group = spec + [8, 3, 1, 128][len(spec) - 2:]
        consts = dict(GROUP_SIZE=group, BLOCK_N=bn, ROWS=rows, TILES=tiles, STAGES=stages, HAS_BIAS=False,
                      WRITE_PARTIAL=False, EVEN_N=True)
        consts.update(flags or {})
        return compile_sm90(w4a16._pk_gemv_kernel, consts, nw, stages, dtype=dtype, arch=arch)
    if which == "pkdq":
        bn, nw, tiles, group = spec + [128][len(spec) - 3:]
        consts = dict(GROUP_SIZE=group, BLOCK_N=bn, TILES=tiles, USE_ASM=True, DOT_FP32=False, EVEN_N=True)
        consts.update(flags or {})
        return compile_sm90(w4a16._pk_dequant_kernel, consts, nw, 1, dtype=dtype, arch=arch)
    if which == "pk":
        bm, bn, tiles, nw, ns, exact, group = spec + [0, 128][len(spec) - 5:]
        consts = dict(GROUP_SIZE=group, BLOCK_M=bm, BLOCK_N=bn, TILES=tiles, HAS_BIAS=False, WRITE_PARTIAL=False,
                      USE_ASM=True, DOT_FP32=False, EVEN_N=True, EVEN_M=True, EXACT=bool(exact),
                      DRAIN=arch == 90)  # as the launcher sets it (w4a16._is_hopper)
        consts.update(flags or {})
        return compile_sm90(w4a16._pk_kernel, consts, nw, ns, dtype=dtype, arch=arch)
    raise ValueError(f"unknown kernel {which!r}")


def batch(cases):
    """[(kernel, spec, dtype[, flags[, arch]])] -> one dict each: registers and stack, or the compiler's error."""
    out = []
    for which, spec, dtype, *rest in cases:
        flags, arch = (list(rest) + [{}, 90][len(rest):])[:2]
        row = dict(kernel=which, spec=spec, dtype=dtype, flags=flags, arch=arch, triton=triton.__version__)
        try:
            row["registers"], row["stack"], ins = resources(compile_case(which, spec, dtype, flags, arch))
            row["instructions"] = len(ins)
            row["wgmma_a_hazards"] = wgmma_a_hazards(ins)[:3]
        except Exception as e:  # reported per case
            msg = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or [repr(e)]
            row["error"] = f"{type(e).__name__}: {msg[0][:300]}"
        out.append(row)
    return out


def main():
    if sys.argv[1] == "--batch":  # JSON [[kernel, spec, dtype], ...] on stdin -> JSON results on stdout
        import json

        print(json.dumps(batch(json.load(sys.stdin))))
        return
    report(compile_case(sys.argv[1], [int(v) for v in sys.argv[2].split(",")]))


if __name__ == "__main__":
    main()
