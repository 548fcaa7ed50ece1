"""Plain-PyTorch reference decoders for InternVL's language models: InternLM2, Qwen2, Llama and Phi-3.

Written from the behaviour of InternVL's ``modeling_internlm2.py`` and ``modeling_phi3.py`` and
transformers' stock Qwen2 and Llama (spec A2.3); Phi-3's LongRoPE from Microsoft's description as
transformers implements it (short factors up to ``original_max_position_embeddings`` tokens, long
factors beyond, cos/sin scaled by sqrt(1 + ln(max/original) / ln(original))). One sequence, no KV cache, causal attention over positions 0..L-1: the models are tiny
and the point is to be obviously right. Module names mirror the checkpoint under
``language_model.``. Imports only torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .vision import RMSNormRef, cfg_get

__all__ = ["InternLM2ForCausalLMRef", "LlamaForCausalLMRef", "Phi3ForCausalLMRef", "Qwen2ForCausalLMRef",
           "build_language_model", "longrope_cos_sin", "split_internlm2_wqkv"]


# ----------------------------------------------------------------------------------------------
# shared math


def _rope_theta(lcfg: Any) -> float:
    theta = cfg_get(lcfg, "rope_theta")
    if theta is None:  # transformers 5 style
        theta = (cfg_get(lcfg, "rope_parameters") or {}).get("rope_theta", 10000.0)
    return float(theta)


def _rope_scaling(lcfg: Any) -> dict:
    return dict(cfg_get(lcfg, "rope_scaling") or cfg_get(lcfg, "rope_parameters") or {})


def _rope_kind(lcfg: Any) -> str:
    scaling = _rope_scaling(lcfg)
    return scaling.get("rope_type", scaling.get("type", "default"))


def _check_rope_scaling(lcfg: Any, allowed: tuple[str, ...] = ("default",)) -> None:
    scaling = _rope_scaling(lcfg)
    kind = _rope_kind(lcfg)
    if kind not in allowed:
        # 'dynamic' NTK in particular: HF rescales only past max_position_embeddings, vLLM always;
        # a reference must not silently pick one
        raise NotImplementedError(f"rope scaling {scaling!r} is not supported by the reference")


def rotary_cos_sin(length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [L, D] in fp32 for the rotate-half (NeoX) layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def longrope_cos_sin(length: int, head_dim: int, theta: float, lcfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3 LongRoPE ("su"/"longrope"): per-frequency rescale factors, short ones while the sequence fits
    ``original_max_position_embeddings``, long ones beyond; cos/sin times the attention factor."""
    scaling = _rope_scaling(lcfg)
    original = int(scaling.get("original_max_position_embeddings") or cfg_get(lcfg, "original_max_position_embeddings"))
    max_positions = int(cfg_get(lcfg, "max_position_embeddings"))
    factors = torch.tensor(scaling["long_factor" if length > original else "short_factor"], dtype=torch.float32)
    inv_freq = 1.0 / (factors * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    scale = max_positions / original
    mscale = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
    return angles.cos() * mscale, angles.sin() * mscale


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, L, D]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Hq, L, D], k/v [Hkv, L, D] -> [L, Hq*D]. Query head i reads KV head i // (Hq/Hkv);
    softmax in fp32 like the HF eager paths."""
    n_heads, length, head_dim = q.shape
    group = n_heads // k.shape[0]
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    return (probs @ v).transpose(0, 1).reshape(length, n_heads * head_dim)


class _DecoderShape:
    def __init__(self, lcfg: Any, rope_kinds: tuple[str, ...] = ("default",)):
        if cfg_get(lcfg, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"llm hidden_act {cfg_get(lcfg, 'hidden_act')!r} is not 'silu'")
        _check_rope_scaling(lcfg, rope_kinds)
        self.vocab = int(cfg_get(lcfg, "vocab_size"))
        self.hidden = int(cfg_get(lcfg, "hidden_size"))
        self.layers = int(cfg_get(lcfg, "num_hidden_layers"))
        self.heads = int(cfg_get(lcfg, "num_attention_heads"))
        self.kv_heads = int(cfg_get(lcfg, "num_key_value_heads") or self.heads)
        self.head_dim = int(cfg_get(lcfg, "head_dim") or self.hidden // self.heads)
        self.intermediate = int(cfg_get(lcfg, "intermediate_size"))
        self.eps = float(cfg_get(lcfg, "rms_norm_eps", 1e-6))
        self.theta = _rope_theta(lcfg)
        self.tied = bool(cfg_get(lcfg, "tie_word_embeddings", False))
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} attention heads do not split into {self.kv_heads} KV groups")


class _CausalLMBase(nn.Module):
    """Shared driver: ``embed`` then ``logits_from_embeds``; subclasses provide the modules,
    ``get_input_embeddings`` and ``output_weight`` (the embedding matrix when tied)."""

    shape: _DecoderShape

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.get_input_embeddings()(input_ids)

    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(length, self.shape.head_dim, self.shape.theta)

    def logits_from_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [L, H] -> logits [L, vocab]."""
        cos, sin = self.rotary(embeds.shape[0])
        h = embeds
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return F.linear(self.model.norm(h), self.output_weight())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embeds(self.embed(input_ids))


