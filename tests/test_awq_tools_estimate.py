"""awq_tools estimate: the fp16 figure equals the bytes of the tiny checkpoint's tensors; an AWQ checkpoint is
estimated at its own group size."""

from __future__ import annotations

import json

from click.testing import CliRunner
from safetensors import safe_open

from awq_tools.cli import main


def test_estimate_matches_bytes_on_disk(tiny_model):
    path = tiny_model("internvl2-2b")
    res = CliRunner().invoke(main, ["estimate", str(path), "--json", "--w-group-size", "64"])
    assert res.exit_code == 0, res.output
    est = json.loads(res.output)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        on_disk = sum(f.get_tensor(k).numel() * 2 for k in f.keys())  # bf16 = fp16 bytes
    assert est["fp16"]["total_bytes"] == on_disk
    assert est["w4a16"]["vision_bytes"] == est["fp16"]["vision_bytes"]  # vision stays 16-bit
    assert est["w4a16"]["llm_bytes"] < est["fp16"]["llm_bytes"]
    cfg = json.loads((path / "config.json").read_text())["llm_config"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_layer_heads = cfg["num_hidden_layers"] * cfg["num_key_value_heads"]
    assert est["fp16"]["kv_bytes_per_token"] == {"0": 2 * per_layer_heads * head_dim * 2,
                                                 "8": 2 * per_layer_heads * (head_dim + 4),
                                                 "4": 2 * per_layer_heads * (head_dim // 2 + 4)}


def test_estimate_table_and_errors(tiny_model, tmp_path):
    res = CliRunner().invoke(main, ["estimate", str(tiny_model("internvl2-1b")), "--tokens", "4096"])
    assert res.exit_code == 0 and "total weights" in res.output and "KV cache for 4096 tokens" in res.output
    missing = CliRunner().invoke(main, ["estimate", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no such file" in missing.output and "Traceback" not in missing.output
    (tmp_path / "config.json").write_text("{oops")
    bad = CliRunner().invoke(main, ["estimate", str(tmp_path)])
    assert bad.exit_code == 1 and "not valid JSON" in bad.output
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    other = CliRunner().invoke(main, ["estimate", str(tmp_path)])
    assert other.exit_code == 1 and "lacks" in other.output


def test_estimate_uses_an_awq_checkpoints_group_size(tiny_model, tmp_path):
    config = json.loads((tiny_model("internvl2-2b") / "config.json").read_text())
    awq = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 64, "zero_point": True}
    lmdeploy = tmp_path / "lmdeploy"
    lmdeploy.mkdir()
    (lmdeploy / "config.json").write_text(json.dumps({**config, "llm_config": {**config["llm_config"],
                                                                                "quantization_config": awq}}))
    side_file = tmp_path / "autoawq-old"
    side_file.mkdir()
    (side_file / "config.json").write_text(json.dumps(config))
    (side_file / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 32, "w_bit": 4}))

    def group_size(*args):
        res = CliRunner().invoke(main, ["estimate", *args, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)["w4a16"]["group_size"]

    assert group_size(str(lmdeploy)) == 64
    assert group_size(str(lmdeploy / "config.json")) == 64
    assert group_size(str(side_file)) == 32
    assert group_size(str(lmdeploy), "--w-group-size", "128") == 128   # the flag wins
    assert group_size(str(tiny_model("internvl2-2b"))) == 128          # not quantized: the default


def test_estimate_a_catalogue_model_reproduces_the_seeds_internvl2_26b_figures():
    """The seed tutorial: InternVL2-26B W4A16 on a 24 GB slice is about 12 GB of fp16 ViT plus about 10 GB of
    int4 LLM (spec internvl-and-quant.md B5.2); the estimate adds the LLM's fp16 embeddings and head."""
    res = CliRunner().invoke(main, ["estimate", "OpenGVLab/InternVL2-26B", "--memory", "24GiB", "--json"])
    assert res.exit_code == 0, res.output
    est = json.loads(res.output)
    assert est["catalogue"] == "OpenGVLab/InternVL2-26B"
    assert 11.0e9 < est["w4a16"]["vision_bytes"] < 12.5e9                 # "about 12 GB ViT fp16"
    assert 9.0e9 < est["w4a16_int4_linear_bytes"] < 10.5e9                # "about 10 GB LLM int4"
    kv4 = est["w4a16"]["kv_bytes_per_token"]["4"]
    assert kv4 == 2 * 48 * 8 * (128 // 2 + 4)                             # 51 KiB per token (B5.3)
    free = est["memory_bytes"] - est["reserve_bytes"] - est["w4a16"]["total_bytes"]
    assert est["max_session_tokens"]["w4a16"]["4"] == free // kv4 > 20000
    assert est["max_session_tokens"]["fp16"] == {"0": 0, "8": 0, "4": 0}  # 47 GiB of fp16 weights never fit
    table = CliRunner().invoke(main, ["estimate", "InternVL2-26B", "--memory", "24GiB"])
    assert table.exit_code == 0 and "of which int4" in table.output
    assert f"quant_policy 4: {free // kv4:,} tokens" in table.output and "does not fit" in table.output


def test_estimate_memory_flag_and_unknown_names(tiny_model):
    res = CliRunner().invoke(main, ["estimate", str(tiny_model("internvl2-2b")), "--memory", "2GiB", "--reserve",
                                    "0", "--json"])
    est = json.loads(res.output)
    assert est["max_session_tokens"]["fp16"]["0"] == (2 * 2**30 - est["fp16"]["total_bytes"]) // \
        est["fp16"]["kv_bytes_per_token"]["0"]
    bad = CliRunner().invoke(main, ["estimate", "InternVL2-26B", "--memory", "lots"])
    assert bad.exit_code == 2 and "'lots': give a size such as 24GiB" in bad.output
    unknown = CliRunner().invoke(main, ["estimate", "OpenGVLab/InternVL9-1T"])
    assert unknown.exit_code == 1 and "no such file" in unknown.output and "hub_cli models" in unknown.output
