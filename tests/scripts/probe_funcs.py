"""Functions run inside vLLM workers by tests (must be importable by module path there)."""

import os
import sys


def describe(model):
    import torch

    return {"pid": os.getpid(), "class": f"{type(model).__module__}:{type(model).__qualname__}",
            "torchvision_loaded": "torchvision" in sys.modules,
            "vision_dtype": str(next(model.vision_model.parameters()).dtype),
            "n_params": sum(p.numel() for p in model.parameters() if isinstance(p, torch.Tensor))}