# ----------------------------------------------------------------------------------------------
# InternLM2


def split_internlm2_wqkv(
    qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output of ``wqkv`` (last dim (heads + 2*kv_heads)*D, grouped per KV head as
    [heads/kv_heads query heads, 1 key head, 1 value head]) -> q [..., heads*D], k, v [..., kv*D]."""
    group = heads // kv_heads
    lead = qkv.shape[:-1]
    grouped = qkv.reshape(*lead, kv_heads, group + 2, head_dim)
    q = grouped[..., :group, :].reshape(*lead, heads * head_dim)
    k = grouped[..., group, :].reshape(*lead, kv_heads * head_dim)
    v = grouped[..., group + 1, :].reshape(*lead, kv_heads * head_dim)
    return q, k, v


class InternLM2AttentionRef(nn.Module):
    def __init__(self, s: _DecoderShape, bias: bool):
        super().__init__()
        self.s = s
        self.wqkv = nn.Linear(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim, bias=bias)
        self.wo = nn.Linear(s.heads * s.head_dim, s.hidden, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s, length = self.s, x.shape[0]
        q, k, v = split_internlm2_wqkv(self.wqkv(x), s.heads, s.kv_heads, s.head_dim)
        q = q.view(length, s.heads, s.head_dim).transpose(0, 1)
        k = k.view(length, s.kv_heads, s.head_dim).transpose(0, 1)
        v = v.view(length, s.kv_heads, s.head_dim).transpose(0, 1)
        return self.wo(causal_gqa_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v))


class InternLM2FeedForwardRef(nn.Module):
    def __init__(self, s: _DecoderShape):
        super().__init__()
        self.w1 = nn.Linear(s.hidden, s.intermediate, bias=False)  # gate
        self.w3 = nn.Linear(s.hidden, s.intermediate, bias=False)  # up
        self.w2 = nn.Linear(s.intermediate, s.hidden, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayerRef(nn.Module):
    def __init__(self, s: _DecoderShape, bias: bool):
        super().__init__()
        self.attention_norm = RMSNormRef(s.hidden, s.eps)
        self.attention = InternLM2AttentionRef(s, bias)
        self.ffn_norm = RMSNormRef(s.hidden, s.eps)
        self.feed_forward = InternLM2FeedForwardRef(s)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.attention_norm(h), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class _InternLM2ModelRef(nn.Module):
    def __init__(self, s: _DecoderShape, bias: bool):
        super().__init__()
        self.tok_embeddings = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(InternLM2DecoderLayerRef(s, bias) for _ in range(s.layers))
        self.norm = RMSNormRef(s.hidden, s.eps)


class InternLM2ForCausalLMRef(_CausalLMBase):
    def __init__(self, lcfg: Any):
        super().__init__()
        self.shape = _DecoderShape(lcfg)
        # InternLM2's ``bias`` flag covers wqkv and wo only; released InternVL configs have it False
        self.model = _InternLM2ModelRef(self.shape, bool(cfg_get(lcfg, "bias", False)))
        if not self.shape.tied:
            self.output = nn.Linear(self.shape.hidden, self.shape.vocab, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def output_weight(self) -> torch.Tensor:
        return self.model.tok_embeddings.weight if self.shape.tied else self.output.weight


# ----------------------------------------------------------------------------------------------
# Qwen2


class Qwen2AttentionRef(nn.Module):
    """Also Llama's, where ``qkv_bias`` / ``o_bias`` follow ``attention_bias`` (False in released checkpoints)."""

    def __init__(self, s: _DecoderShape, qkv_bias: bool = True, o_bias: bool = False):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.hidden, s.heads * s.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s, length = self.s, x.shape[0]
        q = self.q_proj(x).view(length, s.heads, s.head_dim).transpose(0, 1)
        k = self.k_proj(x).view(length, s.kv_heads, s.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(length, s.kv_heads, s.head_dim).transpose(0, 1)
        return self.o_proj(causal_gqa_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v))


class Qwen2MLPRef(nn.Module):
    def __init__(self, s: _DecoderShape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayerRef(nn.Module):
    def __init__(self, s: _DecoderShape, attention: nn.Module | None = None, mlp: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = RMSNormRef(s.hidden, s.eps)
        self.self_attn = attention if attention is not None else Qwen2AttentionRef(s)
        self.post_attention_layernorm = RMSNormRef(s.hidden, s.eps)
        self.mlp = mlp if mlp is not None else Qwen2MLPRef(s)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Qwen2ModelRef(nn.Module):
    """``model.`` of Qwen2, Llama and Phi-3 (same names outside the layers' attention and MLP)."""

    def __init__(self, s: _DecoderShape, make_layer=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        make_layer = make_layer or (lambda: Qwen2DecoderLayerRef(s))
        self.layers = nn.ModuleList(make_layer() for _ in range(s.layers))
        self.norm = RMSNormRef(s.hidden, s.eps)


class Qwen2ForCausalLMRef(_CausalLMBase):
    def __init__(self, lcfg: Any):
        super().__init__()
        if cfg_get(lcfg, "use_sliding_window", False):
            raise NotImplementedError("Qwen2 sliding-window attention is not supported by the reference")
        self.shape = _DecoderShape(lcfg)
        self.model = _Qwen2ModelRef(self.shape)
        if not self.shape.tied:
            self.lm_head = nn.Linear(self.shape.hidden, self.shape.vocab, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.shape.tied else self.lm_head.weight


# ----------------------------------------------------------------------------------------------
# Llama (InternVL2-40B's Nous-Hermes-2-Yi-34B, InternVL2-Llama3-76B)


class LlamaForCausalLMRef(Qwen2ForCausalLMRef):
    """Qwen2's structure with ``attention_bias`` (default False) on q/k/v/o and no MLP bias."""

    def __init__(self, lcfg: Any):
        nn.Module.__init__(self)
        if cfg_get(lcfg, "mlp_bias", False):
            raise NotImplementedError("Llama mlp_bias is not supported by the reference")
        self.shape = s = _DecoderShape(lcfg)
        bias = bool(cfg_get(lcfg, "attention_bias", False))
        self.model = _Qwen2ModelRef(s, lambda: Qwen2DecoderLayerRef(s, Qwen2AttentionRef(s, bias, bias)))
        if not s.tied:
            self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)


# ----------------------------------------------------------------------------------------------
# Phi-3 (Mini-InternVL-Chat-4B-V1-5, InternVL2-4B)


class Phi3AttentionRef(nn.Module):
    def __init__(self, s: _DecoderShape):
        super().__init__()
        self.s = s
        # rows: q (heads*D), then k (kv*D), then v (kv*D)
        self.qkv_proj = nn.Linear(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s, length = self.s, x.shape[0]
        q, k, v = self.qkv_proj(x).split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        q = q.reshape(length, s.heads, s.head_dim).transpose(0, 1)
        k = k.reshape(length, s.kv_heads, s.head_dim).transpose(0, 1)
        v = v.reshape(length, s.kv_heads, s.head_dim).transpose(0, 1)
        return self.o_proj(causal_gqa_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v))


class Phi3MLPRef(nn.Module):
    def __init__(self, s: _DecoderShape):
        super().__init__()
        self.gate_up_proj = nn.Linear(s.hidden, 2 * s.intermediate, bias=False)  # [gate; up]
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Phi3ForCausalLMRef(Qwen2ForCausalLMRef):
    """Fused qkv_proj and gate_up_proj; rope default or LongRoPE. Sliding-window attention is ignored
    below ``sliding_window`` tokens, where it changes nothing (the reference refuses longer inputs)."""

    def __init__(self, lcfg: Any):
        nn.Module.__init__(self)
        self.lcfg = lcfg
        self.shape = s = _DecoderShape(lcfg, rope_kinds=("default", "su", "longrope"))
        if float(_rope_scaling(lcfg).get("partial_rotary_factor", 1.0)) != 1.0:
            raise NotImplementedError("Phi-3 partial_rotary_factor is not supported by the reference")
        self.sliding_window = cfg_get(lcfg, "sliding_window")
        self.model = _Qwen2ModelRef(s, lambda: Qwen2DecoderLayerRef(s, Phi3AttentionRef(s), Phi3MLPRef(s)))
        if not s.tied:
            self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)

    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sliding_window and length > int(self.sliding_window):
            raise NotImplementedError(f"{length} tokens exceed sliding_window={self.sliding_window}")
        if _rope_kind(self.lcfg) == "default":
            return super().rotary(length)
        return longrope_cos_sin(length, self.shape.head_dim, self.shape.theta, self.lcfg)


# ----------------------------------------------------------------------------------------------

LANGUAGE_MODELS = {
    "InternLM2ForCausalLM": InternLM2ForCausalLMRef,
    "Qwen2ForCausalLM": Qwen2ForCausalLMRef,
    "LlamaForCausalLM": LlamaForCausalLMRef,
    "Phi3ForCausalLM": Phi3ForCausalLMRef,
}


def build_language_model(lcfg: Any) -> _CausalLMBase:
    archs = cfg_get(lcfg, "architectures") or []
    if not archs or archs[0] not in LANGUAGE_MODELS:
        raise NotImplementedError(
            f"llm_config.architectures {archs!r}: the reference supports {sorted(LANGUAGE_MODELS)}"
        )
    return LANGUAGE_MODELS[archs[0]](lcfg)
