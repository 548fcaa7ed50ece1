"""Plain-PyTorch reference of InternVL (``InternVLChatModel``): loading, prompts, forward, greedy generation.

The ground truth that tests hold the vLLM plugin against, written from the behaviour of OpenGVLab's HF
remote code (``modeling_internvl_chat.py``, ``modeling_intern_vit.py``, ``modeling_internlm2.py``,
``conversation.py``) and stock Qwen2, as pinned down in specs/internvl-and-quant.md PART A. It is
deliberately independent of the plugin: it imports torch, numpy, PIL and safetensors only (never vllm,
never torchvision, never the plugin code it checks), and it lives under tests/ so that it never ships
in the wheel.

    ref = load_reference("tiny-internvl/")                      # config.json + *.safetensors
    pixel_values = ref_load_image(image, None, ref.config)      # [T, 3, S, S]
    prompt = ref_build_prompt("Describe it.", [len(pixel_values)], ref.config)
    ids = tokenizer(prompt).input_ids                           # tokenizer is the caller's
    logits = ref(torch.tensor(ids), pixel_values, img_context_token_id)
    new_tokens = ref.greedy_generate(ids, pixel_values, img_context_token_id, 16, [eos_id])

Scope: one sequence at a time, full recompute (no KV cache), language models InternLM2, Qwen2, Llama and Phi-3
without rope scaling (Phi-3's LongRoPE excepted) or sliding window.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .llm import build_language_model, split_internlm2_wqkv
from .vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InternViTRef,
    as_config,
    build_mlp1,
    cfg_get,
    pixel_shuffle,
    ref_dynamic_preprocess,
    ref_find_closest_aspect_ratio,
    ref_candidate_grids,
    ref_load_image,
    ref_num_image_token_per_tile,
    ref_num_image_tokens,
    ref_num_tiles,
    ref_tile_size,
)

__all__ = [
    "IMG_START_TOKEN",
    "IMG_END_TOKEN",
    "IMG_CONTEXT_TOKEN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InternVLReference",
    "load_reference",
    "pixel_shuffle",
    "split_internlm2_wqkv",
    "ref_build_prompt",
    "ref_stop_token",
    "ref_candidate_grids",
    "ref_find_closest_aspect_ratio",
    "ref_dynamic_preprocess",
    "ref_load_image",
    "ref_num_image_tokens",
    "ref_num_image_token_per_tile",
    "ref_num_tiles",
    "ref_tile_size",
    "REF_TEMPLATES",
]

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"


# ----------------------------------------------------------------------------------------------
# public: loading


def load_reference(path: str | Path, dtype: torch.dtype = torch.float32) -> InternVLReference:
    """Build the reference from a checkpoint folder (``config.json`` + all ``*.safetensors``).

    Weight names must match spec A2 exactly: a missing or unexpected name is an error. With
    ``tie_word_embeddings`` the LM head reuses the token embedding and a stored head (which vLLM
    also skips) is ignored.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "internvl_chat":
        raise ValueError(f"{config_file}: model_type is {config.get('model_type')!r}, expected 'internvl_chat'")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")

    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        for name, tensor in load_file(str(shard)).items():
            if name in state:
                raise ValueError(f"{shard}: weight {name!r} is also in another shard")
            state[name] = tensor

    with torch.device("meta"):
        model = InternVLReference(config)
    expected = set(model.state_dict())
    if model.language_model.shape.tied:
        for head in ("language_model.output.weight", "language_model.lm_head.weight"):
            state.pop(head, None)
    missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or extra:
        problems = _name_list("missing", missing) + _name_list("unexpected", extra)
        raise ValueError(f"{folder}: checkpoint does not match the config:{problems}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def _name_list(what: str, names: list[str], limit: int = 12) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f" {len(names)} {what} weight(s): {shown};"


# ----------------------------------------------------------------------------------------------
# public: the model


class InternVLReference(nn.Module):
    """``vision_model`` (InternViT) -> pixel shuffle -> ``mlp1`` -> features that replace the
    ``<IMG_CONTEXT>`` embeddings of ``language_model``. Parameters are named as in the checkpoint."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        vcfg = config["vision_config"]
        lcfg = config.get("llm_config") or config.get("text_config")
        if lcfg is None:
            raise ValueError("config has no llm_config")
        self.select_layer = int(config.get("select_layer", -1))
        self.downsample_ratio = float(config.get("downsample_ratio", 0.5))
        self.ps_version = config.get("ps_version", "v1")
        self.template = config.get("template")
        self.image_size = ref_tile_size(config)
        self.num_image_token = ref_num_image_token_per_tile(config)

        self.vision_model = InternViTRef(vcfg, self.image_size)
        self.language_model = build_language_model(lcfg)
        self.mlp1 = build_mlp1(int(vcfg["hidden_size"]), self.language_model.shape.hidden, self.downsample_ratio)

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype

    @torch.no_grad()
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [T, 3, S, S] -> image features [T, num_image_token, Hl]."""
        h = self.vision_model.hidden_state(pixel_values.to(self.dtype), self.select_layer)
        patches = h[:, 1:]  # drop CLS
        side = int(round(patches.shape[1] ** 0.5))
        grid = patches.reshape(patches.shape[0], side, side, patches.shape[-1])
        shuffled = pixel_shuffle(grid, self.downsample_ratio, self.ps_version)
        return self.mlp1(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))

    @torch.no_grad()
    def embed_inputs(
        self,
        input_ids: torch.Tensor | Sequence[int],
        pixel_values: torch.Tensor | None = None,
        img_context_token_id: int | None = None,
    ) -> torch.Tensor:
        """Token embeddings [L, Hl] with the ``<IMG_CONTEXT>`` rows replaced, in order, by the
        flattened image features."""
        ids = _as_ids(input_ids)
        embeds = self.language_model.embed(ids)
        if pixel_values is None:
            return embeds
        if img_context_token_id is None:
            raise ValueError("pixel_values given without img_context_token_id")
        features = self.extract_feature(pixel_values)
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        slots = ids == img_context_token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(
                f"{int(slots.sum())} <IMG_CONTEXT> tokens in input_ids but {features.shape[0]} image "
                f"feature rows ({pixel_values.shape[0]} tiles x {self.num_image_token})"
            )
        embeds = embeds.clone()
        embeds[slots] = features
        return embeds

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor | Sequence[int],
        pixel_values: torch.Tensor | None = None,
        img_context_token_id: int | None = None,
    ) -> torch.Tensor:
        """Logits [L, vocab] for one sequence (causal, positions 0..L-1), in the model dtype."""
        embeds = self.embed_inputs(input_ids, pixel_values, img_context_token_id)
        return self.language_model.logits_from_embeds(embeds)

    @torch.no_grad()
    def greedy_generate(
        self,
        input_ids: torch.Tensor | Sequence[int],
        pixel_values: torch.Tensor | None,
        img_context_token_id: int | None,
        max_new_tokens: int,
        eos_token_ids: int | Iterable[int] | None = None,
    ) -> list[int]:
        """Argmax decoding, recomputing the whole sequence each step. Returns the new tokens; an
        EOS token that ends generation is included (as vLLM's ``token_ids`` does)."""
        stop = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids or ())
        embeds = self.embed_inputs(input_ids, pixel_values, img_context_token_id)
        table = self.language_model.get_input_embeddings()
        generated: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.language_model.logits_from_embeds(embeds)[-1].argmax())
            generated.append(token)
            if token in stop:
                break
            embeds = torch.cat([embeds, table(torch.tensor([token]))], dim=0)
        return generated

    @torch.no_grad()
    def prompt_logprobs(
        self,
        input_ids: torch.Tensor | Sequence[int],
        pixel_values: torch.Tensor | None = None,
        img_context_token_id: int | None = None,
    ) -> torch.Tensor:
        """float32 [L-1]: entry t = log p(input_ids[t+1] | input_ids[:t+1]) (vLLM's prompt
        logprobs without its leading None)."""
        ids = _as_ids(input_ids)
        logits = self.forward(ids, pixel_values, img_context_token_id).float()
        logprobs = logits[:-1].log_softmax(dim=-1)
        return logprobs.gather(-1, ids[1:, None]).squeeze(-1)


