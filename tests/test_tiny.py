"""The tiny checkpoint factory: real layout, deterministic, never leaves a half-written folder."""

from __future__ import annotations

import hashlib
import json

import pytest
from safetensors import safe_open

from internvl_plugin import tiny
from internvl_plugin.tiny import INTERNVL_SPECIAL_TOKENS, build_tiny_model


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_deterministic_from_seed(tmp_path):
    a = build_tiny_model("internvl2-1b", tmp_path / "a", seed=3)
    b = build_tiny_model("internvl2-1b", tmp_path / "b", seed=3)
    c = build_tiny_model("internvl2-1b", tmp_path / "c", seed=4)
    assert _digest(a) == _digest(b)
    da, dc = _digest(a), _digest(c)
    assert da["model.safetensors"] != dc["model.safetensors"]
    assert da["tokenizer.json"] == dc["tokenizer.json"]  # the tokenizer depends on the shipped text only


@pytest.mark.parametrize("layout,llm_names", [
    ("internvl2-2b", ["language_model.model.tok_embeddings.weight", "language_model.output.weight",
                      "language_model.model.layers.1.attention.wqkv.weight",
                      "language_model.model.layers.0.feed_forward.w3.weight"]),
    ("internvl2-1b", ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                      "language_model.model.layers.0.self_attn.q_proj.bias",
                      "language_model.model.layers.1.mlp.down_proj.weight"]),
])
def test_real_layout(tiny_model, layout, llm_names):
    path = tiny_model(layout)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLChatModel"] and cfg["model_type"] == "internvl_chat"
    for key in ("vision_config", "llm_config", "downsample_ratio", "ps_version", "template", "select_layer",
                "force_image_size", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch"):
        assert key in cfg, key
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("vision_model.embeddings.position_embedding").shape == (1, 1 + 32 * 32, 32)
        assert f.get_tensor("mlp1.1.weight").shape == (cfg["llm_config"]["hidden_size"], 4 * 32)
    for name in llm_names + ["vision_model.embeddings.class_embedding", "vision_model.encoder.layers.1.ls2",
                             "vision_model.encoder.layers.0.attn.qkv.weight", "mlp1.0.weight", "mlp1.3.bias"]:
        assert name in names, name
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    contents = {v["content"]: int(k) for k, v in tok_cfg["added_tokens_decoder"].items()}
    for t in INTERNVL_SPECIAL_TOKENS + ["<|im_start|>", "<|im_end|>"]:
        assert t in contents
    assert max(contents.values()) == cfg["llm_config"]["vocab_size"] - 1
    assert "auto_map" in cfg and not list(path.glob("*.py"))


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_model("internvl2-2b", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_refuses_foreign_folder_and_unknown_layout(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.bin").write_bytes(b"something else")
    with pytest.raises(FileExistsError, match="not this tiny model"):
        build_tiny_model("internvl2-2b", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown tiny layout 'internvl9'"):
        build_tiny_model("internvl9", tmp_path / "y")
