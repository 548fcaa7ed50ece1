"""Plain-PyTorch reference of InternLM-XComposer2 (VL-7B, VL-1.8B, 7B, 4KHD, 2.5): the test oracle.

Written from spec xcomposer2.md (§2-§6) following the upstream remote code's structure: the CLIP
ViT-L/14 tower (last encoder layer, no post-LN, CLS dropped), ``resize_pos`` for a position table
of another size, the projector, 4KHD ``HD_transform`` / 2.5 ``Image_transform`` and the
global + local layout with ``plora_glb_GN`` / ``plora_sub_GN`` written with the upstream
reshape/permute sequence, and InternLM2 whose five linears add ``(alpha/r) * B(A x)`` on the image
rows selected by boolean indexing. One sequence, no KV cache: greedy decoding recomputes the whole
sequence with mask 0 on generated tokens, which is what decoding with a cache gives. Imports torch,
numpy, PIL and the InternLM2 pieces of ``llm.py``; no plugin code, no vLLM.

    ref = load_xcomposer2_reference("/path/to/checkpoint")
    crops, grid = ref.preprocess(image, hd_num=None)
    ids = ref_build_ids(tokenizer, "<ImageHere>Describe it.", [ref.num_image_tokens(grid)], ref.image_token_id)
    ref.greedy_generate(ids, [image], max_new_tokens=8)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .llm import _DecoderShape, apply_rotary, causal_gqa_attention, rotary_cos_sin, split_internlm2_wqkv
from .vision import RMSNormRef

__all__ = ["XComposer2Reference", "load_xcomposer2_reference", "ref_build_ids", "ref_hd_tokens",
           "ref_variant", "IMAGE_TOKEN", "PLACEHOLDER"]

PLACEHOLDER = "<ImageHere>"
IMAGE_TOKEN = "[UNUSED_TOKEN_141]"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, layer_norm_eps=1e-5)
HD_TILE = {"4khd": 336, "2.5": 560}
HD_NUM = {"4khd": 25, "2.5": 24}


def ref_variant(config: dict[str, Any]) -> str:
    """vl | 4khd | 2.5 from config.json (4KHD declares InternLM2ForCausalLM and max_length 16384)."""
    if config.get("xcomposer_variant"):
        return config["xcomposer_variant"]
    if (config.get("architectures") or [""])[0] == "InternLM2ForCausalLM" or config.get("max_length") == 16384:
        return "4khd"
    return "vl" if config.get("img_size") else "2.5"


def ref_hd_tokens(h: int, w: int, n: int) -> int:
    return (h * w + 1) * n * n + 1 + (h + 1) * n


# ----------------------------------------------------------------------------------------------
# preprocessing (spec §5)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def ref_hd_transform(image: Image.Image, hd_num: int, tile: int, variant: str) -> torch.Tensor:
    """HD_transform (4KHD) / Image_transform (2.5) + ToTensor + Normalize -> [3, h*T, w*T]."""
    width, height = image.size
    trans = width < height
    if trans:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    if variant == "2.5":
        scale = min(np.ceil(width / tile), scale)
    new_w = int(scale * tile)
    new_h = max(1, int(new_w / ratio))  # upstream crashes at 0 (spec §5.3 edge case)
    x = _to_tensor(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
    target = int(np.ceil(new_h / tile) * tile)
    top = 0 if variant == "2.5" else int((target - new_h) / 2)
    x = F.pad(x, (0, 0, top, target - new_h - top), value=1.0)  # white
    if trans:
        x = x.transpose(1, 2)
    return _normalize(x)


# ----------------------------------------------------------------------------------------------
# CLIP vision tower (HF CLIPVisionTransformer naming under vision_model.)


class _CLIPLayerRef(nn.Module):
    def __init__(self, c: int, inter: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.layer_norm1 = nn.LayerNorm(c, eps=eps)
        self.layer_norm2 = nn.LayerNorm(c, eps=eps)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(c, c))
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(c, inter)
        self.mlp.fc2 = nn.Linear(inter, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        a = self.self_attn
        y = self.layer_norm1(x)
        q, k, v = (p(y).view(b, n, self.heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        probs = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        x = x + a.out_proj((probs @ v).transpose(1, 2).reshape(b, n, c))
        y = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(y * torch.sigmoid(1.702 * y))  # quick_gelu


class CLIPVisionRef(nn.Module):
    def __init__(self, vit: dict[str, Any], image_size: int):
        super().__init__()
        c, p = vit["hidden_size"], vit["patch_size"]
        self.vision_model = nn.Module()
        vm = self.vision_model
        vm.embeddings = nn.Module()
        vm.embeddings.class_embedding = nn.Parameter(torch.zeros(c))
        vm.embeddings.patch_embedding = nn.Conv2d(3, c, p, p, bias=False)
        vm.embeddings.position_embedding = nn.Embedding((image_size // p) ** 2 + 1, c)
        vm.pre_layrnorm = nn.LayerNorm(c, eps=vit["layer_norm_eps"])
        vm.encoder = nn.Module()
        vm.encoder.layers = nn.ModuleList(
            _CLIPLayerRef(c, vit["intermediate_size"], vit["num_attention_heads"], vit["layer_norm_eps"])
            for _ in range(vit["num_hidden_layers"]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> last encoder layer output without post-LN, CLS dropped: [B, (S/p)^2, C]."""
        e = self.vision_model.embeddings
        patches = e.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([e.class_embedding.expand(patches.shape[0], 1, -1), patches], dim=1)
        x = self.vision_model.pre_layrnorm(x + e.position_embedding.weight[None])
        for layer in self.vision_model.encoder.layers:
            x = layer(x)
        return x[:, 1:]


