"""InternVL image preprocessing without torchvision: dynamic tiling, thumbnail, normalisation.

Follows InternVL's ``dynamic_preprocess`` / ``build_transform`` (spec internvl-and-quant A3.1):
the grid (cols, rows) with 1 <= cols*rows in [min_num, max_num] whose aspect ratio is closest to
the image's wins; on an exact tie a later (larger) grid wins only if the image has more than half
of its pixels. The image is resized to the grid with PIL's default filter, cut into row-major
tiles, and a whole-image thumbnail is appended when there is more than one tile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import torch
from PIL import Image

from internvl_plugin.tile_budget import MAX_DYNAMIC_PATCH_ENV, MAX_TILES_LIMIT, budget_from_env

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_TILES_LIMIT",
    "Tiling",
    "choose_grid",
    "image_to_pixel_values",
    "num_tiles",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TILING_KWARGS = ("max_dynamic_patch", "min_dynamic_patch", "dynamic_image_size", "use_thumbnail")


@dataclass(frozen=True)
class Tiling:
    """Tiling parameters of one request: config defaults, optionally overridden per request."""

    image_size: int
    min_num: int
    max_num: int
    use_thumbnail: bool

    @classmethod
    def from_config(cls, config: Any, overrides: Mapping[str, object] | None = None) -> "Tiling":
        """Merge ``mm_processor_kwargs`` into the model config's tiling; clamp to a safe range."""
        overrides = dict(overrides or {})
        image_size = config.force_image_size or config.vision_config.image_size
        dynamic = bool(overrides.get("dynamic_image_size", config.dynamic_image_size))
        use_thumbnail = bool(overrides.get("use_thumbnail", config.use_thumbnail))
        min_num = _as_tile_count("min_dynamic_patch", overrides.get("min_dynamic_patch", config.min_dynamic_patch))
        max_num = _as_tile_count("max_dynamic_patch", overrides.get("max_dynamic_patch", config.max_dynamic_patch))
        budget = budget_from_env()
        asked = overrides.get("max_dynamic_patch")
        if budget is not None and isinstance(asked, int) and asked > max(budget, config.max_dynamic_patch):
            # vLLM's encoder cache holds images of at most this many tiles: say so instead of its 400
            raise ValueError(f"max_dynamic_patch={asked} is over this server's limit of {budget} tiles "
                             f"({MAX_DYNAMIC_PATCH_ENV}, hub_cli serve --max-dynamic-patch)")
        if max_num < min_num:
            raise ValueError(f"max_dynamic_patch={max_num} is smaller than min_dynamic_patch={min_num}")
        if not dynamic:
            min_num = max_num = 1
        return cls(image_size=image_size, min_num=min_num, max_num=max_num, use_thumbnail=use_thumbnail)


def _as_tile_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer tile count, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value > MAX_TILES_LIMIT:
        logger.warning("%s=%d clamped to %d tiles", name, value, MAX_TILES_LIMIT)
        return MAX_TILES_LIMIT
    return value


@lru_cache(maxsize=64)
def _candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    # InternVL sorts a *set* by area; ties keep CPython's set iteration order, which is part of
    # the observable behaviour (it decides between equal-area grids), so build it the same way.
    grids = {(i, j) for n in range(min_num, max_num + 1)
             for i in range(1, n + 1) for j in range(1, n + 1) if min_num <= i * j <= max_num}
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, tiling: Tiling) -> tuple[int, int]:
    """(cols, rows) of the tile grid InternVL picks for a width x height image."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    half_grid_pixels = 0.5 * tiling.image_size * tiling.image_size
    for cols, rows in _candidate_grids(tiling.min_num, tiling.max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > half_grid_pixels * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, tiling: Tiling) -> int:
    """Tiles fed to the vision tower for one image, thumbnail included."""
    cols, rows = choose_grid(width, height, tiling)
    n = cols * rows
    return n + 1 if tiling.use_thumbnail and n != 1 else n


def image_to_pixel_values(image: Image.Image, tiling: Tiling) -> torch.Tensor:
    """Tiles of one image as a normalised float32 tensor [num_tiles, 3, S, S]."""
    image = image.convert("RGB")
    size = tiling.image_size
    cols, rows = choose_grid(image.width, image.height, tiling)
    resized = image.resize((size * cols, size * rows))
    tiles = [resized.crop(((k % cols) * size, (k // cols) * size,
                           (k % cols + 1) * size, (k // cols + 1) * size))
             for k in range(cols * rows)]
    if tiling.use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    batch = torch.stack([_to_chw_uint8(t) for t in tiles]).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std)


def _to_chw_uint8(tile: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(tile.tobytes()), dtype=torch.uint8)
    return data.view(tile.height, tile.width, 3).permute(2, 0, 1)
