"""hub_cli webui without a model server: its options, a URL that does not answer, what each request carries
(images kept within the server's limit, newest first), a server that is down mid-chat.
The page in a real browser over a real server: test_webui_browser.py."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from pathlib import Path

import click
import pytest
from PIL import Image

from conftest import free_port

HUB_CLI = Path(sys.executable).with_name("hub_cli")


def _png(path: Path, color) -> str:
    Image.new("RGB", (64, 48), color).save(path)
    return str(path)


def test_help_documents_every_option():
    from hub_cli.cli import main

    command = main.commands["webui"]
    undocumented = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
    assert undocumented == []
    out = subprocess.run([HUB_CLI, "webui", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--server-name", "--server-port", "--api-key", "--limit-images", "--system", "--max-tokens",
                   "--temperature", "--top-p", "--tp", "--trust-request-mm-kwargs", "--model-name"):
        assert option in out
    assert "[default: 6006" in out and "[default: 127.0.0.1]" in out
    serve_help = subprocess.run([HUB_CLI, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--webui " in serve_help and "--webui-port" in serve_help


def test_url_that_does_not_answer_is_one_line():
    port = free_port()   # nothing listens there
    proc = subprocess.run([HUB_CLI, "webui", f"http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 6
    assert proc.stderr.strip() == f"hub_cli webui: error: cannot reach an OpenAI-compatible server at " \
                                  f"http://127.0.0.1:{port}/v1"
    assert proc.stdout == ""


def test_vllm_args_with_a_url_are_refused():
    proc = subprocess.run([HUB_CLI, "webui", "http://127.0.0.1:1", "--", "--max-num-seqs", "2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "after '--'" in proc.stderr


def test_image_limit_from_vllm_args():
    from hub_cli.webui_chat import image_limit_from_args

    assert image_limit_from_args(["--limit-mm-per-prompt", '{"image": 3}']) == 3
    assert image_limit_from_args(['--limit_mm_per_prompt={"image": 1, "video": 0}']) == 1
    assert image_limit_from_args(["--max-num-seqs", "2"]) is None
    assert image_limit_from_args(["--limit-mm-per-prompt", "not json"]) is None


def _images_per_message(messages):
    return [sum(1 for p in m["content"] if isinstance(p, dict) and p["type"] == "image_url")
            if isinstance(m["content"], list) else 0 for m in messages]


def test_requests_keep_the_newest_images_within_the_limit(tmp_path):
    from hub_cli.webui_chat import Conversation, Turn

    a, b, c, d = (_png(tmp_path / f"{n}.png", (i * 60, 0, 0)) for i, n in enumerate("abcd"))
    conv = Conversation()
    conv.turns = [Turn("first", [a, b], "answer 1"), Turn("second", [], "answer 2")]
    messages, notes = conv.messages("Be brief.", "third", [c], limit=2)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert _images_per_message(messages) == [0, 1, 0, 0, 0, 1]
    # b (newest earlier image) and c are sent, a is replaced by a note in its turn
    kept = [p["image_url"]["url"] for m in messages if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == "image_url"]
    assert kept == ["data:image/png;base64," + base64.b64encode(Path(x).read_bytes()).decode() for x in (b, c)]
    assert "(an earlier image, not sent again)" in messages[1]["content"][0]["text"]
    assert notes == ["The server takes at most 2 image(s) per request: 1 image(s) from earlier turns left out of "
                     "this request."]
    # more new images than the limit: only the last ones go
    messages, notes = conv.messages("", "many", [b, c, d], limit=2)
    assert _images_per_message(messages) == [0, 0, 0, 0, 2]
    assert [p["type"] for p in messages[-1]["content"]] == ["image_url", "image_url", "text"]   # no stand-in text
    assert "only the last 2 of the 3 images you just added sent" in notes[0]
    assert "2 image(s) from earlier turns" in notes[0]
    # no limit known: everything goes, no note
    messages, notes = conv.messages("", "all", [c], limit=None)
    assert _images_per_message(messages) == [2, 0, 0, 0, 1] and notes == []


def test_each_image_is_read_and_encoded_once(tmp_path, monkeypatch):
    import hub_cli.webui_chat as webui_chat
    from hub_cli.webui_chat import Conversation, Turn

    a, b = (_png(tmp_path / f"{n}.png", (i * 90, 0, 0)) for i, n in enumerate("ab"))
    encoded = []
    real = webui_chat.image_url_for
    monkeypatch.setattr(webui_chat, "image_url_for", lambda path: encoded.append(path) or real(path))
    conv = Conversation()
    first, _ = conv.messages("", "one", [a], limit=None)
    conv.turns = [Turn("one", [a], "answer")]
    second, _ = conv.messages("", "two", [b], limit=None)
    assert encoded == [a, b]   # a's data URL of the first turn is reused in the second request
    assert second[0]["content"][0] == first[0]["content"][0]
    conv.reset()
    conv.messages("", "again", [a], limit=None)
    assert encoded == [a, b, a]   # a new conversation reads its files anew

    # the image of a turn that is dropped is not held: a reply that failed, a reply stopped before its first word
    from hub_cli.webui_chat import ServerInfo, Settings

    c, d = (_png(tmp_path / f"{n}.png", (0, i * 90, 0)) for i, n in enumerate("cd"))
    conv, info = Conversation(), ServerInfo(base_url="http://127.0.0.1:1/v1", model="m")
    conv.turns = [Turn("kept", [a], "answer")]
    encoded.clear()
    failed = asyncio.run(_answer(conv, _FakeAsyncClient(fail=True), info, "why?", [c]))
    assert failed[-1].error.startswith("Cannot reach the server") and [t.text for t in conv.turns] == ["kept"]
    assert sorted(encoded) == [a, c] and set(conv._urls) == {a}

    hanging = _FakeAsyncClient(hang=True)

    async def stopped_while_waiting():
        task = asyncio.ensure_future(_answer(conv, hanging, info, "and?", [d]))
        while not hanging.requests:   # the request is on its way (its images encoded)
            await asyncio.sleep(0.01)
        assert conv.stop() is True
        return await task

    stopped = asyncio.run(stopped_while_waiting())
    assert [(u.answer, u.stopped) for u in stopped] == [("", True)] and [t.text for t in conv.turns] == ["kept"]
    assert sorted(encoded) == [a, c, d] and set(conv._urls) == {a}
    conv.messages("", "more", [c, d], limit=None)
    assert sorted(encoded) == [a, c, c, d, d]   # read anew; the kept turn's image still comes from the cache


class _FakeStream:
    """An openai chat stream of the given words, then a usage chunk."""

    def __init__(self, words):
        self.words, self.closed = list(words), False

    async def _chunks(self):
        from types import SimpleNamespace as NS

        for word in self.words:
            yield NS(usage=None, choices=[NS(delta=NS(content=word))])
        yield NS(usage=NS(prompt_tokens=7, completion_tokens=len(self.words)), choices=[])

    def __aiter__(self):
        return self._chunks()

    async def close(self):
        self.closed = True


class _FakeAsyncClient:
    """openai.AsyncOpenAI's chat.completions.create: a stream of ``words``, a connection error, or no answer."""

    def __init__(self, words=("Hel", "lo"), *, fail=False, hang=False):
        from types import SimpleNamespace

        self.words, self.fail, self.hang, self.requests = words, fail, hang, []
        self.chat = SimpleNamespace(completions=self)

    async def create(self, **request):
        import httpx
        import openai

        self.requests.append(request)
        if self.fail:
            raise openai.APIConnectionError(request=httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions"))
        if self.hang:
            await asyncio.Event().wait()
        return _FakeStream(self.words)


async def _answer(conv, client, info, text, images=(), epoch=None):
    from hub_cli.webui_chat import Settings

    return [u async for u in conv.reply(client, info, text, list(images), Settings(), epoch)]


def test_stop_before_the_reply_starts_ends_it():
    """The page's Stop while the question waits in the queue (no reply streams yet) ends that reply before it sends
    anything; a Stop pressed while nothing was asked is forgotten by the next submit (Conversation.begin); a Reset
    after the submit keeps its answer out of the new chat."""
    from hub_cli.webui_chat import Conversation, ServerInfo

    conv, info, client = Conversation(), ServerInfo(base_url="http://127.0.0.1:1/v1", model="m"), _FakeAsyncClient()
    epoch = conv.begin()                 # the submit
    assert conv.stop() is False          # Stop before the reply started
    updates = asyncio.run(_answer(conv, client, info, "hello", epoch=epoch))
    assert [(u.answer, u.done, u.stopped, u.error) for u in updates] == [("", True, True, None)]
    assert client.requests == [] and conv.turns == []

    last = asyncio.run(_answer(conv, client, info, "again", epoch=conv.begin()))[-1]   # the Stop was used up
    assert (last.answer, last.stopped, last.usage) == ("Hello", False, {"prompt_tokens": 7, "completion_tokens": 2})
    assert [(t.text, t.answer) for t in conv.turns] == [("again", "Hello")] and len(client.requests) == 1

    conv.stop()                          # nothing asked, nothing streaming
    last = asyncio.run(_answer(conv, client, info, "third", epoch=conv.begin()))[-1]
    assert (last.answer, last.stopped) == ("Hello", False) and len(conv.turns) == 2

    epoch = conv.begin()
    conv.reset()                         # Reset while the question is queued ...
    conv.begin()                         # ... and the next submit forgot the Stop that Reset leaves
    last = asyncio.run(_answer(conv, client, info, "fourth", epoch=epoch))[-1]
    assert last.answer == "Hello" and conv.turns == []   # answered into the old chat: not kept


def test_bytes_go_unchanged(tmp_path):
    from hub_cli.webui_chat import image_url_for

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (1234, 567), (1, 2, 3)).save(path, quality=91)
    url = image_url_for(path)
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == path.read_bytes()


