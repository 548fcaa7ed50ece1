"""Plain-PyTorch reference of InternVL: the test oracle the vLLM plugin is held against.

``internvl.py`` holds the whole model (loading, prompts, forward, greedy generation), ``vision.py``
the image tiling, InternViT and pixel shuffle, ``llm.py`` the InternLM2 and Qwen2 decoders. The
package imports no plugin code and lives under tests/, so it never ships in the wheel; tests import
it as ``reference`` (pytest puts tests/ on ``sys.path``).
"""

from .internvl import *  # noqa: F401,F403
from .internvl import __all__
