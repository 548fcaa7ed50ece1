"""Tiny random-weight checkpoints with the real layout of InternVL / InternLM2 checkpoints.

Used by the tests and by ``hub_cli demo``: real ``config.json`` keys (including the ``auto_map``
into remote code that must *not* run), real weight names, a real tokenizer layout (a sentencepiece
``tokenizer.model`` for InternLM2, a byte-level BPE ``tokenizer.json`` for Qwen2, both trained here
on text the project ships, plus InternVL's added special tokens), only small widths. Deterministic
from a seed. A folder is written under a temporary name and renamed when complete.

    build_tiny_model("internvl2-2b", "/tmp/tiny-internvl2-2b")
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from internvl_plugin.chat_templates import template_text

__all__ = ["LAYOUTS", "build_tiny_model", "INTERNVL_SPECIAL_TOKENS", "write_folder_atomically"]

FACTORY_VERSION = 2
DATA_DIR = Path(__file__).parent / "data"
INTERNVL_SPECIAL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                           "<box>", "</box>"]
INTERNLM2_CHAT_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>",
                         "<|im_end|>", "<|im_start|>"]
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# layout name -> what differs between the real models it imitates (spec internvl-and-quant A1)
LAYOUTS: dict[str, dict[str, Any]] = {
    # InternVL2-2B: InternViT-300M (layer_norm, qkv bias) + mlp1 + InternLM2, pixel shuffle v2
    "internvl2-2b": dict(llm="internlm2", vit="300m", ps_version="v2", template="internlm2-chat"),
    # InternVL2-1B: same tower, Qwen2 backbone, Hermes-2 template
    "internvl2-1b": dict(llm="qwen2", vit="300m", ps_version="v2", template="Hermes-2"),
    # InternVL-Chat-V1-5: InternViT-6B style (rms_norm, qk_normalization, no qkv bias), ps v1
    "internvl-chat-v1-5": dict(llm="internlm2", vit="6b", ps_version="v1", template="internlm2-chat"),
    # InternVL2.5-2B-like: v2, internvl2_5 template
    "internvl2_5-2b": dict(llm="internlm2", vit="300m", ps_version="v2", template="internvl2_5"),
    # Mini-InternVL-Chat-4B-V1-5: InternViT-300M + Phi-3-mini (tiny_backbones.py), ps v2, phi3-chat
    "mini-internvl-4b": dict(llm="phi3", vit="300m", ps_version="v2", template="phi3-chat"),
    # InternVL2-40B: InternViT-6B style + Nous-Hermes-2-Yi-34B (Llama, Yi tokenizer), ps v2, Hermes-2
    "internvl2-40b": dict(llm="llama", vit="6b", ps_version="v2", template="Hermes-2"),
    # text-only InternLM2 chat model (no vision)
    "internlm2": dict(llm="internlm2", vit=None, template="internlm2-chat"),
}
# InternLM-XComposer2 layouts (xcomposer2-vl-1.8b, -vl-7b, -7b, -4khd, xcomposer2d5): tiny_xcomposer2.py
from internvl_plugin.tiny_xcomposer2 import XCOMPOSER2_LAYOUTS  # noqa: E402

LAYOUTS.update(XCOMPOSER2_LAYOUTS)

# vLLM's CPU attention kernels need head_dim in {32, 64, 80, 96, 112, 128, ...}: 32 for InternLM2
# (4 heads, 2 KV heads), 64 for Qwen2 as in Qwen2-0.5B (2 heads, 1 KV head).
TINY_LLM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, rms_norm_eps=1e-6,
                rope_theta=1000000.0, max_position_embeddings=8192)
TINY_HEADS = {"internlm2": dict(num_attention_heads=4, num_key_value_heads=2),
              "qwen2": dict(num_attention_heads=2, num_key_value_heads=1)}
TINY_VIT = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                image_size=448, patch_size=14)


def build_tiny_model(layout: str, out_dir: str | os.PathLike, *, seed: int = 0,
                     max_dynamic_patch: int = 6, overwrite: bool = False) -> Path:
    """Write a tiny checkpoint of ``layout`` to ``out_dir`` (reused if already built the same way)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown tiny layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out = Path(out_dir)
    stamp = {"factory_version": FACTORY_VERSION, "layout": layout, "seed": seed,
             "max_dynamic_patch": max_dynamic_patch}
    stamp_file = out / "tiny_build.json"
    if out.exists() and not overwrite:
        if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
            return out
        raise FileExistsError(f"{out} exists and is not this tiny model; pass overwrite=True or pick another folder")

    def write(tmp: Path) -> None:
        _write_model(LAYOUTS[layout], tmp, seed, max_dynamic_patch)
        (tmp / "tiny_build.json").write_text(json.dumps(stamp, indent=2))

    return write_folder_atomically(out, write)


