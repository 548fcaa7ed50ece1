"""``hub_cli chat``: a terminal chat with an InternVL model, images included.

MODEL_OR_URL is either the http(s) URL of a running OpenAI-compatible server, or a model folder / repo id,
for which a vLLM server is started on a free loopback port the way ``hub_cli serve`` starts one, and stopped
when the chat ends (:func:`hub_cli.launch.local_server`). The conversation goes through the official ``openai``
client with streaming.

In the chat: ``/image PATH_OR_URL`` attaches an image to the next message (local files go as base64 data URLs,
http(s) URLs as they are), ``/reset`` forgets the conversation, ``/exit`` or Ctrl-D quits, Ctrl-C stops an
answer (and quits at the prompt).
"""

from __future__ import annotations

import base64
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import click

__all__ = ["ChatSession", "ImageError", "image_part", "api_base_url", "pick_model", "run_chat"]

PROMPT = "user> "
ANSWER = "assistant> "
HELP = ("/image PATH_OR_URL attaches an image to your next message; /reset forgets the conversation; "
        "/exit or Ctrl-D quits.")
_MAX_IMAGE_BYTES = 50 << 20


class ImageError(ValueError):
    """A file or URL that cannot be sent as an image; the message is one line naming it."""


def image_part(path_or_url: str) -> dict[str, Any]:
    """The OpenAI ``image_url`` content part for a local image file or an http(s)/data URL."""
    text = path_or_url.strip().strip("'\"")
    if not text:
        raise ImageError("/image needs a file path or an http(s) URL")
    if text.startswith(("http://", "https://", "data:image/")):
        return {"type": "image_url", "image_url": {"url": text}}
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text).expanduser()
    if not path.exists():
        raise ImageError(f"no such file: {text}")
    if not path.is_file():
        raise ImageError(f"not a file: {text}")
    if path.stat().st_size > _MAX_IMAGE_BYTES:
        raise ImageError(f"{text} is larger than {_MAX_IMAGE_BYTES >> 20} MiB")
    data = path.read_bytes()
    mime = _image_mime(data)
    if mime is None:
        raise ImageError(f"not an image (or a format Pillow cannot read): {text}")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def _image_mime(data: bytes) -> str | None:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
            fmt = img.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
    return Image.MIME.get(fmt or "", "image/png")


def api_base_url(url: str) -> str:
    """The client's base URL (``.../v1``) for a server URL given with or without ``/v1``."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def pick_model(client: Any, wanted: str | None) -> str:
    """``wanted`` if the server serves it, else the server's only (or first) model."""
    ids = [m.id for m in client.models.list().data]
    if wanted:
        if wanted not in ids:
            served = ", ".join(ids) or "nothing"
            raise click.ClickException(f"the server does not serve {wanted!r}; it serves: {served}")
        return wanted
    if not ids:
        raise click.ClickException("the server lists no model at /v1/models")
    return ids[0]


class ChatSession:
    """History, pending images and one streamed answer at a time."""

    def __init__(self, client: Any, model: str, *, system: str | None = None, max_tokens: int = 512,
                 temperature: float = 0.7, out: IO[str] | None = None, answer_prefix: str = ANSWER) -> None:
        self.client, self.model = client, model
        self.system, self.max_tokens, self.temperature = system, max_tokens, temperature
        self.out = out or sys.stdout
        self.answer_prefix = answer_prefix
        self.history: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.pending = []

    def attach(self, path_or_url: str) -> None:
        self.pending.append(image_part(path_or_url))

    def ask(self, text: str) -> str:
        """Send ``text`` (with the pending images), stream the answer to ``out``, keep both in the history.

        On an API error or Ctrl-C the turn is dropped from the history, the images stay pending for the next
        message, and the exception propagates.
        """
        content: Any = [*self.pending, {"type": "text", "text": text}] if self.pending else text
        messages = [*self.history, {"role": "user", "content": content}]
        stream = self.client.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                     max_tokens=self.max_tokens, temperature=self.temperature)
        parts: list[str] = []
        self.out.write(self.answer_prefix)
        self.out.flush()
        try:
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    parts.append(delta)
                    self.out.write(delta)
                    self.out.flush()
        finally:
            self.out.write("\n")
            self.out.flush()
            with contextlib.suppress(Exception):
                stream.close()
        answer = "".join(parts)
        self.history = messages + [{"role": "assistant", "content": answer}]
        self.pending = []
        return answer


def run_chat(session: ChatSession, read_line: Callable[[str], str], err: Callable[[str], None],
             prompt: str = PROMPT) -> int:
    """The read-eval loop; returns the exit code (0 after /exit or end of input, 130 after Ctrl-C at the prompt)."""
    import openai

    while True:
        try:
            line = read_line(prompt)
        except EOFError:
            if prompt:
                session.out.write("\n")
            return 0
        except KeyboardInterrupt:
            session.out.write("\n")
            return 130
        text = line.strip()
        if not text:
            continue
        command, _, rest = text.partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            err("conversation cleared")
            continue
        if command == "/help":
            err(HELP)
            continue
        if command == "/image":
            try:
                session.attach(rest)
            except ImageError as exc:
                err(f"error: {exc}")
            else:
                err(f"image attached to your next message ({len(session.pending)} pending)")
            continue
        if command.startswith("/") and len(command) > 1 and "/" not in command[1:]:
            err(f"error: unknown command {command}; {HELP}")
            continue
        try:
            session.ask(text)
        except KeyboardInterrupt:
            err("answer interrupted; the turn is dropped")
        except openai.APIStatusError as exc:
            err(f"error: the server answered HTTP {exc.status_code}: {_api_message(exc)}")
        except openai.APIConnectionError as exc:
            err(f"error: lost the server: {' '.join(str(exc).split())}")


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    return " ".join(str(message or exc).split())
