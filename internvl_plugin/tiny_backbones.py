"""Phi-3 and Llama (Yi) language models for the tiny InternVL checkpoints of ``tiny.py``.

Mini-InternVL-Chat-4B-V1-5 / InternVL2-4B put Phi-3-mini-128k-instruct behind the vision tower;
InternVL2-40B Nous-Hermes-2-Yi-34B, a ``LlamaForCausalLM`` with Yi's tokenizer (spec
internvl-and-quant A1, A2.3). What is kept from the real checkpoints, at tiny widths:

* Phi-3: fused ``self_attn.qkv_proj`` ([q; k; v] rows) and ``mlp.gate_up_proj`` ([gate; up] rows),
  MHA with head_dim 96 (Phi-3-mini's, not a power of two), LongRoPE in its 2024 spelling
  (``rope_scaling.type = "su"``, short/long factors, original_max_position_embeddings 4096 of
  131072), ``sliding_window``, the Llama-2 sentencepiece tokenizer (``<unk>``/``<s>``/``</s>`` = 0/1/2,
  a dummy "▁" prefix, BOS added) and Phi-3's added chat tokens from id 32000-style ``base`` on.
* Yi / Llama: separate q/k/v/o and gate/up/down projections without bias, GQA, rope_theta 5e6, Yi's
  sentencepiece layout (``<unk>``/``<|startoftext|>``/``<|endoftext|>`` = 0/1/2, ChatML tokens as
  ordinary pieces, no dummy prefix, no BOS added) and EOS ``<|im_end|>``.

The tokenizers are trained here on the project's corpus, like ``tiny.py``'s InternLM2 one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from internvl_plugin.tiny import _linear, _norm, _qwen2_weights

__all__ = ["BACKBONES", "write_backbone"]

BACKBONES = ("phi3", "llama")

# Phi-3-mini's added tokens in id order after the sentencepiece vocabulary (32000..32010 in the real one)
PHI3_ADDED_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
                     "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>",
                     "<|placeholder6|>", "<|user|>"]
# Yi reserves these as sentencepiece pieces 3..7 (ids of the real tokenizer), before the ordinary vocabulary
YI_RESERVED_PIECES = ["<|Human|>", "<|Assistant|>", "<|System|>", "<|im_start|>", "<|im_end|>"]


def write_backbone(kind: str, out: Path, gen: torch.Generator, *, template_text: str, internvl_tokens: list[str],
                   tiny_llm: dict[str, Any], corpus: list[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Write the tokenizer files of backbone ``kind`` into ``out``; return (llm_config, weights)."""
    if kind == "phi3":
        vocab, eos = _write_phi3_tokenizer(out, template_text, internvl_tokens, corpus)
        cfg = _phi3_config(vocab, eos, tiny_llm)
        return cfg, _phi3_weights(cfg, gen)
    if kind == "llama":
        vocab, eos = _write_yi_tokenizer(out, template_text, internvl_tokens, corpus)
        cfg = _llama_config(vocab, eos, tiny_llm)
        return cfg, _llama_weights(cfg, gen)
    raise ValueError(f"unknown backbone {kind!r}; choose one of {BACKBONES}")


# ---------------------------------------------------------------- configs

def _phi3_config(vocab_size: int, eos_id: int, tiny_llm: dict[str, Any]) -> dict[str, Any]:
    head_dim = 96
    heads = 2
    half = head_dim // 2
    # factors as LongRoPE ships them: ~1 for high frequencies, growing for low ones
    short = [round(1.0 + 0.05 * i / half, 4) for i in range(half)]
    long = [round(1.0 + 10.0 * (i / half) ** 2, 4) for i in range(half)]
    return {
        "architectures": ["Phi3ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                     "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
        "model_type": "phi3", "vocab_size": vocab_size, "hidden_act": "silu",
        "hidden_size": heads * head_dim, "intermediate_size": tiny_llm["intermediate_size"],
        "num_hidden_layers": tiny_llm["num_hidden_layers"], "num_attention_heads": heads,
        "num_key_value_heads": heads, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "su", "short_factor": short, "long_factor": long},
        "sliding_window": 262144, "attention_dropout": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
        "bos_token_id": 1, "eos_token_id": eos_id, "pad_token_id": eos_id, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "initializer_range": 0.02, "use_cache": True,
    }


def _llama_config(vocab_size: int, eos_id: int, tiny_llm: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_act": "silu", "hidden_size": tiny_llm["hidden_size"],
        "intermediate_size": tiny_llm["intermediate_size"], "num_hidden_layers": tiny_llm["num_hidden_layers"],
        "num_attention_heads": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 5000000.0,
        "rope_scaling": None, "max_position_embeddings": 4096, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "pretraining_tp": 1, "bos_token_id": 1, "eos_token_id": eos_id, "pad_token_id": 0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "initializer_range": 0.02, "use_cache": True,
    }


