"""The language-model backbones awq_tools quantizes: their weight names, smoothing pairs and decoder-layer forward.

One decoder layer is all the quantizer ever runs (calibration is text-only and layer by layer, spec
internvl-and-quant.md B1.2-B1.3), so it is written here on plain tensors rather than by instantiating a model:
transformers has no InternLM2 (it is remote code, which the project never runs), and its Llama / Qwen2 / Phi-3
layers need a whole model's config and cache objects around them. The math is the standard pre-norm decoder:
RMSNorm, rotary (rotate-half) attention with grouped KV heads, SiLU-gated MLP.

Which linears share a smoothing scale (B1.5):

    norm groups   the norm before attention -> the q/k/v linears; the norm before the MLP -> gate and up
    fc groups     up -> down (all backbones); v -> o only without GQA (Qwen2/Llama/Phi-3 with as many KV heads
                  as query heads); InternLM2 has no wqkv -> wo pair, as in LMDeploy

For fused producers (Phi-3's qkv_proj and gate_up_proj) only the rows that feed the next linear are divided
(the V rows, the "up" half), which is what LMDeploy's ratio rule amounts to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["Backbone", "NormGroup", "FcGroup", "BACKBONES", "backbone_for", "llm_config_of", "llm_prefix_of",
           "rotary_tables", "UnsupportedModel"]


XCOMPOSER2_ARCH = "InternLMXComposer2ForCausalLM"


class UnsupportedModel(ValueError):
    """The checkpoint is not one awq_tools can quantize (architecture, rope scaling, activation)."""


@dataclass(frozen=True)
class NormGroup:
    norm: str                     # norm weight name inside the layer, e.g. "attention_norm"
    linears: tuple[str, ...]      # linears reading that norm's output (the first one's input is observed)
    block: str                    # "attn" or "mlp": the sub-block the scale search scores


@dataclass(frozen=True)
class FcGroup:
    prev: str                     # linear whose output rows (some of them) feed `next`
    next: str
    rows: Callable[[dict], slice]  # rows of prev's weight that make next's input, from the shape dict


@dataclass(frozen=True)
class Backbone:
    name: str                     # the LLM architecture, as in config.json
    embed: str                    # token embedding weight, relative to the LLM prefix
    linears: tuple[str, ...]      # every linear of one decoder layer (relative to the layer)
    norms: tuple[str, ...]
    norm_groups: tuple[NormGroup, ...]
    fc_groups: Callable[[dict], tuple[FcGroup, ...]]
    qkv: Callable[[Callable, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    o_proj: str
    gate_up: Callable[[Callable, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]
    down: str

    def linear_shapes(self, shape: dict) -> dict[str, tuple[int, int]]:
        """(out N, in K) of each linear of one layer."""
        h, f, q, kv = shape["hidden"], shape["ffn"], shape["q"], shape["kv"]
        table = {"attention.wqkv": (q + 2 * kv, h), "attention.wo": (h, q), "feed_forward.w1": (f, h),
                 "feed_forward.w3": (f, h), "feed_forward.w2": (h, f),
                 "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
                 "mlp.down_proj": (h, f), "self_attn.qkv_proj": (q + 2 * kv, h), "mlp.gate_up_proj": (2 * f, h)}
        return {name: table[name] for name in self.linears}

    def forward(self, w: dict[str, torch.Tensor], h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                shape: dict, observe: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
        """One decoder layer on hidden states h [B, L, H] (float32); `observe(linear, x)` sees every linear's input."""
        x = rms_norm(h, w[self.norm_groups[0].norm + ".weight"], shape["eps"])
        h = h + self.attention(w, x, rope, shape, observe)
        x = rms_norm(h, w[self.norm_groups[1].norm + ".weight"], shape["eps"])
        return h + self.mlp(w, x, shape, observe)

    def attention(self, w, x, rope, shape, observe=None) -> torch.Tensor:
        lin = _linear_fn(w, observe)
        q, k, v = self.qkv(lin, x, shape)                        # [B, L, heads, D]
        cos, sin = rope
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))         # [B, heads, L, D]
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return lin(self.o_proj, out.transpose(1, 2).flatten(2))

    def mlp(self, w, x, shape, observe=None) -> torch.Tensor:
        lin = _linear_fn(w, observe)
        gate, up = self.gate_up(lin, x, shape)
        return lin(self.down, F.silu(gate) * up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _linear_fn(w, observe):
    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        if observe is not None:
            observe(name, x)
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))
    return lin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat([-second, first], dim=-1) * sin[:, None, :]


