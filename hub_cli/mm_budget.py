"""hub_cli serve's multimodal sizing: images per request and the per-request tile budget.

* ``--limit-mm-per-prompt``: vLLM's default is 999 items of each modality, which no session can hold;
  serve passes as many images of the config's largest tiling as fit in one session (at least 1, at
  most 16), and one video for InternVL2 / 2.5, unless the user gives the flag after ``--``.
* ``--max-dynamic-patch N`` (with ``--trust-request-mm-kwargs``): requests may raise their own
  ``max_dynamic_patch`` up to N. vLLM sizes its encoder cache at start-up from the largest image the
  processor reports, so serve sets ``VLLM_INTERNVL_MAX_DYNAMIC_PATCH=N`` for the plugin to report N tiles
  (internvl_plugin/tile_budget.py). Default: 40 tiles (the clamp limit), or fewer when an image of 40
  tiles could not fit the session.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from hub_cli.errors import UsageError
from internvl_plugin.tile_budget import MAX_DYNAMIC_PATCH_ENV, MAX_TILES_LIMIT, encoder_cache_bytes, tokens_per_tile

__all__ = ["MAX_IMAGES_DEFAULT", "plan_mm_budget"]

MAX_IMAGES_DEFAULT = 16


def plan_mm_budget(plan: Any, config: Mapping[str, Any], *, max_dynamic_patch: int | None,
                   trust_request_mm_kwargs: bool, session_len: int | None, given: set[str]) -> None:
    """Add ``--limit-mm-per-prompt`` and the tile budget to ``plan`` (a serve.ServerPlan) for an InternVL config."""
    if max_dynamic_patch is not None and not trust_request_mm_kwargs:
        raise UsageError("--max-dynamic-patch sets what a request's mm_processor_kwargs may ask for; "
                         "it needs --trust-request-mm-kwargs")
    if "vision_config" not in config:
        return
    from hub_cli.serve import max_positions   # serve imports this module

    per_tile = tokens_per_tile(config)
    config_tiles = int(config.get("max_dynamic_patch", 6)) if config.get("dynamic_image_size") else 1
    session = session_len or max_positions(config)

    if "--limit-mm-per-prompt" not in given and session:
        image_tokens = (config_tiles + (1 if config_tiles > 1 and config.get("use_thumbnail") else 0)) * per_tile
        images = max(1, min(MAX_IMAGES_DEFAULT, session // max(image_tokens, 1)))
        limits = {"image": images}
        if config.get("ps_version") == "v2":   # InternVL2 / 2.5 take video (internvl_plugin/internvl_video.py)
            limits["video"] = 1
        plan.args += ["--limit-mm-per-prompt", json.dumps(limits)]
        plan.notes.append(f"up to {images} images a request: as many {config_tiles}-tile images as fill the "
                          f"{session}-token session (-- --limit-mm-per-prompt '{{\"image\": N}}' to change)"
                          + (", and one video" if "video" in limits else ""))

    if not trust_request_mm_kwargs:
        return
    if max_dynamic_patch is None:
        fits = session // per_tile - 1 if session else MAX_TILES_LIMIT  # the thumbnail takes a tile's tokens
        max_dynamic_patch = max(config_tiles, min(MAX_TILES_LIMIT, fits))
    plan.env[MAX_DYNAMIC_PATCH_ENV] = str(max_dynamic_patch)
    cache = encoder_cache_bytes(config, max_dynamic_patch)
    plan.notes.append(f"requests may ask for max_dynamic_patch up to {max_dynamic_patch} tiles (--max-dynamic-patch): "
                      f"vLLM's encoder cache holds {(max_dynamic_patch + 1) * per_tile} image tokens, "
                      f"{cache / 2**20:.1f} MiB in 16 bits "
                      "(the start-up memory profile still uses the config's tiling)")

