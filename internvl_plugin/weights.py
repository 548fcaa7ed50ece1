"""Weight loading shared by the plugin's model classes: a checkpoint tensor that cannot be loaded is
named in the error. vLLM's loaders say "Attempted to load weight (torch.Size(...)) into parameter" or
list every parameter of a module, without the checkpoint's tensor name; they consume one tensor at a
time, so the last one handed over is the culprit."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper


def load_weights_naming_culprit(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                                mapper: WeightsMapper | None = None) -> set[str]:
    """``AutoWeightsLoader(model).load_weights(weights, mapper)``; a failure is a ValueError naming the
    checkpoint tensor (name and shape) that was being loaded."""
    current: list[tuple[str, tuple[int, ...]]] = []

    def tracked() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            current[:] = [(name, tuple(tensor.shape))]
            yield name, tensor

    try:
        return AutoWeightsLoader(model).load_weights(tracked(), mapper=mapper)
    except (AssertionError, ValueError, KeyError) as exc:
        if not current:
            raise
        name, shape = current[0]
        reason = str(exc).split(". The available", 1)[0].strip() or type(exc).__name__
        raise ValueError(f"checkpoint tensor {name!r} (shape {list(shape)}) cannot be loaded: {reason}") from exc