def test_server_down_mid_chat_is_a_chat_message(tmp_path):
    import openai

    from hub_cli.webui_chat import Conversation, ServerInfo, Settings

    port = free_port()
    info = ServerInfo(base_url=f"http://127.0.0.1:{port}/v1", model="m")
    client = openai.AsyncOpenAI(base_url=info.base_url, api_key="x", max_retries=0, timeout=10)
    conv = Conversation()

    async def run():
        return [u async for u in conv.reply(client, info, "hello", [_png(tmp_path / "a.png", (9, 9, 9))],
                                            Settings())]

    updates = asyncio.run(run())
    assert len(updates) == 1 and updates[0].done
    assert updates[0].error.startswith(f"Cannot reach the server at http://127.0.0.1:{port}/v1")
    assert conv.turns == []   # the failed turn (and its image) is not kept


def test_missing_gradio_is_one_line(monkeypatch):
    import importlib.util

    from hub_cli import webui

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    lines = []
    code = webui.run("http://127.0.0.1:1", (), server_name="127.0.0.1", server_port=6006, api_key="x",
                     model_name=None, limit_images=None, system="", max_tokens=8, temperature=0, top_p=1,
                     options={}, echo=lines.append)
    assert code == 2 and lines == ["hub_cli webui: error: the web UI needs gradio: pip install 'vllm-internvl[webui]'"]


