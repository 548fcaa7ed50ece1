"""The per-request tile budget of a server: how many tiles a request's ``max_dynamic_patch`` may ask for.

vLLM sizes its encoder cache once, at start-up, from the largest image the processor reports
(``get_mm_max_tokens_per_item``); with the config's ``max_dynamic_patch`` (6 for InternVL2) a request
that raises its own budget to 12 gets HTTP 400 "... exceeds the pre-allocated encoder cache size".
``VLLM_INTERNVL_MAX_DYNAMIC_PATCH=N`` (set by ``hub_cli serve --max-dynamic-patch``) makes the plugin
report N tiles (+ thumbnail) instead, so every request within N fits, and refuses a request above N in
one line. Standard library only: the CLIs import it without torch or vLLM.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_DYNAMIC_PATCH_ENV", "MAX_TILES_LIMIT", "budget_from_env", "encoder_cache_bytes", "tokens_per_tile"]

MAX_DYNAMIC_PATCH_ENV = "VLLM_INTERNVL_MAX_DYNAMIC_PATCH"
# Upper bound for a per-request max_dynamic_patch: 40 tiles (+ thumbnail) is what InternVL's own
# demos use for 4K inputs; more would let one request occupy a whole batch's token budget.
MAX_TILES_LIMIT = 40


def budget_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The server's tile budget from ``VLLM_INTERNVL_MAX_DYNAMIC_PATCH``, or None when unset."""
    raw = (os.environ if environ is None else environ).get(MAX_DYNAMIC_PATCH_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_DYNAMIC_PATCH_ENV}={raw!r} is not a tile count") from None
    if not 1 <= value <= MAX_TILES_LIMIT:
        raise ValueError(f"{MAX_DYNAMIC_PATCH_ENV}={value} is outside 1..{MAX_TILES_LIMIT}")
    return value


def tokens_per_tile(config: Mapping[str, Any]) -> int:
    """Image tokens of one tile from an InternVL ``config.json`` dict (256 for every released model)."""
    vision = config.get("vision_config") or {}
    size = config.get("force_image_size") or vision.get("image_size", 448)
    return int((size // vision.get("patch_size", 14)) ** 2 * config.get("downsample_ratio", 0.5) ** 2)


def encoder_cache_bytes(config: Mapping[str, Any], tiles: int, element: int = 2) -> int:
    """Bytes of vLLM's encoder cache for one image of ``tiles`` tiles plus its thumbnail."""
    hidden = (config.get("llm_config") or config.get("text_config") or {}).get("hidden_size", 0)
    return (tiles + 1) * tokens_per_tile(config) * int(hidden) * element
