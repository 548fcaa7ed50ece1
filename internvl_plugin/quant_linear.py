"""The linear method of ``awq_w4a16`` (config and selection rules: ``quant.py``).

Weights load in the checkpoint's AWQ gemm layout:

    qweight  int32 [K, N/8]     packed along the output dim (AWQ nibble order)
    qzeros   int32 [K/G, N/8]   packed the same way
    scales   act dtype [K/G, N]

On CUDA, when K is a multiple of 128 and G is 32, 64 or 128 (``can_pack``), they are repacked once
after loading into the K-packed layout of ``internvl_kernels.w4a16_packed`` (``qk`` int32 [N, K/8],
``meta`` [K/G, 2N] of (zero point, scale) pairs in the activations' dtype; the AWQ tensors are freed,
so the weight words take the same memory and the scales and zero points 1.5 bytes more a group and
column, +0.09 bits a weight at G = 128). benchmarks/README.md has the figures against the AWQ layout.
Other shapes, and every CPU tensor, keep the AWQ layout (``w4a16_linear``: Triton on CUDA, the torch
reference on CPU).

Fused layers (qkv, gate_up) load their shards through vLLM's parameter classes: a shard of N_i
output columns lands at column offset sum(N_<i) of ``scales`` and at offset sum(N_<i)/8 of the
packed tensors, which is why every shard width must be a multiple of 8.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.layers.quantization.utils.layer_utils import replace_parameter
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

from internvl_kernels import can_pack, pack_w4a16, w4a16_linear, w4a16_packed_mm
from internvl_kernels.w4a16 import triton
from internvl_plugin.quant import METHOD_NAME, PACK_FACTOR, AWQW4A16Config

__all__ = ["AWQW4A16LinearMethod", "use_packed_layout", "repack_layer"]

# Columns repacked at a time: bounds the temporary memory of pack_w4a16 (about 12 K bytes a column).
REPACK_CHUNK = 1024


def use_packed_layout(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> bool:
    """Whether a layer's AWQ tensors go to the K-packed Triton kernels: CUDA, fp16/bf16, a packable shape."""
    return (triton is not None and qweight.is_cuda and scales.dtype in (torch.float16, torch.bfloat16)
            and can_pack(qweight.shape[0], group_size))


def repack_layer(layer: torch.nn.Module, group_size: int) -> None:
    """Replace the layer's qweight/qzeros/scales by the packed qk/meta."""
    qk, meta = pack_w4a16(layer.qweight.data, layer.qzeros.data, layer.scales.data, group_size, chunk=REPACK_CHUNK)
    del layer.qweight, layer.qzeros, layer.scales
    layer.register_parameter("qk", torch.nn.Parameter(qk, requires_grad=False))
    layer.register_parameter("meta", torch.nn.Parameter(meta, requires_grad=False))


@register_weight_loader_v2_supported_method
class AWQW4A16LinearMethod(LinearMethodBase):
    def __init__(self, quant_config: AWQW4A16Config) -> None:
        self.quant_config = quant_config

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        group_size = self.quant_config.group_size
        name = getattr(layer, "prefix", "") or type(layer).__name__
        if input_size_per_partition % group_size:
            raise ValueError(f"{METHOD_NAME}: quantization_config.group_size={group_size} does not divide "
                             f"the {input_size_per_partition} input features of {name}"
                             + (f" (per tensor-parallel rank; {input_size} in all)"
                                if input_size != input_size_per_partition else ""))
        if any(n % PACK_FACTOR for n in output_partition_sizes):
            raise ValueError(f"{METHOD_NAME}: output sizes {output_partition_sizes} of {name} must be "
                             f"multiples of {PACK_FACTOR} to hold packed 4-bit weights")
        output_size_per_partition = sum(output_partition_sizes)
        groups = input_size_per_partition // group_size
        weight_loader = extra_weight_attrs["weight_loader"]

        def packed(rows: int) -> PackedvLLMParameter:
            return PackedvLLMParameter(
                data=torch.empty(rows, output_size_per_partition // PACK_FACTOR, dtype=torch.int32),
                input_dim=0, output_dim=1, packed_dim=1, packed_factor=PACK_FACTOR, weight_loader=weight_loader)

        layer.register_parameter("qweight", packed(input_size_per_partition))
        layer.register_parameter("qzeros", packed(groups))
        layer.register_parameter("scales", GroupQuantScaleParameter(
            data=torch.empty(groups, output_size_per_partition, dtype=params_dtype),
            input_dim=0, output_dim=1, weight_loader=weight_loader))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # Plain Parameters from here on: the loaders' subclasses are not needed by the kernel.
        for name in ("qweight", "qzeros", "scales"):
            replace_parameter(layer, name, getattr(layer, name).data.contiguous())
        if use_packed_layout(layer.qweight, layer.scales, self.quant_config.group_size):
            repack_layer(layer, self.quant_config.group_size)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(layer, "qk"):  # w4a16_packed_matmul as a torch operator, opaque to torch.compile
            return w4a16_packed_mm(x, layer.qk, layer.meta, self.quant_config.group_size, bias)
        return w4a16_linear(x, layer.qweight, layer.qzeros, layer.scales, self.quant_config.group_size, bias)
