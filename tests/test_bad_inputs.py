"""Hostile and odd input against one real ``hub_cli serve`` of the tiny InternVL on CPU: every bad image, URL and
request gets a 4xx with a one-line message naming the image and the cause (never a 500), odd but valid images
answer 200, image URLs reach no refused address (listeners on 127.0.0.2 record connections), and the server
answers a real chat after each case."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import cli_server, free_port, make_llm, release_llm
from test_media_policy import Listener, png_header_only

pytestmark = pytest.mark.slow
HUB_CLI = Path(sys.executable).with_name("hub_cli")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


PNG = encode(Image.new("RGB", (64, 48), (200, 10, 10)), "PNG")
JPEG = encode(Image.new("RGB", (64, 48), (10, 200, 10)), "JPEG")


@pytest.fixture(scope="module")
def listeners():
    refused = Listener("127.0.0.2", {"/x.png": (200, {}, PNG)})        # loopback, not in the allow list
    allowed = Listener("127.0.0.1", {"/x.png": (200, {}, PNG),
                                     "/hop": (302, {"Location": refused.base + "/x.png"}, b"")})
    yield allowed, refused
    allowed.close()
    refused.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx

    from internvl_plugin.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("bad-inputs")
    model = build_tiny_model("internvl2-2b", root / "tiny")
    port = free_port()
    argv = [HUB_CLI, "serve", model, "--server-port", port, "--session-len", "4096", "--max-batch-size", "4",
            "--model-name", "tiny", "--allow-media-hosts", "127.0.0.1/32",
            "--", "--limit-mm-per-prompt", '{"image": 2}']
    with cli_server(argv, root / "serve.log", port=port,
                    drop_env=("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE")) as base:
        with httpx.Client(base_url=base, timeout=120) as client:
            yield client, root / "serve.log"


def chat(client, *urls, text="hi", **extra):
    body = {"model": "tiny", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": text}]}]}
    body.update(extra)
    return client.post("/v1/chat/completions", json=body)


def still_serving(client):
    resp = chat(client, data_url(PNG))
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 2


def assert_refused(resp, status, fragment):
    assert resp.status_code == status, resp.text
    message = resp.json()["error"]["message"]
    assert fragment in message, message
    assert "\n" not in message.strip() and "Traceback" not in message


# (image bytes or URL builder, status, message fragment): each a kind of bad image
BAD_DATA = {
    "decompression bomb 40000x40000": (data_url(png_header_only(40000, 40000)), 400,
                                       "image 1 (data URL): 40000x40000 is 1600000000 pixels, over the limit of "
                                       "178956970 (VLLM_MAX_IMAGE_PIXELS)"),
    "garbage bytes": (data_url(b"this is not a png at all" * 10), 400, "image 1 (data URL): not an image"),
    "HTML sent as an image": (data_url(b"<!doctype html><html><body>hi</body></html>", "image/png"), 400,
                              "image 1 (data URL): not an image in a supported format"),
    "SVG sent as an image": (data_url(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                                      "image/svg+xml"), 400, "image 1 (data URL): not an image"),
    "empty data URL": ("data:image/png;base64,", 400, "image 1 (data URL): empty image"),
    "data URL not base64": ("data:image/png;base64,%%%not-base64%%%", 400, "payload is not valid base64"),
    "data URL without payload": ("data:image/png;base64", 400, "data URL without a ','"),
    "truncated PNG": (data_url(PNG[: len(PNG) // 2]), 400, "image 1 (data URL): damaged PNG image (64x48): "),
    "truncated JPEG": (data_url(JPEG[: len(JPEG) // 2], "image/jpeg"), 400, "image 1 (data URL): "),
    "PNG header with a corrupt IDAT": (data_url(png_header_only(64, 64)), 400,
                                       "image 1 (data URL): damaged PNG image (64x64): image file is truncated"),
    "file:// URL": ("file:///etc/passwd", 400, "image 1 (file:///etc/passwd): file:// URLs are refused: the "
                                               "server was started without --allowed-local-media-path"),
    "ftp:// URL": ("ftp://example.org/cat.png", 400, "image 1 (ftp://example.org/cat.png): unsupported URL "
                                                     "scheme ftp:"),
    "cloud metadata address": ("http://169.254.169.254/latest/meta-data/", 400,
                               "refused address: 169.254.169.254 is link-local"),
    "private address": ("http://10.0.0.1/cat.png", 400, "refused address: 10.0.0.1 is private"),
    "IPv6 loopback": ("http://[::1]:9/cat.png", 400, "refused address: ::1 is loopback"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_image_is_400_and_server_survives(server, case):
    client, _ = server
    url, status, fragment = BAD_DATA[case]
    assert_refused(chat(client, url), status, fragment)
    still_serving(client)


def test_the_three_issue_500s_name_their_cause(server, listeners):
    client, log = server
    allowed, refused = listeners
    closed = free_port()
    assert_refused(chat(client, data_url(PNG), data_url(png_header_only(40000, 40000))), 400,
                   "image 2 (data URL): 40000x40000 is 1600000000 pixels")
    assert_refused(chat(client, f"http://127.0.0.1:{closed}/cat.png"), 400,
                   f"image 1 (http://127.0.0.1:{closed}/cat.png): cannot reach 127.0.0.1:{closed}")
    assert_refused(chat(client, "file:///etc/passwd"), 400, "file:// URLs are refused")
    still_serving(client)
    assert " 500 " not in log.read_text()


def test_loopback_listener_is_never_connected(server, listeners):
    client, _ = server
    allowed, refused = listeners
    before = len(allowed.connections)
    assert_refused(chat(client, refused.base + "/x.png"), 400,
                   f"image 1 ({refused.base}/x.png): refused address: 127.0.0.2 is loopback; the server fetches "
                   "public addresses only")
    assert_refused(chat(client, allowed.base + "/hop"), 400, "refused address: 127.0.0.2 is loopback")
    assert len(allowed.connections) == before + 1          # the allowed hop was fetched, its redirect was not
    assert refused.connections == []
    still_serving(client)


def test_allowed_host_url_and_its_errors(server, listeners):
    client, _ = server
    allowed, _ = listeners
    resp = chat(client, allowed.base + "/x.png")
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] > 256
    assert_refused(chat(client, allowed.base + "/missing.png"), 400,
                   f"image 1 ({allowed.base}/missing.png): 127.0.0.1:{allowed.base.rsplit(':', 1)[1]} answered "
                   "HTTP 404")
    still_serving(client)


def test_anthropic_messages_images_follow_the_policy(server, listeners):
    """vLLM 0.32 also serves Anthropic's /v1/messages with images: the same checks apply there."""
    client, _ = server
    _, refused = listeners

    def messages(source):
        return client.post("/v1/messages", json={"model": "tiny", "max_tokens": 2, "messages": [{
            "role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": "hi"}]}]})

    png = {"type": "base64", "media_type": "image/png"}
    resp = messages(dict(png, data=base64.b64encode(PNG).decode()))
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["output_tokens"] == 2
    assert_refused(messages(dict(png, data=base64.b64encode(png_header_only(40000, 40000)).decode())), 400,
                   "image 1 (data URL): 40000x40000 is 1600000000 pixels")
    assert_refused(messages({"type": "url", "url": refused.base + "/x.png"}), 400,
                   f"image 1 ({refused.base}/x.png): refused address: 127.0.0.2 is loopback")
    assert refused.connections == []
    still_serving(client)


