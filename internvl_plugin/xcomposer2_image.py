"""InternLM-XComposer2 image preprocessing, token counts and the HD tile layout (PIL + torch).

Which variant a checkpoint is (``XComposer2Layout.from_config``), how an image becomes pixel values
(VL: squash-resize to ``img_size``; 4KHD: ``HD_transform``; 2.5: ``Image_transform``; spec
xcomposer2.md §5), how many embedding rows it yields (§1.3 / §4.2) and how the ViT features of the
global view and the tiles are laid out with the ``plora_glb_GN`` / ``plora_sub_GN`` separators
(§4.2). Written by hand because the upstream code needs torchvision, which cannot load beside CPU
torch (DESIGN.md); it has no other library to come from.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "HD_NUM_LIMIT",
    "VARIANTS",
    "XComposer2Layout",
    "hd_grid",
    "hd_layout",
    "hd_num_tokens",
    "hd_resize_and_pad",
    "image_to_pixel_values",
    "merge_2x2",
]

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# "vl": one square crop (VL-7B, VL-1.8B, 7B); "4khd": 336-px tiles, upscaling, centred padding;
# "2.5": 560-px tiles, no upscaling past the native width, bottom padding.
VARIANTS = ("vl", "4khd", "2.5")
DEFAULT_TILE = {"4khd": 336, "2.5": 560}
DEFAULT_HD_NUM = {"4khd": 25, "2.5": 24}
# 2.5's chat uses hd_num 6 when a request carries more than one image (spec §5.3)
MULTI_IMAGE_HD_NUM = {"2.5": 6}
# Largest per-request hd_num: 55 is the 4KHD README's value; more would let one image take a whole
# batch's token budget. 2.5 keeps its chat default as the ceiling (10501 tokens already).
HD_NUM_LIMIT = {"4khd": 55, "2.5": 24}
# OpenAI CLIP ViT-L/14 (openai/clip-vit-large-patch14-336), built by the remote code from its name;
# config.json may override it with a "vit_config" dict (the tiny checkpoints do).
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)


@dataclass(frozen=True)
class XComposer2Layout:
    """What the processor and the model need to know about one checkpoint's image path."""

    variant: str
    crop_size: int  # VL: img_size; HD: the tile size T (also the global view's size)
    patch_size: int
    vit: Mapping[str, Any]
    default_hd_num: int | None

    @classmethod
    def from_config(cls, config: Any) -> "XComposer2Layout":
        variant = infer_variant(config)
        vit = dict(CLIP_L14)
        vit.update(getattr(config, "vit_config", None) or {})
        if variant == "vl":
            crop = int(getattr(config, "img_size", None) or vit.get("image_size") or 490)
        else:
            crop = int(vit.get("image_size") or DEFAULT_TILE[variant])
        vit["image_size"] = crop
        hd_num = getattr(config, "hd_num", None) or DEFAULT_HD_NUM.get(variant)
        return cls(variant=variant, crop_size=crop, patch_size=int(vit["patch_size"]), vit=vit,
                   default_hd_num=hd_num)

    @property
    def is_hd(self) -> bool:
        return self.variant != "vl"

    @property
    def grid(self) -> int:
        """Patches per side of one crop."""
        return self.crop_size // self.patch_size

    @property
    def merged(self) -> int:
        """HD: merged tokens per side of one crop after the 2x2 merge (n in the spec)."""
        return self.grid // 2

    @property
    def vit_out_channels(self) -> int:
        """Channels entering vision_proj: the ViT width, x4 after the HD 2x2 merge."""
        return int(self.vit["hidden_size"]) * (4 if self.is_hd else 1)

    def hd_num_for(self, requested: object | None, num_images: int) -> int:
        """The request's hd_num (validated, clamped) or the variant default (2.5: 6 for several images)."""
        if requested is None:
            if num_images > 1 and self.variant in MULTI_IMAGE_HD_NUM:
                return MULTI_IMAGE_HD_NUM[self.variant]
            return int(self.default_hd_num)
        if isinstance(requested, bool) or not isinstance(requested, int):
            raise ValueError(f"hd_num must be an integer tile count, got {requested!r}")
        if requested < 1:
            raise ValueError(f"hd_num must be >= 1, got {requested}")
        limit = HD_NUM_LIMIT[self.variant]
        if requested > limit:
            logger.warning("hd_num=%d clamped to %d tiles", requested, limit)
            return limit
        return requested

    def num_image_tokens(self, width: int, height: int, hd_num: int | None = None) -> int:
        if not self.is_hd:
            return self.grid ** 2
        h, w = hd_grid(width, height, hd_num, self.crop_size, self.variant)
        return hd_num_tokens(h, w, self.merged)

    def max_image_tokens(self) -> int:
        """Worst case over all images: the tallest grid (w=1, h=hd_num) at the hd_num ceiling."""
        if not self.is_hd:
            return self.grid ** 2
        return hd_num_tokens(HD_NUM_LIMIT[self.variant], 1, self.merged)


