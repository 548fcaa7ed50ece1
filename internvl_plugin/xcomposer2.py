"""InternLM-XComposer2 (VL-7B, VL-1.8B, 7B, 4KHD, 2.5) for vLLM, without remote code.

Processing info -> dummy inputs -> multimodal processor -> Partial-LoRA layers -> the model class,
in that order (spec xcomposer2.md §9). The vision side is vLLM's CLIP tower (last encoder layer, no
post-LN, CLS dropped) and the projector; 4KHD / 2.5 lay the global view and tiles out with the
learned separators (``xcomposer2_image.hd_layout``). The language model is InternLM2 whose five
linears per layer carry a Partial-LoRA: ``y += (alpha/r) * B(A x)`` on exactly the rows that
received image embeddings in this forward (separators included), never on text or generated tokens.
vLLM hands the model those rows only in ``embed_input_ids`` (its ``is_multimodal`` mask; guide §3.7),
so the mask is kept there and consumed by the next ``forward`` of the same worker.

Partial-LoRA under tensor parallelism (spec §9.3): column layers (wqkv, w1, w3) keep A replicated
and shard B like the base output (wqkv's B goes through the same fused QKV loader, so its rows line
up with the interleaved base rows); row layers (wo, w2) shard A along its input, reduce ``A x`` and
keep B replicated. LoRA weights are never quantized. Pipeline parallelism is not offered (the mask
would have to travel between stages).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BatchFeature, CLIPVisionConfig

from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsQuant
from vllm.model_executor.models.internlm2 import InternLM2Attention
from vllm.model_executor.models.utils import WeightsMapper, make_layers, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdate, PromptUpdateDetails)
from vllm.sequence import IntermediateTensors

from internvl_plugin.internvl import _as_pil
from internvl_plugin.weights import load_weights_naming_culprit
from internvl_plugin.xcomposer2_image import HD_NUM_LIMIT, XComposer2Layout, hd_layout, image_to_pixel_values

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<ImageHere>"
# Every image row is this id in the prompt: in-vocabulary, never produced by ordinary text (92538 in
# the released vocabularies), and not the pad/EOS id 2 that LMDeploy used.
IMAGE_TOKEN = "[UNUSED_TOKEN_141]"
PROCESSOR_KWARGS = ("hd_num",)
PLORA_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


# ---------------------------------------------------------------------------------------- processing

class XComposer2ProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # hd_num stays flat; there is no HF processor

    @cached_property
    def layout(self) -> XComposer2Layout:
        return XComposer2Layout.from_config(self.get_hf_config())

    def get_hd_num(self, mm_kwargs: Mapping[str, object] | None, num_images: int) -> int | None:
        """hd_num of a request: --mm-processor-kwargs merged with the request's, validated."""
        merged = self.ctx.get_merged_mm_kwargs(dict(mm_kwargs or {}))
        unknown = sorted(k for k in merged if k not in PROCESSOR_KWARGS and k != "return_tensors")
        if unknown:
            raise ValueError(f"unsupported mm_processor_kwargs for InternLM-XComposer2: {unknown}; "
                             f"supported: {list(PROCESSOR_KWARGS)}")
        if not self.layout.is_hd:
            if merged.get("hd_num") is not None:
                raise ValueError("hd_num applies to InternLM-XComposer2-4KHD and 2.5 only; this checkpoint "
                                 f"has one {self.layout.crop_size}-px crop per image")
            return None
        return self.layout.hd_num_for(merged.get("hd_num"), num_images)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.layout.max_image_tokens()}

    def get_image_size_with_most_features(self) -> ImageSize:
        t = self.layout.crop_size
        if not self.layout.is_hd:
            return ImageSize(width=t, height=t)
        return ImageSize(width=t, height=t * HD_NUM_LIMIT[self.layout.variant])  # w=1, h=limit: the tallest grid

    @cached_property
    def image_token_id(self) -> int:
        vocab = self.get_tokenizer().get_vocab()
        if IMAGE_TOKEN not in vocab:
            raise ValueError(f"tokenizer of {self.model_id} lacks {IMAGE_TOKEN}, the XComposer2 image placeholder")
        return vocab[IMAGE_TOKEN]