def ref_resize_pos(table: torch.Tensor, new_size: int) -> torch.Tensor:
    """The remote code's ``resize_pos``: CLS row kept, patch rows bicubic-resized (align_corners False)."""
    orig = int(math.sqrt(table.shape[0] - 1))
    pos = table[None, 1:].float().reshape(-1, orig, orig, table.shape[-1]).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(new_size, new_size), mode="bicubic", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat([table[None, :1].float(), pos], dim=1)[0].to(table.dtype)


# ----------------------------------------------------------------------------------------------
# InternLM2 with Partial-LoRA


class PLoRALinearRef(nn.Module):
    def __init__(self, in_f: int, out_f: int, rank: int, alpha: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_f, in_f))
        self.Plora_A = nn.Linear(in_f, rank, bias=False)
        self.Plora_B = nn.Linear(rank, out_f, bias=False)
        self.lora_scaling = alpha / rank

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor) -> torch.Tensor:
        res = F.linear(x, self.weight)
        if im_mask.any():
            res[im_mask] += self.Plora_B(self.Plora_A(x[im_mask])) * self.lora_scaling
        return res


class _LayerRef(nn.Module):
    def __init__(self, s: _DecoderShape, lora: dict[str, tuple[int, float]]):
        super().__init__()
        self.s = s
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.attention_norm = RMSNormRef(s.hidden, s.eps)
        self.ffn_norm = RMSNormRef(s.hidden, s.eps)
        self.attention = nn.Module()
        self.attention.wqkv = PLoRALinearRef(s.hidden, qkv, *lora["wqkv"])
        self.attention.wo = PLoRALinearRef(s.heads * s.head_dim, s.hidden, *lora["wo"])
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = PLoRALinearRef(s.hidden, s.intermediate, *lora["w1"])
        self.feed_forward.w3 = PLoRALinearRef(s.hidden, s.intermediate, *lora["w3"])
        self.feed_forward.w2 = PLoRALinearRef(s.intermediate, s.hidden, *lora["w2"])

    def forward(self, h, cos, sin, m):
        s, n = self.s, h.shape[0]
        q, k, v = split_internlm2_wqkv(self.attention.wqkv(self.attention_norm(h), m), s.heads, s.kv_heads, s.head_dim)
        q = apply_rotary(q.view(n, s.heads, -1).transpose(0, 1), cos, sin)
        k = apply_rotary(k.view(n, s.kv_heads, -1).transpose(0, 1), cos, sin)
        v = v.view(n, s.kv_heads, -1).transpose(0, 1)
        h = h + self.attention.wo(causal_gqa_attention(q, k, v), m)
        x = self.ffn_norm(h)
        f = self.feed_forward
        return h + f.w2(F.silu(f.w1(x, m)) * f.w3(x, m), m)


