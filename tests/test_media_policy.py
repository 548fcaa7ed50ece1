"""The media URL policy without a server: the address decision on every refused range, image sizes read from
headers (decompression bombs), fetches under the policy against 127.0.0.1 listeners that record connections
(refused address, redirects, unreachable port, HTTP errors, timeout, size), the ASGI middleware on a stand-in
app, hub_cli serve's flags, and the two vLLM 0.32 facts the middleware relies on."""

from __future__ import annotations

import asyncio
import base64
import http.server
import inspect
import io
import ipaddress
import json
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from internvl_plugin.media_policy import (MediaPolicy, MediaPolicyMiddleware, MediaRefused, address_refusal,
                                          check_image_bytes, fetch_image_bytes, image_size, parse_allow,
                                          resolve_images)

REFUSED = {
    "0.0.0.0": "unspecified", "::": "unspecified",
    "127.0.0.1": "loopback", "127.255.0.9": "loopback", "::1": "loopback", "::ffff:127.0.0.1": "loopback",
    "10.0.0.1": "private", "172.16.5.4": "private", "172.31.255.255": "private", "192.168.0.1": "private",
    "fc00::1": "private", "fd12:3456::1": "private", "::ffff:10.1.1.1": "private",
    "169.254.169.254": "link-local", "169.254.0.1": "link-local", "fe80::1": "link-local",
    "64:ff9b::a9fe:a9fe": "link-local",          # NAT64 spelling of the metadata address
    "fd00:ec2::254": "private",                   # AWS's IPv6 metadata address
    "224.0.0.1": "multicast", "239.255.255.250": "multicast", "ff02::1": "multicast",
    "100.64.0.1": "shared", "100.127.255.254": "shared",
    "240.0.0.1": "private", "255.255.255.255": "private", "198.18.0.1": "private", "192.0.2.7": "private",
    "2001:db8::1": "private",
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "100.128.0.1",
          "172.32.0.1", "11.0.0.1"]


@pytest.mark.parametrize("address,kind", sorted(REFUSED.items()))
def test_refused_ranges(address, kind):
    assert kind in address_refusal(ipaddress.ip_address(address))
    why = MediaPolicy().refusal("example.org", [address])
    assert why.startswith(f"refused address: example.org -> {address} is ") and "--allow-media-hosts" in why


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert address_refusal(ipaddress.ip_address(address)) is None
    assert MediaPolicy().refusal("example.org", [address]) is None


def test_every_address_of_a_name_must_pass():
    why = MediaPolicy().refusal("mixed.example", ["8.8.8.8", "10.0.0.1"])
    assert "mixed.example -> 10.0.0.1 is private" in why


def test_allow_list_hosts_and_ranges():
    policy = MediaPolicy.from_env({"VLLM_INTERNVL_MEDIA_ALLOW": "images.lan, 10.0.0.0/8,127.0.0.1,[::1]"})
    assert policy.refusal("images.lan", ["192.168.1.9"]) is None           # a named host passes whatever it is
    assert policy.refusal("IMAGES.LAN.", ["192.168.1.9"]) is None
    assert policy.refusal("x.lan", ["10.9.9.9"]) is None
    assert policy.refusal("127.0.0.1", ["127.0.0.1"]) is None
    assert policy.refusal("::1", ["::1"]) is None
    assert "loopback" in policy.refusal("127.0.0.2", ["127.0.0.2"])
    assert "private" in policy.refusal("x.lan", ["192.168.1.9"])
    assert "link-local" in policy.refusal("x", ["169.254.169.254"])


@pytest.mark.parametrize("spec", ["10.0.0.0/33", "bad host!", "a/b"])
def test_bad_allow_items_are_named(spec):
    with pytest.raises(ValueError, match="neither a host name"):
        parse_allow(spec)