def _as_ids(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be one sequence (1-D), got shape {tuple(ids.shape)}")
    return ids


# ----------------------------------------------------------------------------------------------
# public: prompts (spec A3.4, A4.1)


@dataclass(frozen=True)
class _Template:
    """InternVL conversation template with the "MPT" separator style."""

    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str

    def render(self, system_message: str, messages: list[tuple[str, str | None]]) -> str:
        prompt = self.system_template.format(system_message=system_message) + self.sep
        for role, message in messages:
            prompt += role + message + self.sep if message else role
        return prompt


# byte-exact from InternVL's conversation.py (full-width comma after 大模型, ASCII ", " after InternVL)
_SYSTEM_INTERNVL2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
_SYSTEM_INTERNVL2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

_CHATML_SYSTEM = "<|im_start|>system\n{system_message}"

REF_TEMPLATES: dict[str, _Template] = {
    "Hermes-2": _Template(_CHATML_SYSTEM, _SYSTEM_INTERNVL2, _CHATML_ROLES, "<|im_end|>"),
    "internlm2-chat": _Template(_CHATML_SYSTEM, _SYSTEM_INTERNVL2, _CHATML_ROLES, "<|im_end|>"),
    "phi3-chat": _Template("<|system|>\n{system_message}", _SYSTEM_INTERNVL2, ("<|user|>\n", "<|assistant|>\n"), "<|end|>"),
    "internvl2_5": _Template(_CHATML_SYSTEM, _SYSTEM_INTERNVL2_5, _CHATML_ROLES, "<|im_end|>\n"),
}


def _template(name: str | None) -> _Template:
    if name not in REF_TEMPLATES:
        raise ValueError(f"template {name!r} is not one of {sorted(REF_TEMPLATES)}")
    return REF_TEMPLATES[name]


def ref_stop_token(template: str) -> str:
    """The generation stop token of a template: ``sep.strip()`` ('<|im_end|>' or '<|end|>')."""
    return _template(template).sep.strip()


def ref_build_prompt(
    question: str,
    num_patches_list: Sequence[int] | None,
    config: Any,
    system_message: str | None = None,
    history: Sequence[tuple[str, str]] | None = None,
) -> str:
    """The prompt string InternVL's ``chat()`` tokenizes, image blocks expanded.

    ``num_patches_list``: tiles per image (``len(pixel_values)`` of each). ``system_message=None``
    uses the template's own. ``history``: earlier (question, answer) turns.
    """
    config = as_config(config)
    template = _template(cfg_get(config, "template"))
    num_patches_list = list(num_patches_list or [])
    if num_patches_list and "<image>" not in question:
        question = "<image>\n" + question
    messages: list[tuple[str, str | None]] = []
    for old_question, old_answer in history or ():
        messages += [(template.roles[0], old_question), (template.roles[1], old_answer)]
    messages += [(template.roles[0], question), (template.roles[1], None)]
    prompt = template.render(template.system_message if system_message is None else system_message, messages)

    if prompt.count("<image>") < len(num_patches_list):
        # InternVL would go on and fail later, when features and <IMG_CONTEXT> slots disagree
        raise ValueError(f"{len(num_patches_list)} images but only {prompt.count('<image>')} '<image>' placeholders")
    per_tile = ref_num_image_token_per_tile(config)
    for num_patches in num_patches_list:
        block = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (per_tile * num_patches) + IMG_END_TOKEN
        prompt = prompt.replace("<image>", block, 1)
    return prompt
