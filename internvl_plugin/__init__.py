"""vLLM plugin for the InternVL and InternLM-XComposer2 families.

vLLM calls :func:`register` (entry point ``vllm.general_plugins: internvl``) in every process it
starts: the front-end, the model-inspection subprocess, the engine core and each worker. It only
registers names; models are registered as lazy ``"module:Class"`` strings so nothing heavy is
imported here. The quantization method ``awq_w4a16`` (``quant.py``) is registered by importing it.
"""

from __future__ import annotations

__all__ = ["register"]

_registered = False

# architecture name in config.json -> our class (lazy: imported by vLLM only when a model needs it)
MODEL_CLASSES = {
    "InternVLChatModel": "internvl_plugin.internvl:InternVLChatModel",
    "InternLMXComposer2ForCausalLM": "internvl_plugin.xcomposer2:InternLMXComposer2ForCausalLM",
}


def register() -> None:
    """Register configs, tokenizer and model classes with transformers and vLLM. Idempotent."""
    global _registered
    if _registered:
        return
    from internvl_plugin.configs import register_configs

    register_configs()
    try:
        from vllm import ModelRegistry
    except ImportError:  # configs/tokenizer are still useful without vLLM (tools, references)
        ModelRegistry = None
    if ModelRegistry is not None:
        for arch, target in MODEL_CLASSES.items():
            ModelRegistry.register_model(arch, target)
        from vllm.transformers_utils.chat_templates.registry import register_chat_template_fallback_path

        from internvl_plugin.chat_templates import fallback_for_model

        register_chat_template_fallback_path("internvl_chat", fallback_for_model)
        from internvl_plugin.chat_templates import xcomposer2_fallback

        register_chat_template_fallback_path("internlmxcomposer2", xcomposer2_fallback)
        # The W4A16 method "awq_w4a16"; the import registers it (cheap: vLLM's quantization base is
        # already loaded once vLLM loads plugins; the linear method is imported when layers are built).
        import internvl_plugin.quant  # noqa: F401
        # int8/int4 per-token-head KV caches on CPU: our subclass of vLLM's CPU_ATTN (cpu_kv_attention.py),
        # a lazy path like the models; every other KV dtype keeps vLLM's own code path
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CPU_ATTN, "internvl_plugin.cpu_kv_attention.CPUKVQuantAttentionBackend")
        # its decode kernel imports numba, which vLLM 0.32's CPU worker init trips over (cpu_kv_vllm_fix.py)
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from internvl_plugin.cpu_kv_vllm_fix import apply as keep_numba_out_of_kernel_rebind

            keep_numba_out_of_kernel_rebind()
    _registered = True