class XComposer2DummyInputsBuilder(BaseDummyInputsBuilder[XComposer2ProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        size = self.info.get_image_size_with_most_features()
        return {"image": self._get_dummy_images(width=size.width, height=size.height,
                                                num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}


class XComposer2MultiModalProcessor(BaseMultiModalProcessor[XComposer2ProcessingInfo]):
    def apply(self, inputs, timing_ctx):
        # 2.5's chat lowers hd_num to 6 when a request has several images. vLLM may process (and cache)
        # the images of one request one by one, so the rule is fixed into the request's kwargs first,
        # where the processor cache keys see it.
        layout = self.info.layout
        num_images = inputs.mm_data_items.get_count("image", strict=False) if inputs.mm_data_items else 0
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        if layout.is_hd and num_images > 1 and "hd_num" not in self.info.ctx.get_merged_mm_kwargs(kwargs):
            kwargs["hd_num"] = layout.hd_num_for(None, num_images)
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = list(hf_data.get("images", []))
        hd_num = self.info.get_hd_num(hf_kwargs, len(images))
        t = self.info.layout.crop_size
        crops, grids = [], []
        for image in images:
            pixels, grid = image_to_pixel_values(_as_pil(image), self.info.layout, hd_num)
            crops.append(pixels)
            grids.append(grid)
        return BatchFeature({
            "pixel_values_flat": torch.cat(crops) if crops else torch.empty(0, 3, t, t),
            "image_num_crops": torch.tensor([c.shape[0] for c in crops], dtype=torch.long),
            "image_grid_hw": torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
        })

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        num_crops = hf_inputs.get("image_num_crops", torch.empty(0, dtype=torch.long))
        return {
            "pixel_values_flat": MultiModalFieldConfig.flat_from_sizes("image", num_crops),
            "image_num_crops": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "image_grid_hw": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        hd_num = self.info.get_hd_num(hf_processor_mm_kwargs, mm_items.get_count("image", strict=False))
        token = self.info.image_token_id

        def expand(item_idx: int) -> PromptUpdateDetails:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            n = self.info.layout.num_image_tokens(size.width, size.height, hd_num)
            return PromptUpdateDetails.select_token_id([token] * n, token)

        # as token ids: vLLM's text-space matching decodes the target
        target = self.info.get_tokenizer().encode(IMAGE_PLACEHOLDER, add_special_tokens=False)
        return [PromptReplacement(modality="image", target=target, replacement=expand)]

    def _apply_prompt_updates(self, token_ids, mm_prompt_updates):
        # Overrides a protected hook of vLLM 0.32's BaseMultiModalProcessor (checked by
        # tests/test_xcomposer2_engine.py). XComposer2 tokenizes the text around each <ImageHere>
        # on its own (spec §6.3/§6.4); replacing in text space and encoding the segments separately
        # gives exactly that, where in-place token replacement would keep neighbours tokenized as
        # they were next to "<ImageHere>".
        new_ids, result = self._apply_prompt_updates_via_text(token_ids, mm_prompt_updates,
                                                              encode_segments_separately=True)
        placeholders = self._find_mm_placeholders(
            new_ids, self._matched_updates_from_result(mm_prompt_updates, result))
        return new_ids, placeholders


# ---------------------------------------------------------------------------------------- Partial-LoRA

class _PartialLoRA:
    """The forward shared by the three Partial-LoRA linears: the base output, plus
    scale * B(A(x)) on the image rows only (``rows``: their indices in this forward's tokens)."""

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = super().forward(x)
        if rows is not None:
            lora = self.Plora_B(self.Plora_A(x.index_select(0, rows)))
            out = out.index_add(0, rows, lora, alpha=self.plora_scale)
        return out


class PLoRAQKVParallelLinear(_PartialLoRA, QKVParallelLinear):
    """wqkv with its Partial-LoRA; B is a QKV layer itself so TP shards its rows like the base."""

    def __init__(self, hidden: int, head_dim: int, heads: int, kv_heads: int, rank: int, scale: float,
                 quant_config, prefix: str):
        super().__init__(hidden, head_dim, heads, kv_heads, bias=False, quant_config=quant_config, prefix=prefix)
        self.Plora_A = ReplicatedLinear(hidden, rank, bias=False, quant_config=None, prefix=f"{prefix}.Plora_A",
                                        return_bias=False)
        self.Plora_B = QKVParallelLinear(rank, head_dim, heads, kv_heads, bias=False, quant_config=None,
                                         prefix=f"{prefix}.Plora_B", return_bias=False)
        self.plora_scale = scale

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[str]:
        # QKVParallelLinear.load_weights hands every tensor a shard id, which the Plora children's
        # loaders do not take; they get the whole tensor (B: the fused QKV split, like the base).
        own = []
        for name, tensor in weights:
            if name.startswith("Plora_"):
                child, _, attr = name.partition(".")
                param = getattr(getattr(self, child), attr)
                param.weight_loader(param, tensor)
                yield name
            else:
                own.append((name, tensor))
        yield from super().load_weights(own)


class PLoRAColumnParallelLinear(_PartialLoRA, ColumnParallelLinear):
    """w1 / w3 (output-sharded) with A replicated and B sharded like the base."""

    def __init__(self, in_f: int, out_f: int, rank: int, scale: float, quant_config, prefix: str):
        super().__init__(in_f, out_f, bias=False, quant_config=quant_config, prefix=prefix)
        self.Plora_A = ReplicatedLinear(in_f, rank, bias=False, quant_config=None, prefix=f"{prefix}.Plora_A",
                                        return_bias=False)
        self.Plora_B = ColumnParallelLinear(rank, out_f, bias=False, quant_config=None, prefix=f"{prefix}.Plora_B",
                                            return_bias=False)
        self.plora_scale = scale


class PLoRARowParallelLinear(_PartialLoRA, RowParallelLinear):
    """wo / w2 (input-sharded): A sharded along its input and reduced, B replicated."""

    def __init__(self, in_f: int, out_f: int, rank: int, scale: float, quant_config, prefix: str):
        super().__init__(in_f, out_f, bias=False, quant_config=quant_config, prefix=prefix)
        self.Plora_A = RowParallelLinear(in_f, rank, bias=False, input_is_parallel=True, reduce_results=True,
                                         quant_config=None, prefix=f"{prefix}.Plora_A", return_bias=False)
        self.Plora_B = ReplicatedLinear(rank, out_f, bias=False, quant_config=None, prefix=f"{prefix}.Plora_B",
                                        return_bias=False)
        self.plora_scale = scale


class XComposer2Attention(InternLM2Attention):
    """vLLM's InternLM2 attention (RoPE, the interleaved-wqkv split with its TP gather) with wqkv/wo
    replaced by their Partial-LoRA versions (the parent's plain ones are dropped right away)."""

    def __init__(self, config, lora: Mapping[str, tuple[int, float]], cache_config, quant_config, prefix: str):
        super().__init__(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                         num_kv_heads=config.num_key_value_heads, rope_parameters=config.rope_parameters,
                         max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
                         cache_config=cache_config, quant_config=quant_config, prefix=prefix)
        h, d = config.hidden_size, self.head_dim
        self.wqkv = PLoRAQKVParallelLinear(h, d, self.total_num_heads, self.total_num_kv_heads, *lora["wqkv"],
                                           quant_config, f"{prefix}.wqkv")
        self.wo = PLoRARowParallelLinear(self.total_num_heads * d, h, *lora["wo"], quant_config, f"{prefix}.wo")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split_qkv(self.wqkv(hidden_states, rows))
        q, k = self.rotary_emb(positions, q, k)
        return self.wo(self.attn(q, k, v), rows)


class XComposer2FeedForward(nn.Module):
    def __init__(self, config, lora, quant_config, prefix: str):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"InternLM-XComposer2: hidden_act {config.hidden_act!r} is not 'silu'")
        h, i = config.hidden_size, config.intermediate_size
        # w1 and w3 stay two layers (no fused gate_up): each has its own LoRA
        self.w1 = PLoRAColumnParallelLinear(h, i, *lora["w1"], quant_config, f"{prefix}.w1")
        self.w3 = PLoRAColumnParallelLinear(h, i, *lora["w3"], quant_config, f"{prefix}.w3")
        self.w2 = PLoRARowParallelLinear(i, h, *lora["w2"], quant_config, f"{prefix}.w2")

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x, rows)) * self.w3(x, rows), rows)


