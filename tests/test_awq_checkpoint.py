"""internvl_plugin.awq_checkpoint: where each producer keeps its quantization_config, and its parsing.

No vLLM here: the module is what hub_cli and awq_tools read checkpoints with. The vLLM method's use of it
(AWQW4A16Config.from_config) is in test_quant.py.
"""

from __future__ import annotations

import json

import pytest

from internvl_plugin import awq_checkpoint
from internvl_plugin.awq_checkpoint import (METHOD_NAME, AWQSettings, find_quantization_config,
                                            group_size_or_default, parse_quantization_config)

LLM_CONFIG = {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 128}
OURS = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
        "modules_to_not_convert": ["vision_model", "mlp1"]}
LMDEPLOY = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}
AUTOAWQ = {"quant_method": "awq", "zero_point": True, "group_size": 64, "bits": 4, "version": "gemm",
           "modules_to_not_convert": None}
AUTOAWQ_SIDE_FILE = {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM",
                     "modules_to_not_convert": ["vision_model"]}


def _folder(tmp_path, config, **side_files):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, content in side_files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path


def test_each_producer_is_found_where_it_writes(tmp_path):
    ours = find_quantization_config({"llm_config": LLM_CONFIG, "quantization_config": OURS})
    assert (ours.file, ours.holder, ours.config, ours.is_awq) == ("config.json", "", OURS, True)

    lmdeploy = find_quantization_config({"llm_config": {**LLM_CONFIG, "quantization_config": LMDEPLOY}})
    assert (lmdeploy.file, lmdeploy.holder, lmdeploy.in_config_json) == ("config.json", "llm_config", True)
    text_config = find_quantization_config({"text_config": {"quantization_config": LMDEPLOY}})
    assert text_config.holder == "text_config"

    autoawq = find_quantization_config({**LLM_CONFIG, "quantization_config": AUTOAWQ})
    assert (autoawq.holder, autoawq.config["group_size"]) == ("", 64)

    old = _folder(tmp_path / "old", LLM_CONFIG, **{"quant_config.json": AUTOAWQ_SIDE_FILE})
    assert find_quantization_config(LLM_CONFIG) is None  # side files only with the folder
    side = find_quantization_config(LLM_CONFIG, old)
    assert (side.file, side.in_config_json, side.quant_method, side.is_awq) == ("quant_config.json", False, "awq",
                                                                                 True)
    older = _folder(tmp_path / "older", LLM_CONFIG, **{"quantize_config.json": AUTOAWQ_SIDE_FILE})
    assert find_quantization_config(LLM_CONFIG, older).file == "quantize_config.json"


def test_config_json_wins_and_broken_side_files_are_skipped(tmp_path):
    both = _folder(tmp_path / "both", {"quantization_config": AUTOAWQ}, **{"quant_config.json": AUTOAWQ_SIDE_FILE})
    assert find_quantization_config({"quantization_config": AUTOAWQ}, both).file == "config.json"
    broken = _folder(tmp_path / "broken", LLM_CONFIG, **{"quant_config.json": "{oops"})
    assert find_quantization_config(LLM_CONFIG, broken) is None
    assert find_quantization_config({"quantization_config": "awq"}) is None  # not a mapping
    gptq = find_quantization_config({"quantization_config": {"quant_method": "gptq"}})
    assert (gptq.quant_method, gptq.is_awq) == ("gptq", False)
    assert find_quantization_config({"quantization_config": {}}).is_awq is False  # config.json: method required


@pytest.mark.parametrize("config,expected", [
    (OURS, AWQSettings(32, ("vision_model", "mlp1"))),
    (LMDEPLOY, AWQSettings(128)),
    (AUTOAWQ, AWQSettings(64)),
    (AUTOAWQ_SIDE_FILE, AWQSettings(32, ("vision_model",))),
    ({**LMDEPLOY, "quant_method": METHOD_NAME}, AWQSettings(128)),
], ids=["ours", "lmdeploy", "autoawq", "autoawq-side-file", "method-name"])
def test_parse_every_producer(config, expected):
    assert parse_quantization_config(config) == expected


@pytest.mark.parametrize("edit,message", [
    ({"quant_method": "gptq"}, "quant_method='gptq' is not an AWQ checkpoint"),
    ({"bits": 3}, "bits=3"), ({"bits": None}, "bits=None"), ({"version": "gemv_fast"}, "version='gemv_fast'"),
    ({"group_size": -1}, "group_size=-1"), ({"group_size": True}, "group_size=True"),
    ({"group_size": "128"}, "group_size='128'"),
    ({"zero_point": False}, "zero_point=False"), ({"lm_head": True}, "lm_head=true"),
    ({"modules_to_not_convert": "vision_model"}, "modules_to_not_convert='vision_model'"),
])
def test_parse_rejects_with_one_line(edit, message):
    with pytest.raises(ValueError) as info:
        parse_quantization_config({**LMDEPLOY, **edit})
    text = str(info.value)
    assert text.startswith(f"{METHOD_NAME}: quantization_config.{message}") and "\n" not in text


def test_first_spelling_wins_as_in_vllm():
    # vLLM's get_from_keys_or: the first key present, even when a later spelling also is
    assert parse_quantization_config({**AUTOAWQ_SIDE_FILE, "group_size": 64}).group_size == 64
    with pytest.raises(ValueError, match="bits=8"):
        parse_quantization_config({**AUTOAWQ_SIDE_FILE, "bits": 8})


def test_group_size_or_default_never_fails():
    assert group_size_or_default(AUTOAWQ_SIDE_FILE) == 32
    assert group_size_or_default(LMDEPLOY) == 128
    assert group_size_or_default(None) == group_size_or_default({"group_size": 0}) == 128
    assert group_size_or_default({"group_size": "64"}) == 128


def test_bits_agree_with_the_kernels_packing():
    from internvl_kernels import PACK_FACTOR

    assert PACK_FACTOR * awq_checkpoint.WEIGHT_BITS == 32  # 4-bit values per int32 word