def infer_variant(config: Any) -> str:
    """Variant from config.json alone (spec §9.1); ``xcomposer_variant`` overrides the rules."""
    explicit = getattr(config, "xcomposer_variant", None)
    if explicit is not None:
        if explicit not in VARIANTS:
            raise ValueError(f"xcomposer_variant={explicit!r} is not one of {VARIANTS}")
        return explicit
    # 4KHD is the release whose config.json names InternLM2ForCausalLM; VL-7B / VL-1.8B / 7B carry
    # img_size; LMDeploy's first 4KHD rule (max_length 16384) covers a 4KHD config whose architecture was
    # overridden; 2.5 has none of these.
    if getattr(config, "declared_architecture", None) == "InternLM2ForCausalLM":
        return "4khd"
    if getattr(config, "img_size", None):
        return "vl"
    if getattr(config, "max_length", None) == 16384:
        return "4khd"
    return "2.5"


# ---------------------------------------------------------------- HD grid

def _hd_scale(width: int, height: int, hd_num: int) -> int:
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    return scale - 1


def hd_resize_and_pad(image: Image.Image, hd_num: int, tile: int, variant: str) -> Image.Image:
    """4KHD ``HD_transform`` / 2.5 ``Image_transform``: resize to whole tiles wide, pad the height
    with white to whole tiles (4KHD centred, 2.5 at the bottom); portrait images are handled
    transposed. ``new_h`` is kept >= 1 (upstream crashes on e.g. 10000x1)."""
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    width, height = image.size
    ratio = width / height
    scale = _hd_scale(width, height, hd_num)
    if variant == "2.5":
        scale = min(math.ceil(width / tile), scale)
    new_w = int(scale * tile)
    new_h = max(1, int(new_w / ratio))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = math.ceil(new_h / tile) * tile
    top = 0 if variant == "2.5" else int((target - new_h) / 2)
    padded = Image.new("RGB", (new_w, target), (255, 255, 255))
    padded.paste(image, (0, top))
    if transposed:
        padded = padded.transpose(Image.Transpose.TRANSPOSE)
    return padded


def hd_grid(width: int, height: int, hd_num: int, tile: int, variant: str) -> tuple[int, int]:
    """(h, w) tile rows and columns of a width x height image, without resizing anything."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = _hd_scale(width, height, hd_num)
    if variant == "2.5":
        scale = min(math.ceil(width / tile), scale)
    new_h = max(1, int(int(scale * tile) / ratio))
    rows, cols = math.ceil(new_h / tile), scale
    return (cols, rows) if transposed else (rows, cols)


def hd_num_tokens(h: int, w: int, n: int) -> int:
    """Global n x n (+ a sub_GN per row), one glb_GN, the (h n) x (w n) local grid (+ a sub_GN per row)."""
    return (h * w + 1) * n * n + 1 + (h + 1) * n


# ---------------------------------------------------------------- pixels

def _normalise(image: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = data.view(image.height, image.width, 3).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def image_to_pixel_values(image: Image.Image, layout: XComposer2Layout, hd_num: int | None = None
                          ) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> (crops [C, 3, T, T], (h, w)). VL: one squashed crop, (1, 1). HD: the global view
    (torch bicubic resize of the normalised padded image, spec §4.2 step 1) then the h x w tiles
    row-major."""
    image = image.convert("RGB")
    size = layout.crop_size
    if not layout.is_hd:
        return _normalise(image.resize((size, size), Image.Resampling.BICUBIC))[None], (1, 1)
    padded = _normalise(hd_resize_and_pad(image, hd_num, size, layout.variant))
    h, w = padded.shape[1] // size, padded.shape[2] // size
    tiles = padded.view(3, h, size, w, size).permute(1, 3, 0, 2, 4).reshape(h * w, 3, size, size)
    glb = F.interpolate(padded[None], size=(size, size), mode="bicubic", align_corners=False)
    return torch.cat([glb, tiles]), (h, w)


# ---------------------------------------------------------------- HD token layout

def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """[B, g*g, C] ViT patch features -> [B, g/2, g/2, 4C]; merged token (i, j) concatenates
    f(2i,2j), f(2i,2j+1), f(2i+1,2j), f(2i+1,2j+1)."""
    b, n, c = features.shape
    g = math.isqrt(n)
    x = features.view(b, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g // 2, g // 2, 4 * c)


def hd_layout(features: torch.Tensor, h: int, w: int, glb_gn: torch.Tensor, sub_gn: torch.Tensor) -> torch.Tensor:
    """ViT features of one image's crops [1 + h*w, g*g, C] -> pre-projection rows [tokens, 4C]:
    the global grid with sub_GN after each row, glb_GN, the stitched tile grid with sub_GN after
    each row (spec §4.2 steps 3-7)."""
    merged = merge_2x2(features)
    n, c4 = merged.shape[1], merged.shape[-1]
    sub = sub_gn.reshape(1, 1, c4).to(merged.dtype)
    glb_rows = torch.cat([merged[0], sub.expand(n, 1, c4)], dim=1).reshape(-1, c4)
    local = merged[1:].view(h, w, n, n, c4).permute(0, 2, 1, 3, 4).reshape(h * n, w * n, c4)
    local_rows = torch.cat([local, sub.expand(h * n, 1, c4)], dim=1).reshape(-1, c4)
    return torch.cat([glb_rows, glb_gn.reshape(1, c4).to(merged.dtype), local_rows])
