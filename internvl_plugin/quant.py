"""W4A16 quantization method ``awq_w4a16``: AWQ "gemm" checkpoints of the InternVL family.

Loads the standard AWQ gemm format (spec internvl-and-quant.md B2: ``qweight`` int32 [K, N/8],
``qzeros`` int32 [K/G, N/8], ``scales`` [K/G, N], nibble order 0 2 4 6 1 3 5 7) as written by
``lmdeploy lite auto_awq`` and by AutoAWQ. Where each keeps its quantization_config, and the parsing
of it, are in ``awq_checkpoint.py``; the weights and the matmul, in ``quant_linear.py``. This module is
the vLLM glue: which layers are 4-bit, and the KV-cache check.

How a checkpoint gets here (vLLM 0.32, ``ModelConfig._verify_quantization``): every registered
method's ``override_quantization_method`` is asked in turn, custom ones before vLLM's AWQ, so a
plain ``LLM(path)`` / ``vllm serve path`` of an InternVL/InternLM2 checkpoint whose quant_method
is ``"awq"`` picks this method. An explicit ``--quantization awq`` still gets vLLM's own.

Only linears inside the language model's decoder layers are quantized; the vision tower, the
projector (``mlp1``), the LM head, and XComposer2's Partial-LoRA (``Plora_A``/``Plora_B``) stay
16-bit whatever the checkpoint's ``modules_to_not_convert`` says.

The KV cache is not this method's to choose: vLLM 0.32 lets a quant config force only fp8 (via
``kv_cache_scheme``), so a 4-bit cache is the user's ``--kv-cache-dtype int4_per_token_head``;
the method says so once, and refuses a KV dtype the attention backend cannot run.

This module is imported by ``register()`` in every vLLM process, so it imports only what vLLM has
already loaded; the linear method (which needs vLLM's layer modules) lives in ``quant_linear.py``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

from internvl_plugin.awq_checkpoint import METHOD_NAME, SIDE_FILES, WEIGHT_BITS, parse_quantization_config

__all__ = ["METHOD_NAME", "KV_CACHE_HINT", "AWQW4A16Config"]

KV_CACHE_HINT = (f"{METHOD_NAME}: the KV cache stays 16-bit; for LMDeploy's 4-bit KV cache "
                 "(--quant-policy 4) pass --kv-cache-dtype int4_per_token_head")

# A "vllm." name: vLLM configures (handler, level) only its own logger tree.
logger = init_logger(f"vllm.{__name__}")

# Architectures this plugin serves; AWQ checkpoints of other models keep vLLM's own AWQ path.
CLAIMED_ARCHITECTURES = frozenset({
    "InternVLChatModel",
    "InternLM2ForCausalLM",
    "InternLMXComposer2ForCausalLM",
})

# vLLM module paths of decoder-layer linears: "language_model.model.layers.3.attention.wqkv"
# (InternVL), "model.layers.3.mlp.gate_up_proj" (a text-only LLM or XComposer2).
_DECODER_LAYER = re.compile(r"^(?:language_model\.)?(?:model\.)?layers\.\d+\.")
# XComposer2's Partial-LoRA adapters sit inside decoder linears and are never quantized.
_ALWAYS_16BIT = ("Plora_A", "Plora_B")


@register_quantization_config(METHOD_NAME)
class AWQW4A16Config(QuantizationConfig):
    """4-bit asymmetric group-wise weights (AWQ gemm layout), 16-bit activations."""

    def __init__(self, group_size: int, modules_to_not_convert: list[str] | None = None) -> None:
        super().__init__()
        self.weight_bits = WEIGHT_BITS
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    def __repr__(self) -> str:
        return (f"AWQW4A16Config(group_size={self.group_size}, "
                f"modules_to_not_convert={self.modules_to_not_convert})")

    # ------------------------------------------------------------------ identity and capabilities

    @classmethod
    def get_name(cls) -> str:
        return METHOD_NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # float32: the float32 reference matmul on CPU, a weight dequantized once at load on CUDA (quant_linear).
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # Triton's floor; CPU skips this check

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Read only when config.json has no quantization_config (old AutoAWQ folders).
        return list(SIDE_FILES)

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQW4A16Config:
        """Parse an AWQ quantization_config (LMDeploy, AutoAWQ or ours); one-line error if unusable."""
        settings = parse_quantization_config(config)
        return cls(settings.group_size, list(settings.modules_to_not_convert))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """Claim AWQ checkpoints of the models this plugin serves, unless the user named a method."""
        if str(hf_quant_cfg.get("quant_method", "")).lower() != "awq":
            return None
        if user_quant not in (None, METHOD_NAME):
            return None  # e.g. an explicit --quantization awq keeps vLLM's own AWQ
        architectures = set(getattr(hf_config, "architectures", None) or [])
        if not architectures & CLAIMED_ARCHITECTURES:
            return None
        return METHOD_NAME

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Fail early, in the front end, when the group size does not fit the language model."""
        text = getattr(hf_config, "text_config", None) or getattr(hf_config, "llm_config", None) or hf_config
        for field in ("hidden_size", "intermediate_size"):
            size = getattr(text, field, None)
            if isinstance(size, int) and size % self.group_size:
                raise ValueError(f"{METHOD_NAME}: quantization_config.group_size={self.group_size} does not "
                                 f"divide the language model's {field}={size}")

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.modules_to_not_convert:
            self.modules_to_not_convert = hf_to_vllm_mapper.apply_list(self.modules_to_not_convert)

    # ------------------------------------------------------------------ per layer

    def is_quantized_module(self, prefix: str) -> bool:
        """Whether the linear at vLLM module path `prefix` holds 4-bit weights in the checkpoint."""
        if not _DECODER_LAYER.match(prefix) or any(name in prefix for name in _ALWAYS_16BIT):
            return False
        return not is_layer_skipped(prefix, self.modules_to_not_convert, self.packed_modules_mapping,
                                    match_mode="substring")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        # Imported here: these vLLM modules are loaded by the time layers are built, not at register().
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        if isinstance(layer, LinearBase):
            if self.is_quantized_module(prefix):
                from internvl_plugin.quant_linear import AWQW4A16LinearMethod

                return AWQW4A16LinearMethod(self)
            return UnquantizedLinearMethod()
        if isinstance(layer, Attention):
            check_kv_cache_dtype(layer.kv_cache_dtype, layer.attn_backend)
        return None  # embeddings, LM head, attention: vLLM's defaults


def check_kv_cache_dtype(kv_cache_dtype: str, attn_backend: Any) -> None:
    """A 16-bit cache gets the hint (once per process); a quantized one must be runnable by the backend.

    The method carries no KV scales, so any KV dtype whose scales are computed at run time works
    with it, provided the attention backend implements that dtype. vLLM's CPU backend does not
    check: it accepts ``int8_per_token_head`` and computes wrong attention, hence the check here.
    """
    if kv_cache_dtype in ("auto", "float16", "bfloat16"):
        logger.info_once(KV_CACHE_HINT)
        return
    if not attn_backend.supports_kv_cache_dtype(kv_cache_dtype):
        backend = attn_backend.get_name()
        supported = ", ".join(attn_backend.supported_kv_cache_dtypes)
        raise ValueError(f"{METHOD_NAME}: --kv-cache-dtype {kv_cache_dtype} is not implemented by the "
                         f"{backend} attention backend in use (it implements: {supported})")
