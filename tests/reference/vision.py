"""Plain-PyTorch reference of InternVL's vision side: image tiling, InternViT, pixel shuffle.

Ground truth for tests, written from the behaviour of OpenGVLab's HF remote code
(``modeling_intern_vit.py``, ``modeling_internvl_chat.py``, ``train/dataset.py``) as described in
specs/internvl-and-quant.md A2.1, A3.1-A3.3. It imports only torch, numpy and PIL: never vllm, never
torchvision, never the plugin code it is meant to check. Public names are re-exported by
the ``reference`` package.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InternViTRef",
    "pixel_shuffle",
    "ref_find_closest_aspect_ratio",
    "ref_candidate_grids",
    "ref_dynamic_preprocess",
    "ref_load_image",
    "ref_num_image_tokens",
    "ref_num_tiles",
    "ref_tile_size",
    "ref_num_image_token_per_tile",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# config access: accept the parsed config.json (dict), a path to it / its folder, or an object
# with attributes (a transformers PretrainedConfig); nested vision_config may be either too.


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def as_config(config: Any) -> Any:
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        return json.loads(path.read_text())
    return config


def ref_tile_size(config: Any) -> int:
    """Tile side S: ``force_image_size`` or ``vision_config.image_size`` (spec A1.5)."""
    config = as_config(config)
    return int(cfg_get(config, "force_image_size") or cfg_get(cfg_get(config, "vision_config"), "image_size"))


def ref_num_image_token_per_tile(config: Any) -> int:
    """(S / patch)^2 * downsample_ratio^2; 256 for every released chat model."""
    config = as_config(config)
    patch = int(cfg_get(cfg_get(config, "vision_config"), "patch_size"))
    ratio = float(cfg_get(config, "downsample_ratio", 0.5))
    return int((ref_tile_size(config) // patch) ** 2 * ratio**2)


# ----------------------------------------------------------------------------------------------
# dynamic tiling (spec A3.1)


def ref_candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Grids (columns, rows) with min_num <= i*j <= max_num, in InternVL's scan order.

    InternVL builds a Python ``set`` and then sorts it by area; equal areas keep the set's iteration
    order. Tuples of small ints hash deterministically, so inserting in the same sequence
    (n ascending, then i, then j) and stable-sorting reproduces that order exactly.
    """
    grids = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    grids.add((i, j))
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def ref_find_closest_aspect_ratio(
    aspect_ratio: float,
    target_ratios: list[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """First candidate with the smallest |aspect - i/j|; on an exact tie a later candidate wins only
    when the image has more than half the pixels of that grid."""
    best, best_diff = (1, 1), float("inf")
    pixels = width * height
    for cols, rows in target_ratios:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and pixels > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def _tiling(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    grids = ref_candidate_grids(min_num, max_num)
    return ref_find_closest_aspect_ratio(width / height, grids, width, height, image_size)


def ref_dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    """Split ``image`` into S x S tiles, row-major, plus a thumbnail last when there is > 1 tile."""
    width, height = image.size
    cols, rows = _tiling(width, height, min_num, max_num, image_size)
    # PIL's default filter (BICUBIC for RGB), as InternVL calls it
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for k in range(cols * rows):
        left, top = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def _tiling_params(max_num: int | None, config: Any) -> tuple[int, int, bool]:
    """(min_num, max_num, use_thumbnail) the way vLLM resolves them: no tiling when the config
    turns ``dynamic_image_size`` off."""
    if not cfg_get(config, "dynamic_image_size", False):
        return 1, 1, bool(cfg_get(config, "use_thumbnail", False))
    min_num = int(cfg_get(config, "min_dynamic_patch", 1))
    if max_num is None:
        max_num = int(cfg_get(config, "max_dynamic_patch", 6))
    return min_num, max_num, bool(cfg_get(config, "use_thumbnail", False))


def ref_num_tiles(width: int, height: int, max_num: int | None, config: Any) -> int:
    """Number of tiles (thumbnail included) ``ref_load_image`` yields for a W x H image."""
    config = as_config(config)
    min_num, max_num, use_thumbnail = _tiling_params(max_num, config)
    cols, rows = _tiling(width, height, min_num, max_num, ref_tile_size(config))
    blocks = cols * rows
    return blocks + 1 if use_thumbnail and blocks != 1 else blocks


def ref_num_image_tokens(width: int, height: int, max_num: int | None, config: Any) -> int:
    """Number of <IMG_CONTEXT> tokens for a W x H image: tokens per tile x tiles."""
    return ref_num_image_token_per_tile(config) * ref_num_tiles(width, height, max_num, config)


def _to_normalized_tensor(tile: Image.Image, image_size: int) -> torch.Tensor:
    tile = tile.convert("RGB") if tile.mode != "RGB" else tile
    if tile.size != (image_size, image_size):
        tile = tile.resize((image_size, image_size), Image.BICUBIC)
    # ToTensor: HWC uint8 -> CHW float in [0, 1]; then Normalize: (x - mean) / std per channel
    chw = torch.from_numpy(np.asarray(tile, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return chw.sub(mean).div(std)


def ref_load_image(image: Image.Image, max_num: int | None, config: Any) -> torch.Tensor:
    """PIL image -> pixel_values [T, 3, S, S] float32, like InternVL's README ``load_image``.

    ``max_num=None`` uses the config's ``max_dynamic_patch``.
    """
    config = as_config(config)
    image_size = ref_tile_size(config)
    min_num, max_num, use_thumbnail = _tiling_params(max_num, config)
    image = image.convert("RGB")
    tiles = ref_dynamic_preprocess(image, min_num, max_num, image_size, use_thumbnail)
    return torch.stack([_to_normalized_tensor(tile, image_size) for tile in tiles])


# ----------------------------------------------------------------------------------------------
# InternViT (spec A2.1, A3.2). Module names mirror the checkpoint under ``vision_model.``.


class RMSNormRef(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as InternViT/InternLM2/Qwen2 do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(in_dtype)


def _norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    if norm_type == "rms_norm":
        return RMSNormRef(dim, eps)
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"vision_config.norm_type {norm_type!r} is not 'rms_norm' or 'layer_norm'")


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()  # exact (erf)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return nn.GELU(approximate="tanh")
    raise ValueError(f"vision_config.hidden_act {name!r} is not supported by the reference")


class InternViTEmbeddingsRef(nn.Module):
    def __init__(self, hidden: int, image_size: int, patch_size: int):
        super().__init__()
        self.grid = image_size // patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, hidden))
        self.patch_embedding = nn.Conv2d(3, hidden, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + self.grid**2, hidden))

    def _patch_positions(self, rows: int, cols: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]
        if (rows, cols) == (self.grid, self.grid):
            return pos  # bicubic resize to the same size is the identity
        # trained grid -> [1, H, g, g] -> bicubic to the new grid (in fp32) -> [1, rows*cols, H]
        grid = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        tiles, _, rows, cols = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # [T, rows*cols, H], row-major over patches
        cls = self.class_embedding.expand(tiles, 1, -1).to(patches.dtype)
        positions = torch.cat([self.position_embedding[:, :1], self._patch_positions(rows, cols)], dim=1)
        return torch.cat([cls, patches], dim=1) + positions.to(patches.dtype)


class InternViTAttentionRef(nn.Module):
    def __init__(self, hidden: int, heads: int, qkv_bias: bool, qk_normalization: bool, eps: float):
        super().__init__()
        self.hidden, self.heads = hidden, heads
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.qk_normalization = qk_normalization
        if qk_normalization:
            # normalises q (and k) over all heads at once, not per head
            self.q_norm = RMSNormRef(hidden, eps)
            self.k_norm = RMSNormRef(hidden, eps)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles, tokens, _ = x.shape
        q, k, v = self.qkv(x).split(self.hidden, dim=-1)  # q rows first, then k, then v
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(tiles, tokens, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(tiles, tokens, self.hidden)
        return self.proj(out)


class InternViTMLPRef(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.act = _activation(act)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternViTLayerRef(nn.Module):
    def __init__(self, vcfg: Any):
        super().__init__()
        hidden = int(cfg_get(vcfg, "hidden_size"))
        eps = float(cfg_get(vcfg, "layer_norm_eps", 1e-6))
        norm_type = cfg_get(vcfg, "norm_type", "rms_norm")
        self.norm1 = _norm(norm_type, hidden, eps)
        self.attn = InternViTAttentionRef(
            hidden,
            int(cfg_get(vcfg, "num_attention_heads")),
            bool(cfg_get(vcfg, "qkv_bias", False)),
            bool(cfg_get(vcfg, "qk_normalization", False)),
            eps,
        )
        self.ls1 = nn.Parameter(torch.empty(hidden))
        self.norm2 = _norm(norm_type, hidden, eps)
        intermediate, act = int(cfg_get(vcfg, "intermediate_size")), cfg_get(vcfg, "hidden_act", "gelu")
        self.mlp = InternViTMLPRef(hidden, intermediate, act)
        self.ls2 = nn.Parameter(torch.empty(hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.ls1 * self.attn(self.norm1(h).to(h.dtype))
        return h + self.ls2 * self.mlp(self.norm2(h).to(h.dtype))


class InternViTEncoderRef(nn.Module):
    def __init__(self, vcfg: Any):
        super().__init__()
        n = int(cfg_get(vcfg, "num_hidden_layers"))
        self.layers = nn.ModuleList(InternViTLayerRef(vcfg) for _ in range(n))


class InternViTRef(nn.Module):
    """InternVisionModel without a final norm. ``forward`` returns the HF-style tuple of hidden
    states up to the requested one: entry 0 is the embeddings, entry i the output of layer i."""

    def __init__(self, vcfg: Any, image_size: int | None = None):
        super().__init__()
        size = int(image_size or cfg_get(vcfg, "image_size"))
        hidden, patch = int(cfg_get(vcfg, "hidden_size")), int(cfg_get(vcfg, "patch_size"))
        self.embeddings = InternViTEmbeddingsRef(hidden, size, patch)
        self.encoder = InternViTEncoderRef(vcfg)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def hidden_state(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """``hidden_states[select_layer]`` of the HF model (-1 = last layer), running only the
        layers that output needs."""
        n = self.num_layers
        index = select_layer if select_layer >= 0 else n + 1 + select_layer
        if not 0 <= index <= n:
            raise ValueError(f"select_layer {select_layer} is outside a {n}-layer vision tower")
        h = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:index]:
            h = layer(h)
        return h


def pixel_shuffle(x: torch.Tensor, downsample_ratio: float, ps_version: str) -> torch.Tensor:
    """[T, G, G, C] patch grid (x[t, row, col]) -> [T, G*r, G*r, C/r^2] blocks (spec A3.3).

    Block (br, bc) channel ``m*sC + k*C + c`` holds x[s*br + m, s*bc + k, c] with s = 1/r
    (block rows first, then columns, then the original channel). 'v2' lays the blocks out
    row-major; 'v1' (InternVL 1.x) keeps them transposed, i.e. column-major.
    """
    if ps_version not in ("v1", "v2"):
        raise ValueError(f"ps_version {ps_version!r} is not 'v1' or 'v2'")
    s = round(1 / downsample_ratio)
    if not math.isclose(s * downsample_ratio, 1.0):
        raise ValueError(f"downsample_ratio {downsample_ratio} is not 1/integer")
    tiles, rows, cols, channels = x.shape
    if rows % s or cols % s:
        raise ValueError(f"a {rows}x{cols} patch grid does not divide into {s}x{s} blocks")
    blocks = x.reshape(tiles, rows // s, s, cols // s, s, channels)  # [T, br, m, bc, k, C]
    blocks = blocks.permute(0, 1, 3, 2, 4, 5)  # [T, br, bc, m, k, C]
    out = blocks.reshape(tiles, rows // s, cols // s, s * s * channels)
    if ps_version == "v1":
        out = out.transpose(1, 2)
    return out.contiguous()


def build_mlp1(vision_hidden: int, llm_hidden: int, downsample_ratio: float) -> nn.Sequential:
    """Projector: LayerNorm(4H) -> Linear(4H, Hl) -> GELU -> Linear(Hl, Hl) (keys mlp1.{0,1,3})."""
    wide = vision_hidden * round(1 / downsample_ratio) ** 2
    return nn.Sequential(nn.LayerNorm(wide), nn.Linear(wide, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