def _odd_images():
    gif = io.BytesIO()
    frames = [Image.new("P", (40, 30), i) for i in range(3)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "CMYK JPEG": encode(Image.new("CMYK", (50, 40), (0, 50, 100, 0)), "JPEG"),
        "16-bit PNG": encode(Image.new("I;16", (50, 40), 40000), "PNG"),
        "palette PNG": encode(Image.new("P", (50, 40), 3), "PNG"),
        "RGBA PNG": encode(Image.new("RGBA", (50, 40), (1, 2, 3, 100)), "PNG"),
        "animated GIF": gif.getvalue(),
        "WebP": encode(Image.new("RGB", (50, 40), (9, 9, 9)), "WEBP"),
        "1x1 PNG": encode(Image.new("RGB", (1, 1)), "PNG"),
        "1x3000 PNG": encode(Image.new("RGB", (1, 3000)), "PNG"),
    }


def test_odd_but_valid_images_answer_200(server):
    client, _ = server
    for name, data in _odd_images().items():
        resp = chat(client, data_url(data))
        assert resp.status_code == 200, f"{name}: {resp.text}"


@pytest.mark.parametrize("case", ["too many images", "malformed JSON", "unknown model", "image part without url",
                                  "mm_processor_kwargs not trusted", "max_tokens negative"])
