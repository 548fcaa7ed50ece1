"""Tiny random-weight InternLM-XComposer2 checkpoints (VL-1.8B, VL-7B, 7B, 4KHD, 2.5 layouts).

Real ``config.json`` keys (``auto_map`` into remote code that must not run, 4KHD's declared
``InternLM2ForCausalLM`` and ``max_length`` 16384, ``img_size`` of the VL releases, 2.5's
``model_type`` ``internlm2``), the real tensor names of spec xcomposer2.md §2.1 (``Plora_A/B`` on the
five decoder linears, ``vit.vision_tower.vision_model.*``, ``vision_proj.0/2``, ``plora_glb_GN`` /
``plora_sub_GN``) and an InternLM2 sentencepiece tokenizer whose ``[UNUSED_TOKEN_141..146]`` pieces
stand for XComposer2's chat markers. Only the widths are small: a 2-layer CLIP of width 32 and a
2-layer InternLM2 of width 128 (head_dim 32, which vLLM's CPU attention needs). Crops are 56 px
(VL: 4x4 = 16 tokens an image; HD: 2x2 merged tokens a crop), the 7B layout 42 px with its position
table stored at the 56-px grid, as a checkpoint saved before ``resize_pos`` would be, so the loader's
interpolation runs. PLoRA ranks differ per module and Plora_B is non-zero (the real init is zero,
which would hide a misplaced mask). Called through ``internvl_plugin.tiny.build_tiny_model``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from internvl_plugin.chat_templates import template_text

__all__ = ["XCOMPOSER2_LAYOUTS", "XCOMPOSER2_TOKENS", "write_xcomposer2_model"]

# [UNUSED_TOKEN_146] opens a turn, [UNUSED_TOKEN_145] ends it (ids 92543 / 92542 in the real vocab);
# [UNUSED_TOKEN_141] is the image placeholder id the plugin uses.
XCOMPOSER2_TOKENS = [f"[UNUSED_TOKEN_{i}]" for i in range(141, 147)]

_HD_LORA = {"wqkv": 8, "wo": 16, "w1": 16, "w3": 12, "w2": 16}  # 4KHD: wqkv r=8 -> alpha 16 (scale 2)
_VL_LORA = {"wqkv": 4, "wo": 8, "w1": 8, "w3": 6, "w2": 8}

XCOMPOSER2_LAYOUTS: dict[str, dict[str, Any]] = {
    # InternLM2-1.8B style GQA (16 heads / 8 KV -> group 2), 490-px single crop -> here 56 px
    "xcomposer2-vl-1.8b": dict(family="xcomposer2", variant="vl", img_size=56, heads=(4, 2), lora=_VL_LORA,
                               template="internlm-xcomposer2"),
    # InternLM2-7B style GQA (32 / 8 -> group 4)
    "xcomposer2-vl-7b": dict(family="xcomposer2", variant="vl", img_size=56, heads=(4, 1), lora=_VL_LORA,
                             template="internlm-xcomposer2"),
    # the composition model: 224 px -> here 42 px, position table stored for 56 px
    "xcomposer2-7b": dict(family="xcomposer2", variant="vl", img_size=42, pos_grid_size=56, heads=(4, 1),
                          lora=_VL_LORA, template="internlm-xcomposer2"),
    # 4KHD's group is 4; 2 KV heads here so that TP=2 can shard them (vLLM's InternLM2 split needs it)
    "xcomposer2-4khd": dict(family="xcomposer2", variant="4khd", tile=56, heads=(4, 2), lora=_HD_LORA,
                            template="internlm-xcomposer2"),
    "xcomposer2d5": dict(family="xcomposer2", variant="2.5", tile=56, heads=(4, 1), lora=_VL_LORA,
                         template="internlm-xcomposer2d5"),
}

TINY_LLM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, rms_norm_eps=1e-5,
                rope_theta=1000000.0, max_position_embeddings=8192)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5)


def write_xcomposer2_model(spec: dict[str, Any], out: Path, seed: int) -> None:
    """Write config, tokenizer, generation config and weights of one tiny layout into ``out``."""
    from internvl_plugin.tiny import _corpus_lines

    gen = torch.Generator().manual_seed(seed)
    vocab_size, ids = _write_tokenizer(out, spec["template"], _corpus_lines())
    config = _config(spec, vocab_size)
    weights = _llm_weights(config, spec["lora"], gen)
    vit = dict(TINY_CLIP, image_size=spec.get("img_size") or spec["tile"])
    pos_size = spec.get("pos_grid_size", vit["image_size"])
    weights.update(_clip_weights(vit, pos_size, gen))
    hd = spec["variant"] != "vl"
    proj_in = vit["hidden_size"] * (4 if hd else 1)
    h = config["hidden_size"]
    weights.update({"vision_proj.0.weight": _linear(gen, h, proj_in), "vision_proj.0.bias": _normal(gen, h, std=0.1),
                    "vision_proj.2.weight": _linear(gen, h, h, gain=2.0), "vision_proj.2.bias": _normal(gen, h, std=0.1)})
    if hd:
        weights["plora_glb_GN"] = _normal(gen, 1, 1, proj_in)
        weights["plora_sub_GN"] = _normal(gen, 1, 1, 1, proj_in)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, ids["[UNUSED_TOKEN_145]"]], "pad_token_id": 2}, indent=2))
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}
    save_file(bf16, str(out / "model.safetensors"), metadata={"format": "pt"})


def _config(spec: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    heads, kv_heads = spec["heads"]
    variant = spec["variant"]
    cfg: dict[str, Any] = {
        "architectures": ["InternLM2ForCausalLM" if variant == "4khd" else "InternLMXComposer2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
                     "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"},
        "model_type": "internlm2" if variant == "2.5" else "internlmxcomposer2",
        "vocab_size": vocab_size, "hidden_act": "silu", "bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "rope_scaling": {"type": "dynamic", "factor": 1.0}, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "attn_implementation": "eager", "initializer_range": 0.02, "use_cache": True,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, **TINY_LLM,
        "max_length": 16384 if variant == "4khd" else 4096,
        # not in real configs: the tiny CLIP's widths (real checkpoints get CLIP ViT-L/14's)
        "vit_config": dict(TINY_CLIP, **({"image_size": spec["tile"]} if variant != "vl" else {})),
    }
    if variant == "vl":
        cfg["img_size"] = spec["img_size"]
    return cfg


def _normal(gen, *shape, std=1.0):
    return torch.randn(*shape, generator=gen) * std


def _linear(gen, out_f, in_f, gain=1.0):
    return _normal(gen, out_f, in_f, std=gain / in_f ** 0.5)


def _llm_weights(cfg: dict[str, Any], ranks: dict[str, int], gen) -> dict[str, torch.Tensor]:
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    qkv_out = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
    shapes = {"attention.wqkv": (qkv_out, h), "attention.wo": (h, h), "feed_forward.w1": (inter, h),
              "feed_forward.w3": (inter, h), "feed_forward.w2": (h, inter)}
    w = {"model.tok_embeddings.weight": _normal(gen, vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, (out_f, in_f) in shapes.items():
            r = ranks[name.split(".")[1]]
            w[p + name + ".weight"] = _linear(gen, out_f, in_f)
            w[p + name + ".Plora_A.weight"] = _linear(gen, r, in_f)
            w[p + name + ".Plora_B.weight"] = _linear(gen, out_f, r, gain=0.5)
        w[p + "attention_norm.weight"] = 1.0 + _normal(gen, h, std=0.1)
        w[p + "ffn_norm.weight"] = 1.0 + _normal(gen, h, std=0.1)
    w["model.norm.weight"] = 1.0 + _normal(gen, h, std=0.1)
    w["output.weight"] = _linear(gen, vocab, h, gain=3.0)  # peaky logits: greedy choices well separated
    return w


def _clip_weights(vit: dict[str, Any], pos_image_size: int, gen) -> dict[str, torch.Tensor]:
    h, inter, p = vit["hidden_size"], vit["intermediate_size"], vit["patch_size"]
    pre = "vit.vision_tower.vision_model."
    n_pos = (pos_image_size // p) ** 2 + 1
    w = {pre + "embeddings.class_embedding": _normal(gen, h),
         pre + "embeddings.patch_embedding.weight": _normal(gen, h, 3, p, p, std=(3 * p * p) ** -0.5),
         pre + "embeddings.position_embedding.weight": _normal(gen, n_pos, h, std=0.5),
         pre + "pre_layrnorm.weight": 1.0 + _normal(gen, h, std=0.1), pre + "pre_layrnorm.bias": _normal(gen, h, std=0.1),
         # unused by XComposer2 (features are taken before it); present in the released checkpoints
         pre + "post_layernorm.weight": 1.0 + _normal(gen, h, std=0.1), pre + "post_layernorm.bias": _normal(gen, h, std=0.1)}
    for i in range(vit["num_hidden_layers"]):
        lp = f"{pre}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[lp + f"self_attn.{name}.weight"] = _linear(gen, h, h)
            w[lp + f"self_attn.{name}.bias"] = _normal(gen, h, std=0.1)
        for norm in ("layer_norm1", "layer_norm2"):
            w[lp + f"{norm}.weight"] = 1.0 + _normal(gen, h, std=0.1)
            w[lp + f"{norm}.bias"] = _normal(gen, h, std=0.1)
        w[lp + "mlp.fc1.weight"] = _linear(gen, inter, h)
        w[lp + "mlp.fc1.bias"] = _normal(gen, inter, std=0.1)
        w[lp + "mlp.fc2.weight"] = _linear(gen, h, inter)
        w[lp + "mlp.fc2.bias"] = _normal(gen, h, std=0.1)
    return w


def _write_tokenizer(out: Path, template: str, corpus: list[str]) -> tuple[int, dict[str, int]]:
    """InternLM2-style sentencepiece BPE (<unk>=0 <s>=1 </s>=2, no dummy prefix) with the
    [UNUSED_TOKEN_141..146] pieces as user-defined symbols, named InternLMXComposer2Tokenizer."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=420, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=XCOMPOSER2_TOKENS,
        minloglevel=2, seed_sentencepiece_size=100000, shuffle_input_sentence=False)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    ids = {t: sp.piece_to_id(t) for t in XCOMPOSER2_TOKENS}
    added = {str(i): _added(sp.id_to_piece(i)) for i in range(3)}
    added.update({str(i): _added(t) for t, i in ids.items()})
    config = {
        "tokenizer_class": "InternLMXComposer2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm_xcomposer2.InternLMXComposer2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 8192, "added_tokens_decoder": added, "additional_special_tokens": XCOMPOSER2_TOKENS,
        "chat_template": template_text(template),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
         "additional_special_tokens": XCOMPOSER2_TOKENS}, indent=2))
    return sp.get_piece_size(), ids


def _added(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}