def _heads(t: torch.Tensor, d: int) -> torch.Tensor:
    return t.unflatten(-1, (-1, d))


# -------------------------------------------------------------------------------- the backbones

def _internlm2_qkv(lin, x, s):
    # wqkv rows are grouped per KV head: [q x rep, k, v] (spec A2.3)
    qkv = lin("attention.wqkv", x).unflatten(-1, (s["kv_heads"], s["heads"] // s["kv_heads"] + 2, s["head_dim"]))
    q = qkv[..., :-2, :].flatten(2, 3)
    return q, qkv[..., -2, :], qkv[..., -1, :]


def _separate_qkv(lin, x, s):
    d = s["head_dim"]
    return (_heads(lin("self_attn.q_proj", x), d), _heads(lin("self_attn.k_proj", x), d),
            _heads(lin("self_attn.v_proj", x), d))


def _phi3_qkv(lin, x, s):
    q, k, v = lin("self_attn.qkv_proj", x).split([s["q"], s["kv"], s["kv"]], dim=-1)
    return _heads(q, s["head_dim"]), _heads(k, s["head_dim"]), _heads(v, s["head_dim"])


def _no_gqa(s: dict) -> bool:
    return s["kv_heads"] == s["heads"]


_LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_LLAMA_NORM_GROUPS = (NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                "attn"),
                      NormGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))


def _llama_fc_groups(s):
    groups = [FcGroup("mlp.up_proj", "mlp.down_proj", lambda s: slice(0, s["ffn"]))]
    if _no_gqa(s):
        groups.insert(0, FcGroup("self_attn.v_proj", "self_attn.o_proj", lambda s: slice(0, s["kv"])))
    return tuple(groups)


def _llama(name: str) -> Backbone:
    return Backbone(
        name=name, embed="model.embed_tokens.weight", linears=_LLAMA_LINEARS, norms=_LLAMA_NORMS,
        norm_groups=_LLAMA_NORM_GROUPS, fc_groups=_llama_fc_groups, qkv=_separate_qkv, o_proj="self_attn.o_proj",
        gate_up=lambda lin, x, s: (lin("mlp.gate_proj", x), lin("mlp.up_proj", x)), down="mlp.down_proj")


def _phi3_fc_groups(s):
    groups = [FcGroup("mlp.gate_up_proj", "mlp.down_proj", lambda s: slice(s["ffn"], 2 * s["ffn"]))]
    if _no_gqa(s):
        groups.insert(0, FcGroup("self_attn.qkv_proj", "self_attn.o_proj",
                                 lambda s: slice(s["q"] + s["kv"], s["q"] + 2 * s["kv"])))
    return tuple(groups)


