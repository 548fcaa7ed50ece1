"""Memory arithmetic for InternVL / XComposer2 checkpoints (shared/specs/internvl-and-quant.md B5.3).

* Weights: fp16/bf16 = 2 bytes per parameter. W4A16 (AWQ ``gemm``, LMDeploy ``auto_awq``) quantizes only the
  linear layers inside the language model's decoder layers; each becomes
  ``qweight K·N/2 + qzeros ⌈K/g⌉·N/2 + scales ⌈K/g⌉·N·2`` bytes (≈ 4.16 bits per weight at g = 128).
  Embeddings, LM head, norms, the vision tower, the projector and XComposer2's Partial-LoRA stay fp16.
  These are the checkpoint's bytes. On CUDA the plugin repacks the layers it runs on the K-packed kernels
  (internvl_kernels.pack_w4a16): a group's zero point and 16-bit scale share one 32-bit word, so the
  scales and zero points take ⌈K/g⌉·N·3/2 more bytes a linear, 0.09 bits per weight at g = 128 (about
  220 MB for InternVL2-26B's language model: 146M groups x 1.5 bytes).
* KV cache per token = 2 (K and V) × layers × kv_heads × bytes per head, where bytes per head is
  ``D·2`` (quant_policy 0, fp16), ``D + 4`` (quant_policy 8: vLLM's int8_per_token_head, int8 data + one fp32
  scale) or ``D/2 + 4`` (quant_policy 4: vLLM's int4_per_token_head, packed int4 + one fp32 scale holding the
  zero point; LMDeploy's fp16 scale and zero take the same 4 bytes). These are the bytes of the page vLLM
  allocates (the KV blocks the engine reports equal the cache memory over these bytes, on CPU and GPU).

Public surface: :class:`LLMShape`, :class:`VisionShape`, :func:`awq_linear_bytes`,
:func:`kv_bytes_per_token`, :func:`estimate_weights` and :func:`estimate_from_config` (reads a checkpoint's
``config.json`` dict). ``hub_cli`` (serve, models) and ``awq_tools estimate`` both use it, which is why it
sits in the plugin package and imports only the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FP16_BYTES", "QUANT_POLICIES", "LLMShape", "VisionShape", "WeightEstimate", "awq_linear_bytes",
           "kv_bytes_per_token", "estimate_weights", "estimate_from_config", "internvl_projector_params",
           "xcomposer_projector_params", "plora_params", "GiB"]

FP16_BYTES = 2
QUANT_POLICIES = (0, 8, 4)
GiB = 1 << 30


@dataclass(frozen=True)
class LLMShape:
    """Decoder-only LLM shape; enough to count parameters and KV bytes."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tie_embeddings: bool = False
    source: str = ""

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "") -> "LLMShape":
        """From a transformers-style config dict (InternVL's ``llm_config`` or XComposer2's top level)."""
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return cls(name=name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "llm"),
                   layers=int(cfg["num_hidden_layers"]), hidden=hidden, heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), ffn=int(cfg["intermediate_size"]),
                   vocab=int(cfg["vocab_size"]), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   source="config.json")

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in_features K, out_features N) of the linears of one decoder layer: qkv, o, gate, up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(self.hidden, q + 2 * kv), (q, self.hidden), (self.hidden, self.ffn), (self.hidden, self.ffn),
                (self.ffn, self.hidden)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(k * n for k, n in self.linear_shapes())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params


