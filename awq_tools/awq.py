"""AWQ on one decoder layer: activation statistics, smoothing scales (fixed alpha or searched), folding, RTN.

LMDeploy's algorithm (spec internvl-and-quant.md B1.4-B1.8), on float32 tensors:

    weight importance  w_j = mean over output rows of |W| / (max |W| of its group of G input channels)
    scale              s_j = a_j^alpha / w_j^(1 - alpha), normalized by sqrt(max s * min s)
                       default: a = per-channel absmax of the input, alpha = 0.5
                       --search-scale: a = per-channel mean |x|, alpha the ratio in {0, 0.05, ..., 0.95} whose
                       RTN-quantized sub-block output is closest (MSE) to the float output
    folding            previous op's output divided by s (norm weight, or the rows of the previous linear
                       feeding this one, bias included), this linear's input columns multiplied by s
    quantization       asymmetric RTN per group (internvl_kernels.quantize_awq), AWQ gemm packing

One deliberate difference: every scale is rounded to a power of two. Multiplying and dividing by a power of
two is exact in every float format, so folding changes no bit of the model's float output (the smoothed,
unquantized model equals the original exactly, even with bfloat16 norm weights), which is what makes the fold
safe to apply next to XComposer2's Partial-LoRA (xcomposer2.md §8). The rounding costs at most a factor
sqrt(2) in a scale; the outlier tests state what AWQ still gains over plain RTN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from internvl_kernels import dequantize_awq, quantize_awq

__all__ = ["ChannelStats", "weight_importance", "smoothing_scales", "pseudo_quantize", "search_ratio",
           "quantize_linear", "output_error_smoothed", "SEARCH_RATIOS", "DEFAULT_ALPHA"]

DEFAULT_ALPHA = 0.5
SEARCH_RATIOS = tuple(i / 20 for i in range(20))
_EPS = 1e-4


@dataclass
class ChannelStats:
    """Per input channel |x| max and running |x| sum over every observed token."""

    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    tokens: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)   # a few tokens kept for search and the report
    sample_tokens: int = 0

    def update(self, x: torch.Tensor, keep_tokens: int) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        a = x.abs()
        amax, asum = a.amax(0), a.sum(0, dtype=torch.float64)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.abssum = asum if self.abssum is None else self.abssum + asum
        self.tokens += x.shape[0]
        if self.sample_tokens < keep_tokens:
            take = x[: keep_tokens - self.sample_tokens].to("cpu", copy=True)
            self.sample.append(take)
            self.sample_tokens += take.shape[0]

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.tokens, 1)).float()

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.empty(0)


def weight_importance(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """w_j: mean over all output rows of |W| normalized by its group's max (B1.6 step 1); W_i are [N_i, K]."""
    w = torch.cat([t.float() for t in weights], dim=0)
    n, k = w.shape
    g = w.abs().reshape(n, k // group_size, group_size)
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=_EPS)
    return g.reshape(n, k).mean(0)


def smoothing_scales(act: torch.Tensor, importance: torch.Tensor, alpha: float,
                     norm_weight: torch.Tensor | None = None) -> torch.Tensor:
    """s = a^alpha / w^(1-alpha), normalized, rounded to powers of two (module docstring); 1 where the norm is 0."""
    p = importance.float().pow(1 - alpha)
    if float(p.min()) == 0:
        p = p.clamp(min=_EPS)
    s = (act.float().pow(alpha) / p).clamp(min=_EPS)
    live = torch.ones_like(s, dtype=torch.bool) if norm_weight is None else norm_weight.float() != 0
    if bool(live.any()):
        s = s / torch.sqrt(s[live].max() * s[live].min())
    s = torch.exp2(torch.round(torch.log2(s)))
    return torch.where(live, s, torch.ones_like(s))


def pseudo_quantize(weight: torch.Tensor, group_size: int, rows_per_chunk: int = 2048) -> torch.Tensor:
    """RTN round trip of an [N, K] weight in float32: ``internvl_kernels.quantize_awq`` (the one rounding rule,
    float32 scales) then ``dequantize_awq``, in chunks of output rows like ``quantize_linear``."""
    parts = []
    for i in range(0, weight.shape[0], rows_per_chunk):
        packed = quantize_awq(weight[i:i + rows_per_chunk].float(), group_size, scale_dtype=torch.float32)
        parts.append(dequantize_awq(*packed, group_size, dtype=torch.float32).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def search_ratio(act_mean: torch.Tensor, weights: list[torch.Tensor], group_size: int, run,
                 norm_weight: torch.Tensor | None = None) -> tuple[float, torch.Tensor, list[float]]:
    """Try each ratio r: s from (mean|x|, r), each weight -> RTN(W * s) / s, score MSE of ``run(weights)``
    against ``run(originals)``. Returns (best r, its scales, the losses)."""
    reference = run(weights)
    importance = weight_importance(weights, group_size)
    best, best_s, losses = None, None, []
    for r in SEARCH_RATIOS:
        s = smoothing_scales(act_mean, importance, r, norm_weight)
        trial = [pseudo_quantize(w * s, group_size) / s for w in weights]
        loss = float((run(trial) - reference).float().pow(2).mean())
        losses.append(loss)
        if best is None or loss < losses[best]:
            best, best_s = len(losses) - 1, s
    return SEARCH_RATIOS[best], best_s, losses


def quantize_linear(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype, rows_per_chunk: int = 2048):
    """(qweight, qzeros, scales) of a (smoothed) [N, K] weight in the AWQ gemm layout. Output rows are quantized
    in chunks (multiples of 8: one packed column each) so the packer's temporaries stay small for 7B+ layers."""
    parts = [quantize_awq(weight[i:i + rows_per_chunk].float(), group_size, scale_dtype=scale_dtype)
             for i in range(0, weight.shape[0], rows_per_chunk)]
    return tuple(torch.cat([p[j] for p in parts], dim=1) for j in range(3))


def output_error_smoothed(x: torch.Tensor, s: torch.Tensor | None, weight: torch.Tensor, approx: torch.Tensor,
                          row_scale: torch.Tensor | None = None) -> float:
    """Relative squared error of a smoothed, quantized linear A in the original output space:
    ||((x / s) A^T) * row_scale - x W^T||^2 / ||x W^T||^2, where s is the input scale folded into A's columns
    and row_scale undoes a following linear's scale folded into A's rows (None: not smoothed that way)."""
    if x.numel() == 0:
        return float("nan")
    ref = x @ weight.float().t()
    got = (x if s is None else x / s) @ approx.float().t()
    if row_scale is not None:
        got = got * row_scale
    return float((got - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))