# ---------------------------------------------------------------------------------------------------------
# image bytes
# ---------------------------------------------------------------------------------------------------------
def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h (a decompression bomb's header) with no pixel data behind it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def png(w=32, h=24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_bomb_size_read_from_header():
    assert image_size(png_header_only(40000, 40000))[:2] == (40000, 40000)
    with pytest.raises(MediaRefused, match=r"^40000x40000 is 1600000000 pixels, over the limit of 178956970 "
                                           r"\(VLLM_MAX_IMAGE_PIXELS\)$"):
        check_image_bytes(png_header_only(40000, 40000), MediaPolicy())
    assert image_size(png_header_only(13000, 13000)) == (13000, 13000, "PNG")   # 169 M: under the limit...
    with pytest.raises(MediaRefused, match=r"^damaged PNG image \(13000x13000\): image file is truncated"):
        check_image_bytes(png_header_only(13000, 13000), MediaPolicy())          # ...but no pixels behind it


@pytest.mark.parametrize("data,fragment", [
    (b"", "empty image"),
    (b"<html><body>not an image</body></html>", "not an image in a supported format"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not an image in a supported format"),
    (b"\x00" * 2000, "not an image"),
    (png()[:-30], r"damaged PNG image \(32x24\): "),
])
def test_bad_bytes(data, fragment):
    with pytest.raises(MediaRefused, match=fragment):
        check_image_bytes(data, MediaPolicy())


def test_byte_limit_and_pixel_limit_from_env():
    policy = MediaPolicy.from_env({"VLLM_INTERNVL_MEDIA_MAX_BYTES": "100", "VLLM_MAX_IMAGE_PIXELS": "500"})
    with pytest.raises(MediaRefused, match=r"bytes, over the limit of 100 \(VLLM_INTERNVL_MEDIA_MAX_BYTES\)"):
        check_image_bytes(png() + b"\x00" * 200, policy)
    with pytest.raises(MediaRefused, match="32x24 is 768 pixels, over the limit of 500"):
        check_image_bytes(png(), MediaPolicy(max_pixels=500))


# ---------------------------------------------------------------------------------------------------------
# fetching, against listeners on loopback
# ---------------------------------------------------------------------------------------------------------
class Listener:
    """An HTTP server on ``host`` that records every connection and answers from a route table."""

    def __init__(self, host="127.0.0.1", routes=None):
        self.connections = []
        self.routes = routes or {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, headers, body = outer.routes.get(self.path, (404, {}, b"missing"))
                if status == "sleep":
                    time.sleep(headers)
                    status, headers = 200, {}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            def verify_request(self, request, client_address):
                outer.connections.append(client_address)
                return True

        self.server = Server((host, 0), Handler)
        self.base = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listeners():
    made = []

    def make(host="127.0.0.1", routes=None):
        made.append(Listener(host, routes))
        return made[-1]

    yield make
    for item in made:
        item.close()


LOOPBACK_ALLOWED = MediaPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),), timeout_s=3)


def fetch(url, policy=LOOPBACK_ALLOWED):
    return asyncio.run(fetch_image_bytes(url, policy))


def test_refused_address_is_never_connected(listeners):
    target = listeners(routes={"/x.png": (200, {}, png())})
    for url in (target.base + "/x.png", target.base.replace("127.0.0.1", "localhost") + "/x.png"):
        with pytest.raises(MediaRefused, match="is loopback; the server fetches public addresses only"):
            fetch(url, MediaPolicy())
    assert target.connections == []
    assert fetch(target.base + "/x.png") == png()          # allowed by the flag: fetched
    assert len(target.connections) == 1


