"""Keep numba and llvmlite out of vLLM 0.32's Triton-kernel rebind scan (the CPU KV cache's decode kernel is Numba).

vLLM 0.32 CPU workers without Triton-CPU run ``current_platform.register_triton_kernel_overrides()`` in every
``init_worker``; its ``triton_utils.dispatcher._rebind_kernels`` walks every module in ``sys.modules`` and, for
each value that has a ``__dict__`` attribute, reads ``vars(value).get("kernel")``. ``llvmlite.binding.ffi.lib``
answers any attribute name (``__dict__`` included) with a function wrapper, so once numba has been imported in
a process every engine started after it stops in that scan with "'_lib_fn_wrapper' object has no attribute
'get'". The decode kernel imports numba only for an int8/int4 cache and only when the model is built, after that
worker's scan, so a fresh server never meets it; a second engine in the same process does (tests, scripts that
build several ``LLM``s, or any engine after vLLM's own n-gram proposer imported numba). numba and llvmlite hold no
Triton kernels, so the scan is run with their modules taken out of ``sys.modules`` and put back right after.
Applied on CPU only (the scan is the CPU worker's); where vLLM no longer has the function, one line is logged
and nothing is wrapped. ``tests/test_kv_cpu_format.py`` fails when vLLM changes the function this wraps.
"""

from __future__ import annotations

import functools
import sys

from vllm.logger import init_logger

# a "vllm." name: vLLM configures (handler, level) only its own logger tree
logger = init_logger(f"vllm.{__name__}")
_SKIPPED = ("numba", "llvmlite")


def apply() -> None:
    """Wrap ``vllm.triton_utils.dispatcher._rebind_kernels`` (idempotent; a no-op where vLLM lacks it)."""
    try:
        from vllm.triton_utils import dispatcher

        original = dispatcher._rebind_kernels
    except (ImportError, AttributeError) as exc:
        logger.warning(
            "internvl_plugin: not keeping numba out of vLLM's Triton-kernel rebind scan (%s; written for vLLM 0.32)",
            exc)
        return
    if getattr(original, "_internvl_skips_numba", False):
        return

    @functools.wraps(original)
    def rebind_kernels(overrides):
        hidden = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in _SKIPPED}
        try:
            return original(overrides)
        finally:
            sys.modules.update(hidden)

    rebind_kernels._internvl_skips_numba = True
    dispatcher._rebind_kernels = rebind_kernels
