"""Weight loading shared by the plugin's model classes: a checkpoint tensor that cannot be loaded, or a
damaged checkpoint file, is named in the error. vLLM's loaders say "Attempted to load weight
(torch.Size(...)) into parameter" or list every parameter of a module, without the checkpoint's tensor
name; they consume one tensor at a time, so the last one handed over is the culprit. A truncated
safetensors file fails inside vLLM's weight iterator with safetensors' "incomplete metadata" and no file
name; the folder's files are then opened one by one to name it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper


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
            damaged = damaged_safetensors(model_dir)
            if damaged is not None:
                raise ValueError(f"checkpoint file {damaged[0]} is damaged: {damaged[1]}") from exc
        if not isinstance(exc, (AssertionError, ValueError, KeyError)):
            raise
        if not current:
            raise
        name, shape = current[0]
        reason = str(exc).split(". The available", 1)[0].strip() or type(exc).__name__
        raise ValueError(f"checkpoint tensor {name!r} (shape {list(shape)}) cannot be loaded: {reason}") from exc


def damaged_safetensors(model_dir: str | os.PathLike) -> tuple[Path, str] | None:
    """The first ``*.safetensors`` file of ``model_dir`` that is shorter than its header says or whose header
    cannot be read, with the reason."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if 8 + header_len > size:
                    return path, f"{size} bytes, shorter than its {header_len}-byte header says"
                header = json.loads(f.read(header_len))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return path, f"unreadable safetensors header ({exc})"
        if 8 + header_len + end > size:
            return path, f"{size} bytes, its header needs {8 + header_len + end} (truncated)"
    return None
