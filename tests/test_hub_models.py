"""hub_cli models: the catalogue and the memory arithmetic (spec internvl-and-quant.md B5.3)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hub_cli.catalogue import CATALOGUE, find, rows
from hub_cli.cli import main
from internvl_plugin.memory import (GiB, LLMShape, VisionShape, awq_linear_bytes, estimate_from_config,
                                    estimate_weights, kv_bytes_per_token)

KiB = 1024

INTERNVL = [
    "InternVL-Chat-V1-5", "Mini-InternVL-Chat-2B-V1-5", "Mini-InternVL-Chat-4B-V1-5",
    "InternVL2-1B", "InternVL2-2B", "InternVL2-4B", "InternVL2-8B", "InternVL2-26B", "InternVL2-40B",
    "InternVL2-Llama3-76B",
    "InternVL2_5-1B", "InternVL2_5-2B", "InternVL2_5-4B", "InternVL2_5-8B", "InternVL2_5-26B", "InternVL2_5-38B",
    "InternVL2_5-78B",
]
XCOMPOSER = ["internlm-xcomposer2-vl-1_8b", "internlm-xcomposer2-vl-7b", "internlm-xcomposer2-4khd-7b",
             "internlm-xcomposer2d5-7b"]


# ---------------------------------------------------------------------------------------------------------
# memory.py against the spec's worked numbers (B5.3 table)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, linear_b, emb_b, awq_gib, kv_kib", [
    ("InternVL2-26B", 18.72, 1.14, 11.2, (192, 99, 51)),
    ("InternVL2-8B", 6.98, 0.76, 4.8, (128, 66, 34)),
    ("InternVL2-2B", 1.51, 0.38, 1.4, (96, 49.5, 25.5)),
    ("InternVL2-40B", 33.47, 0.92, 17.9, (240, 123.75, 63.75)),
    ("InternVL2-Llama3-76B", 68.45, 2.10, 37.0, (320, 165, 85)),
])
def test_llm_numbers_match_spec_table(model, linear_b, emb_b, awq_gib, kv_kib):
    llm = find(model).llm
    assert llm.linear_params / 1e9 == pytest.approx(linear_b, abs=0.006)
    assert llm.embedding_params / 1e9 == pytest.approx(emb_b, abs=0.006)
    w4 = estimate_weights(llm, weight_format="w4a16")
    assert w4.llm_bytes / GiB == pytest.approx(awq_gib, abs=0.06)
    assert tuple(kv_bytes_per_token(llm, q) / KiB for q in (0, 8, 4)) == kv_kib


def test_awq_bytes_per_weight():
    # K·N·(0.5 + 0.5/g + 2/g) → 0.51953 bytes per weight at g = 128 (≈ 4.16 bits)
    assert awq_linear_bytes(4096, 4096) == 4096 * 4096 * 0.51953125
    assert awq_linear_bytes(4096, 4096, group_size=64) == 4096 * 4096 * (0.5 + 0.5 / 64 + 2 / 64)
    assert awq_linear_bytes(200, 8) == 200 * 8 // 2 + 2 * 8 // 2 + 2 * 8 * 2  # a partial group still counts


def test_vision_towers_match_spec():
    assert find("InternVL2-26B").vision.params / 1e9 == pytest.approx(5.53, abs=0.02)
    assert find("InternVL2-2B").vision.params / 1e9 == pytest.approx(0.30, abs=0.01)
    fp16, w4 = find("InternVL2-26B").weights("fp16"), find("InternVL2-26B").weights("w4a16")
    assert fp16.vision_bytes == w4.vision_bytes == 2 * find("InternVL2-26B").vision.params  # ViT stays fp16
    assert fp16.projector_bytes == w4.projector_bytes


def test_kv_policy_validation_and_head_dim():
    llm = find("InternVL2-1B").llm  # head_dim 64, 2 KV heads, 24 layers
    assert kv_bytes_per_token(llm, 0) == 2 * 24 * 2 * 128
    assert kv_bytes_per_token(llm, 4) == 2 * 24 * 2 * (32 + 4)
    with pytest.raises(ValueError):
        kv_bytes_per_token(llm, 16)
    with pytest.raises(ValueError):
        estimate_weights(llm, weight_format="int3")


def test_estimate_from_internvl_config():
    llm_cfg = {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 512, "vocab_size": 1000, "tie_word_embeddings": False}
    vis_cfg = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "image_size": 448,
               "patch_size": 14, "qkv_bias": True, "norm_type": "layer_norm"}
    config = {"llm_config": llm_cfg, "vision_config": vis_cfg, "downsample_ratio": 0.5}
    llm = LLMShape.from_hf_config(llm_cfg)
    assert (llm.head_dim, llm.kv_heads) == (64, 2)
    per_layer = 256 * (256 + 2 * 128) + 256 * 256 + 3 * 256 * 512
    assert llm.linear_params == 2 * per_layer
    fp16 = estimate_from_config(config)
    w4 = estimate_from_config(config, weight_format="awq")
    vision = VisionShape("v", 2, 64, 128, layer_scale=True)
    assert fp16.vision_bytes == w4.vision_bytes == 2 * vision.params
    assert fp16.projector_bytes == 2 * (2 * 256 + 256 * 256 + 256 + 256 * 256 + 256)
    assert w4.llm_bytes < fp16.llm_bytes and w4.total_bytes < fp16.total_bytes
    assert fp16.kv_bytes_per_token == {0: 2 * 2 * 2 * 128, 8: 2 * 2 * 2 * 68, 4: 2 * 2 * 2 * 36}


def test_estimate_from_xcomposer_config():
    cfg = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 92544, "img_size": 490}
    est = estimate_from_config(cfg, weight_format="w4a16")
    assert est.vision_bytes / 2 / 1e9 == pytest.approx(0.30, abs=0.01)
    assert est.kv_bytes_per_token[0] == 128 * KiB


# ---------------------------------------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------------------------------------
def test_catalogue_has_every_supported_model():
    names = [e.name for e in CATALOGUE]
    assert names == INTERNVL + XCOMPOSER
    for e in CATALOGUE:
        owner = "OpenGVLab" if e.name in INTERNVL else "internlm"
        assert e.hf_id == f"{owner}/{e.name}"
        assert e.modelscope_id == e.hf_id and e.modelscope_verified is False  # the spec gives no ModelScope ids
        assert find(e.hf_id) is e and find(e.name.upper()) is e
    assert find("OpenGVLab/InternVL2-2B").llm.name == "internlm2-chat-1_8b"
    assert find("nope") is None
    assert [e.name for e in rows("xcomposer2")] == XCOMPOSER
    assert len(rows("internvl2.5")) == 7 and len(rows("internvl")) == len(INTERNVL)


@pytest.mark.parametrize("name, billions", [
    ("InternVL2-1B", 0.94), ("InternVL2-2B", 2.21), ("InternVL2-4B", 4.15), ("InternVL2-8B", 8.08),
    ("InternVL2-26B", 25.5), ("InternVL2-40B", 40.1), ("InternVL2-Llama3-76B", 76.3), ("InternVL2_5-4B", 3.71),
    ("InternVL2_5-38B", 38.4), ("InternVL2_5-78B", 78.4), ("InternVL-Chat-V1-5", 25.5),
])
def test_parameter_counts_near_published(name, billions):
    assert find(name).params / 1e9 == pytest.approx(billions, rel=0.02)


def test_xcomposer_counts_partial_lora():
    vl7b, khd = find("internlm-xcomposer2-vl-7b"), find("internlm-xcomposer2-4khd-7b")
    lora_per_layer = 256 * (4096 + 6144) + 256 * (4096 + 4096) + 3 * 256 * (4096 + 14336)
    assert vl7b.extra_fp16_params == 32 * lora_per_layer
    assert khd.extra_fp16_params < vl7b.extra_fp16_params  # wqkv rank 8 on 4KHD
    w4 = vl7b.weights("w4a16")
    assert w4.extra_bytes == 2 * vl7b.extra_fp16_params  # Partial-LoRA stays fp16 under W4A16


def test_every_entry_is_consistent():
    for e in CATALOGUE:
        fp16, w4 = e.weights("fp16"), e.weights("w4a16")
        assert fp16.total_bytes == 2 * e.params
        assert w4.total_bytes < fp16.total_bytes
        kv = [e.kv_bytes_per_token(q) for q in (0, 8, 4)]
        assert kv[0] > kv[1] > kv[2] > 0
        assert e.llm.heads % e.llm.kv_heads == 0 and e.llm.source and e.vision.source


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------
def test_models_table():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["MODEL", "PARAMS"]
    for name in INTERNVL + XCOMPOSER:
        assert any(line.startswith(name + " ") for line in lines), name
    row = next(line for line in lines if line.startswith("InternVL2-26B "))
    assert "25.51B" in row and "192/99/51" in row and "OpenGVLab/InternVL2-26B *" in row
    assert "not verified" in lines[-1]


def test_models_json_and_filters():
    result = CliRunner().invoke(main, ["models", "--json", "--family", "xcomposer2", "--tokens", "1000"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [d["name"] for d in data] == XCOMPOSER
    first = data[0]
    assert first["kv_bytes_per_token"] == {"0": 96 * KiB, "8": 99 * 512, "4": 51 * 512}
    assert first["kv_bytes_for_tokens"]["0"] == 1000 * 96 * KiB
    assert first["weights_bytes"]["w4a16"] < first["weights_bytes"]["fp16"]
    assert first["modelscope_verified"] is False
    result = CliRunner().invoke(main, ["models", "--tokens", "8192", "--group-size", "64"])
    assert result.exit_code == 0 and "KV GiB@8192" in result.output and "group 64" in result.output
    assert CliRunner().invoke(main, ["models", "--family", "llama"]).exit_code == 2


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "fetch" in result.output and "models" in result.output
