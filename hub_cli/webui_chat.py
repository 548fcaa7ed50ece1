"""The conversation behind ``hub_cli webui``: what the server accepts, what each request carries, one streamed reply.

Kept apart from the gradio page (webui.py) so that tests drive it without a browser. It talks to the server
through the official ``openai`` client only:

* :func:`probe_server` learns the served model, whether the server takes per-request ``mm_processor_kwargs``
  (a one-token text request carrying them: vLLM refuses them with HTTP 400 unless started with
  ``--trust-request-mm-kwargs``) and which keyword sets the tile budget (``max_dynamic_patch`` for InternVL,
  ``hd_num`` for XComposer2, read from the model's config.json when the server's model root is a local folder).
* :class:`Conversation` keeps the turns and builds each request. Images already sent stay in their turns, but a
  request never carries more than the server's ``--limit-mm-per-prompt``: the newest images are kept, older ones
  are replaced by a short text, and a note says so. When the limit is unknown it is learned from the server's
  "At most N image(s)" answer and the request is sent again.
* :meth:`Conversation.reply` streams one answer as :class:`Update` objects. :meth:`Conversation.stop` (Stop in
  the page) ends it: the HTTP stream is closed, which makes vLLM abort the request, and the reply's last update
  says it was stopped. The page's own generator draws that last update, so nothing drawn later undoes it. A Stop
  that comes before the reply starts (its submit still queued) is kept and ends that reply at once;
  :meth:`Conversation.begin` (each submit) forgets an older one.

Images go exactly as uploaded (base64 data URLs of the file's bytes, no resizing), so the server's tiling and
token count are those of the original picture.
"""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl_plugin.json_files import JsonFileError, read_json_object

__all__ = ["ServerInfo", "Settings", "Turn", "Update", "Conversation", "probe_server", "image_limit_from_args",
           "image_url_for", "server_error_text", "DEFAULT_TILE_KEY"]

DEFAULT_TILE_KEY = "max_dynamic_patch"
MAX_TILES = 40          # the plugin clamps a per-request tile budget to 40 (internvl_image.py)
_LIMIT_RE = re.compile(r"At most (\d+) image\(s\)")


@dataclass
class ServerInfo:
    base_url: str                      # the client's base URL, ending in /v1
    model: str                         # served model name
    image_limit: int | None = None     # images per request (--limit-mm-per-prompt); None = not known yet
    tile_key: str | None = None        # per-request tile keyword when the server accepts it, else None
    tile_default: int = 6              # the model's own tile budget, the slider's start
    notes: list[str] = field(default_factory=list)


@dataclass
class Settings:
    system: str = ""
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    tiles: int | None = None           # None: the model's default tile budget


@dataclass
class Turn:
    text: str
    images: list[str]                  # local file paths, sent as data URLs
    answer: str = ""


@dataclass
class Update:
    """One step of a reply: the answer so far, and, when it ends, usage, notes or an error line."""

    answer: str = ""
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    usage: dict[str, int] | None = None
    done: bool = False
    stopped: bool = False              # ended by Conversation.stop (the answer so far is kept)


def image_url_for(path: str | Path) -> str:
    """A data URL of the file's bytes, unchanged (the server decides whether it is an image)."""
    data = Path(path).read_bytes()
    mime = mimetypes.guess_type(str(path))[0] or ""
    if not mime.startswith("image/"):
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_limit_from_args(vllm_args: Sequence[str]) -> int | None:
    """The image limit in ``--limit-mm-per-prompt`` among vLLM arguments, or None when not given."""
    value = None
    for i, arg in enumerate(vllm_args):
        name, eq, inline = arg.partition("=")
        if name.replace("_", "-") == "--limit-mm-per-prompt":
            value = inline if eq else (vllm_args[i + 1] if i + 1 < len(vllm_args) else None)
    if value is None:
        return None
    try:
        limit = json.loads(value).get("image")
    except (ValueError, AttributeError):
        return None
    return int(limit) if isinstance(limit, int) else None


