"""Per-request tile budgets and images per request in hub_cli serve (internvl_plugin/tile_budget.py, hub_cli/mm_budget.py).

Before: ``hub_cli serve --trust-request-mm-kwargs`` on a model whose config says max_dynamic_patch 6 answered
a request with ``max_dynamic_patch: 12`` and a 4000x100 image (13 tiles, 3328 image tokens) with HTTP 400
"... exceeds the pre-allocated encoder cache size 2048": vLLM sizes its encoder cache from the largest
image the processor reports. Now serve sets the budget (``--max-dynamic-patch``, default 40 or what fits the
session) for the plugin to report, a request within it is served, one above it gets a one-line 400 naming
the limit, and ``--limit-mm-per-prompt`` defaults to what fits one session. One real server of the tiny
Mini-InternVL-4B (Phi-3) layout, through the openai client: an image chat and an mp4 video_url chat whose usage equals the
reference prompt's token count; a corrupt video is a 400 and the server goes on serving.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
from conftest import cli_server, free_port, png_bytes

from hub_cli.errors import UsageError
from hub_cli.serve import plan_server
from internvl_plugin.internvl_image import Tiling
from internvl_plugin.tile_budget import MAX_DYNAMIC_PATCH_ENV, budget_from_env

HUB_CLI = Path(sys.executable).with_name("hub_cli")


def _png_url(w, h, color=(10, 200, 30)) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(w, h, color)).decode()


def _flag(args, name):
    return args[args.index(name) + 1] if name in args else None


@pytest.fixture(scope="module")
def model_4b(tiny_model):
    return tiny_model("mini-internvl-4b")


def test_serve_sizes_the_budget_and_the_image_count(model_4b):
    plan = plan_server(model_4b, trust_request_mm_kwargs=True, session_len=4096, on_cpu=True)
    # 4096 tokens hold 4096 // 256 - 1 = 15 tiles + thumbnail; 4096 // (7 * 256) = 2 images of the config's 6 tiles
    assert plan.env[MAX_DYNAMIC_PATCH_ENV] == "15"
    assert json.loads(_flag(plan.args, "--limit-mm-per-prompt")) == {"image": 2, "video": 1}
    assert any("up to 15 tiles" in n and "4096 image tokens" in n for n in plan.notes)

    plan = plan_server(model_4b, trust_request_mm_kwargs=True, max_dynamic_patch=12, on_cpu=True,
                       extra=["--limit-mm-per-prompt", '{"image": 5}'])
    assert plan.env[MAX_DYNAMIC_PATCH_ENV] == "12"
    assert plan.args.count("--limit-mm-per-prompt") == 1 and _flag(plan.args, "--limit-mm-per-prompt") == '{"image": 5}'

    plan = plan_server(model_4b, on_cpu=True)  # session = max_position_embeddings 131072: the cap of 16 images
    assert MAX_DYNAMIC_PATCH_ENV not in plan.env and json.loads(_flag(plan.args, "--limit-mm-per-prompt")) == {"image": 16, "video": 1}
    with pytest.raises(UsageError, match="--max-dynamic-patch .* needs --trust-request-mm-kwargs"):
        plan_server(model_4b, max_dynamic_patch=12, on_cpu=True)


def test_tiling_refuses_a_request_over_the_budget(monkeypatch, model_4b):
    from internvl_plugin.configs import InternVLChatConfig

    config = InternVLChatConfig(**json.loads((model_4b / "config.json").read_text()))
    monkeypatch.setenv(MAX_DYNAMIC_PATCH_ENV, "12")
    assert budget_from_env() == 12
    assert Tiling.from_config(config, {"max_dynamic_patch": 12}).max_num == 12
    with pytest.raises(ValueError, match=r"^max_dynamic_patch=13 is over this server's limit of 12 tiles"):
        Tiling.from_config(config, {"max_dynamic_patch": 13})
    monkeypatch.setenv(MAX_DYNAMIC_PATCH_ENV, "41")
    with pytest.raises(ValueError, match=f"{MAX_DYNAMIC_PATCH_ENV}=41 is outside 1..40"):
        budget_from_env()


@pytest.fixture(scope="module")
def served_4b(model_4b, tmp_path_factory):
    log = tmp_path_factory.mktemp("budget") / "serve.log"
    port = free_port()
    argv = [HUB_CLI, "serve", model_4b, "--model-name", "tiny-4b", "--server-port", port, "--session-len", "4096",
            "--max-batch-size", "2", "--trust-request-mm-kwargs", "--max-dynamic-patch", "12"]
    with cli_server(argv, log, port=port,
                    drop_env=("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE")) as base:
        yield base, log


def _chat(base, url, text="Describe the image.", **extra):
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    return client.chat.completions.create(model="tiny-4b", max_tokens=4, temperature=0, extra_body=extra or None,
                                          messages=[{"role": "user", "content": [
                                              {"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": text}]}])


@pytest.mark.slow
def test_served_image_chat_counts_the_reference_prompt(served_4b, model_4b):
    from reference import ref_build_prompt, ref_num_tiles
    from transformers import AutoTokenizer

    base, _ = served_4b
    resp = _chat(base, _png_url(640, 480))
    tok = AutoTokenizer.from_pretrained(str(model_4b))
    tiles = ref_num_tiles(640, 480, None, model_4b)
    expected = len(tok(ref_build_prompt("<image>\nDescribe the image.", [tiles], model_4b)).input_ids)
    assert tiles == 7 and resp.usage.prompt_tokens == expected and resp.usage.completion_tokens == 4


@pytest.mark.slow
def test_request_within_the_budget_is_served_and_one_above_is_a_clear_400(served_4b):
    import openai

    base, _ = served_4b
    resp = _chat(base, _png_url(4000, 100), mm_processor_kwargs={"max_dynamic_patch": 12})
    assert resp.usage.prompt_tokens > 13 * 256   # 12 x 1 tiles + thumbnail: was the encoder-cache 400
    with pytest.raises(openai.BadRequestError) as err:
        _chat(base, _png_url(4000, 100), mm_processor_kwargs={"max_dynamic_patch": 13})
    assert err.value.status_code == 400
    assert "max_dynamic_patch=13 is over this server's limit of 12 tiles" in str(err.value)
    assert "encoder cache" not in str(err.value)
    assert _chat(base, _png_url(64, 48)).usage.completion_tokens == 4   # still serving


@pytest.mark.slow
def test_served_video_url_and_a_corrupt_video(served_4b, model_4b, tmp_path):
    import numpy as np
    import openai
    from reference import ref_build_prompt
    from test_internvl_video import mp4_bytes
    from transformers import AutoTokenizer

    base, _ = served_4b
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)

    def video_chat(url):
        return client.chat.completions.create(model="tiny-4b", max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "What happens?"}]}])

    clip = np.random.default_rng(1).integers(0, 256, (6, 96, 128, 3), dtype=np.uint8)
    resp = video_chat("data:video/mp4;base64," + base64.b64encode(mp4_bytes(clip, tmp_path)).decode())
    tok = AutoTokenizer.from_pretrained(str(model_4b))
    question = "".join(f"Frame{i + 1}: <image>\n" for i in range(6)) + "What happens?"
    assert resp.usage.prompt_tokens == len(tok(ref_build_prompt(question, [1] * 6, model_4b)).input_ids)
    for bad in (b"\x00\x00\x00\x18ftypmp42 this is not a video", b""):
        with pytest.raises(openai.BadRequestError) as err:
            video_chat("data:video/mp4;base64," + base64.b64encode(bad).decode())
        assert err.value.status_code == 400
    assert _chat(base, _png_url(64, 48)).usage.completion_tokens == 4   # still serving
