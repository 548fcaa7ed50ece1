"""Import the project's kernels as `internvl_kernels` whether or not the project is installed.

On the GPU machine (no vLLM, nothing installed) the benchmarks run from the repository root with
plain `python3 benchmarks/<script>.py`; this loads kernels/ under its package name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_kernels():
    try:
        return importlib.import_module("internvl_kernels")
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(
        "internvl_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["internvl_kernels"] = module
    spec.loader.exec_module(module)
    return module


# InternLM2 linear shapes (K, N); the weight is x @ W with W [K, N].
INTERNLM2_SHAPES = {
    # InternLM2-1.8B (InternVL2-2B's language model): hidden 2048, 16 heads, 8 kv heads, head_dim 128,
    # FFN 8192; not part of the default benchmark sets (pk_explore.py --shapes 1.8B:w13 ...)
    "1.8B": [("wqkv", 2048, 4096), ("wo", 2048, 2048), ("w13", 2048, 2 * 8192), ("w2", 8192, 2048)],
    # InternLM2-7B: hidden 4096, 32 heads, 8 kv heads, head_dim 128, FFN 14336
    "7B": [("wqkv", 4096, 6144), ("wo", 4096, 4096), ("w13", 4096, 2 * 14336), ("w2", 14336, 4096)],
    # InternLM2-20B: hidden 6144, 48 heads, 8 kv heads, head_dim 128, FFN 16384
    "20B": [("wqkv", 6144, 8192), ("wo", 6144, 6144), ("w13", 6144, 2 * 16384), ("w2", 16384, 6144)],
}


def linear_shape(spec: str) -> tuple[str, str, int, int]:
    """A "--shapes" entry such as "7B:w13" -> (model, linear, K, N)."""
    model, name = spec.split(":")
    k, n = next((k, n) for nm, k, n in INTERNLM2_SHAPES[model] if nm == name)
    return model, name, k, n
