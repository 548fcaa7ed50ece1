"""InternVL conversation templates as Jinja chat templates (spec A4.1), one file per template name.

A checkpoint's ``config.json`` names its template (``"template": "internlm2-chat"``). When the
tokenizer carries no chat template of its own, vLLM asks the fallback registered here (a supported
vLLM hook, ``register_chat_template_fallback_path``) and gets the file for that name.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TEMPLATE_NAMES", "template_path", "template_text", "fallback_for_model", "xcomposer2_fallback"]

DATA_DIR = Path(__file__).parent / "data"
TEMPLATE_NAMES = ("internlm2-chat", "Hermes-2", "internvl2_5", "phi3-chat",
                  "internlm-xcomposer2", "internlm-xcomposer2d5")
# the template InternVL's own code falls back to when a config names none
DEFAULT_TEMPLATE = "internlm2-chat"


def template_path(name: str) -> Path:
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown InternVL template {name!r}; known: {', '.join(TEMPLATE_NAMES)}")
    return DATA_DIR / f"template_{name}.jinja"


def template_text(name: str) -> str:
    return template_path(name).read_text(encoding="utf-8")


def fallback_for_model(tokenizer_name_or_path: str) -> Path | None:
    """vLLM chat-template fallback for model_type ``internvl_chat``: read ``template`` from config."""
    config_file = Path(tokenizer_name_or_path) / "config.json"
    if not config_file.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(tokenizer_name_or_path, "config.json")
        except Exception:  # not a repo id, or no cache: nothing to fall back to
            return None
        if not isinstance(cached, str):
            return None
        config_file = Path(cached)
    try:
        name = json.loads(config_file.read_text(encoding="utf-8")).get("template") or DEFAULT_TEMPLATE
    except (OSError, ValueError):
        return None
    return template_path(name) if name in TEMPLATE_NAMES else None


def xcomposer2_fallback(tokenizer_name_or_path: str) -> Path | None:
    """vLLM chat-template fallback for model_type ``internlmxcomposer2``: 2.5 has no system turn by
    default, the others open with the default meta instruction (spec xcomposer2.md 6.2)."""
    config_file = Path(tokenizer_name_or_path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return template_path("internlm-xcomposer2")
    from types import SimpleNamespace

    from internvl_plugin.xcomposer2_image import infer_variant

    declared = SimpleNamespace(**config, declared_architecture=(config.get("architectures") or [None])[0])
    is_25 = infer_variant(declared) == "2.5"
    return template_path("internlm-xcomposer2d5" if is_25 else "internlm-xcomposer2")
