"""Triton kernels of vllm-internvl and their plain-torch references (import name: internvl_kernels).

Imports only torch and triton (triton optionally: without it only the torch paths work), never vllm,
so it also runs on a GPU machine where vLLM is not installed.

W4A16 on the AWQ "gemm" format (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales [K/G, N]):
    w4a16_linear(x, qweight, qzeros, scales, group_size, bias=None)      model code calls this
    w4a16_matmul(...)        the Triton path (CUDA, or CPU under TRITON_INTERPRET=1)
    w4a16_matmul_ref(...)    the float32 torch reference
K-packed layout for the tensor-core kernel (repacked once at load time, w4a16_packed.py):
    pack_w4a16(qweight, qzeros, scales, group_size) -> (qk, meta); w4a16_packed_matmul(x, qk, meta, group_size, ...)
    dequantize_awq, quantize_awq, pack_awq_int4, unpack_awq_int4, AWQ_ORDER, AWQ_REVERSE_ORDER
The same two Triton paths as torch operators, opaque to torch.compile (ops.py):
    torch.ops.internvl_kernels.w4a16_packed_mm / w4a16_awq_mm (also exported as w4a16_packed_mm, w4a16_awq_mm)
"""

from .awq_format import (
    AWQ_ORDER,
    AWQ_REVERSE_ORDER,
    dequantize_awq,
    pack_awq_int4,
    quantize_awq,
    unpack_awq_int4,
    w4a16_matmul_ref,
)
from .w4a16 import w4a16_linear, w4a16_matmul
from .w4a16_packed import can_pack, pack_w4a16, unpack_w4a16, w4a16_packed_matmul
from .ops import w4a16_awq_mm, w4a16_packed_mm  # noqa: E402  (registers the torch operators)

__all__ = [
    "w4a16_linear",
    "w4a16_matmul",
    "w4a16_matmul_ref",
    "w4a16_packed_matmul",
    "w4a16_packed_mm",
    "w4a16_awq_mm",
    "pack_w4a16",
    "unpack_w4a16",
    "can_pack",
    "dequantize_awq",
    "quantize_awq",
    "pack_awq_int4",
    "unpack_awq_int4",
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
]
