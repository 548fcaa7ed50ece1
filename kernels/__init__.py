"""W4A16 matmul for AWQ checkpoints: the AWQ tensor format, Triton kernels on one K-packed layout, the reference.

Import name: internvl_kernels (4-bit weights, 16-bit activations).

Imports only torch and triton (triton optionally: without it the format helpers, the packing and the
reference still work), never vllm, so it also runs on a GPU machine where vLLM is not installed.

The AWQ "gemm" format (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales [K/G, N]; awq_format.py):
    quantize_awq, pack_awq_int4, unpack_awq_int4, dequantize_awq, AWQ_ORDER, AWQ_REVERSE_ORDER, PACK_FACTOR
    w4a16_matmul_ref(x, qweight, qzeros, scales, group_size, bias=None)   the float32 reference
The K-packed layout the Triton kernels run on (repacked once at load time; w4a16.py):
    can_pack(K, group_size), packed_available(device)
    pack_w4a16(qweight, qzeros, scales, group_size) -> (qk, meta); unpack_w4a16(qk, meta)
    w4a16_packed_matmul(x, qk, meta, group_size, bias=None)   CUDA, or CPU under TRITON_INTERPRET=1
The same matmul as a torch operator, opaque to torch.compile (ops.py):
    torch.ops.internvl_kernels.w4a16_packed_mm (also exported as w4a16_packed_mm)
"""

from .awq_format import (
    AWQ_ORDER,
    AWQ_REVERSE_ORDER,
    PACK_FACTOR,
    dequantize_awq,
    pack_awq_int4,
    quantize_awq,
    unpack_awq_int4,
    w4a16_matmul_ref,
)
from .w4a16 import can_pack, pack_w4a16, packed_available, unpack_w4a16, w4a16_packed_matmul
from .ops import w4a16_packed_mm  # noqa: E402  (registers the torch operator)

__all__ = [
    "quantize_awq",
    "pack_awq_int4",
    "unpack_awq_int4",
    "dequantize_awq",
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "PACK_FACTOR",
    "w4a16_matmul_ref",
    "can_pack",
    "packed_available",
    "pack_w4a16",
    "unpack_w4a16",
    "w4a16_packed_matmul",
    "w4a16_packed_mm",
]