def test_redirect_to_a_refused_address_is_refused(listeners):
    refused = listeners("127.0.0.2", {"/secret": (200, {}, png())})
    hop = listeners(routes={"/r": (302, {"Location": refused.base + "/secret"}, b""),
                            "/meta": (301, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
                            "/file": (302, {"Location": "file:///etc/passwd"}, b""),
                            "/loop": (302, {"Location": "/loop"}, b"")})
    with pytest.raises(MediaRefused, match=r"^refused address: 127\.0\.0\.2 is loopback"):
        fetch(hop.base + "/r")
    with pytest.raises(MediaRefused, match=r"169\.254\.169\.254 is link-local"):
        fetch(hop.base + "/meta")
    with pytest.raises(MediaRefused, match="redirect to a file: URL refused"):
        fetch(hop.base + "/file")
    with pytest.raises(MediaRefused, match="more than 5 redirects"):
        fetch(hop.base + "/loop")
    assert refused.connections == []


def test_unreachable_errors_timeout_and_size(listeners):
    from conftest import free_port

    port = free_port()
    with pytest.raises(MediaRefused, match=f"^cannot reach 127.0.0.1:{port}: "):
        fetch(f"http://127.0.0.1:{port}/x.png")
    host = listeners(routes={"/slow": ("sleep", 5, png()), "/big": (200, {}, b"\x00" * 5000),
                             "/gone": (410, {}, b"")})
    with pytest.raises(MediaRefused, match=r"127\.0\.0\.1:\d+ answered HTTP 404$"):
        fetch(host.base + "/nothing")
    with pytest.raises(MediaRefused, match="answered HTTP 410"):
        fetch(host.base + "/gone")
    with pytest.raises(MediaRefused, match=r"no answer from 127\.0\.0\.1:\d+ within 1 s \(VLLM_IMAGE_FETCH_TIMEOUT\)"):
        fetch(host.base + "/slow", MediaPolicy(allowed_networks=LOOPBACK_ALLOWED.allowed_networks, timeout_s=1))
    with pytest.raises(MediaRefused, match="sends 5000 bytes, over the limit of 1000"):
        fetch(host.base + "/big", MediaPolicy(allowed_networks=LOOPBACK_ALLOWED.allowed_networks, max_bytes=1000))


# ---------------------------------------------------------------------------------------------------------
# a request's images, and the middleware around a stand-in app
# ---------------------------------------------------------------------------------------------------------
def chat_body(*urls):
    return {"model": "m", "messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": "hi"}]}]}


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("url,message", [
    ("file:///etc/passwd", "image 2 (file:///etc/passwd): file:// URLs are refused: the server was started "
                           "without --allowed-local-media-path"),
    ("ftp://example.org/x.png", "image 2 (ftp://example.org/x.png): unsupported URL scheme ftp:"),
    ("gopher://127.0.0.1:70/", "image 2 (gopher://127.0.0.1:70/): unsupported URL scheme gopher:"),
    ("just-a-name.png", "image 2 (just-a-name.png): unsupported URL scheme (none)"),
    ("data:image/png;base64,", "image 2 (data URL): empty image"),
    ("data:image/png;base64,@@@@", "image 2 (data URL): data URL payload is not valid base64"),
    ("data:image/png,rawbytes", "image 2 (data URL): data URL is not base64"),
    ("data:image/png;base64", "image 2 (data URL): data URL without a ','"),
    (data_url(png_header_only(40000, 40000)), "image 2 (data URL): 40000x40000 is 1600000000 pixels"),
    ("http://169.254.169.254/latest/meta-data/", "image 2 (http://169.254.169.254/latest/meta-data/): refused "
                                                 "address: 169.254.169.254 is link-local"),
    ("http://[::1]:8080/x.png", "image 2 (http://[::1]:8080/x.png): refused address: ::1 is loopback"),
])
def test_request_images_named_in_order(url, message):
    with pytest.raises(MediaRefused) as info:
        asyncio.run(resolve_images(chat_body(data_url(png()), url), MediaPolicy()))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_file_inside_the_allowed_folder(tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    policy = MediaPolicy(local_media_path=tmp_path.resolve())
    body = chat_body(f"file://{tmp_path}/ok.png")
    assert asyncio.run(resolve_images(body, policy)) is False     # vLLM reads it itself
    with pytest.raises(MediaRefused, match="outside the allowed local media folder"):
        asyncio.run(resolve_images(chat_body("file:///etc/passwd"), policy))


def test_http_image_becomes_a_data_url(listeners):
    host = listeners(routes={"/a.png": (200, {}, png())})
    body = {"input": [{"type": "input_image", "image_url": host.base + "/a.png"}]}   # Responses API shape
    assert asyncio.run(resolve_images(body, LOOPBACK_ALLOWED)) is True
    assert body["input"][0]["image_url"] == "data:image/png;base64," + base64.b64encode(png()).decode()


def anthropic_body(*sources, in_tool_result=False):
    """An Anthropic /v1/messages request: one image block per source, optionally inside a tool_result."""
    blocks = [{"type": "image", "source": src} for src in sources]
    if in_tool_result:
        blocks = [{"type": "tool_result", "tool_use_id": "t1", "content": blocks}]
    return {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
        *blocks, {"type": "text", "text": "hi"}]}]}