def write_folder_atomically(out: Path, write) -> Path:
    """Run ``write(tmp)`` on a hidden sibling folder, then rename it to ``out``; on any failure or
    interrupt remove it, so ``out`` is either complete or untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_model(spec: dict[str, Any], out: Path, seed: int, max_dynamic_patch: int) -> None:
    if spec.get("family") == "xcomposer2":
        from internvl_plugin.tiny_xcomposer2 import write_xcomposer2_model

        return write_xcomposer2_model(spec, out, seed)
    gen = torch.Generator().manual_seed(seed)
    if spec["llm"] == "internlm2":
        vocab_size = _write_internlm2_tokenizer(out, spec["template"], with_internvl_tokens=spec["vit"] is not None)
        llm_cfg = _internlm2_config(vocab_size)
        llm_weights = _internlm2_weights(llm_cfg, gen)
    elif spec["llm"] in ("phi3", "llama"):
        from internvl_plugin.tiny_backbones import write_backbone

        llm_cfg, llm_weights = write_backbone(spec["llm"], out, gen, template_text=template_text(spec["template"]),
                                              internvl_tokens=INTERNVL_SPECIAL_TOKENS, tiny_llm=TINY_LLM,
                                              corpus=_corpus_lines())
    else:
        vocab_size = _write_qwen2_tokenizer(out, spec["template"])
        llm_cfg = _qwen2_config(vocab_size)
        llm_weights = _qwen2_weights(llm_cfg, gen)

    if spec["vit"] is None:
        config, weights = llm_cfg, llm_weights
    else:
        vit_cfg = _vit_config(spec["vit"])
        config = _internvl_config(vit_cfg, llm_cfg, spec, max_dynamic_patch)
        weights = {f"language_model.{k}": v for k, v in llm_weights.items()}
        weights.update(_vit_weights(vit_cfg, gen))
        weights.update(_mlp1_weights(vit_cfg["hidden_size"] * 4, llm_cfg["hidden_size"], gen))
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": config.get("eos_token_id", llm_cfg["eos_token_id"])}, indent=2))
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}
    save_file(bf16, str(out / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------- configs

def _internlm2_config(vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2", "vocab_size": vocab_size, "hidden_act": "silu", "bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attn_implementation": "eager",
        "initializer_range": 0.02, "use_cache": True, **TINY_LLM, **TINY_HEADS["internlm2"],
    }


def _qwen2_config(vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab_size,
        "hidden_act": "silu", "bos_token_id": None, "eos_token_id": vocab_size - len(INTERNVL_SPECIAL_TOKENS) - 1,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": 2, "attention_dropout": 0.0, "rope_scaling": None,
        "initializer_range": 0.02, "use_cache": True, **TINY_LLM, **TINY_HEADS["qwen2"],
    }


def _vit_config(kind: str) -> dict[str, Any]:
    six_b = kind == "6b"
    return {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "num_channels": 3,
        "qkv_bias": not six_b, "qk_normalization": six_b, "norm_type": "rms_norm" if six_b else "layer_norm",
        "layer_norm_eps": 1e-6, "hidden_act": "gelu", "use_flash_attn": False, "dropout": 0.0,
        "drop_path_rate": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02,
        "initializer_factor": 1.0, **TINY_VIT,
    }


def _internvl_config(vit_cfg, llm_cfg, spec, max_dynamic_patch) -> dict[str, Any]:
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "model_type": "internvl_chat", "torch_dtype": "bfloat16", "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": vit_cfg["image_size"], "min_dynamic_patch": 1,
        "max_dynamic_patch": max_dynamic_patch, "ps_version": spec["ps_version"], "select_layer": -1,
        "template": spec["template"], "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
        "pad2square": False, "vision_config": vit_cfg, "llm_config": llm_cfg,
    }


# ---------------------------------------------------------------- weights

def _normal(gen, *shape, std=1.0):
    return torch.randn(*shape, generator=gen) * std


def _linear(gen, out_f, in_f, gain=1.0):
    return _normal(gen, out_f, in_f, std=gain / in_f ** 0.5)


def _norm(gen, n):
    return 1.0 + _normal(gen, n, std=0.1)


def _internlm2_weights(cfg, gen) -> dict[str, torch.Tensor]:
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    qkv_out = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
    w = {"model.tok_embeddings.weight": _normal(gen, vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "attention.wqkv.weight"] = _linear(gen, qkv_out, h)
        w[p + "attention.wo.weight"] = _linear(gen, h, h)
        w[p + "feed_forward.w1.weight"] = _linear(gen, inter, h)
        w[p + "feed_forward.w3.weight"] = _linear(gen, inter, h)
        w[p + "feed_forward.w2.weight"] = _linear(gen, h, inter)
        w[p + "attention_norm.weight"] = _norm(gen, h)
        w[p + "ffn_norm.weight"] = _norm(gen, h)
    w["model.norm.weight"] = _norm(gen, h)
    w["output.weight"] = _linear(gen, vocab, h, gain=3.0)  # peaky logits: greedy choices well separated
    return w


def _qwen2_weights(cfg, gen) -> dict[str, torch.Tensor]:
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    w = {"model.embed_tokens.weight": _normal(gen, vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, out_f in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            w[p + f"self_attn.{name}.weight"] = _linear(gen, out_f, h)
            w[p + f"self_attn.{name}.bias"] = _normal(gen, out_f, std=0.1)
        w[p + "self_attn.o_proj.weight"] = _linear(gen, h, h)
        w[p + "mlp.gate_proj.weight"] = _linear(gen, inter, h)
        w[p + "mlp.up_proj.weight"] = _linear(gen, inter, h)
        w[p + "mlp.down_proj.weight"] = _linear(gen, h, inter)
        w[p + "input_layernorm.weight"] = _norm(gen, h)
        w[p + "post_attention_layernorm.weight"] = _norm(gen, h)
    w["model.norm.weight"] = _norm(gen, h)
    w["lm_head.weight"] = _linear(gen, vocab, h, gain=3.0)
    return w


def _vit_weights(cfg, gen) -> dict[str, torch.Tensor]:
    h, inter, p = cfg["hidden_size"], cfg["intermediate_size"], cfg["patch_size"]
    n_pos = 1 + (cfg["image_size"] // p) ** 2
    pre = "vision_model."
    w = {pre + "embeddings.class_embedding": _normal(gen, 1, 1, h),
         pre + "embeddings.patch_embedding.weight": _normal(gen, h, 3, p, p, std=(3 * p * p) ** -0.5),
         pre + "embeddings.patch_embedding.bias": _normal(gen, h, std=0.1),
         pre + "embeddings.position_embedding": _normal(gen, 1, n_pos, h, std=0.5)}
    layer_norm = cfg["norm_type"] == "layer_norm"
    for i in range(cfg["num_hidden_layers"]):
        lp = f"{pre}encoder.layers.{i}."
        for norm in ("norm1", "norm2"):
            w[lp + f"{norm}.weight"] = _norm(gen, h)
            if layer_norm:
                w[lp + f"{norm}.bias"] = _normal(gen, h, std=0.1)
        w[lp + "attn.qkv.weight"] = _linear(gen, 3 * h, h)
        if cfg["qkv_bias"]:
            w[lp + "attn.qkv.bias"] = _normal(gen, 3 * h, std=0.1)
        if cfg["qk_normalization"]:
            w[lp + "attn.q_norm.weight"] = _norm(gen, h)
            w[lp + "attn.k_norm.weight"] = _norm(gen, h)
        w[lp + "attn.proj.weight"] = _linear(gen, h, h)
        w[lp + "attn.proj.bias"] = _normal(gen, h, std=0.1)
        w[lp + "ls1"] = 0.5 + _normal(gen, h, std=0.1)
        w[lp + "ls2"] = 0.5 + _normal(gen, h, std=0.1)
        w[lp + "mlp.fc1.weight"] = _linear(gen, inter, h)
        w[lp + "mlp.fc1.bias"] = _normal(gen, inter, std=0.1)
        w[lp + "mlp.fc2.weight"] = _linear(gen, h, inter)
        w[lp + "mlp.fc2.bias"] = _normal(gen, h, std=0.1)
    return w


def _mlp1_weights(in_f, out_f, gen) -> dict[str, torch.Tensor]:
    return {"mlp1.0.weight": _norm(gen, in_f), "mlp1.0.bias": _normal(gen, in_f, std=0.1),
            "mlp1.1.weight": _linear(gen, out_f, in_f), "mlp1.1.bias": _normal(gen, out_f, std=0.1),
            "mlp1.3.weight": _linear(gen, out_f, out_f, gain=2.0), "mlp1.3.bias": _normal(gen, out_f, std=0.1)}


# ---------------------------------------------------------------- tokenizers

def _corpus_lines() -> list[str]:
    return (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()


def _added_token(content: str, special: bool = True) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def _write_internlm2_tokenizer(out: Path, template: str, with_internvl_tokens: bool) -> int:
    """sentencepiece BPE like InternLM2's: <unk>=0 <s>=1 </s>=2, ChatML tokens as user pieces, no
    dummy "▁" prefix (InternLM2's normalizer has add_dummy_prefix off; llama.cpp's converter reads it)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()), model_writer=model, vocab_size=420, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=INTERNLM2_CHAT_TOKENS,
        minloglevel=2, seed_sentencepiece_size=100000, shuffle_input_sentence=False)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    base = sp.get_piece_size()
    added = {str(i): _added_token(sp.id_to_piece(i)) for i in range(3)}
    added.update({str(sp.piece_to_id(t)): _added_token(t) for t in INTERNLM2_CHAT_TOKENS})
    extra = INTERNVL_SPECIAL_TOKENS if with_internvl_tokens else []
    added.update({str(base + i): _added_token(t) for i, t in enumerate(extra)})
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 8192, "added_tokens_decoder": added,
        "additional_special_tokens": INTERNLM2_CHAT_TOKENS + extra,
        "chat_template": template_text(template),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
         "additional_special_tokens": INTERNLM2_CHAT_TOKENS + extra}, indent=2))
    return base + len(extra)


# GPT-4-style split used by Qwen2's tokenizer.json pre-tokenizer
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _write_qwen2_tokenizer(out: Path, template: str) -> int:
    """byte-level BPE tokenizer.json like Qwen2's, with Qwen2's and InternVL's special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_lines(), trainer)
    specials = QWEN2_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    base = tok.get_vocab_size(with_added_tokens=False)
    added = {str(tok.token_to_id(t)): _added_token(t) for t in specials}
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "clean_up_tokenization_spaces": False,
        "model_max_length": 8192, "errors": "replace", "split_special_tokens": False,
        "added_tokens_decoder": added, "additional_special_tokens": INTERNVL_SPECIAL_TOKENS,
        "chat_template": template_text(template),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return base + len(specials)
