"""Media URL policy for vLLM's OpenAI server: an ASGI middleware that checks and fetches request images itself.

Loaded with ``--middleware internvl_plugin.media_policy.MediaPolicyMiddleware`` (``hub_cli serve`` adds it).
For every POST with a JSON body it finds each image (chat ``image_url`` parts, Responses ``input_image``,
Anthropic ``/v1/messages`` ``image`` blocks with a url or base64 source) and, before vLLM sees the request:

* ``http(s)://``: resolves the host and refuses loopback, private, shared (CGNAT), link-local (cloud
  metadata), multicast, unspecified and reserved addresses unless allowed; connects only to the addresses it
  checked (no second DNS lookup to rebind), follows at most :data:`MAX_REDIRECTS` redirects checking each hop
  the same way, stops at the size limit and the fetch timeout, and replaces the URL by a ``data:`` URL of the
  bytes, so vLLM's own fetcher never runs;
* ``data:``: reads the image size from the header (no pixel decoded) and refuses more pixels than the limit;
* ``file://``: refused unless the server has ``--allowed-local-media-path`` and the file is inside it;
* anything else: refused.

A refusal is HTTP 400 in vLLM's error format with one line naming the image (1-based, in request order), the
URL's host and the cause. The policy comes from the environment, because vLLM's ``--middleware`` takes a class
and no arguments:

``VLLM_INTERNVL_MEDIA_ALLOW``       comma list of host names, addresses or CIDR ranges let through
                                    (``hub_cli serve --allow-media-hosts``)
``VLLM_IMAGE_FETCH_TIMEOUT``        seconds for the whole fetch (vLLM's variable, default 5)
``VLLM_INTERNVL_MEDIA_MAX_BYTES``   largest download or data URL payload (default 20 MiB)
``VLLM_MAX_IMAGE_PIXELS``           width x height limit (vLLM's variable, default 178956970)

vLLM 0.32 only: ``scope["app"].state.args`` (the server's parsed arguments, set by its api_server) is read for
``allowed_local_media_path``; without it ``file://`` is refused. ``tests/test_media_policy.py`` pins that.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import json
import os
import socket
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MediaPolicy", "MediaRefused", "MediaPolicyMiddleware", "address_refusal", "image_size",
           "check_image_bytes", "fetch_image_bytes", "parse_allow", "resolve_images", "ALLOW_ENV", "MAX_BYTES_ENV",
           "MAX_REDIRECTS", "MIDDLEWARE"]

ALLOW_ENV = "VLLM_INTERNVL_MEDIA_ALLOW"
MAX_BYTES_ENV = "VLLM_INTERNVL_MEDIA_MAX_BYTES"
DEFAULT_MAX_BYTES = 20 << 20
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_PIXELS = 178_956_970        # vLLM 0.32's VLLM_MAX_IMAGE_PIXELS default (PIL's bomb limit)
MAX_REDIRECTS = 5
MIDDLEWARE = "internvl_plugin.media_policy.MediaPolicyMiddleware"

# Ranges Python's ipaddress flags do not name as private in 3.11 but that are not the public internet.
_SHARED = ipaddress.ip_network("100.64.0.0/10")          # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")             # IPv4 embedded in the low 32 bits


class MediaRefused(ValueError):
    """A client's image that the server will not load; ``str()`` is the one-line reason."""


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public address (a short range name), or None when it is one."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            return address_refusal(embedded)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (cloud metadata lives there)"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared (carrier-grade NAT)"
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


