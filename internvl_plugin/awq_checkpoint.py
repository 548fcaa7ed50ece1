"""AWQ W4A16 checkpoints: the method name, where each producer keeps quantization_config, and its parsing.

Three producers write the same tensors (AWQ "gemm": ``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/G, N/8],
``scales`` [K/G, N]; spec internvl-and-quant.md B1.9, B2) and put the config in different places:

    ours       config.json ``quantization_config``, with ``modules_to_not_convert`` (the tests' tiny checkpoints)
    LMDeploy   ``lmdeploy lite auto_awq``: only config.json ``llm_config.quantization_config``
    AutoAWQ    config.json ``quantization_config`` (``bits``/``group_size``); older folders only a
               ``quant_config.json`` or ``quantize_config.json`` (``w_bit``/``q_group_size``, no quant_method)

The vLLM method (``quant.py``), ``hub_cli serve`` and ``awq_tools`` all read checkpoints through this
module. It imports only the standard library, so the command-line tools stay free of torch and vLLM. The
tensors themselves (packing, nibble order, ``PACK_FACTOR``) are ``internvl_kernels.awq_format``'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["METHOD_NAME", "AWQ_QUANT_METHODS", "WEIGHT_BITS", "DEFAULT_GROUP_SIZE", "CONFIG_HOLDERS", "SIDE_FILES",
           "AWQSettings", "FoundQuantizationConfig", "parse_quantization_config", "find_quantization_config",
           "group_size_or_default"]

METHOD_NAME = "awq_w4a16"                  # the plugin's vLLM quantization method
AWQ_QUANT_METHODS = ("awq", METHOD_NAME)   # quant_method values of checkpoints the method loads
WEIGHT_BITS = 4
DEFAULT_GROUP_SIZE = 128                   # every producer's default
# Where config.json may hold the quantization_config, in the order vLLM looks (the top level, then the
# language model's sub-config: InternVL calls it llm_config, transformers' VLMs text_config).
CONFIG_HOLDERS = ("", "llm_config", "text_config")
# Old AutoAWQ folders; vLLM reads them only when config.json has no quantization_config and the method
# is named with --quantization.
SIDE_FILES = ("quant_config.json", "quantize_config.json")
_SUPPORTED_VERSIONS = ("gemm",)
# The spellings of one setting, first match wins (AutoAWQ's side files use the second).
_BITS_KEYS = ("bits", "w_bit")
_GROUP_SIZE_KEYS = ("group_size", "q_group_size")


@dataclass(frozen=True)
class AWQSettings:
    """What the W4A16 method needs from a valid quantization_config."""

    group_size: int
    modules_to_not_convert: tuple[str, ...] = ()


@dataclass(frozen=True)
class FoundQuantizationConfig:
    """A checkpoint's quantization_config and where it was found."""

    config: dict[str, Any]
    file: str             # "config.json" or one of SIDE_FILES
    holder: str = ""      # the config.json key holding it, "" for the top level: one of CONFIG_HOLDERS

    @property
    def in_config_json(self) -> bool:
        """False for a side file: vLLM then needs ``--quantization`` to read it."""
        return self.file == "config.json"

    @property
    def quant_method(self) -> str:
        # Side files are AutoAWQ's own and carry no quant_method.
        return str(self.config.get("quant_method", "" if self.in_config_json else "awq")).lower()

    @property
    def is_awq(self) -> bool:
        return self.quant_method in AWQ_QUANT_METHODS


def parse_quantization_config(config: Mapping[str, Any]) -> AWQSettings:
    """Check an AWQ quantization_config (any producer's) and return its settings.

    Raises ValueError with one line naming the field at fault, prefixed by the method name.
    """
    method = str(config.get("quant_method", "awq")).lower()
    if method not in AWQ_QUANT_METHODS:
        raise ValueError(f"{METHOD_NAME}: quantization_config.quant_method={method!r} is not an AWQ checkpoint")
    bits = _first(config, _BITS_KEYS)
    if bits != WEIGHT_BITS:
        raise ValueError(f"{METHOD_NAME}: quantization_config.bits={bits!r} is not supported; "
                         "only 4-bit AWQ weights are")
    version = str(config.get("version", "gemm")).lower()
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"{METHOD_NAME}: quantization_config.version={config.get('version')!r} is not "
                         "supported; only the AWQ 'gemm' tensor layout is (re-export the model as gemm)")
    group_size = _first(config, _GROUP_SIZE_KEYS)
    if not _is_positive_int(group_size):
        raise ValueError(f"{METHOD_NAME}: quantization_config.group_size={group_size!r} is not supported; "
                         "need a positive group size (e.g. 128)")
    zero_point = config.get("zero_point", True)
    if zero_point is not True:
        raise ValueError(f"{METHOD_NAME}: quantization_config.zero_point={zero_point!r} is not supported; "
                         "only asymmetric AWQ (zero_point true) is")
    if config.get("lm_head", False):
        raise ValueError(f"{METHOD_NAME}: quantization_config.lm_head=true is not supported; "
                         "the LM head must stay 16-bit")
    skip = config.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"{METHOD_NAME}: quantization_config.modules_to_not_convert={skip!r} "
                         "must be a list of module names")
    return AWQSettings(group_size, tuple(skip))


def find_quantization_config(config: Mapping[str, Any],
                             folder: str | Path | None = None) -> FoundQuantizationConfig | None:
    """The quantization_config of a checkpoint whose config.json is ``config``, or None if it has none.

    config.json first (top level, then ``llm_config`` / ``text_config``); then, with ``folder``, the old
    AutoAWQ side files. A side file that is not a JSON object is ignored, as vLLM would fail on it anyway.
    """
    for holder in CONFIG_HOLDERS:
        sub = config.get(holder) if holder else config
        qc = sub.get("quantization_config") if isinstance(sub, Mapping) else None
        if isinstance(qc, Mapping):
            return FoundQuantizationConfig(dict(qc), "config.json", holder)
    for name in SIDE_FILES if folder is not None else ():
        try:
            qc = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(qc, dict):
            return FoundQuantizationConfig(qc, name)
    return None


def group_size_or_default(config: Mapping[str, Any] | None) -> int:
    """The group size a quantization_config states, or DEFAULT_GROUP_SIZE; for estimates, never an error."""
    group_size = _first(config or {}, _GROUP_SIZE_KEYS)
    return group_size if _is_positive_int(group_size) else DEFAULT_GROUP_SIZE


def _first(config: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The value of the first of ``keys`` present in ``config``, else None (vLLM's get_from_keys_or)."""
    return next((config[key] for key in keys if key in config), None)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
