"""The models hub_cli knows: InternVL 1.5 / 2 / 2.5 and InternLM-XComposer2, with hub ids, sizes and memory.

Pairs of vision tower and language model: shared/specs/internvl-and-quant.md A1.1 and xcomposer2.md §0.1,
§1.2–1.3. Shapes: A1.2 / A1.3 where the spec has them; the others are the public configs of the backbones
and are marked unverified in ``source``. Parameter counts are computed from the shapes (InternVL checkpoints
keep a separate LM head, so embeddings are counted twice). ModelScope ids: the spec gives none, so the HF
id is used and flagged ``modelscope_verified=False``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from internvl_plugin.memory import (QUANT_POLICIES, LLMShape, VisionShape, WeightEstimate, estimate_weights,
                                    internvl_projector_params, kv_bytes_per_token, plora_params,
                                    xcomposer_projector_params)

__all__ = ["ModelEntry", "CATALOGUE", "find", "rows"]

_SPEC = "spec internvl-and-quant.md A1.2"
_UNVERIFIED = "public config of the backbone; not verified in the specs"

# -- language models ----------------------------------------------------------------------------------------
INTERNLM2_1_8B = LLMShape("internlm2-chat-1_8b", 24, 2048, 16, 8, 128, 8192, 92544, source=_SPEC)
INTERNLM2_5_1_8B = LLMShape("internlm2_5-1_8b-chat", 24, 2048, 16, 8, 128, 8192, 92544,
                            source=_UNVERIFIED + " (assumed the internlm2-1.8b shape)")
INTERNLM2_7B = LLMShape("internlm2-7b", 32, 4096, 32, 8, 128, 14336, 92544, source="spec xcomposer2.md §1.2")
INTERNLM2_5_7B = LLMShape("internlm2_5-7b-chat", 32, 4096, 32, 8, 128, 14336, 92544,
                          source=_SPEC + " (heads / kv heads not verified there)")
INTERNLM2_20B = LLMShape("internlm2-chat-20b", 48, 6144, 48, 8, 128, 16384, 92544, source=_SPEC)
INTERNLM2_5_20B = LLMShape("internlm2_5-20b-chat", 48, 6144, 48, 8, 128, 16384, 92544,
                           source=_UNVERIFIED + " (assumed the internlm2-20b shape)")
PHI3_MINI = LLMShape("Phi-3-mini-128k-instruct", 32, 3072, 32, 32, 96, 8192, 32064,
                     source=_SPEC + " (not verified there)")
QWEN2_0_5B = LLMShape("Qwen2-0.5B-Instruct", 24, 896, 14, 2, 64, 4864, 151936,
                      source=_SPEC + " (hidden, heads, head_dim); layers, FFN, vocab: " + _UNVERIFIED)
QWEN2_5_0_5B = LLMShape("Qwen2.5-0.5B-Instruct", 24, 896, 14, 2, 64, 4864, 151936, source=QWEN2_0_5B.source)
QWEN2_5_3B = LLMShape("Qwen2.5-3B-Instruct", 36, 2048, 16, 2, 128, 11008, 151936, source=_UNVERIFIED)
QWEN2_5_32B = LLMShape("Qwen2.5-32B-Instruct", 64, 5120, 40, 8, 128, 27648, 152064, source=_UNVERIFIED)
QWEN2_5_72B = LLMShape("Qwen2.5-72B-Instruct", 80, 8192, 64, 8, 128, 29568, 152064, source=_UNVERIFIED)
YI_34B = LLMShape("Nous-Hermes-2-Yi-34B", 60, 7168, 56, 8, 128, 20480, 64007, source=_SPEC)
LLAMA3_70B = LLMShape("Hermes-2-Theta-Llama-3-70B", 80, 8192, 64, 8, 128, 28672, 128256,
                      source="spec internvl-and-quant.md B5.3 (Llama-3-70B shape, not verified there)")

# -- vision towers ------------------------------------------------------------------------------------------
INTERNVIT_6B = VisionShape("InternViT-6B-448px-V1-5", 45, 3200, 12800, qkv_bias=False, layer_norm=False,
                           layer_scale=True, source="spec internvl-and-quant.md A1.3")
INTERNVIT_6B_V2_5 = VisionShape("InternViT-6B-448px-V2_5", 45, 3200, 12800, qkv_bias=False, layer_norm=False,
                                layer_scale=True, source="assumed the V1-5 shape (A1.3)")
INTERNVIT_300M = VisionShape("InternViT-300M-448px", 24, 1024, 4096, layer_scale=True,
                             source="spec A1.3 (values recalled there, not verified)")
INTERNVIT_300M_V2_5 = VisionShape("InternViT-300M-448px-V2_5", 24, 1024, 4096, layer_scale=True,
                                  source=INTERNVIT_300M.source)
CLIP_L14_490 = VisionShape("clip-vit-large-patch14 @490", 24, 1024, 4096, image_size=490,
                           source="spec xcomposer2.md §1.3")
CLIP_L14_336 = VisionShape("clip-vit-large-patch14-336", 24, 1024, 4096, image_size=336,
                           source="spec xcomposer2.md §1.3")
CLIP_L14_560 = VisionShape("internlm-xcomposer2d5-clip @560", 24, 1024, 4096, image_size=560,
                           source="spec xcomposer2.md §1.3")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    hf_id: str
    llm: LLMShape
    vision: VisionShape
    projector_params: int
    extra_fp16_params: int = 0      # XComposer2: Partial-LoRA + separators
    modelscope_id: str = ""
    modelscope_verified: bool = False
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def params(self) -> int:
        return self.vision.params + self.projector_params + self.llm.params + self.extra_fp16_params

    def weights(self, weight_format: str = "fp16", group_size: int = 128) -> WeightEstimate:
        return estimate_weights(self.llm, vision_params=self.vision.params, projector_params=self.projector_params,
                                extra_fp16_params=self.extra_fp16_params, weight_format=weight_format,
                                group_size=group_size)

    def kv_bytes_per_token(self, quant_policy: int = 0) -> int:
        return kv_bytes_per_token(self.llm, quant_policy)

    def as_dict(self, group_size: int = 128, tokens: int = 0) -> dict[str, Any]:
        fp16, w4 = self.weights("fp16", group_size), self.weights("w4a16", group_size)
        kv = {str(q): self.kv_bytes_per_token(q) for q in QUANT_POLICIES}
        out: dict[str, Any] = {
            "name": self.name, "family": self.family, "hf_id": self.hf_id,
            "modelscope_id": self.modelscope_id, "modelscope_verified": self.modelscope_verified,
            "params": self.params,
            "parts": {"vision": self.vision.params, "projector": self.projector_params,
                      "llm": self.llm.params, "extra_fp16": self.extra_fp16_params},
            "llm": {"name": self.llm.name, "layers": self.llm.layers, "hidden": self.llm.hidden,
                    "heads": self.llm.heads, "kv_heads": self.llm.kv_heads, "head_dim": self.llm.head_dim,
                    "ffn": self.llm.ffn, "vocab": self.llm.vocab, "source": self.llm.source},
            "vision": {"name": self.vision.name, "layers": self.vision.layers, "hidden": self.vision.hidden,
                       "ffn": self.vision.ffn, "source": self.vision.source},
            "weights_bytes": {"fp16": fp16.total_bytes, "w4a16": w4.total_bytes},
            "weights_detail": {"fp16": fp16.as_dict(), "w4a16": w4.as_dict()},
            "kv_bytes_per_token": kv,
            "notes": self.notes,
        }
        if tokens:
            out["kv_bytes_for_tokens"] = {"tokens": tokens, **{q: b * tokens for q, b in kv.items()}}
        return out


def _internvl(name: str, family: str, vision: VisionShape, llm: LLMShape, notes: str = "") -> ModelEntry:
    hf_id = f"OpenGVLab/{name}"
    return ModelEntry(name=name, family=family, hf_id=hf_id, llm=llm, vision=vision,
                      projector_params=internvl_projector_params(vision.hidden, llm.hidden),
                      modelscope_id=hf_id, notes=notes)


def _xcomposer(name: str, vision: VisionShape, llm: LLMShape, *, hd: bool, wqkv_rank: int = 256,
               notes: str = "") -> ModelEntry:
    hf_id = f"internlm/{name}"
    proj_in = 4 * vision.hidden if hd else vision.hidden
    separators = 2 * proj_in if hd else 0
    ranks = {"wqkv": wqkv_rank, "wo": 256, "w1": 256, "w3": 256, "w2": 256}
    return ModelEntry(name=name, family="XComposer2", hf_id=hf_id, llm=llm, vision=vision,
                      projector_params=xcomposer_projector_params(proj_in, llm.hidden),
                      extra_fp16_params=plora_params(llm, ranks) + separators, modelscope_id=hf_id,
                      notes=notes)


CATALOGUE: tuple[ModelEntry, ...] = (
    _internvl("InternVL-Chat-V1-5", "InternVL 1.5", INTERNVIT_6B, INTERNLM2_20B),
    _internvl("Mini-InternVL-Chat-2B-V1-5", "InternVL 1.5", INTERNVIT_300M, INTERNLM2_1_8B),
    _internvl("Mini-InternVL-Chat-4B-V1-5", "InternVL 1.5", INTERNVIT_300M, PHI3_MINI),
    _internvl("InternVL2-1B", "InternVL2", INTERNVIT_300M, QWEN2_0_5B,
              notes="head_dim 64: LMDeploy TurboMind has no KV int8/int4 for it"),
    _internvl("InternVL2-2B", "InternVL2", INTERNVIT_300M, INTERNLM2_1_8B),
    _internvl("InternVL2-4B", "InternVL2", INTERNVIT_300M, PHI3_MINI,
              notes="LMDeploy runs it on the PyTorch engine only"),
    _internvl("InternVL2-8B", "InternVL2", INTERNVIT_300M, INTERNLM2_5_7B),
    _internvl("InternVL2-26B", "InternVL2", INTERNVIT_6B, INTERNLM2_20B),
    _internvl("InternVL2-40B", "InternVL2", INTERNVIT_6B, YI_34B),
    _internvl("InternVL2-Llama3-76B", "InternVL2", INTERNVIT_6B, LLAMA3_70B),
    _internvl("InternVL2_5-1B", "InternVL2.5", INTERNVIT_300M_V2_5, QWEN2_5_0_5B,
              notes="head_dim 64: LMDeploy TurboMind has no KV int8/int4 for it"),
    _internvl("InternVL2_5-2B", "InternVL2.5", INTERNVIT_300M_V2_5, INTERNLM2_5_1_8B),
    _internvl("InternVL2_5-4B", "InternVL2.5", INTERNVIT_300M_V2_5, QWEN2_5_3B),
    _internvl("InternVL2_5-8B", "InternVL2.5", INTERNVIT_300M_V2_5, INTERNLM2_5_7B),
    _internvl("InternVL2_5-26B", "InternVL2.5", INTERNVIT_6B_V2_5, INTERNLM2_5_20B),
    _internvl("InternVL2_5-38B", "InternVL2.5", INTERNVIT_6B_V2_5, QWEN2_5_32B),
    _internvl("InternVL2_5-78B", "InternVL2.5", INTERNVIT_6B_V2_5, QWEN2_5_72B),
    _xcomposer("internlm-xcomposer2-vl-1_8b", CLIP_L14_490, INTERNLM2_1_8B, hd=False,
               notes="Partial-LoRA rank 256 assumed (not verified)"),
    _xcomposer("internlm-xcomposer2-vl-7b", CLIP_L14_490, INTERNLM2_7B, hd=False),
    _xcomposer("internlm-xcomposer2-4khd-7b", CLIP_L14_336, INTERNLM2_7B, hd=True, wqkv_rank=8,
               notes="config.json declares InternLM2ForCausalLM; route it to the XComposer2 class"),
    _xcomposer("internlm-xcomposer2d5-7b", CLIP_L14_560, INTERNLM2_7B, hd=True,
               notes="task LoRAs (web/sft/dpo) not counted"),
)


def find(name: str) -> ModelEntry | None:
    """Look a model up by short name or hub id, case-insensitively."""
    key = name.strip().lower()
    for entry in CATALOGUE:
        if key in (entry.name.lower(), entry.hf_id.lower(), entry.modelscope_id.lower()):
            return entry
    return None


def rows(family: str | None = None) -> list[ModelEntry]:
    if not family:
        return list(CATALOGUE)
    key = family.lower().replace(" ", "").replace("-", "")
    return [e for e in CATALOGUE if e.family.lower().replace(" ", "").replace("-", "").startswith(key)]


def format_table(entries: list[ModelEntry], *, group_size: int = 128, tokens: int = 0) -> str:
    """Fixed-width table: sizes in GiB (2^30 bytes), KV in KiB per token for quant_policy 0 / 8 / 4."""
    head = ["MODEL", "PARAMS", "FP16 GiB", "W4A16 GiB", "KV KiB/tok q0/q8/q4"]
    if tokens:
        head.append(f"KV GiB@{tokens} q0/q8/q4")
    head += ["HF ID", "MODELSCOPE ID"]
    body = []
    for e in entries:
        kv = [e.kv_bytes_per_token(q) for q in QUANT_POLICIES]
        row = [e.name, f"{e.params / 1e9:.2f}B",
               f"{e.weights('fp16', group_size).total_bytes / (1 << 30):.1f}",
               f"{e.weights('w4a16', group_size).total_bytes / (1 << 30):.1f}",
               "/".join(_num(b / 1024) for b in kv)]
        if tokens:
            row.append("/".join(f"{b * tokens / (1 << 30):.2f}" for b in kv))
        row += [e.hf_id, e.modelscope_id + ("" if e.modelscope_verified else " *")]
        body.append(row)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    right = {1, 2, 3}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [head, *body]]
    lines.append("* ModelScope id not verified (same as the HF id). Weights: vision tower, projector and "
                 f"LoRA stay fp16; W4A16 = AWQ gemm, group {group_size}.")
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:.0f}" if x == int(x) else f"{x:.2f}".rstrip("0")
