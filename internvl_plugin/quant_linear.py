"""The linear method of ``awq_w4a16``: how a layer holds its AWQ weight after loading, and its matmul
(config and selection rules: ``quant.py``).

Weights load in the checkpoint's AWQ gemm layout:

    qweight  int32 [K, N/8]     packed along the output dim (AWQ nibble order)
    qzeros   int32 [K/G, N/8]   packed the same way
    scales   act dtype [K/G, N]

After loading, ``weight_layout`` picks one of four forms for the layer (the AWQ tensors are freed
in the first three):

* ``packed`` (CUDA, fp16/bf16, ``can_pack``: G 32, 64 or a multiple of 128): repacked once into the
  K-packed layout of ``internvl_kernels`` (``qk`` int32 [N, K'/8], ``meta`` [K'/G, 2N] of (zero point,
  scale) pairs in the activations' dtype, K' = K rounded up to a multiple of 128 with zero weights).
  The weight words take the bytes AWQ's do (plus K' - K zero rows), the scales and zero points 1.5
  bytes more a group and column (+0.09 bits a weight at G = 128). Matmul: the Triton kernels, through
  the torch operator ``w4a16_packed_mm``.
* ``cpu_int4`` (CPU): repacked once into the format of the one library int4 kernel that
  ``quant_cpu.choose_plan`` picks for the layer's shape and dtype (on a bfloat16 AMX machine vLLM's
  int4 GEMM with int8 activations, as stock ``awq`` runs it; elsewhere PyTorch's int4pack or vLLM's
  CPUWNA16). Matmul: vLLM's ``_C.int4_scaled_mm_cpu`` called directly for w4a8-amx (as stock
  does), else the torch operator ``torch.ops.internvl_cpu.int4_mm`` (``quant_cpu.py`` has the
  formats, their exactness and the measurements).
* ``dense`` (any other CUDA or CPU layer: a group size the kernels do not take, such as 96 on CUDA,
  float32 activations on CUDA, no Triton, or a CPU shape no int4 kernel takes): dequantized once into
  a dense ``weight`` [N, K] in the activations' dtype, then ``F.linear``. It costs 16 (float32: 32)
  bits a weight instead of about 4.1.
* ``awq`` (any other device): the AWQ tensors stay; each call runs the float32 reference
  ``w4a16_matmul_ref``.

Fused layers (qkv, gate_up) load their shards through vLLM's parameter classes: a shard of N_i
output columns lands at column offset sum(N_<i) of ``scales`` and at offset sum(N_<i)/8 of the
packed tensors, which is why every shard width must be a multiple of 8.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.layers.quantization.utils.layer_utils import replace_parameter
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

from internvl_kernels import (PACK_FACTOR, can_pack, dequantize_awq, pack_w4a16, packed_available, w4a16_matmul_ref,
                              w4a16_packed_mm)
from internvl_plugin import quant_cpu
from internvl_plugin.awq_checkpoint import METHOD_NAME

if TYPE_CHECKING:  # quant.py imports this module when vLLM asks it for a layer's method
    from internvl_plugin.quant import AWQW4A16Config

__all__ = ["AWQW4A16LinearMethod", "weight_layout", "repack_layer", "dequantize_layer"]

# Output columns converted at a time: bounds the temporary memory of the repacking and of the load-time
# dequantization (about 12 K bytes a column for pack_w4a16, 20 K for dequantize_awq).
CHUNK = 1024


def weight_layout(device, dtype: torch.dtype, k: int, group_size: int, n: int) -> str:
    """How a layer of K inputs and N outputs holds its weight after loading, on `device` with scales (the
    activations' dtype) in `dtype`: "packed", "cpu_int4", "dense" or "awq" (module docstring)."""
    if torch.device(device).type == "cpu":
        return "cpu_int4" if quant_cpu.choose_plan(k, n, group_size, dtype) else "dense"
    if torch.device(device).type != "cuda":
        return "awq"
    if packed_available(device) and dtype in (torch.float16, torch.bfloat16) and can_pack(k, group_size):
        return "packed"
    return "dense"


def repack_layer(layer: torch.nn.Module, group_size: int) -> None:
    """Replace the layer's qweight/qzeros/scales by the packed qk/meta."""
    qk, meta = pack_w4a16(layer.qweight.data, layer.qzeros.data, layer.scales.data, group_size, chunk=CHUNK)
    del layer.qweight, layer.qzeros, layer.scales
    layer.register_parameter("qk", torch.nn.Parameter(qk, requires_grad=False))
    layer.register_parameter("meta", torch.nn.Parameter(meta, requires_grad=False))


def dequantize_layer(layer: torch.nn.Module, group_size: int) -> None:
    """Replace the layer's qweight/qzeros/scales by the dense weight [N, K] in the scales' dtype."""
    qweight, qzeros, scales = layer.qweight.data, layer.qzeros.data, layer.scales.data
    k, n = qweight.shape[0], scales.shape[1]
    weight = torch.empty((n, k), dtype=scales.dtype, device=scales.device)
    for w0 in range(0, n // PACK_FACTOR, CHUNK // PACK_FACTOR):
        w1 = min(n // PACK_FACTOR, w0 + CHUNK // PACK_FACTOR)
        cols = slice(PACK_FACTOR * w0, PACK_FACTOR * w1)
        weight[cols] = dequantize_awq(qweight[:, w0:w1], qzeros[:, w0:w1], scales[:, cols], group_size).t()
    del layer.qweight, layer.qzeros, layer.scales
    layer.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))


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
        group_size = self.quant_config.group_size
        k, n, dtype = layer.qweight.shape[0], layer.scales.shape[1], layer.scales.dtype
        layout = weight_layout(layer.qweight.device, dtype, k, group_size, n)
        if layout == "packed":
            repack_layer(layer, group_size)
        elif layout == "cpu_int4":
            quant_cpu.repack_layer(layer, group_size, quant_cpu.choose_plan(k, n, group_size, dtype))
        elif layout == "dense":
            dequantize_layer(layer, group_size)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(layer, "qk"):  # w4a16_packed_matmul as a torch operator, opaque to torch.compile
            return w4a16_packed_mm(x, layer.qk, layer.meta, self.quant_config.group_size, bias)
        if hasattr(layer, "cpu_int4_plan"):  # the same on CPU
            return quant_cpu.apply_layer(layer, x, self.quant_config.group_size, bias)
        if hasattr(layer, "weight"):
            return F.linear(x, layer.weight, bias)
        return w4a16_matmul_ref(x, layer.qweight, layer.qzeros, layer.scales, self.quant_config.group_size, bias)
