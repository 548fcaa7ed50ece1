"""XComposer2's turn-end stop token for `hub_cli serve`.

XComposer2 ends a turn with ``[UNUSED_TOKEN_145]`` (92542) but its released ``generation_config.json`` files
list only ``</s>``, so vLLM would run past the end of the answer into a made-up next turn. vLLM reads stop
ids from the generation config only (``--override-generation-config`` does not reach ``eos_token_id``), so
serve writes a copy of the model's generation config with the turn-end id added to a cache folder and
passes it as ``--generation-config``; the model folder itself is never modified.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TURN_END = "[UNUSED_TOKEN_145]"
TURN_END_ID = 92542          # its id in every released XComposer2 vocabulary
XCOMPOSER2_ARCH = "InternLMXComposer2ForCausalLM"


def is_xcomposer2(config: Mapping[str, Any]) -> bool:
    names = list(config.get("architectures") or [])
    auto_map = config.get("auto_map")
    names += list(auto_map.values()) if isinstance(auto_map, dict) else []
    return any(XCOMPOSER2_ARCH in str(n) for n in names)


def turn_end_id(model_dir: Path) -> int:
    """The id of ``[UNUSED_TOKEN_145]`` from the tokenizer files (tiny test vocabularies differ), else 92542."""
    try:
        added = json.loads((model_dir / "tokenizer_config.json").read_text()).get("added_tokens_decoder") or {}
    except (OSError, ValueError, AttributeError):
        added = {}
    for token_id, token in added.items():
        if isinstance(token, dict) and token.get("content") == TURN_END:
            return int(token_id)
    return TURN_END_ID


def generation_config_with_turn_end(model_dir: Path, config: Mapping[str, Any],
                                    cache_root: Path | None = None) -> Path | None:
    """A folder holding the model's generation config plus the turn-end stop id, or None when the model
    is not XComposer2 or its generation config already stops there."""
    if not is_xcomposer2(config):
        return None
    try:
        gen = json.loads((model_dir / "generation_config.json").read_text())
    except FileNotFoundError:
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    except (OSError, ValueError):
        return None   # unreadable: the checkpoint check names it; vLLM's own reading decides
    if not isinstance(gen, dict):
        return None
    stop = turn_end_id(model_dir)
    eos = gen.get("eos_token_id", 2)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if stop in eos:
        return None
    gen["eos_token_id"] = eos + [stop]
    text = json.dumps(gen, indent=2, sort_keys=True) + "\n"
    key = hashlib.sha256(f"{model_dir.resolve()}\n{text}".encode()).hexdigest()[:16]
    root = cache_root or Path.home() / ".cache" / "vllm-internvl" / "generation-config"
    folder = root / key
    target = folder / "generation_config.json"
    if not (target.is_file() and target.read_text() == text):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".generation_config.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    return folder