class _FakeModels:
    def __init__(self, ids, root):
        self.ids, self.root = ids, root

    def list(self):
        from types import SimpleNamespace

        return SimpleNamespace(data=[SimpleNamespace(id=i, root=self.root) for i in self.ids])


class _FakeChat:
    def __init__(self, refuse):
        self.refuse, self.requests = refuse, []
        self.completions = self

    def create(self, **request):
        import httpx
        import openai

        self.requests.append(request)
        if self.refuse:
            response = httpx.Response(400, request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"))
            raise openai.BadRequestError("Per-request mm_processor_kwargs are disabled by default", response=response,
                                         body={"message": "Per-request mm_processor_kwargs are disabled by default"})
        return None


def _fake_client(root, refuse):
    from types import SimpleNamespace

    return SimpleNamespace(base_url="http://127.0.0.1:1/v1/", models=_FakeModels(["m"], str(root)),
                           chat=_FakeChat(refuse))


def test_tile_slider_only_where_the_server_takes_per_request_kwargs(tmp_path):
    import json

    from hub_cli.webui_chat import probe_server

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"], "max_dynamic_patch": 12}))
    client = _fake_client(tmp_path, refuse=False)
    info = probe_server(client)
    assert (info.model, info.tile_key, info.tile_default, info.notes) == ("m", "max_dynamic_patch", 12, [])
    assert client.chat.requests[0]["extra_body"] == {"mm_processor_kwargs": {"max_dynamic_patch": 12}}
    assert client.chat.requests[0]["max_tokens"] == 1
    info = probe_server(_fake_client(tmp_path, refuse=True))
    assert info.tile_key is None and "--trust-request-mm-kwargs" in info.notes[0]
    # XComposer2's tile budget is hd_num
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["InternLMXComposer2ForCausalLM"],
                                                      "hd_num": 25}))
    assert probe_server(_fake_client(tmp_path, refuse=False)).tile_key == "hd_num"
    # a served model the page was told to use must exist
    with pytest.raises(ValueError, match=r"^the server does not serve 'other'; it serves: m$"):
        probe_server(_fake_client(tmp_path, refuse=False), "other")


def test_serve_webui_passes_the_servers_api_key(tiny_model, monkeypatch):
    """`hub_cli serve --webui -- --api-key K`: the page talks to the server with K (without it every request is a
    401)."""
    import hub_cli.launch
    import hub_cli.webui
    from click.testing import CliRunner

    from hub_cli.cli import main

    seen = {}

    def fake_run_server(argv, env, base, on_ready=None, **kwargs):
        on_ready()
        return 0

    monkeypatch.setattr(hub_cli.launch, "run_server", fake_run_server)
    monkeypatch.setattr(hub_cli.webui, "launch_in_background", lambda *a, **kw: seen.update(kw))
    result = CliRunner().invoke(main, ["serve", str(tiny_model("internvl2-2b")), "--webui", "--",
                                       "--api-key", "sekret"])
    assert result.exit_code == 0, result.output
    assert seen["api_key"] == "sekret"


@pytest.mark.parametrize("config, want", [
    ("[]", ("max_dynamic_patch", 6)),                                  # not an object: the default, no traceback
    ('{"max_dynamic_patch": 12}', ("max_dynamic_patch", 12)),
    ('{"hd_num": 16}', ("hd_num", 16)),
    ('{"hd_num": "many"}', ("hd_num", 25)),                            # garbage value: XComposer2's default
    ('{"architectures": ["InternLMXComposer2ForCausalLM"]}', ("hd_num", 25)),
    (None, ("max_dynamic_patch", 6)),                                  # a served name, not a folder
])
def test_tile_slider_facts_from_the_config(tmp_path, config, want):
    from hub_cli.webui_chat import _tile_facts

    if config is not None:
        (tmp_path / "config.json").write_text(config)
    assert _tile_facts(str(tmp_path) if config is not None else "OpenGVLab/InternVL2-2B") == want