@dataclass(frozen=True)
class MediaPolicy:
    """What the server fetches: the ranges and host names let through, and the limits."""

    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    local_media_path: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, local_media_path: str | None = None
                 ) -> MediaPolicy:
        env = os.environ if environ is None else environ
        hosts, nets = parse_allow(env.get(ALLOW_ENV, ""))
        return cls(allowed_hosts=hosts, allowed_networks=nets,
                   timeout_s=float(env.get("VLLM_IMAGE_FETCH_TIMEOUT") or DEFAULT_TIMEOUT_S),
                   max_bytes=int(env.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES),
                   max_pixels=int(env.get("VLLM_MAX_IMAGE_PIXELS") or DEFAULT_MAX_PIXELS),
                   local_media_path=Path(local_media_path).resolve() if local_media_path else None)

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allowed_hosts

    def refusal(self, host: str, addresses: Iterable[str]) -> str | None:
        """Why ``host`` (resolved to ``addresses``) may not be fetched, or None. Every address must pass."""
        if self.host_allowed(host):
            return None
        for text in addresses:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
            if any(ip in net for net in self.allowed_networks if net.version == ip.version):
                continue
            why = address_refusal(ip)
            if why is not None:
                shown = host if host == text else f"{host} -> {text}"
                return (f"refused address: {shown} is {why}; the server fetches public addresses only "
                        f"(allow it with hub_cli serve --allow-media-hosts or {ALLOW_ENV})")
        return None


def parse_allow(spec: str) -> tuple[frozenset[str], tuple[Any, ...]]:
    """``"images.lan,10.0.0.0/8,127.0.0.1"`` -> (host names, networks). Raises ValueError naming a bad item."""
    hosts, nets = set(), []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            if "/" in item or not all(c.isalnum() or c in "-._" for c in item):
                raise ValueError(f"{item!r} is neither a host name, an address nor a CIDR range") from None
            hosts.add(item.lower().rstrip("."))
    return frozenset(hosts), tuple(nets)


# ---------------------------------------------------------------------------------------------------------
# image bytes
# ---------------------------------------------------------------------------------------------------------
def image_size(data: bytes) -> tuple[int, int, str]:
    """Width, height and PIL format name from the image's header, without decoding pixels or PIL's bomb guard."""
    im = _open_header(data)
    return im.size[0], im.size[1], im.format


def _open_header(data: bytes) -> Any:
    """The PIL image with only its header read.

    Image.open would raise DecompressionBombError (no size in it) before we could say how big the image is, so
    the format plugins are tried directly, as Image.open does. Raises MediaRefused when no format knows it.
    """
    from PIL import Image

    from vllm.multimodal.image import ALLOWED_IMAGE_FORMATS

    Image.init()
    prefix = data[:16]
    for fmt in ALLOWED_IMAGE_FORMATS:
        if fmt not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(prefix):
            continue
        try:
            im = factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, ValueError, OSError, EOFError, Image.DecompressionBombError):
            continue
        return im
    raise MediaRefused("not an image in a supported format")


def check_image_bytes(data: bytes, policy: MediaPolicy) -> str:
    """Refuse an empty payload, one over the byte limit, more pixels than the limit, or pixels that do not decode;
    return the format. Decoding here too (vLLM decodes again) is what lets the refusal name the image."""
    if not data:
        raise MediaRefused("empty image")
    if len(data) > policy.max_bytes:
        raise MediaRefused(f"{len(data)} bytes, over the limit of {policy.max_bytes} ({MAX_BYTES_ENV})")
    im = _open_header(data)
    (w, h), fmt = im.size, im.format
    if policy.max_pixels > 0 and w * h > policy.max_pixels:
        raise MediaRefused(f"{w}x{h} is {w * h} pixels, over the limit of {policy.max_pixels} "
                           "(VLLM_MAX_IMAGE_PIXELS)")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise MediaRefused(f"damaged {fmt} image ({w}x{h}): {' '.join(str(exc).split()) or type(exc).__name__}") from None
    return fmt