def test_bad_requests(server, case):
    client, _ = server
    if case == "too many images":
        resp, status, fragment = chat(client, *[data_url(PNG)] * 3), 400, "image"
    elif case == "malformed JSON":
        resp = client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                           headers={"content-type": "application/json"})
        status, fragment = 400, "JSON"
    elif case == "unknown model":
        resp, status, fragment = chat(client, data_url(PNG), model="nope"), 404, "nope"
    elif case == "image part without url":
        body = {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {}}, {"type": "text", "text": "hi"}]}]}
        resp, status, fragment = client.post("/v1/chat/completions", json=body), 400, "url"
    elif case == "mm_processor_kwargs not trusted":
        resp = chat(client, data_url(PNG), mm_processor_kwargs={"max_dynamic_patch": 6})
        status, fragment = 400, "mm_processor_kwargs"
    else:
        resp, status, fragment = chat(client, data_url(PNG), max_tokens=-1), 400, "max_tokens"
    assert resp.status_code == status, resp.text
    body = resp.json()
    message = body["error"]["message"] if "error" in body else json.dumps(body)
    assert fragment.lower() in message.lower(), message
    still_serving(client)


# ---------------------------------------------------------------------------------------------------------
# offline LLM(): no server, no middleware; vLLM's own errors, each naming its cause
# ---------------------------------------------------------------------------------------------------------
def _truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4096])
    return f"checkpoint file damaged: {path} is truncated: tensor "


def _wrong_shape(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["mlp1.1.weight"] = tensors["mlp1.1.weight"][:, :-1].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return ("checkpoint tensor 'mlp1.1.weight' (shape [128, 127]) cannot be loaded: "
            "Attempted to load weight (torch.Size([128, 127])) into parameter")


@pytest.mark.parametrize("damage", [_wrong_shape, _truncate], ids=["wrong-shape", "truncated"])
def test_offline_llm_bad_checkpoint_names_the_culprit(tiny_model, tmp_path, monkeypatch, damage):
    """LLM() raises the plugin's one-line ValueError naming the tensor of the wrong shape, or the truncated
    safetensors file (safetensors' own "incomplete metadata" names no file)."""
    import shutil

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model("internvl2-2b"), bad)
    expected = damage(bad)
    with pytest.raises(ValueError) as info:
        try:
            make_llm(bad)
        finally:
            from vllm.distributed import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()  # the half-built engine's process group, before the next LLM()
    assert str(info.value).startswith(expected), info.value


def test_first_damaged_names_the_file(tiny_model, tmp_path):
    import shutil

    from internvl_plugin.safetensors_check import first_damaged

    folder = tmp_path / "m"
    shutil.copytree(tiny_model("internvl2-2b"), folder)
    assert first_damaged(folder) is None
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    assert str(first_damaged(folder)).startswith(f"{path} is truncated: tensor ")
    path.write_bytes(data[:20])
    assert str(first_damaged(folder)).startswith(f"{path} is truncated or not safetensors: its header claims ")


@pytest.fixture(scope="module")
def offline_llm(tiny_model, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = make_llm(tiny_model("internvl2-2b"))
    yield llm
    release_llm(llm)


def test_offline_llm_bad_images_raise_a_clear_error(offline_llm):
    from vllm import SamplingParams

    def chat(url):
        return offline_llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                               {"type": "text", "text": "hi"}]}],
                                SamplingParams(max_tokens=2), use_tqdm=False)

    cases = [  # (image URL, exception, message start)
        (data_url(b"this is not a png at all" * 10), ValueError, "Failed to load image: cannot identify image file"),
        (data_url(png_header_only(40000, 40000)), Image.DecompressionBombError,
         "Image size (1600000000 pixels) exceeds limit of 178956970 pixels"),
        ("file:///etc/passwd", RuntimeError, "Cannot load local files without `--allowed-local-media-path`"),
    ]
    for url, error, message in cases:
        with pytest.raises(error) as info:
            chat(url)
        assert str(info.value).startswith(message), str(info.value)
    out = chat(data_url(PNG))[0]   # the engine still answers
    assert len(out.outputs[0].token_ids) == 2
