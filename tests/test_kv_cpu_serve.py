"""``hub_cli serve --model-format awq --quant-policy 4`` on CPU: a W4A16 InternVL with the 4-bit KV cache answers an
image request through the ``openai`` client (the real multi-process server; the plugin's CPU attention backend in
its worker)."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import pytest

from conftest import cli_server, free_port, random_image

HUB_CLI = Path(sys.executable).with_name("hub_cli")


@pytest.mark.slow
def test_awq_internvl_with_the_int4_kv_cache_answers_an_image(awq_model, tmp_path):
    import openai

    quant, _ = awq_model("internvl2-2b", "ours", 32)
    port = free_port()
    log = tmp_path / "serve.log"
    argv = [HUB_CLI, "serve", quant, "--model-format", "awq", "--quant-policy", "4", "--server-port", port,
            "--session-len", "4096", "--max-batch-size", "2"]
    with cli_server(argv, log, port=port,
                    drop_env=("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE")) as base:
        buf = io.BytesIO()
        random_image(640, 480, seed=7).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=180)
        resp = client.chat.completions.create(model=str(quant), max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe the image."}]}])
        text = log.read_text()
    assert resp.choices[0].message.content and resp.usage.completion_tokens == 6
    assert resp.usage.prompt_tokens > 7 * 256             # 640x480 -> 3x2 tiles + thumbnail, 256 tokens each
    # the server ran the 4-bit cache (vLLM logs the dtype it stores) with the W4A16 method
    assert "--kv-cache-dtype int4_per_token_head" in text
    assert "Using int4_per_token_head data type to store kv cache" in text
    assert "int4_per_token_head KV cache on CPU: written and read by the plugin's CPUKVQuantAttentionBackend" in text
    assert "int4_per_token_head decode steps: fused CPU kernel (Numba" in text          # not the scratch path
    assert "awq_w4a16" in text