# ---------------------------------------------------------------- weights

def _phi3_weights(cfg, gen) -> dict[str, torch.Tensor]:
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    w = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=gen)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.qkv_proj.weight"] = _linear(gen, h + 2 * kv, h)
        w[p + "self_attn.o_proj.weight"] = _linear(gen, h, h)
        w[p + "mlp.gate_up_proj.weight"] = _linear(gen, 2 * inter, h)
        w[p + "mlp.down_proj.weight"] = _linear(gen, h, inter)
        w[p + "input_layernorm.weight"] = _norm(gen, h)
        w[p + "post_attention_layernorm.weight"] = _norm(gen, h)
    w["model.norm.weight"] = _norm(gen, h)
    w["lm_head.weight"] = _linear(gen, vocab, h, gain=3.0)  # peaky logits: greedy choices well separated
    return w


def _llama_weights(cfg, gen) -> dict[str, torch.Tensor]:
    # Qwen2's names and shapes without its q/k/v biases (attention_bias false)
    return {k: v for k, v in _qwen2_weights(cfg, gen).items() if not k.endswith("_proj.bias")}


# ---------------------------------------------------------------- tokenizers

def _added_token(content: str, special: bool = True) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def _train_sentencepiece(corpus: list[str], *, bos: str, eos: str, user_symbols: list[str],
                         dummy_prefix: bool) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=420, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece=bos, eos_piece=eos,
        user_defined_symbols=user_symbols, minloglevel=2, seed_sentencepiece_size=100000,
        shuffle_input_sentence=False)
    return model.getvalue()


def _write_tokenizer_files(out: Path, proto: bytes, config: dict[str, Any], special_map: dict[str, Any]) -> None:
    (out / "tokenizer.model").write_bytes(proto)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False))


def _write_phi3_tokenizer(out: Path, template_text: str, internvl_tokens: list[str],
                          corpus: list[str]) -> tuple[int, int]:
    """Llama-2 sentencepiece model + Phi-3's added chat tokens + InternVL's; returns (vocab, eos id)."""
    import sentencepiece as spm

    proto = _train_sentencepiece(corpus, bos="<s>", eos="</s>", user_symbols=[], dummy_prefix=True)
    base = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    added_list = PHI3_ADDED_TOKENS + internvl_tokens
    added = {"0": _added_token("<unk>"), "1": _added_token("<s>"), "2": _added_token("</s>", special=False)}
    # Phi-3 marks its placeholders and chat tokens non-special except <|endoftext|>; InternVL's are special
    added.update({str(base + i): _added_token(t, special=t == "<|endoftext|>" or t in internvl_tokens)
                  for i, t in enumerate(added_list)})
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
        "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 131072,
        "padding_side": "left", "sp_model_kwargs": {}, "use_default_system_prompt": False,
        "added_tokens_decoder": added, "additional_special_tokens": internvl_tokens,
        "chat_template": template_text,
    }
    _write_tokenizer_files(out, proto, config, {
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
        "additional_special_tokens": internvl_tokens})
    return base + len(added_list), base + PHI3_ADDED_TOKENS.index("<|end|>")


def _write_yi_tokenizer(out: Path, template_text: str, internvl_tokens: list[str],
                        corpus: list[str]) -> tuple[int, int]:
    """Yi's sentencepiece layout + InternVL's added tokens; returns (vocab, eos id = <|im_end|>)."""
    import sentencepiece as spm

    proto = _train_sentencepiece(corpus, bos="<|startoftext|>", eos="<|endoftext|>",
                                 user_symbols=YI_RESERVED_PIECES, dummy_prefix=False)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    base = sp.get_piece_size()
    added = {str(i): _added_token(sp.id_to_piece(i)) for i in range(3)}
    added.update({str(sp.piece_to_id(t)): _added_token(t) for t in YI_RESERVED_PIECES})
    added.update({str(base + i): _added_token(t) for i, t in enumerate(internvl_tokens)})
    # Yi's tokenizer adds no BOS, and InternVL's chat() tokenizes the prompt as it is: the template must
    # not emit one either
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
        "add_prefix_space": False, "legacy": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": 4096, "sp_model_kwargs": {},
        "added_tokens_decoder": added, "additional_special_tokens": YI_RESERVED_PIECES[3:] + internvl_tokens,
        "chat_template": template_text.replace("{%- if bos_token %}{{- bos_token }}{% endif -%}\n", ""),
    }
    _write_tokenizer_files(out, proto, config, {
        "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<unk>",
        "additional_special_tokens": YI_RESERVED_PIECES[3:] + internvl_tokens})
    return base + len(internvl_tokens), sp.piece_to_id("<|im_end|>")