@dataclass(frozen=True)
class VisionShape:
    """ViT encoder (InternViT or CLIP); parameters ≈ L·(4H² + 2HF) plus biases, norms and embeddings."""

    name: str
    layers: int
    hidden: int
    ffn: int
    image_size: int = 448
    patch_size: int = 14
    qkv_bias: bool = True
    layer_norm: bool = True          # LayerNorm (weight + bias) vs RMSNorm (weight)
    layer_scale: bool = False        # InternViT's ls1 / ls2
    source: str = ""

    @property
    def params(self) -> int:
        h, f = self.hidden, self.ffn
        norm = 2 * h if self.layer_norm else h
        per_layer = 4 * h * h + 2 * h * f + (3 * h if self.qkv_bias else 0) + h + f + h + 2 * norm
        if self.layer_scale:
            per_layer += 2 * h
        positions = (self.image_size // self.patch_size) ** 2 + 1
        embeddings = 3 * self.patch_size ** 2 * h + h + positions * h + h
        return self.layers * per_layer + embeddings


@dataclass(frozen=True)
class WeightEstimate:
    """Bytes of each part of a checkpoint under one weight format."""

    weight_format: str              # "fp16" or "w4a16"
    group_size: int
    vision_bytes: int
    projector_bytes: int
    llm_bytes: int                  # decoder linears (quantized under w4a16) + embeddings/head + norms
    extra_bytes: int                # fp16 extras: XComposer2 Partial-LoRA, separators
    kv_bytes_per_token: dict[int, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.vision_bytes + self.projector_bytes + self.llm_bytes + self.extra_bytes

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


def awq_linear_bytes(k: int, n: int, group_size: int = 128, bits: int = 4) -> int:
    """Bytes of one AWQ ``gemm`` linear with K inputs and N outputs: packed weights, zeros and fp16 scales."""
    groups = -(-k // group_size)
    return k * n * bits // 8 + groups * n * bits // 8 + groups * n * FP16_BYTES


def kv_bytes_per_token(llm: LLMShape, quant_policy: int = 0) -> int:
    """KV-cache bytes one token occupies across all layers, for LMDeploy quant_policy 0, 8 or 4."""
    d = llm.head_dim
    per_head = {0: d * FP16_BYTES, 8: d + 4, 4: d // 2 + 4}.get(quant_policy)
    if per_head is None:
        raise ValueError(f"quant_policy must be one of {QUANT_POLICIES}, not {quant_policy!r}")
    return 2 * llm.layers * llm.kv_heads * per_head


def estimate_weights(llm: LLMShape, *, vision_params: int = 0, projector_params: int = 0,
                     extra_fp16_params: int = 0, weight_format: str = "fp16",
                     group_size: int = 128) -> WeightEstimate:
    """Weight bytes of a VLM whose language model is ``llm``; the rest is fp16 whatever the format."""
    fmt = weight_format.lower()
    if fmt in ("fp16", "bf16", "float16", "bfloat16", "hf"):
        fmt, llm_bytes = "fp16", llm.params * FP16_BYTES
    elif fmt in ("w4a16", "awq", "int4"):
        fmt = "w4a16"
        linear = llm.layers * sum(awq_linear_bytes(k, n, group_size) for k, n in llm.linear_shapes())
        llm_bytes = linear + (llm.embedding_params + llm.norm_params) * FP16_BYTES
    else:
        raise ValueError(f"weight_format must be fp16 or w4a16, not {weight_format!r}")
    return WeightEstimate(weight_format=fmt, group_size=group_size, vision_bytes=vision_params * FP16_BYTES,
                          projector_bytes=projector_params * FP16_BYTES, llm_bytes=llm_bytes,
                          extra_bytes=extra_fp16_params * FP16_BYTES,
                          kv_bytes_per_token={q: kv_bytes_per_token(llm, q) for q in QUANT_POLICIES})


def estimate_from_config(config: Mapping[str, Any], *, weight_format: str = "fp16",
                         group_size: int = 128) -> WeightEstimate:
    """Estimate from a checkpoint's ``config.json`` (InternVL ``InternVLChatModel`` or XComposer2).

    InternVL: ``llm_config`` + ``vision_config`` (+ the ``mlp1`` projector from their widths and
    ``downsample_ratio``). XComposer2: the LLM keys sit at the top level; the CLIP ViT-L/14 tower and the
    projector are added from the known design (xcomposer2.md §1.3); Partial-LoRA is not in config.json and
    is left out here (the catalogue counts it).
    """
    if "llm_config" in config:
        llm = LLMShape.from_hf_config(config["llm_config"])
        v = config.get("vision_config") or {}
        vision = VisionShape(name="vision", layers=int(v.get("num_hidden_layers", 0)),
                             hidden=int(v.get("hidden_size", 0)), ffn=int(v.get("intermediate_size", 0)),
                             image_size=int(v.get("image_size", 448)), patch_size=int(v.get("patch_size", 14)),
                             qkv_bias=bool(v.get("qkv_bias", True)),
                             layer_norm=v.get("norm_type", "rms_norm") == "layer_norm", layer_scale=True)
        ratio = float(config.get("downsample_ratio", 0.5))
        projector = internvl_projector_params(vision.hidden, llm.hidden, ratio) if vision.layers else 0
        return estimate_weights(llm, vision_params=vision.params if vision.layers else 0,
                                projector_params=projector, weight_format=weight_format, group_size=group_size)
    llm = LLMShape.from_hf_config(config)
    clip = VisionShape(name="clip-vit-large-patch14", layers=24, hidden=1024, ffn=4096,
                       image_size=int(config.get("img_size", 490) or 490))
    return estimate_weights(llm, vision_params=clip.params, projector_params=xcomposer_projector_params(
        1024, llm.hidden), weight_format=weight_format, group_size=group_size)


def internvl_projector_params(vision_hidden: int, llm_hidden: int, downsample_ratio: float = 0.5) -> int:
    """``mlp1``: LayerNorm(c) → Linear(c, H) → GELU → Linear(H, H), c = vision_hidden / ratio²."""
    c = int(round(vision_hidden / (downsample_ratio * downsample_ratio)))
    return 2 * c + c * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden


def xcomposer_projector_params(in_features: int, llm_hidden: int) -> int:
    """``vision_proj``: Linear(in, H) → GELU → Linear(H, H), with biases."""
    return in_features * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden


def plora_params(llm: LLMShape, ranks: Mapping[str, int]) -> int:
    """Partial-LoRA A [r, in] and B [out, r] on wqkv, wo, w1, w3, w2 of every decoder layer."""
    shapes = dict(zip(("wqkv", "wo", "w1", "w3", "w2"), llm.linear_shapes()))
    return llm.layers * sum(ranks.get(name, 0) * (k + n) for name, (k, n) in shapes.items())
