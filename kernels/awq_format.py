"""The AWQ "gemm" W4A16 tensor format: packing, RTN quantization, dequantization, reference matmul.

Layout (spec internvl-and-quant.md B2.1), for a linear with K inputs, N outputs and group size G:

    qweight  int32 [K, N/8]     element (k, c) packs q[k, 8c..8c+7]
    qzeros   int32 [K/G, N/8]   zero points 0..15, packed the same way
    scales   fp16/bf16 [K/G, N]
    dequantized W[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]     (W is [K, N]: x @ W)

Nibble order inside one int32 (B2.2): nibble i (bits 4i..4i+3) holds logical column AWQ_ORDER[i];
logical column j is read back as (word >> 4 * AWQ_REVERSE_ORDER[j]) & 0xF.

Everything here is plain torch and runs on any device; it is the ground truth the Triton kernels in
w4a16.py are tested against.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
PACK_FACTOR = 8  # 4-bit values per int32


def pack_awq_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values [R, N] (any integer dtype, 0..15) into AWQ-ordered int32 words [R, N/8]."""
    if q.dim() != 2 or q.shape[1] % PACK_FACTOR:
        raise ValueError(f"pack_awq_int4: need a 2-D tensor with a multiple of 8 columns, got {tuple(q.shape)}")
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_awq_int4: values must lie in 0..15")
    q = q.view(q.shape[0], -1, PACK_FACTOR)
    word = torch.zeros(q.shape[:2], dtype=torch.int64, device=q.device)
    for nibble, column in enumerate(AWQ_ORDER):
        word |= q[:, :, column] << (4 * nibble)
    # int32 words are stored signed: a top nibble >= 8 makes them negative.
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def unpack_awq_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_awq_int4: int32 [R, N/8] -> int32 [R, N] with values 0..15."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_awq_int4: need a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.tensor([4 * s for s in AWQ_REVERSE_ORDER], dtype=torch.int32, device=packed.device)
    q = (packed[:, :, None] >> shifts) & 0xF
    return q.reshape(packed.shape[0], -1)


def quantize_awq(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype | None = None):
    """Asymmetric 4-bit round-to-nearest quantization of an nn.Linear weight [N, K] (spec B1.8).

    Per group of `group_size` consecutive input channels of one output row:
    scale = clamp(max - min, 1e-5) / 15, zero = clamp(-round(min / scale), 0, 15),
    q = clamp(round(w / scale) + zero, 0, 15), with round-half-to-even. Computed in float32;
    scales are stored in `scale_dtype` (default: the weight's dtype).
    Returns (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales [K/G, N]).
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_awq: need a 2-D weight [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    if k % group_size or n % PACK_FACTOR:
        raise ValueError(f"quantize_awq: K={k} must be a multiple of group_size={group_size} and N={n} of 8")
    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    mx = w.amax(dim=-1, keepdim=True)
    mn = w.amin(dim=-1, keepdim=True)
    # A full tensor, not the scalar 15: CUDA turns division by a scalar into a multiplication by its
    # reciprocal, which rounds differently and would make GPU and CPU quantization disagree.
    scale = (mx - mn).clamp(min=1e-5) / torch.full_like(mx, 15.0)
    zero = (-torch.round(mn / scale)).clamp(0, 15)
    q = (torch.round(w / scale) + zero).clamp(0, 15).to(torch.int32).reshape(n, k)
    scales = scale.squeeze(-1).t().contiguous().to(scale_dtype)  # [K/G, N]
    zeros = zero.squeeze(-1).to(torch.int32).t().contiguous()  # [K/G, N]
    return pack_awq_int4(q.t().contiguous()), pack_awq_int4(zeros), scales


def dequantize_awq(qweight, qzeros, scales, group_size: int, dtype: torch.dtype | None = None):
    """Dense W [K, N] = (q - zero) * scale, computed in float32, returned in `dtype` (default scales.dtype)."""
    k, n = check_awq_shapes(qweight, qzeros, scales, group_size)
    q = unpack_awq_int4(qweight).to(torch.float32)
    z = unpack_awq_int4(qzeros).to(torch.float32)
    s = scales.to(torch.float32)
    w = (q.view(k // group_size, group_size, n) - z[:, None, :]) * s[:, None, :]
    return w.reshape(k, n).to(dtype or scales.dtype)


def w4a16_matmul_ref(x, qweight, qzeros, scales, group_size: int, bias=None):
    """x [..., K] @ dequant(W) [K, N] (+ bias), in float32, cast to x.dtype. The ground truth."""
    w = dequantize_awq(qweight, qzeros, scales, group_size, dtype=torch.float32)
    out = x.to(torch.float32) @ w
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def check_awq_shapes(qweight, qzeros, scales, group_size: int):
    """Validate the three AWQ tensors against each other; return (K, N)."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"AWQ qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError("AWQ qweight, qzeros and scales must be 2-D")
    k, n = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    if group_size <= 0 or k % group_size:
        raise ValueError(f"AWQ: K={k} is not a multiple of group_size={group_size}")
    groups = k // group_size
    if tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n // PACK_FACTOR):
        raise ValueError(
            f"AWQ: with qweight {tuple(qweight.shape)} and group_size {group_size} expected scales "
            f"{(groups, n)} and qzeros {(groups, n // PACK_FACTOR)}, got {tuple(scales.shape)} and {tuple(qzeros.shape)}"
        )
    return k, n
