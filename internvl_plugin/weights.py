"""Weight loading shared by the plugin's model classes: a checkpoint tensor that cannot be loaded, or a
damaged checkpoint file, is named in the error. vLLM's loaders say "Attempted to load weight
(torch.Size(...)) into parameter" or list every parameter of a module, without the checkpoint's tensor
name; they consume one tensor at a time, so the last one handed over is the culprit. A truncated
safetensors file fails inside vLLM's weight iterator with safetensors' "incomplete metadata" and no file
name; the folder's files are then checked one by one (safetensors_check) to name it."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper

from internvl_plugin.safetensors_check import first_damaged


def load_weights_naming_culprit(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                                mapper: WeightsMapper | None = None, model_dir: str | os.PathLike | None = None,
                                ) -> set[str]:
    """``AutoWeightsLoader(model).load_weights(weights, mapper)``; a failure is a ValueError naming the
    checkpoint tensor (name and shape) that was being loaded, or the damaged safetensors file of
    ``model_dir``."""
    current: list[tuple[str, tuple[int, ...]]] = []

    def tracked() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            current[:] = [(name, tuple(tensor.shape))]
            yield name, tensor

    try:
        return AutoWeightsLoader(model).load_weights(tracked(), mapper=mapper)
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError" and model_dir is not None:
            damaged = first_damaged(model_dir)
            if damaged is not None:
                raise ValueError(f"checkpoint file damaged: {damaged}") from exc
        if not isinstance(exc, (AssertionError, ValueError, KeyError)):
            raise
        if not current:
            raise
        name, shape = current[0]
        reason = str(exc).split(". The available", 1)[0].strip() or type(exc).__name__
        raise ValueError(f"checkpoint tensor {name!r} (shape {list(shape)}) cannot be loaded: {reason}") from exc

