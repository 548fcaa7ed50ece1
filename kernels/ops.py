"""The Triton W4A16 launchers as torch operators, so that torch.compile treats them as opaque calls.

vLLM compiles the language model with torch.compile unless --enforce-eager. Traced into, a launcher's
Python (the kernel and config chosen from the number of tokens, the grid, the split-K workspace)
would branch on a symbolic batch size. As operators they are traced as one node each, with a "fake"
rule for the output's shape:

    torch.ops.internvl_kernels.w4a16_packed_mm(x, qk, meta, group_size, bias) -> [..., N]
    torch.ops.internvl_kernels.w4a16_awq_mm(x, qweight, qzeros, scales, group_size, bias) -> [..., N]

Registered through torch.library.Library (the C++ dispatcher calls the Python launcher directly, a
few microseconds per call) for CUDA, and for CPU where Triton's interpreter runs the same kernels
(TRITON_INTERPRET=1; tests). Model code on CPU uses the torch reference instead (w4a16_linear).
"""

from __future__ import annotations

import torch

from .w4a16 import w4a16_matmul
from .w4a16_packed import w4a16_packed_matmul

NAMESPACE = "internvl_kernels"


def _packed_fake(x, qk, meta, group_size, bias):
    return x.new_empty((*x.shape[:-1], qk.shape[0]))


def _awq_fake(x, qweight, qzeros, scales, group_size, bias):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


def _registered() -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), "w4a16_packed_mm")
        return True
    except (AttributeError, RuntimeError):
        return False


if not _registered():  # once per process, even if this file is loaded under a second module name
    _LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
    for _name, _args, _impl, _fake in (
            ("w4a16_packed_mm", "Tensor qk, Tensor meta", w4a16_packed_matmul, _packed_fake),
            ("w4a16_awq_mm", "Tensor qweight, Tensor qzeros, Tensor scales", w4a16_matmul, _awq_fake)):
        _LIB.define(f"{_name}(Tensor x, {_args}, int group_size, Tensor? bias) -> Tensor")
        for _key in ("CUDA", "CPU"):
            _LIB.impl(_name, _impl, _key)
        torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake, lib=_LIB)

w4a16_packed_mm = torch.ops.internvl_kernels.w4a16_packed_mm
w4a16_awq_mm = torch.ops.internvl_kernels.w4a16_awq_mm
