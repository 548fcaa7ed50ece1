"""Transformers config classes for checkpoints that otherwise need ``trust_remote_code``.

InternVL (``internvl_chat`` + ``intern_vit_6b``) and InternLM2 (``internlm2``) ship their config
and tokenizer as remote code named in ``auto_map``. With ``trust_remote_code=False`` transformers
prefers a class registered under the same ``model_type``, so registering these makes the real
checkpoints load without executing anything from the model folder. The fields and defaults follow
the upstream classes (InternVL ``configuration_internvl_chat.py`` / ``configuration_intern_vit.py``,
InternLM2 ``configuration_internlm2.py``); only what engines read is modelled.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig

__all__ = [
    "InternLM2Config",
    "InternVisionConfig",
    "InternVLChatConfig",
    "InternLMXComposer2Config",
    "register_configs",
]


class InternVisionConfig(PreTrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, patch_size=14, image_size=224, qkv_bias=False,
                 hidden_size=3200, num_attention_heads=25, intermediate_size=12800,
                 qk_normalization=True, num_hidden_layers=48, use_flash_attn=False,
                 hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6,
                 dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0,
                 initializer_range=0.02, initializer_factor=0.1, **kwargs):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor


class InternLM2Config(PreTrainedConfig):
    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=103168, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                 hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
                 rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, bias=True, rope_theta=10000,
                 rope_scaling=None, attn_implementation=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        kwargs.pop("attn_implementation", None)
        super().__init__(**kwargs)


def _llm_config_from_dict(llm_config: dict[str, Any]) -> PreTrainedConfig:
    """Build the language-model config named by ``llm_config['architectures'][0]``."""
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    by_arch = {
        "InternLM2ForCausalLM": InternLM2Config,
        "LlamaForCausalLM": LlamaConfig,
        "Qwen2ForCausalLM": Qwen2Config,
        "Phi3ForCausalLM": Phi3Config,
    }
    arch = (llm_config.get("architectures") or ["InternLM2ForCausalLM"])[0]
    if arch not in by_arch:
        raise ValueError(f"llm_config.architectures[0]={arch!r} is not supported by InternVL; "
                         f"expected one of {sorted(by_arch)}")
    cfg = dict(llm_config)
    cfg.pop("model_type", None)
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("type") == "su":
        # Phi-3-128k's 2024 spelling of LongRoPE (Mini-InternVL-Chat-4B-V1-5, InternVL2-4B). transformers 5.19
        # renames it only after it has looked for rope types needing original_max_position_embeddings, and then
        # refuses the config for lacking that key
        cfg["rope_scaling"] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "longrope"}
    return by_arch[arch](**cfg)


class InternVLChatConfig(PreTrainedConfig):
    model_type = "internvl_chat"
    sub_configs = {"vision_config": InternVisionConfig, "llm_config": PreTrainedConfig}

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0, use_llm_lora=0,
                 pad2square=False, select_layer=-1, force_image_size=None, downsample_ratio=0.5,
                 template=None, dynamic_image_size=False, use_thumbnail=False, ps_version="v1",
                 min_dynamic_patch=1, max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(vision_config, PreTrainedConfig):
            vision_config = InternVisionConfig(**(vision_config or {}))
        if not isinstance(llm_config, PreTrainedConfig):
            llm_config = _llm_config_from_dict(llm_config or {})
        self.vision_config = vision_config
        self.llm_config = llm_config
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.pad2square = pad2square
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.tie_word_embeddings = False
        self.hidden_size = llm_config.hidden_size


XCOMPOSER2_ARCH = "InternLMXComposer2ForCausalLM"


def _names_xcomposer2(auto_map: object) -> bool:
    values = auto_map.values() if isinstance(auto_map, dict) else []
    return any(XCOMPOSER2_ARCH in str(v) for v in values)


class InternLMXComposer2Config(InternLM2Config):
    """InternLM-XComposer2 (VL-7B, VL-1.8B, 7B, 4KHD, 2.5): InternLM2 fields plus ``img_size`` and
    ``max_length`` (spec xcomposer2.md §1). 4KHD's config.json names ``InternLM2ForCausalLM``;
    when ``auto_map`` points at XComposer2's model class the architecture is corrected here, so
    vLLM builds the XComposer2 class (the declared name is kept as ``declared_architecture``)."""

    model_type = "internlmxcomposer2"

    def __init__(self, img_size=None, max_length=None, **kwargs):
        archs = list(kwargs.get("architectures") or [])
        if archs and archs[0] != XCOMPOSER2_ARCH and _names_xcomposer2(kwargs.get("auto_map")):
            kwargs.setdefault("declared_architecture", archs[0])
            kwargs["architectures"] = [XCOMPOSER2_ARCH]
        self.img_size = img_size
        self.max_length = max_length
        super().__init__(**kwargs)


CONFIG_CLASSES = (InternVisionConfig, InternLM2Config, InternVLChatConfig, InternLMXComposer2Config)


def register_configs() -> None:
    """Register config and tokenizer classes with transformers' Auto classes (idempotent)."""
    from internvl_plugin.tokenizer import InternLM2Tokenizer, InternLMXComposer2Tokenizer

    for cls in CONFIG_CLASSES:
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
    # tokenizer_config.json names "InternLM2Tokenizer" (+ an auto_map to remote code); the Auto
    # class resolves a registered class whose __name__ matches, so no remote code runs.
    for cfg_cls in (InternLM2Config, InternVLChatConfig):
        AutoTokenizer.register(cfg_cls, slow_tokenizer_class=InternLM2Tokenizer, exist_ok=True)
    AutoTokenizer.register(InternLMXComposer2Config, slow_tokenizer_class=InternLMXComposer2Tokenizer, exist_ok=True)