def server_error_text(exc: Exception, base_url: str) -> str:
    """One line for the chat: what the server (or its absence) said."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = getattr(exc, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        if message is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = body["error"].get("message")
        return f"The server answered HTTP {exc.status_code}: {' '.join(str(message or exc).split())}"
    if isinstance(exc, openai.APIConnectionError):
        return f"Cannot reach the server at {base_url}: {' '.join(str(exc.__cause__ or exc).split())}"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def probe_server(client: Any, model: str | None = None, *, image_limit: int | None = None) -> ServerInfo:
    """What the page needs to know about the server; raises the client's exception if it does not answer."""
    import openai

    models = client.models.list().data
    ids = [m.id for m in models]
    if model is None:
        if not ids:
            raise ValueError(f"{client.base_url} lists no model at /models")
        model = ids[0]
    elif model not in ids:
        raise ValueError(f"the server does not serve {model!r}; it serves: {', '.join(ids) or 'nothing'}")
    root = next((getattr(m, "root", None) for m in models if m.id == model), None)
    tile_key, tile_default = _tile_facts(root or model)
    info = ServerInfo(base_url=str(client.base_url).rstrip("/"), model=model, image_limit=image_limit,
                      tile_default=tile_default)
    try:
        client.chat.completions.create(model=model, max_tokens=1, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"mm_processor_kwargs": {tile_key: tile_default}})
        info.tile_key = tile_key
    except openai.BadRequestError:
        info.notes.append("The server does not take a per-request tile budget (start it with "
                          "--trust-request-mm-kwargs for the tile slider).")
    return info


def _tile_facts(root: str) -> tuple[str, int]:
    """(tile keyword, the model's default budget) from a local config.json when there is one."""
    try:
        config = read_json_object(Path(root) / "config.json")   # root may be a served name, not a folder
    except (JsonFileError, TypeError):
        return DEFAULT_TILE_KEY, 6
    key, default = (("hd_num", 25) if "hd_num" in config or "xcomposer" in str(config.get("architectures", "")).lower()
                    else (DEFAULT_TILE_KEY, 6))
    try:
        return key, int(config.get(key, default))
    except (TypeError, ValueError):   # a value the server would refuse too: the slider starts at the default
        return key, default


