"""The packed W4A16 launcher as a torch operator, so that torch.compile treats it as one opaque call.

vLLM compiles the language model with torch.compile unless --enforce-eager. Traced into, the launcher's
Python (the kernel and config chosen from the number of tokens, the grid, the split-K workspace)
would branch on a symbolic batch size. As an operator it is traced as one node, with a "fake" rule
for the output's shape:

    torch.ops.internvl_kernels.w4a16_packed_mm(x, qk, meta, group_size, bias) -> [..., N]

Registered through torch.library.Library (the C++ dispatcher calls the Python launcher directly, a
few microseconds per call) for CUDA, and for CPU where Triton's interpreter runs the same kernels
(TRITON_INTERPRET=1; tests).
"""

from __future__ import annotations

import torch

from .w4a16 import w4a16_packed_matmul

NAMESPACE = "internvl_kernels"


def _packed_fake(x, qk, meta, group_size, bias):
    return x.new_empty((*x.shape[:-1], qk.shape[0]))


def _registered() -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), "w4a16_packed_mm")
        return True
    except (AttributeError, RuntimeError):
        return False


if not _registered():  # once per process, even if this file is loaded under a second module name
    _LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
    _LIB.define("w4a16_packed_mm(Tensor x, Tensor qk, Tensor meta, int group_size, Tensor? bias) -> Tensor")
    for _key in ("CUDA", "CPU"):
        _LIB.impl("w4a16_packed_mm", w4a16_packed_matmul, _key)
    torch.library.register_fake(f"{NAMESPACE}::w4a16_packed_mm", _packed_fake, lib=_LIB)

w4a16_packed_mm = torch.ops.internvl_kernels.w4a16_packed_mm