def b64_source(data: bytes, media_type="image/png"):
    return {"type": "base64", "media_type": media_type, "data": base64.b64encode(data).decode()}


@pytest.mark.parametrize("in_tool_result", [False, True], ids=["message", "tool-result"])
def test_anthropic_image_blocks_are_checked(listeners, in_tool_result):
    """/v1/messages image sources: base64 checked as the data URL vLLM builds, url fetched under the policy and
    replaced by a data URL (vLLM passes a url source's url on as it is)."""
    bomb = b64_source(png_header_only(40000, 40000))
    with pytest.raises(MediaRefused, match=r"^image 2 \(data URL\): 40000x40000 is 1600000000 pixels"):
        asyncio.run(resolve_images(anthropic_body(b64_source(png()), bomb, in_tool_result=in_tool_result),
                                   MediaPolicy()))
    with pytest.raises(MediaRefused, match=r"^image 1 \(data URL\): not an image"):
        asyncio.run(resolve_images(anthropic_body({"data": base64.b64encode(b"junk" * 9).decode()},
                                                  in_tool_result=in_tool_result), MediaPolicy()))
    refused = listeners("127.0.0.2", {"/x.png": (200, {}, png())})
    with pytest.raises(MediaRefused, match=r"^image 1 \(http://127\.0\.0\.2:\d+/x\.png\): refused address"):
        asyncio.run(resolve_images(anthropic_body({"type": "url", "url": refused.base + "/x.png"},
                                                  in_tool_result=in_tool_result), LOOPBACK_ALLOWED))
    assert refused.connections == []
    host = listeners(routes={"/a.png": (200, {}, png())})
    body = anthropic_body(b64_source(png()), {"type": "url", "url": host.base + "/a.png"},
                          in_tool_result=in_tool_result)
    assert asyncio.run(resolve_images(body, LOOPBACK_ALLOWED)) is True
    blocks = body["messages"][0]["content"]
    blocks = blocks[0]["content"] if in_tool_result else blocks
    assert blocks[0]["source"] == b64_source(png())       # checked, left as it was
    assert blocks[1]["source"] == {"type": "url", "url": "data:image/png;base64," + base64.b64encode(png()).decode()}


def test_vllm_032_reads_anthropic_image_sources_as_the_middleware_does():
    """Fails when vLLM changes how /v1/messages image sources become image URLs."""
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages as serving

    assert serving._convert_image_source_to_url({"type": "url", "url": "data:image/png;base64,QQ=="}) == (
        "data:image/png;base64,QQ==")
    assert serving._convert_image_source_to_url({"type": "base64", "media_type": "image/gif", "data": "QQ=="}) == (
        "data:image/gif;base64,QQ==")
    assert serving._convert_image_source_to_url({"data": "QQ=="}) == "data:image/jpeg;base64,QQ=="


def run_middleware(body: bytes, headers=(), app_args=None):
    seen = {}

    async def app(scope, receive, send):
        parts = [await receive()]
        while parts[-1].get("more_body"):
            parts.append(await receive())
        seen["body"] = b"".join(p["body"] for p in parts)
        seen["headers"] = dict(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    class FakeApp:
        class state:
            args = app_args

    middleware = MediaPolicyMiddleware(app)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "app": FakeApp,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers]}
    sent = []
    chunks = [body[:10], body[10:]]

    async def receive():
        part = chunks.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), seen


