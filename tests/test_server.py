"""The OpenAI-compatible server, started the way the README says (``hub_cli demo``), through the
official ``openai`` client: models list, chat with a base64 image and with an http URL on
127.0.0.1, usage counts against the reference prompt, a garbage image -> HTTP 400, still serving."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from conftest import png_bytes, cli_server, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo-cache")
    port = free_port()
    log = cache / "server.log"
    hub_cli = Path(sys.executable).with_name("hub_cli")
    # the real multi-process server; the plugin found through its entry point
    # 127.0.0.1 allowed for image_host; other loopback addresses stay refused (the media policy)
    with cli_server([hub_cli, "demo", "--port", port, "--cache-dir", cache, "--allow-media-hosts", "127.0.0.1/32"],
                    log, port=port) as base:
        yield base, cache / "internvl2-2b", log


@pytest.fixture(scope="module")
def client(demo_server):
    import openai

    return openai.OpenAI(base_url=demo_server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def image_host(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "cat.png").write_bytes(png_bytes(900, 300, (20, 120, 220)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _expected_prompt_tokens(model_dir, images, text):
    from transformers import AutoTokenizer

    from internvl_plugin import register
    from reference import ref_build_prompt, ref_num_tiles

    register()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    question = "".join("<image>\n" for _ in images) + text
    tiles = [ref_num_tiles(im.width, im.height, None, model_dir) for im in images]
    return len(tok(ref_build_prompt(question, tiles, model_dir)).input_ids)


def test_ready_message_and_models(demo_server, client):
    base, _, log = demo_server
    text = log.read_text()
    assert "curl -s " + base + "/v1/chat/completions" in text
    assert "'trust_remote_code': True" not in text and "trust_remote_code=True" not in text
    assert [m.id for m in client.models.list().data] == ["tiny-internvl"]


def test_chat_with_base64_image(demo_server, client):
    _, model_dir, _ = demo_server
    png = png_bytes(640, 480, (10, 200, 30))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    resp = client.chat.completions.create(model="tiny-internvl", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "Describe the image."}]}])
    assert resp.choices[0].message.content
    assert resp.usage.completion_tokens == 6
    # 640x480 -> 3x2 tiles + thumbnail = 1792 image tokens, plus the templated text
    expected = _expected_prompt_tokens(model_dir, [Image.open(io.BytesIO(png))], "Describe the image.")
    assert resp.usage.prompt_tokens == expected > 1792


def test_chat_with_http_image_url(demo_server, client, image_host):
    _, model_dir, _ = demo_server
    resp = client.chat.completions.create(model="tiny-internvl", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_host + "/cat.png"}},
                                     {"type": "text", "text": "What is this?"}]}])
    img = Image.new("RGB", (900, 300))
    assert resp.usage.prompt_tokens == _expected_prompt_tokens(model_dir, [img], "What is this?")


def test_loopback_image_url_is_refused_without_a_connection(demo_server, client):
    """hub_cli demo has serve's media policy: an image URL to a loopback address not allowed is a 400 naming
    the image and the address, and nothing connects to it."""
    import openai
    from test_media_policy import Listener

    listener = Listener("127.0.0.2", {"/x.png": (200, {}, png_bytes(8, 8, (1, 2, 3)))})
    try:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny-internvl", max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": listener.base + "/x.png"}},
                                             {"type": "text", "text": "hi"}]}])
        assert info.value.status_code == 400
        assert f"image 1 ({listener.base}/x.png): refused address: 127.0.0.2 is loopback" in str(info.value)
        assert listener.connections == []
    finally:
        listener.close()


def test_garbage_image_is_400_and_server_survives(demo_server, client):
    import openai

    garbage = "data:image/png;base64," + base64.b64encode(b"this is not a png at all" * 10).decode()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-internvl", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": garbage}},
                                         {"type": "text", "text": "hi"}]}])
    assert info.value.status_code == 400
    message = str(info.value).lower()
    assert "image" in message, message
    resp = client.chat.completions.create(model="tiny-internvl", max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "still there?"}])
    assert resp.usage.completion_tokens == 3
