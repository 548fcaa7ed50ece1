"""The tiny XComposer2 VL-1.8B served by ``hub_cli demo --layout xcomposer2-vl-1.8b`` (vLLM's OpenAI server,
plugin found by entry point, no remote code) through the official ``openai`` client: a chat with a base64
image whose usage.prompt_tokens equals the reference's count, a garbage image -> HTTP 400 with the server
still serving, and ``hub_cli chat`` against it with an image and piped input."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import png_bytes, cli_server, free_port

pytestmark = pytest.mark.slow
LAYOUT = "xcomposer2-vl-1.8b"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xc-demo")
    port = free_port()
    log = cache / "server.log"
    hub_cli = Path(sys.executable).with_name("hub_cli")
    with cli_server([hub_cli, "demo", "--layout", LAYOUT, "--port", port, "--cache-dir", cache], log, port=port) as base:
        yield base, cache / LAYOUT, log


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_with_an_image_and_usage(server, client):
    from transformers import AutoTokenizer

    from internvl_plugin import register
    from reference.xcomposer2 import IMAGE_TOKEN, PLACEHOLDER, load_xcomposer2_reference, ref_build_ids

    base, model_dir, log = server
    assert "trust_remote_code=True" not in log.read_text()
    model = client.models.list().data[0].id
    png = png_bytes(640, 480, (10, 200, 30))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    resp = client.chat.completions.create(model=model, max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "Describe the image."}]}])
    assert resp.choices[0].message.content is not None and resp.usage.completion_tokens <= 6
    register()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ref = load_xcomposer2_reference(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": f"{PLACEHOLDER}\nDescribe the image."}],
                                   tokenize=False, add_generation_prompt=True)
    image = Image.open(io.BytesIO(png))
    ids = ref_build_ids(tok, text, [ref.num_image_tokens(ref.preprocess(image)[1])],
                        tok.convert_tokens_to_ids(IMAGE_TOKEN), add_bos=False)
    assert resp.usage.prompt_tokens == len(ids)


def test_garbage_image_is_400_and_server_keeps_serving(client):
    import openai

    model = client.models.list().data[0].id
    url = "data:image/png;base64," + base64.b64encode(b"this is not an image at all").decode()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "hi"}]}])
    assert info.value.status_code == 400 and "image" in str(info.value).lower()
    resp = client.chat.completions.create(model=model, max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "still there?"}])
    assert resp.usage.completion_tokens <= 3 and resp.choices[0].finish_reason in ("length", "stop")


def test_hub_cli_chat_with_an_image(server, tmp_path):
    base = server[0]
    image = tmp_path / "green.png"
    image.write_bytes(png_bytes(320, 240, (10, 200, 30)))
    hub_cli = Path(sys.executable).with_name("hub_cli")
    proc = subprocess.run([str(hub_cli), "chat", base, "--image", str(image), "--max-tokens", "8",
                           "--temperature", "0"], input="What is in the picture?\n", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "talking to" in proc.stderr and proc.stdout.strip()