# ----------------------------------------------------------------------------------------------
# the whole model


class XComposer2Reference(nn.Module):
    def __init__(self, config: dict[str, Any], ranks: dict[str, int]):
        super().__init__()
        self.config = config
        self.variant = ref_variant(config)
        self.vit_cfg = dict(CLIP_L14, **(config.get("vit_config") or {}))
        if self.variant == "vl":
            self.crop = int(config.get("img_size"))
        else:
            self.crop = int(self.vit_cfg.get("image_size") or HD_TILE[self.variant])
        self.grid = self.crop // self.vit_cfg["patch_size"]
        alphas = config.get("plora_alpha") or {}
        lora = {k: (r, float(alphas.get(k, 16 if r == 8 else r))) for k, r in ranks.items()}
        self.shape = s = _DecoderShape(dict(config, rope_scaling=None))  # dynamic NTK with factor 1 == plain RoPE
        self.vit = CLIPVisionRef(self.vit_cfg, self.crop)
        c = self.vit_cfg["hidden_size"] * (1 if self.variant == "vl" else 4)
        self.vision_proj = nn.Sequential(nn.Linear(c, s.hidden), nn.GELU(), nn.Linear(s.hidden, s.hidden))
        if self.variant != "vl":
            self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, c))
            self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.model = nn.Module()
        self.model.tok_embeddings = nn.Embedding(s.vocab, s.hidden)
        self.model.layers = nn.ModuleList(_LayerRef(s, lora) for _ in range(s.layers))
        self.model.norm = RMSNormRef(s.hidden, s.eps)
        self.output = nn.Linear(s.hidden, s.vocab, bias=False)
        self.image_token_id: int | None = None  # set by the caller from its tokenizer

    @property
    def default_hd_num(self) -> int | None:
        return self.config.get("hd_num") or HD_NUM.get(self.variant)

    # -------------------------------------------------------------- images

    def preprocess(self, image: Image.Image, hd_num: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        image = image.convert("RGB")
        if self.variant == "vl":
            return _normalize(_to_tensor(image.resize((self.crop, self.crop), Image.Resampling.BICUBIC)))[None], (1, 1)
        img = ref_hd_transform(image, hd_num or self.default_hd_num, self.crop, self.variant)[None]
        t = self.crop
        _, _, hh, ww = img.shape
        sub = img.reshape(1, 3, hh // t, t, ww // t, t).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, t, t)
        glb = F.interpolate(img.float(), size=(t, t), mode="bicubic", align_corners=False).to(sub.dtype)
        return torch.cat([glb, sub]), (hh // t, ww // t)

    def num_image_tokens(self, grid: tuple[int, int]) -> int:
        return self.grid ** 2 if self.variant == "vl" else ref_hd_tokens(*grid, self.grid // 2)

    def encode_image(self, crops: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        feats = self.vit(crops.to(self.output.weight.dtype))
        if self.variant == "vl":
            return self.vision_proj(feats[0])
        h, w = grid
        g, c = self.grid, feats.shape[-1]
        n = g // 2
        glb = feats[:1].reshape(1, g, g, c).reshape(1, n, 2, n, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(1, n, n, 4 * c)
        glb = torch.cat([glb, self.plora_sub_GN.repeat(1, n, 1, 1)], dim=2).reshape(1, -1, 4 * c)
        sub = feats[1:1 + h * w].reshape(h * w, g, g, c).reshape(h * w, n, 2, n, 2, c)
        sub = sub.permute(0, 1, 3, 2, 4, 5).reshape(h * w, -1, 4 * c)
        sub = sub.reshape(1, h, w, n, n, -1).permute(0, 1, 3, 2, 4, 5).reshape(1, h * n, w * n, 4 * c)
        sub = torch.cat([sub, self.plora_sub_GN.repeat(1, h * n, 1, 1)], dim=2).reshape(1, -1, 4 * c)
        return self.vision_proj(torch.cat([glb, self.plora_glb_GN, sub], dim=1))[0]

    # -------------------------------------------------------------- language model

    def embed(self, ids: Sequence[int], images: Sequence[Image.Image], hd_num: int | None = None):
        """Prompt ids whose image rows are ``image_token_id`` runs -> (embeds [L, H], im_mask [L])."""
        ids_t = torch.tensor(list(ids))
        mask = ids_t == self.image_token_id
        embeds = self.model.tok_embeddings(ids_t.clamp(max=self.shape.vocab - 1))
        if images:
            blocks = [self.encode_image(*self.preprocess(im, hd_num)) for im in images]
            rows = torch.cat(blocks)
            if rows.shape[0] != int(mask.sum()):
                raise ValueError(f"{int(mask.sum())} image placeholders for {rows.shape[0]} image rows")
            embeds = embeds.clone()
            embeds[mask] = rows.to(embeds.dtype)
        elif mask.any():
            raise ValueError("image placeholders without images")
        return embeds, mask

    def logits_from_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary_cos_sin(embeds.shape[0], self.shape.head_dim, self.shape.theta)
        h = embeds
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask)
        return self.output(self.model.norm(h)).float()

    @torch.no_grad()
    def prompt_logprobs(self, ids, images=(), hd_num=None) -> torch.Tensor:
        """log p(ids[t] | ids[:t]) for t >= 1."""
        embeds, mask = self.embed(ids, images, hd_num)
        logp = self.logits_from_embeds(embeds, mask).log_softmax(-1)
        return logp[:-1].gather(1, torch.tensor(list(ids[1:]))[:, None])[:, 0]

    @torch.no_grad()
    def greedy_generate(self, ids, images=(), max_new_tokens: int = 8, hd_num=None) -> list[int]:
        embeds, mask = self.embed(ids, images, hd_num)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.logits_from_embeds(embeds, mask)[-1].argmax())
            out.append(nxt)
            # a generated token is text: its own embedding, mask 0 (spec §2.3)
            embeds = torch.cat([embeds, self.model.tok_embeddings.weight[nxt][None]])
            mask = torch.cat([mask, torch.zeros(1, dtype=torch.bool)])
        return out


def ref_build_ids(tokenizer, text: str, counts: Sequence[int], image_token_id: int, add_bos: bool = True,
                  bos_after_image: bool = False) -> list[int]:
    """Split ``text`` on <ImageHere>, tokenize each segment on its own (BOS only before the first unless
    ``bos_after_image``, the HF VL-7B chat behaviour) and put ``counts[i]`` image ids between them."""
    parts = text.split(PLACEHOLDER)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"{len(parts) - 1} placeholders for {len(counts)} images")
    ids: list[int] = []
    for i, part in enumerate(parts):
        bos = (add_bos and i == 0) or (bos_after_image and i > 0)
        seg = tokenizer(part, add_special_tokens=False).input_ids if part else []
        ids += ([tokenizer.bos_token_id] if bos else []) + seg
        if i < len(counts):
            ids += [image_token_id] * counts[i]
    return ids


def load_xcomposer2_reference(path: str | Path, dtype: torch.dtype = torch.float32) -> XComposer2Reference:
    """Build the reference from a checkpoint folder (config.json + *.safetensors). Every tensor must be
    used except the documented skip list (post_layernorm, position_ids, rotary inv_freq, 2.5's task
    LoRAs); ranks come from the Plora_A shapes; a position table of another size is resized."""
    from safetensors.torch import load_file

    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    skip = ("post_layernorm.", "position_ids", "rotary_emb.inv_freq", ".lora_web_", ".lora_sft_", ".lora_dpo_")
    state = {k.replace("vit.vision_tower.", "vit.", 1): v for k, v in state.items() if not any(s in k for s in skip)}
    ranks = {n: state[f"model.layers.0.{m}.{n}.Plora_A.weight"].shape[0]
             for m, n in (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w1"),
                          ("feed_forward", "w3"), ("feed_forward", "w2"))}
    with torch.device("meta"):
        model = XComposer2Reference(config, ranks)
    pos = "vit.vision_model.embeddings.position_embedding.weight"
    if state[pos].shape[0] != model.grid ** 2 + 1:
        state[pos] = ref_resize_pos(state[pos], model.grid)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or extra:
        raise ValueError(f"{folder}: checkpoint does not match the config: missing {missing[:8]}, unexpected {extra[:8]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()
