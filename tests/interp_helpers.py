"""Shared machinery of the interpreter tests (test_kernels.py, test_kernels_packed.py).

TRITON_INTERPRET=1 must be set before triton is imported, and other test files import vLLM (which
imports triton), so each kernel test file computes its interpreted cases in one subprocess: the file
run as a script with `--worker` prints one JSON line of per-case results, and parametrized tests
check one case each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def run_worker(test_file: str) -> dict:
    """Run `test_file --worker` under TRITON_INTERPRET=1 and return its JSON results."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, test_file, "--worker"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def case_result(kind: str, y, out, ref, lead, n: int, dtype) -> dict:
    """What a case records: y the returned tensor, out the NaN-poisoned out= tensor, ref float64."""
    return dict(kind=kind, dtype=str(dtype).split(".")[-1], rel_err=float((y.double() - ref).norm() / ref.norm()),
                all_written=bool(torch.isfinite(out).all()),
                out_equal=bool(torch.equal(out.view_as(y), y)),
                shape_ok=tuple(y.shape) == (*lead, n) and y.dtype == dtype)


def assert_case(r: dict, tolerances: dict) -> None:
    """One case's checks; the error bound is tolerances[(kind, dtype name)]."""
    tolerance = tolerances[(r["kind"], r["dtype"])]
    assert r["shape_ok"]
    assert r["all_written"], "the kernel left output elements unwritten (NaN poison survived)"
    assert r["out_equal"], "out= and the returned tensor differ"
    assert r["rel_err"] <= tolerance, r
