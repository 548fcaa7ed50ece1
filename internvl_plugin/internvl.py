"""InternVL (1.5, Mini-InternVL, 2, 2.5) for vLLM, without torchvision and without remote code.

Registered over vLLM's own ``InternVLChatModel`` because vLLM's version imports its
torchvision-based processor at module import, which cannot load beside CPU torch. This file holds
processing info -> dummy inputs -> multimodal processor -> the model class, in that order. The
model composes vLLM's InternViT (``intern_vit.py``, torchvision-free) with the language model vLLM
builds from ``llm_config`` (InternLM2, Qwen2, Llama, Phi-3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from transformers import BatchFeature

from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.models.intern_vit import InternVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems, VideoProcessorItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.exceptions import VLLMValidationError
from vllm.sequence import IntermediateTensors

from internvl_plugin.tile_budget import budget_from_env
from internvl_plugin.tile_budget import tokens_per_tile as config_tokens_per_tile
from internvl_plugin.weights import load_weights_naming_culprit
from internvl_plugin.internvl_image import TILING_KWARGS, Tiling, choose_grid, image_to_pixel_values, num_tiles
from internvl_plugin.internvl_video import (MAX_FRAMES, VIDEO_PLACEHOLDER, frame_prefix, num_video_frames,
                                            video_frames)

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
NO_VIDEO_MESSAGE = ("this InternVL model (pixel shuffle v1, InternVL-Chat-V1-5 style) takes images, not video; "
                    "InternVL2 and 2.5 take video")


class InternVLProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None} if self.supports_video else {"image": None}

    @cached_property
    def supports_video(self) -> bool:
        # InternVL2 / 2.5 (pixel shuffle v2) were trained on frame sequences; InternVL-Chat-V1-5's v1 layout was not
        return self.get_hf_config().ps_version == "v2"

    def validate_num_items(self, modality: str, num_items: int) -> None:
        if modality == "video" and num_items > 0 and not self.supports_video:
            # vLLM's own answer would be "At most 0 video(s) may be provided in one prompt."
            raise VLLMValidationError(NO_VIDEO_MESSAGE, parameter=modality)
        super().validate_num_items(modality, num_items)

    def get_video_frames(self, total: int, mm_kwargs: Mapping[str, object] | None = None) -> int:
        return num_video_frames(total, self.ctx.get_merged_mm_kwargs(dict(mm_kwargs or {})).get("num_frames"))

    def get_max_video_frames(self, seq_len: int) -> int:
        # the frames of one video must fit a sequence (each frame is one tile)
        return max(1, min(MAX_FRAMES, seq_len // self.tokens_per_tile - 1))

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # our kwargs (max_dynamic_patch, ...) stay flat; there is no HF processor

    def get_tiling(self, mm_kwargs: Mapping[str, object] | None = None) -> Tiling:
        """Config tiling merged with --mm-processor-kwargs and the request's mm_processor_kwargs."""
        merged = self.ctx.get_merged_mm_kwargs(dict(mm_kwargs or {}))
        unknown = sorted(k for k in merged if k not in TILING_KWARGS and k not in ("return_tensors", "num_frames"))
        if unknown:
            raise ValueError(f"unsupported mm_processor_kwargs for InternVL: {unknown}; "
                             f"supported: {list(TILING_KWARGS)}")
        return Tiling.from_config(self.get_hf_config(), merged)

    @cached_property
    def tokens_per_tile(self) -> int:
        return config_tokens_per_tile(self.get_hf_config().to_dict())

    def get_num_image_tokens(self, *, image_width: int, image_height: int, tiling: Tiling) -> int:
        return self.tokens_per_tile * num_tiles(image_width, image_height, tiling)

    def get_image_size_with_most_features(self, tiling: Tiling | None = None) -> ImageSize:
        tiling = tiling or self.get_tiling()
        s = tiling.image_size
        # an image exactly the shape of the largest grid selects that grid
        cols, rows = max(((c, r) for c in range(1, tiling.max_num + 1)
                          for r in range(1, tiling.max_num + 1) if c * r <= tiling.max_num),
                         key=lambda g: (g[0] * g[1], -g[0]))
        assert choose_grid(s * cols, s * rows, tiling) == (cols, rows)
        return ImageSize(width=s * cols, height=s * rows)

    def get_max_image_tokens(self) -> int:
        """Largest image, in tokens, that a request may bring: the server's tile budget when one is set
        (requests may then raise max_dynamic_patch up to it), else the config's tiling. vLLM sizes its
        encoder cache from this."""
        tiling = self.get_tiling()
        budget = budget_from_env()
        if budget is not None and tiling.max_num > 1 and budget > tiling.max_num:
            tiling = dataclasses.replace(tiling, max_num=budget)
        size = self.get_image_size_with_most_features(tiling)
        return self.get_num_image_tokens(image_width=size.width, image_height=size.height, tiling=tiling)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        limits = {"image": self.get_max_image_tokens()}
        if self.supports_video:
            limits["video"] = self.get_max_video_frames(seq_len) * self.tokens_per_tile
        return limits

    @cached_property
    def special_token_ids(self) -> dict[str, int]:
        vocab = self.get_tokenizer().get_vocab()
        missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer of {self.model_id} lacks InternVL special tokens {missing}")
        return {t: vocab[t] for t in (IMG_START, IMG_END, IMG_CONTEXT)}