class XComposer2DecoderLayer(nn.Module):
    def __init__(self, config, lora, cache_config, quant_config, prefix: str):
        super().__init__()
        self.attention = XComposer2Attention(config, lora, cache_config, quant_config, f"{prefix}.attention")
        self.feed_forward = XComposer2FeedForward(config, lora, quant_config, f"{prefix}.feed_forward")
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual, rows):
        if residual is None:
            residual = hidden_states
            hidden_states = self.attention_norm(hidden_states)
        else:
            hidden_states, residual = self.attention_norm(hidden_states, residual)
        hidden_states = self.attention(positions, hidden_states, rows)
        hidden_states, residual = self.ffn_norm(hidden_states, residual)
        return self.feed_forward(hidden_states, rows), residual


class XComposer2LanguageModel(nn.Module):
    """InternLM2 decoder with Partial-LoRA layers; checkpoint names under ``model.``."""

    def __init__(self, *, vllm_config: VllmConfig, lora, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.tok_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: XComposer2DecoderLayer(config, lora, vllm_config.cache_config,
                                                  vllm_config.quant_config, prefix),
            prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, rows=None):
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers[self.start_layer:self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual, rows)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


def plora_ranks(model_path: str, config, variant: str) -> dict[str, tuple[int, float]]:
    """(rank, alpha/rank) per linear: ``plora_r`` / ``plora_alpha`` from config.json if given, else the
    rank read from layer 0's Plora_A shape in the checkpoint (spec §2.2: VL-1.8B's is not published),
    else the published defaults; alpha is 16 for rank 8 (4KHD's wqkv) and the rank otherwise."""
    ranks = dict(getattr(config, "plora_r", None) or {})
    missing = [n for n in PLORA_LINEARS if n.split(".")[1] not in ranks]
    if missing:
        ranks.update({k: v for k, v in _ranks_from_checkpoint(Path(model_path)).items() if k not in ranks})
    alphas = dict(getattr(config, "plora_alpha", None) or {})
    out = {}
    for name in PLORA_LINEARS:
        short = name.split(".")[1]
        r = int(ranks.get(short, 8 if (variant == "4khd" and short == "wqkv") else 256))
        alpha = float(alphas.get(short, 16 if r == 8 else r))
        out[short] = (r, alpha / r)
    return out