def test_middleware_answers_400_in_vllms_error_shape():
    status, body, seen = run_middleware(json.dumps(chat_body("file:///etc/passwd")).encode())
    assert status == 400 and seen == {}
    error = json.loads(body)["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError" and error["param"] == "image_url"
    assert error["message"].startswith("image 1 (file:///etc/passwd): file:// URLs are refused")


def test_middleware_reads_escaped_keys():
    body = json.dumps(chat_body("file:///etc/passwd")).replace("image_url", "image\\u005furl").encode()
    assert b"image_url" not in body
    assert run_middleware(body)[0] == 400


def test_middleware_passes_good_and_unparsable_bodies_unchanged():
    good = json.dumps(chat_body(data_url(png()))).encode()
    assert run_middleware(good)[0] == 200 and run_middleware(good)[2]["body"] == good
    assert run_middleware(b'{"image_url": ')[2]["body"] == b'{"image_url": '


def test_middleware_leaves_unauthorised_requests_to_vllm():
    class Args:
        api_key = ["sekret"]
        allowed_local_media_path = ""

    body = json.dumps(chat_body("http://169.254.169.254/")).encode()
    status, _, seen = run_middleware(body, app_args=Args)
    assert status == 200 and seen["body"] == body            # vLLM's own authentication answers 401 next
    status, _, seen = run_middleware(body, headers=[(b"authorization", b"Bearer sekret")], app_args=Args)
    assert status == 400 and seen == {}


def test_middleware_reads_allowed_local_media_path(tmp_path):
    (tmp_path / "ok.png").write_bytes(png())

    class Args:
        api_key = None
        allowed_local_media_path = str(tmp_path)

    assert run_middleware(json.dumps(chat_body(f"file://{tmp_path}/ok.png")).encode(), app_args=Args)[0] == 200


# ---------------------------------------------------------------------------------------------------------
# hub_cli serve, and the vLLM 0.32 facts relied on
# ---------------------------------------------------------------------------------------------------------
def test_serve_sets_the_policy(tiny_model):
    from hub_cli.errors import UsageError
    from hub_cli.serve import MEDIA_MIDDLEWARE, NO_VLLM_FETCH_DOMAIN, plan_server

    path = tiny_model("internvl2-2b")
    plan = plan_server(path, on_cpu=False)
    i = plan.args.index("--middleware")
    assert plan.args[i + 1] == MEDIA_MIDDLEWARE
    assert plan.args[plan.args.index("--allowed-media-domains") + 1] == NO_VLLM_FETCH_DOMAIN
    assert "VLLM_INTERNVL_MEDIA_ALLOW" not in plan.env
    plan = plan_server(path, on_cpu=False, allow_media_hosts="127.0.0.1,images.lan",
                       extra=["--allowed-media-domains", "images.lan"])
    assert plan.env["VLLM_INTERNVL_MEDIA_ALLOW"] == "127.0.0.1,images.lan"
    assert plan.env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    assert plan.args.count("--allowed-media-domains") == 1
    with pytest.raises(UsageError, match=r"^--allow-media-hosts: 'not a host!' is neither"):
        plan_server(path, on_cpu=False, allow_media_hosts="not a host!")


def test_vllm_032_facts_the_middleware_relies_on():
    """Fails when vLLM changes them: --middleware classes are added after its API-key check (so they run
    first: see _authorised), the server's arguments are at app.state.args, and its image formats list exists."""
    from vllm.entrypoints.launchers import app as launcher_app
    from vllm.entrypoints.serve.middleware import register
    from vllm.multimodal.image import ALLOWED_IMAGE_FORMATS

    source = inspect.getsource(register.init_entrypoints_middleware)
    assert source.index("AuthenticationMiddleware") < source.index("for middleware in args.middleware")
    assert "app.add_middleware(imported)" in source
    assert "app.state.args = args" in inspect.getsource(launcher_app)
    assert "PNG" in ALLOWED_IMAGE_FORMATS and "JPEG" in ALLOWED_IMAGE_FORMATS