class InternVLDummyInputsBuilder(BaseDummyInputsBuilder[InternVLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0) + VIDEO_PLACEHOLDER * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: MultiModalDummyOptions):
        size = self.info.get_image_size_with_most_features()
        data = {"image": self._get_dummy_images(width=size.width, height=size.height,
                                                num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}
        if mm_counts.get("video", 0):
            side = self.info.get_tiling().image_size
            data["video"] = self._get_dummy_videos(width=side, height=side, num_videos=mm_counts["video"],
                                                   num_frames=self.info.get_max_video_frames(seq_len),
                                                   overrides=mm_options.get("video"))
        return data


class InternVLMultiModalProcessor(BaseMultiModalProcessor[InternVLProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        tiling = self.info.get_tiling(hf_kwargs)
        tiles = [image_to_pixel_values(_as_pil(img), tiling) for img in hf_data.get("images", [])]
        out = {
            "pixel_values_flat": torch.cat(tiles) if tiles else torch.empty(0, 3, tiling.image_size, tiling.image_size),
            "image_num_patches": torch.tensor([t.shape[0] for t in tiles], dtype=torch.long),
        }
        videos = hf_data.get("videos", [])
        if videos:
            if not self.info.supports_video:
                raise ValueError(NO_VIDEO_MESSAGE)
            # one tile per frame, as InternVL's load_video(max_num=1)
            one_tile = dataclasses.replace(tiling, min_num=1, max_num=1)
            num_frames = self.info.ctx.get_merged_mm_kwargs(dict(hf_kwargs)).get("num_frames")
            clips = [torch.cat([image_to_pixel_values(f, one_tile) for f in video_frames(v, num_frames)])
                     for v in videos]
            out["pixel_values_flat_video"] = torch.cat(clips)
            out["video_num_patches"] = torch.tensor([c.shape[0] for c in clips], dtype=torch.long)
        return BatchFeature(out)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        num_patches = hf_inputs.get("image_num_patches", torch.empty(0, dtype=torch.long))
        fields = {
            "pixel_values_flat": MultiModalFieldConfig.flat_from_sizes("image", num_patches),
            "image_num_patches": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }
        if "video_num_patches" in hf_inputs:
            fields["pixel_values_flat_video"] = MultiModalFieldConfig.flat_from_sizes(
                "video", hf_inputs["video_num_patches"])
            fields["video_num_patches"] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        ids = self.info.special_token_ids
        tiling = self.info.get_tiling(hf_processor_mm_kwargs)

        def expand(item_idx: int) -> PromptUpdateDetails:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            n = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height, tiling=tiling)
            full = [ids[IMG_START]] + [ids[IMG_CONTEXT]] * n + [ids[IMG_END]]
            return PromptUpdateDetails.select_token_id(full, ids[IMG_CONTEXT])

        tokenizer = self.info.get_tokenizer()
        target = tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False)
        updates = [PromptReplacement(modality="image", target=target, replacement=expand)]
        if not self.info.supports_video:
            return updates
        block = IMG_START + IMG_CONTEXT * self.info.tokens_per_tile + IMG_END

        def expand_video(item_idx: int) -> PromptUpdateDetails:
            total = mm_items.get_items("video", VideoProcessorItems).get_num_frames(item_idx)
            frames = self.info.get_video_frames(total, hf_processor_mm_kwargs)
            text = "\n".join(frame_prefix(i + 1) + block for i in range(frames))
            # encoded after a special token, as the text will be in the expanded prompt: a dummy-prefix
            # tokenizer (Phi-3) would otherwise start "Frame1" with a "▁" the prompt does not have
            full = tokenizer.encode(IMG_END + text, add_special_tokens=False)[1:]
            return PromptUpdateDetails.select_token_id(full, ids[IMG_CONTEXT])

        video_target = tokenizer.encode(VIDEO_PLACEHOLDER, add_special_tokens=False)
        return updates + [PromptReplacement(modality="video", target=video_target, replacement=expand_video)]

    def _apply_prompt_updates(self, token_ids, mm_prompt_updates):
        # Overrides a protected hook of vLLM 0.32's BaseMultiModalProcessor (checked by
        # tests/test_plugin.py::test_processor_hooks_exist_in_vllm). InternVL's reference tokenizes the *expanded* prompt text ("...<img><IMG_CONTEXT>...</img>\n...")
        # in one go. "<image>" is ordinary text, so replacing its token ids in place would keep the
        # tokenization of its neighbours as they were next to "<image>", which differs (sentencepiece
        # restarts at special tokens). Replacing in text space and re-encoding reproduces it exactly.
        # A leading BOS is set aside while decoding: sentencepiece tokenizers with a dummy "▁" prefix (Phi-3's
        # Llama-2 tokenizer) strip that prefix when decoding only at the very start of the text, so
        # "<s>" + "<image>\n..." would decode to "<s> <image>" and keep a "▁" the reference never has.
        bos = self.info.get_tokenizer().bos_token_id
        lead = list(token_ids[:1]) if bos is not None and len(token_ids) > 1 and token_ids[0] == bos else []
        rest = list(token_ids[len(lead):])
        if len(mm_prompt_updates.get("image", ())) > 1:   # only a multi-image prompt is renumbered
            rest = self._number_first_image(rest)
        new_ids, result = self._apply_prompt_updates_via_text(rest, mm_prompt_updates)
        new_ids = lead + list(new_ids)
        placeholders = self._find_mm_placeholders(
            new_ids, self._matched_updates_from_result(mm_prompt_updates, result))
        return new_ids, placeholders

    def _number_first_image(self, token_ids: list[int]) -> list[int]:
        """"<image>\nImage-2: <image>" -> "Image-1: <image>\nImage-2: <image>".

        vLLM asks for each chat image's placeholder before it knows how many follow, so the first one is a
        bare "<image>" (right for a single image, as InternVL's chat() writes it) and only the later ones
        are numbered (get_placeholder_str); once a second image is there, the first gets its number too,
        as in InternVL's multi-image prompts."""
        first, second = numbered_image(1), numbered_image(2)
        if not token_ids or IMAGE_PLACEHOLDER + "\n" + second not in (text := self.info.get_tokenizer().decode(token_ids)):
            return token_ids
        if first in text:
            return token_ids
        text = text.replace(IMAGE_PLACEHOLDER + "\n" + second, first + "\n" + second, 1)
        return self.info.get_tokenizer().encode(text, add_special_tokens=False)


def numbered_image(i: int) -> str:
    """The placeholder of the i-th image (1-based) of a multi-image prompt, as InternVL writes it."""
    return f"Image-{i}: {IMAGE_PLACEHOLDER}"


def _as_pil(image: object) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)