def _ranks_from_checkpoint(folder: Path) -> dict[str, int]:
    if not folder.is_dir():
        return {}
    wanted = {f"model.layers.0.{n}.Plora_A.weight": n.split(".")[1] for n in PLORA_LINEARS}
    found: dict[str, int] = {}
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in set(st.keys()) & set(wanted):
                found[wanted[key]] = st.get_slice(key).get_shape()[0]
    if not found:
        index = folder / "pytorch_model.bin.index.json"
        files = {json.loads(index.read_text())["weight_map"].get(k) for k in wanted} - {None} if index.is_file() \
            else {p.name for p in folder.glob("pytorch_model*.bin")}
        for name in sorted(files):
            state = torch.load(folder / name, map_location="cpu", mmap=True, weights_only=True)
            found.update({wanted[k]: int(v.shape[0]) for k, v in state.items() if k in wanted})
    return found


# ---------------------------------------------------------------------------------------- model

@MULTIMODAL_REGISTRY.register_processor(XComposer2MultiModalProcessor, info=XComposer2ProcessingInfo,
                                        dummy_inputs=XComposer2DummyInputsBuilder)
class InternLMXComposer2ForCausalLM(nn.Module, SupportsMultiModal, SupportsQuant):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={"vit.vision_tower.": "vit."},
        # 2.5's task LoRAs (web / write modes) act on every token and are not served here
        orig_to_new_regex={re.compile(r"\.lora_(web|sft|dpo)_[AB]\.weight$"): None,
                           re.compile(r"\.position_ids$"): None})

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError(f"InternLM-XComposer2 accepts images only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model_dir = vllm_config.model_config.model   # to name a damaged weight file
        self.layout = XComposer2Layout.from_config(config)
        hidden = config.hidden_size
        lora = plora_ranks(self.model_dir, config, self.layout.variant)
        self._image_mask: torch.Tensor | None = None

        with self._mark_tower_model(vllm_config, {"image"}):
            vit_cfg = CLIPVisionConfig(**self.layout.vit)
            self.vit = CLIPVisionModel(vit_cfg, quant_config=None, require_post_norm=False,
                                       prefix=maybe_prefix(prefix, "vit"))
            c = self.layout.vit_out_channels
            self.vision_proj = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            if self.layout.is_hd:
                self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, c))
                self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, c))

        with self._mark_language_model(vllm_config):
            self.model = XComposer2LanguageModel(vllm_config=vllm_config, lora=lora,
                                                 prefix=maybe_prefix(prefix, "model"))
            self.output = ParallelLMHead(config.vocab_size, hidden, quant_config=vllm_config.quant_config,
                                         prefix=maybe_prefix(prefix, "output"))
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def get_language_model(self) -> nn.Module:
        return self.model

    # ------------------------------------------------------------------ vision

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values_flat")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        num_crops = [int(n) for n in kwargs["image_num_crops"]]
        grids = [tuple(int(v) for v in g) for g in kwargs["image_grid_hw"]]
        dtype = self.vision_proj[0].weight.dtype
        features = self.vit(pixel_values.to(dtype))[:, 1:, :]  # last layer, no post-LN, CLS dropped
        if not self.layout.is_hd:
            return tuple(self.vision_proj(features))
        out = []
        for crops, (h, w) in zip(features.split(num_crops), grids):
            out.append(self.vision_proj(hd_layout(crops, h, w, self.plora_glb_GN, self.plora_sub_GN)))
        return tuple(out)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: MultiModalEmbeddings | None = None,
                        *, is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        # The rows that receive image embeddings in this step are exactly the PLoRA rows (spec §9.4).
        has_images = multimodal_embeddings is not None and len(multimodal_embeddings) > 0
        self._image_mask = is_multimodal.to(input_ids.device) if has_images and is_multimodal is not None else None
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    # ------------------------------------------------------------------ language model

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        mask, self._image_mask = self._image_mask, None  # never reused by a later step
        rows = None
        if mask is not None and inputs_embeds is not None:
            rows = mask.nonzero().squeeze(1)   # one host sync a step; an empty index means no image rows
            if rows.numel() == 0:
                rows = None
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds, rows)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.output, hidden_states)

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        pos_name = "vit.vision_tower.vision_model.embeddings.position_embedding.weight"
        rows_needed = self.layout.grid ** 2 + 1

        def prepared() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name == pos_name and tensor.shape[0] != rows_needed:
                    tensor = interpolate_position_table(tensor, self.layout.grid)
                yield name, tensor

        return load_weights_naming_culprit(self, prepared(), self.hf_to_vllm_mapper, self.model_dir)


def interpolate_position_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """CLIP position table [1 + s*s, C] -> [1 + grid*grid, C]: the CLS row kept, the s x s patch rows
    resized bicubically (align_corners=False), as the remote code's ``resize_pos`` does."""
    side = int(round((table.shape[0] - 1) ** 0.5))
    if side * side + 1 != table.shape[0]:
        raise ValueError(f"position table with {table.shape[0]} rows is not 1 + a square")
    patches = table[1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    return torch.cat([table[:1].float(), patches]).to(table.dtype)