class Conversation:
    """The turns of one chat; :meth:`reply` adds one."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self._urls: dict[str, str] = {}   # image path -> data URL: each image is encoded once, not every turn
        self.epoch = 0                   # bumped by reset: a reply that started before it adds no turn
        self._stopping: tuple[asyncio.Event, asyncio.AbstractEventLoop] | None = None
        self._stop_requested = False     # Stop while no reply streams: the next reply ends at once
        self.busy = False                # the page answers one question of a chat at a time

    def begin(self) -> int:
        """A new question was submitted: forget a Stop that came before it; returns the epoch it belongs to."""
        self._stop_requested = False
        return self.epoch

    def reset(self) -> None:
        """Forget the turns (a reply streaming now is stopped and not kept)."""
        self.stop()
        self.turns, self._urls = [], {}
        self.epoch += 1

    def stop(self) -> bool:
        """End the reply streaming now (from any thread), or the next one to start; False when none streams."""
        if self._stopping is None:
            self._stop_requested = True
            return False
        event, loop = self._stopping
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            event.set()
        else:
            loop.call_soon_threadsafe(event.set)
        return True

    def _forget_unused_images(self) -> None:
        """Drop the data URLs of images no kept turn has (a failed or empty turn's), so they are not held."""
        used = {path for turn in self.turns for path in turn.images}
        self._urls = {path: url for path, url in self._urls.items() if path in used}

    def _image_url(self, path: str) -> str:
        if path not in self._urls:
            self._urls[path] = image_url_for(path)
        return self._urls[path]

    def messages(self, system: str, text: str, images: Sequence[str],
                 limit: int | None) -> tuple[list[dict], list[str]]:
        """The request's messages for a new turn and notes on images left out (newest images kept)."""
        pending = [*self.turns, Turn(text, list(images))]
        total = sum(len(t.images) for t in pending)
        keep = total if limit is None else min(total, limit)
        skipped = total - keep
        notes: list[str] = []
        if skipped:
            new_dropped = max(0, len(images) - keep)
            old_dropped = skipped - new_dropped
            parts = []
            if old_dropped:
                parts.append(f"{old_dropped} image(s) from earlier turns left out of this request")
            if new_dropped:
                parts.append(f"only the last {keep} of the {len(images)} images you just added sent")
            notes.append(f"The server takes at most {limit} image(s) per request: " + "; ".join(parts) + ".")
        messages: list[dict] = [{"role": "system", "content": system}] if system.strip() else []
        seen = 0   # images counted from the newest backwards decide which are kept
        contents: list[Any] = []
        for turn in reversed(pending):
            parts: list[dict] = []
            for path in reversed(turn.images):
                seen += 1
                if seen <= keep:
                    parts.insert(0, {"type": "image_url", "image_url": {"url": self._image_url(path)}})
                elif turn is not pending[-1]:   # the new turn's extra images are simply not sent (a note says so)
                    parts.insert(0, {"type": "text", "text": "(an earlier image, not sent again)"})
            contents.insert(0, [*parts, {"type": "text", "text": turn.text}] if parts else turn.text)
        for turn, content in zip(pending, contents):
            messages.append({"role": "user", "content": content})
            if turn is not pending[-1]:
                messages.append({"role": "assistant", "content": turn.answer})
        return messages, notes

    async def reply(self, client: Any, info: ServerInfo, text: str, images: Sequence[str],
                    settings: Settings, epoch: int | None = None) -> AsyncIterator[Update]:
        """Stream the answer to ``text`` and ``images`` (``client`` is an ``openai.AsyncOpenAI``).

        The turn joins the history when the first answer text arrives and grows with it, so an answer cut by
        :meth:`stop` stays as far as it got (the last update has ``stopped``). On an error the turn is dropped
        (its images are not sent again) and the last update carries the error line. ``epoch`` (from
        :meth:`begin`, default now): a :meth:`reset` since then keeps the turn out of the history.
        """
        turn = Turn(text, list(images))
        event = asyncio.Event()
        if self._stop_requested:   # Stop came while this reply waited to start
            self._stop_requested = False
            event.set()
        self._stopping = (event, asyncio.get_running_loop())
        try:
            async for update in self._reply(client, info, turn, settings, event,
                                            self.epoch if epoch is None else epoch):
                yield update
        finally:
            self._stopping = None
            if turn not in self.turns:
                self._forget_unused_images()

    async def _reply(self, client: Any, info: ServerInfo, turn: Turn, settings: Settings,
                     stop: asyncio.Event, epoch: int) -> AsyncIterator[Update]:
        import openai

        if stop.is_set():   # no request is sent
            yield Update(done=True, stopped=True)
            return
        notes: list[str] = []
        extra: dict[str, Any] = {}
        if info.tile_key and settings.tiles:
            extra["mm_processor_kwargs"] = {info.tile_key: int(settings.tiles)}
        for attempt in (0, 1):
            messages, limit_notes = self.messages(settings.system, turn.text, turn.images, info.image_limit)
            try:
                stream = await _unless_stopped(client.chat.completions.create(
                    model=info.model, messages=messages, stream=True, stream_options={"include_usage": True},
                    max_tokens=int(settings.max_tokens), temperature=float(settings.temperature),
                    top_p=float(settings.top_p), extra_body=extra or None), stop)
                break
            except openai.BadRequestError as exc:
                learned = _LIMIT_RE.search(str(exc))
                if attempt == 0 and learned and info.image_limit != int(learned.group(1)):
                    info.image_limit = int(learned.group(1))
                    continue
                yield Update(notes=notes + limit_notes, error=server_error_text(exc, info.base_url), done=True)
                return
            except openai.APIError as exc:
                yield Update(notes=notes + limit_notes, error=server_error_text(exc, info.base_url), done=True)
                return
        notes += limit_notes
        if stream is _STOPPED:
            yield Update(notes=notes, done=True, stopped=True)
            return
        usage = None
        chunks = aiter(stream)
        try:
            while (chunk := await _unless_stopped(anext(chunks, _END), stop)) not in (_END, _STOPPED):
                if chunk.usage is not None:
                    usage = {"prompt_tokens": chunk.usage.prompt_tokens,
                             "completion_tokens": chunk.usage.completion_tokens}
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    if turn not in self.turns and self.epoch == epoch:
                        self.turns.append(turn)
                    turn.answer += delta
                    yield Update(answer=turn.answer, notes=notes)
        except openai.APIError as exc:
            if turn in self.turns:
                self.turns.remove(turn)
            yield Update(answer=turn.answer, notes=notes, error=server_error_text(exc, info.base_url), done=True)
            return
        finally:
            await stream.close()   # on Stop, and when the page's task is cancelled: vLLM aborts the request
        if chunk is _STOPPED:
            yield Update(answer=turn.answer, notes=notes, done=True, stopped=True)
            return
        if turn not in self.turns and self.epoch == epoch:
            self.turns.append(turn)
        yield Update(answer=turn.answer, notes=notes, usage=usage, done=True)


_END, _STOPPED = object(), object()


async def _unless_stopped(awaitable, stop: asyncio.Event):
    """``awaitable``'s result, or _STOPPED (``awaitable`` cancelled or its result dropped) once ``stop`` is set."""
    step, halt = asyncio.ensure_future(awaitable), asyncio.ensure_future(stop.wait())
    try:
        if not stop.is_set():
            await asyncio.wait({step, halt}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        halt.cancel()
        if not step.done():
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
    if stop.is_set():   # a chunk that was already buffered when Stop came is not shown
        if not step.cancelled():
            step.exception()   # retrieved, so that asyncio does not warn about it
        return _STOPPED
    return step.result()
