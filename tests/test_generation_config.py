"""hub_cli serve adds XComposer2's turn-end stop id through a generation-config copy (the released
generation_config.json files stop on </s> only)."""

import json
import shutil

import pytest

from hub_cli.generation import generation_config_with_turn_end, turn_end_id


@pytest.fixture
def released_xc2(tiny_model, tmp_path):
    """The tiny VL-1.8B with a generation config as released: eos </s> only."""
    folder = tmp_path / "xc2"
    shutil.copytree(tiny_model("xcomposer2-vl-1.8b"), folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                               "max_length": 1600}))
    return folder


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def test_copy_adds_the_turn_end_id_and_keeps_the_rest(released_xc2, tmp_path):
    from transformers import GenerationConfig

    stop = turn_end_id(released_xc2)
    added = json.loads((released_xc2 / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert added[str(stop)]["content"] == "[UNUSED_TOKEN_145]"
    folder = generation_config_with_turn_end(released_xc2, _config(released_xc2), cache_root=tmp_path / "cache")
    gen = GenerationConfig.from_pretrained(folder)          # what vLLM's try_get_generation_config reads
    assert gen.eos_token_id == [2, stop] and gen.max_length == 1600 and gen.bos_token_id == 1
    # the model folder is untouched, and a second call reuses the same folder
    assert json.loads((released_xc2 / "generation_config.json").read_text())["eos_token_id"] == 2
    assert generation_config_with_turn_end(released_xc2, _config(released_xc2), cache_root=tmp_path / "cache") == folder


def test_without_a_generation_config_the_config_ids_are_used(released_xc2, tmp_path):
    (released_xc2 / "generation_config.json").unlink()
    folder = generation_config_with_turn_end(released_xc2, _config(released_xc2), cache_root=tmp_path / "cache")
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, turn_end_id(released_xc2)] and gen["bos_token_id"] == 1


def test_nothing_for_internvl_or_a_config_that_already_stops(tiny_model, tmp_path):
    cache = tmp_path / "cache"
    internvl = tiny_model("internvl2-2b")
    assert generation_config_with_turn_end(internvl, _config(internvl), cache_root=cache) is None
    tiny_xc2 = tiny_model("xcomposer2-4khd")       # the tiny layouts ship [2, turn end] already
    assert generation_config_with_turn_end(tiny_xc2, _config(tiny_xc2), cache_root=cache) is None
    assert not cache.exists()


def test_serve_passes_it_unless_the_user_does(released_xc2, tmp_path, monkeypatch):
    from hub_cli.serve import plan_server

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    plan = plan_server(released_xc2, on_cpu=True)
    folder = plan.args[plan.args.index("--generation-config") + 1]
    assert folder.startswith(str(tmp_path / "home"))
    assert json.loads(open(f"{folder}/generation_config.json").read())["eos_token_id"][-1] == turn_end_id(released_xc2)
    assert any("[UNUSED_TOKEN_145]" in note for note in plan.notes)
    mine = plan_server(released_xc2, on_cpu=True, extra=["--generation-config", "vllm"])
    assert mine.args.count("--generation-config") == 1 and mine.args[-1] == "vllm"


def test_vllm_stops_on_it(released_xc2, tmp_path):
    """vLLM 0.32 reads the folder as the model's generation config: the turn end becomes a stop id."""
    from vllm import SamplingParams
    from vllm.config import ModelConfig

    from internvl_plugin import register

    register()   # what vLLM's plugin loading does in an engine: the configs, no remote code
    folder = generation_config_with_turn_end(released_xc2, _config(released_xc2), cache_root=tmp_path / "cache")
    fields = ModelConfig(model=str(released_xc2), generation_config=str(folder)).try_get_generation_config()
    params = SamplingParams(max_tokens=4)
    params.update_from_generation_config(fields, 2)
    assert params.stop_token_ids == [turn_end_id(released_xc2)]