BACKBONES: dict[str, Backbone] = {
    "InternLM2ForCausalLM": Backbone(
        name="InternLM2ForCausalLM", embed="model.tok_embeddings.weight",
        linears=("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"),
        norms=("attention_norm", "ffn_norm"),
        norm_groups=(NormGroup("attention_norm", ("attention.wqkv",), "attn"),
                     NormGroup("ffn_norm", ("feed_forward.w1", "feed_forward.w3"), "mlp")),
        fc_groups=lambda s: (FcGroup("feed_forward.w3", "feed_forward.w2", lambda s: slice(0, s["ffn"])),),
        qkv=_internlm2_qkv, o_proj="attention.wo",
        gate_up=lambda lin, x, s: (lin("feed_forward.w1", x), lin("feed_forward.w3", x)), down="feed_forward.w2"),
    "Qwen2ForCausalLM": _llama("Qwen2ForCausalLM"),
    "LlamaForCausalLM": _llama("LlamaForCausalLM"),
    "Phi3ForCausalLM": Backbone(
        name="Phi3ForCausalLM", embed="model.embed_tokens.weight",
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        norms=_LLAMA_NORMS,
        norm_groups=(NormGroup("input_layernorm", ("self_attn.qkv_proj",), "attn"),
                     NormGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp")),
        fc_groups=_phi3_fc_groups, qkv=_phi3_qkv, o_proj="self_attn.o_proj",
        gate_up=lambda lin, x, s: lin("mlp.gate_up_proj", x).chunk(2, dim=-1), down="mlp.down_proj"),
}


def llm_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: InternVL's ``llm_config``, else the top level (plain LLMs)."""
    return config.get("llm_config") or config


def llm_prefix_of(config: dict[str, Any]) -> str:
    return "language_model." if "llm_config" in config else ""


def backbone_for(config: dict[str, Any]) -> tuple[Backbone, dict]:
    """The backbone of a checkpoint's config.json and its shape dict; UnsupportedModel with one line if not ours."""
    top = (config.get("architectures") or ["?"])[0]
    if top not in ("InternVLChatModel", XCOMPOSER2_ARCH, *BACKBONES):
        raise UnsupportedModel(f"architecture {top!r} is not supported; awq_tools quantizes InternVLChatModel "
                               f"(InternLM2, Qwen2, Llama, Phi-3 backbones), {XCOMPOSER2_ARCH} and "
                               f"{', '.join(BACKBONES)}")
    lcfg = llm_config_of(config)
    # XComposer2's language model is InternLM2 with Partial-LoRA beside its linears (quantize.py folds them)
    arch = "InternLM2ForCausalLM" if top == XCOMPOSER2_ARCH else (lcfg.get("architectures") or ["?"])[0]
    if arch not in BACKBONES:
        raise UnsupportedModel(f"language model architecture {arch!r} is not supported; "
                               f"choose a checkpoint with one of {', '.join(BACKBONES)}")
    act = lcfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"llm hidden_act {act!r} is not supported (only silu)")
    try:
        heads = int(lcfg["num_attention_heads"])
        hidden = int(lcfg["hidden_size"])
        kv_heads = int(lcfg.get("num_key_value_heads") or heads)
        head_dim = int(lcfg.get("head_dim") or hidden // heads)
        shape = dict(hidden=hidden, ffn=int(lcfg["intermediate_size"]), heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, q=heads * head_dim, kv=kv_heads * head_dim,
                     layers=int(lcfg["num_hidden_layers"]), eps=float(lcfg.get("rms_norm_eps", 1e-6)),
                     vocab=int(lcfg["vocab_size"]))
    except KeyError as exc:
        raise UnsupportedModel(f"llm config lacks {exc.args[0]!r}") from None
    _rope_inv_freq(lcfg, shape, 1)  # rejects an unknown rope scaling up front
    return BACKBONES[arch], shape


def rotary_tables(lcfg: dict, shape: dict, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, D] float32 for positions 0..L-1 under the config's rope scaling."""
    inv_freq, attention_factor = _rope_inv_freq(lcfg, shape, length)
    pos = torch.arange(length, dtype=torch.float32)
    if (lcfg.get("rope_scaling") or {}).get("type", (lcfg.get("rope_scaling") or {}).get("rope_type")) == "linear":
        pos = pos / float(lcfg["rope_scaling"]["factor"])
    angles = pos[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def _rope_inv_freq(lcfg: dict, shape: dict, length: int) -> tuple[torch.Tensor, float]:
    d = shape["head_dim"]
    theta = float(lcfg.get("rope_theta") or (lcfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0)
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    scaling = lcfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", "linear"):
        return inv_freq, 1.0
    if kind == "dynamic":
        # dynamic NTK only changes positions past max_position_embeddings; calibration windows stay below
        if length > int(lcfg.get("max_position_embeddings", length)):
            raise UnsupportedModel(f"--calib-seqlen {length} exceeds max_position_embeddings under dynamic rope")
        return inv_freq, 1.0
    if kind == "llama3":
        factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(
            scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled), 1.0
    if kind in ("longrope", "su"):
        old = int(lcfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings"))
        factors = scaling["short_factor"] if length <= old else scaling["long_factor"]
        ext = torch.tensor(factors, dtype=torch.float32)
        ratio = int(lcfg["max_position_embeddings"]) / old
        attention_factor = 1.0 if ratio <= 1 else math.sqrt(1 + math.log(ratio) / math.log(old))
        return inv_freq / ext, attention_factor
    raise UnsupportedModel(f"rope scaling {kind!r} is not supported")
