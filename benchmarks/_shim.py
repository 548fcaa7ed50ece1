"""The benchmarks' imports: this checkout's kernels/ as `internvl_kernels`, and the InternLM2 linear shapes.

On the GPU machine (no vLLM, nothing installed) the benchmarks run from the repository root with
plain `python3 benchmarks/<script>.py`. The checkout's kernels/ is loaded even where another copy is
installed, so that what is measured is the tree the command runs in.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_kernels():
    """kernels/ as the package internvl_kernels (its submodules import as internvl_kernels.<name>)."""
    loaded = sys.modules.get("internvl_kernels")
    if loaded is not None and Path(loaded.__file__).resolve().parent == ROOT / "kernels":
        return loaded
    spec = importlib.util.spec_from_file_location(
        "internvl_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["internvl_kernels"] = module
    spec.loader.exec_module(module)
    return module


# InternLM2 linear shapes (name, K, N); the weight is x @ W with W [K, N].
INTERNLM2_SHAPES = {
    # InternLM2-1.8B (InternVL2-2B's language model): hidden 2048, 16 heads, 8 kv heads, head_dim 128, FFN 8192
    "1.8B": [("wqkv", 2048, 4096), ("wo", 2048, 2048), ("w13", 2048, 2 * 8192), ("w2", 8192, 2048)],
    # InternLM2-7B: hidden 4096, 32 heads, 8 kv heads, head_dim 128, FFN 14336
    "7B": [("wqkv", 4096, 6144), ("wo", 4096, 4096), ("w13", 4096, 2 * 14336), ("w2", 14336, 4096)],
    # InternLM2-20B: hidden 6144, 48 heads, 8 kv heads, head_dim 128, FFN 16384
    "20B": [("wqkv", 6144, 8192), ("wo", 6144, 6144), ("w13", 6144, 2 * 16384), ("w2", 16384, 6144)],
}