def pixel_shuffle(x: torch.Tensor, ratio: float, ps_version: str) -> torch.Tensor:
    """[N, h, w, C] patch grid -> [N, h*w*ratio^2, C/ratio^2] tokens (spec A3.3).

    Token (br, bc) concatenates the r x r block x[r*br + m, r*bc + k] over (m, k) in row-major
    order. v2 emits tokens row-major over blocks; v1 column-major (InternVL's transposed layout).
    """
    r = int(round(1 / ratio))
    n, h, w, c = x.shape
    blocks = x.view(n, h // r, r, w // r, r, c).permute(0, 1, 3, 2, 4, 5)  # n, br, bc, m, k, c
    blocks = blocks.reshape(n, h // r, w // r, r * r * c)
    if ps_version == "v1":
        blocks = blocks.transpose(1, 2)
    return blocks.reshape(n, -1, r * r * c)


@MULTIMODAL_REGISTRY.register_processor(InternVLMultiModalProcessor, info=InternVLProcessingInfo,
                                        dummy_inputs=InternVLDummyInputsBuilder)
class InternVLChatModel(nn.Module, SupportsMultiModal, SupportsPP):
    # Checkpoint modules we do not implement (video/grounding heads of some InternVL forks).
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix=dict.fromkeys(
        ["action_embed", "temporal_embed", "track_embed", "track_embed_decoder", "box_token",
         "cg_criterion", "cg_model", "loc_encoder", "loc_decoder", "sam", "temporal_token", "track_token"]))

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER if i <= 1 else numbered_image(i)
        if modality.startswith("video"):
            return VIDEO_PLACEHOLDER
        raise ValueError(f"InternVL accepts images and video, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model_dir = vllm_config.model_config.model   # to name a damaged weight file
        self.num_image_token = config_tokens_per_tile(config.to_dict())
        self.llm_hidden_size = config.text_config.hidden_size

        with self._mark_tower_model(vllm_config, {"image"}):
            # The vision tower and projector always stay 16-bit: no quant_config reaches them.
            layer = config.select_layer
            num_layers = config.vision_config.num_hidden_layers + layer + 1 if layer < 0 else layer + 1
            self.vision_model = InternVisionModel(config.vision_config, quant_config=None,
                                                  num_hidden_layers_override=num_layers,
                                                  prefix=maybe_prefix(prefix, "vision_model"))
            vit_hidden = config.vision_config.hidden_size * int(round(1 / config.downsample_ratio)) ** 2
            self.mlp1 = nn.Sequential(nn.LayerNorm(vit_hidden), nn.Linear(vit_hidden, self.llm_hidden_size),
                                      nn.GELU(), nn.Linear(self.llm_hidden_size, self.llm_hidden_size))

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"))

        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[T, 3, S, S] tiles -> [T, num_image_token, llm_hidden] image embeddings."""
        vit = self.vision_model(pixel_values=pixel_values.to(self.mlp1[1].weight.dtype))[:, 1:, :]
        side = int(vit.shape[1] ** 0.5)
        vit = vit.reshape(vit.shape[0], side, side, -1)
        return self.mlp1(pixel_shuffle(vit, self.config.downsample_ratio, self.config.ps_version))

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        # vLLM hands over one modality at a time; keep the kwargs' order if it ever sends both
        embeddings: list[torch.Tensor] = []
        for key in kwargs:
            if key == "pixel_values_flat":
                embeddings += self._embed_items(kwargs[key], kwargs["image_num_patches"])
            elif key == "pixel_values_flat_video":
                embeddings += self._embed_items(kwargs[key], kwargs["video_num_patches"])
        return tuple(embeddings)

    def _embed_items(self, pixel_values: object, num_patches: object) -> list[torch.Tensor]:
        num_patches = num_patches.tolist() if isinstance(num_patches, torch.Tensor) else list(num_patches)
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        embeds = self.extract_feature(pixel_values).reshape(-1, self.llm_hidden_size)
        return list(embeds.split([n * self.num_image_token for n in num_patches]))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids=input_ids, positions=positions,
                                          intermediate_tensors=intermediate_tensors,
                                          inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights_naming_culprit(self, weights, self.hf_to_vllm_mapper, self.model_dir)