def _decode_data_url(url: str) -> bytes:
    spec, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaRefused("data URL without a ',' before the payload")
    if not spec.lower().endswith(";base64"):
        raise MediaRefused("data URL is not base64 (only ';base64,' payloads are supported)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaRefused("data URL payload is not valid base64") from None


# ---------------------------------------------------------------------------------------------------------
# fetching http(s) URLs with the address policy on every hop
# ---------------------------------------------------------------------------------------------------------
def _policy_resolver(policy: MediaPolicy) -> Any:
    """An aiohttp resolver that resolves once and hands aiohttp only addresses the policy passed."""
    import aiohttp
    from aiohttp.abc import AbstractResolver

    class PolicyResolver(AbstractResolver):
        def __init__(self) -> None:
            self._inner = aiohttp.ThreadedResolver()

        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
            results = await self._inner.resolve(host, port, family)
            why = policy.refusal(host, [r["host"] for r in results])
            if why is not None:
                raise _Refused(why)
            return results

        async def close(self) -> None:
            await self._inner.close()

    return PolicyResolver()


class _Refused(Exception):
    """Raised inside aiohttp by the resolver; not an OSError, so aiohttp lets it through unwrapped."""


async def fetch_image_bytes(url: str, policy: MediaPolicy) -> bytes:
    """The bytes at ``url`` (http or https), following redirects under the policy. Raises MediaRefused."""
    import aiohttp

    resolver = _policy_resolver(policy)
    timeout = aiohttp.ClientTimeout(total=policy.timeout_s)
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, force_close=True)
    current = url
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        for _ in range(MAX_REDIRECTS + 1):
            parts = _check_url(current, policy)
            host_port = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
            try:
                async with session.get(current, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location")
                        if not location:
                            raise MediaRefused(f"{host_port} answered HTTP {resp.status} without a Location")
                        current = urllib.parse.urljoin(current, location)
                        continue
                    if resp.status != 200:
                        raise MediaRefused(f"{host_port} answered HTTP {resp.status}")
                    if resp.content_length is not None and resp.content_length > policy.max_bytes:
                        raise MediaRefused(f"{host_port} sends {resp.content_length} bytes, over the limit of "
                                           f"{policy.max_bytes} ({MAX_BYTES_ENV})")
                    data = bytearray()
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        data += chunk
                        if len(data) > policy.max_bytes:
                            raise MediaRefused(f"{host_port} sent more than {policy.max_bytes} bytes "
                                               f"({MAX_BYTES_ENV})")
                    return bytes(data)
            except _Refused as exc:
                raise MediaRefused(str(exc)) from None
            except asyncio.TimeoutError:
                raise MediaRefused(f"no answer from {host_port} within {policy.timeout_s:g} s "
                                   "(VLLM_IMAGE_FETCH_TIMEOUT)") from None
            except aiohttp.ClientError as exc:
                cause = getattr(exc, "os_error", None) or exc.__cause__ or exc
                if isinstance(cause, _Refused):
                    raise MediaRefused(str(cause)) from None
                reason = getattr(cause, "strerror", None) or type(cause).__name__
                raise MediaRefused(f"cannot reach {host_port}: {reason}") from None
        raise MediaRefused(f"more than {MAX_REDIRECTS} redirects")


def _check_url(url: str, policy: MediaPolicy) -> urllib.parse.SplitResult:
    """Scheme and literal-address checks (aiohttp does not call a resolver for an IP literal)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise MediaRefused("malformed URL") from None
    if parts.scheme not in ("http", "https"):
        raise MediaRefused(f"redirect to a {parts.scheme or 'relative'}: URL refused (http and https only)")
    if not parts.hostname:
        raise MediaRefused("URL without a host")
    try:
        ipaddress.ip_address(parts.hostname.split("%", 1)[0])
    except ValueError:
        return parts
    why = policy.refusal(parts.hostname, [parts.hostname])
    if why is not None:
        raise MediaRefused(why)
    return parts


# ---------------------------------------------------------------------------------------------------------
# one request's images
# ---------------------------------------------------------------------------------------------------------
def _image_refs(node: Any) -> Iterator[tuple[dict, str]]:
    """(container, key) of every image URL string in a request body, in document order.

    Anthropic ``/v1/messages`` image blocks (``{"type": "image", "source": ...}``, also inside ``tool_result``
    content; vLLM 0.32 turns them into chat ``image_url`` parts): a ``url`` source is its ``url``; any other
    source is base64, as vLLM reads it, and is checked as the data URL vLLM builds from it (a copy: nothing
    to replace).
    """
    if isinstance(node, dict):
        source = node.get("source")
        if node.get("type") == "image" and isinstance(source, dict):
            if source.get("type") == "url":
                if isinstance(source.get("url"), str):
                    yield source, "url"
            elif isinstance(source.get("data"), str):
                media_type = source.get("media_type") or "image/jpeg"
                yield {"url": f"data:{media_type};base64,{source['data']}"}, "url"
            return
        for key, value in node.items():
            if key == "image_url":
                if isinstance(value, str):
                    yield node, key
                elif isinstance(value, dict) and isinstance(value.get("url"), str):
                    yield value, "url"
            else:
                yield from _image_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _image_refs(item)


def _describe(url: str) -> str:
    if url[:5].lower() == "data:":
        return "data URL"
    shown = url if len(url) <= 80 else url[:77] + "..."
    return shown


async def resolve_images(body: Any, policy: MediaPolicy) -> bool:
    """Check every image of ``body`` and replace http(s) URLs by data URLs in place; True when it changed.

    Raises MediaRefused with "image N (what): why".
    """
    changed = False
    for n, (holder, key) in enumerate(list(_image_refs(body)), 1):
        url = holder[key].strip()
        try:
            scheme = url.split(":", 1)[0].lower() if ":" in url else ""
            if scheme == "data":
                data = await asyncio.to_thread(_decode_data_url, url)
                await asyncio.to_thread(check_image_bytes, data, policy)
            elif scheme in ("http", "https"):
                data = await fetch_image_bytes(url, policy)
                fmt = await asyncio.to_thread(check_image_bytes, data, policy)
                holder[key] = f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()
                changed = True
            elif scheme == "file":
                await asyncio.to_thread(_check_file, url, policy)
            else:
                raise MediaRefused(f"unsupported URL scheme {scheme + ':' if scheme else '(none)'}; "
                                   "use http(s):// or a base64 data: URL")
        except MediaRefused as exc:
            raise MediaRefused(f"image {n} ({_describe(url)}): {exc}") from None
    return changed


def _check_file(url: str, policy: MediaPolicy) -> None:
    root = policy.local_media_path
    if root is None:
        raise MediaRefused("file:// URLs are refused: the server was started without --allowed-local-media-path")
    parts = urllib.parse.urlsplit(url)
    path = Path(urllib.parse.unquote(parts.netloc + parts.path)).resolve()
    if root not in path.parents:
        raise MediaRefused(f"file is outside the allowed local media folder {root}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaRefused(f"cannot read the file: {exc.strerror}") from None
    check_image_bytes(data, policy)


# ---------------------------------------------------------------------------------------------------------
# the ASGI middleware
# ---------------------------------------------------------------------------------------------------------
class MediaPolicyMiddleware:
    """ASGI middleware: every POST JSON body's images go through :func:`resolve_images` before vLLM sees them."""

    def __init__(self, app: Any):
        self.app = app
        self._policy: MediaPolicy | None = None

    def policy(self, scope: Mapping[str, Any]) -> MediaPolicy:
        if self._policy is None:
            state_args = getattr(getattr(scope.get("app"), "state", None), "args", None)
            local = getattr(state_args, "allowed_local_media_path", None) or None
            self._policy = MediaPolicy.from_env(local_media_path=local)
        return self._policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST" or not _is_json(scope)
                or not _authorised(scope)):
            await self.app(scope, receive, send)   # vLLM answers these itself (401 for a missing key)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None          # vLLM answers a malformed body itself
        if body is not None:   # no byte-level pre-filter: JSON may spell the key "image\u005furl"
            try:
                if await resolve_images(body, self.policy(scope)):
                    raw = json.dumps(body).encode()
                    scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-length"]
                                 + [(b"content-length", str(len(raw)).encode())])
            except MediaRefused as exc:
                await _send_400(send, str(exc))
                return
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)


def _authorised(scope: Mapping[str, Any]) -> bool:
    """False when the server wants an API key that the request lacks.

    vLLM adds ``--middleware`` classes after its own authentication, so they run first; without this check a
    client without the key could make the server fetch URLs before vLLM refuses it.
    """
    args = getattr(getattr(scope.get("app"), "state", None), "args", None)
    keys = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
    if not keys:
        return True
    given = dict(scope.get("headers", ())).get(b"authorization", b"").decode("latin-1")
    return any(given == f"Bearer {k}" for k in keys)


def _is_json(scope: Mapping[str, Any]) -> bool:
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return b"json" in value.lower()
    return False


async def _send_400(send: Any, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": "image_url",
                                 "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
