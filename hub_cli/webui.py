"""``hub_cli webui``: chat with an InternVL server in the browser, images included (a gradio page).

LMDeploy's ``serve gradio`` gave this in one command and has since dropped its vision-language playground;
vLLM has none. Gradio (the optional extra ``vllm-internvl[webui]``) draws the page: a multimodal box for
text and images (file picker, drag-and-drop, previews), the chat with streamed replies, Stop and Reset,
sliders for the sampling settings and the tile budget, a system prompt. The conversation itself (what each
request carries, the image limit, errors) is :mod:`hub_cli.webui_chat`.

MODEL_OR_URL is a running server's URL or a model folder / repo id, for which a server is started the way
``hub_cli serve`` starts one, on a free loopback port (:func:`hub_cli.launch.local_server`), and stopped when the
page stops (Ctrl-C or SIGTERM). ``hub_cli serve --webui`` opens the same page beside the server it runs
(:func:`launch_in_background`).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

__all__ = ["DEFAULT_WEBUI_PORT", "GradioMissing", "require_gradio", "build_app", "connect", "launch",
           "launch_in_background", "run"]

DEFAULT_WEBUI_PORT = 6006            # LMDeploy's serve gradio default
UPDATE_EVERY_S = 0.1                 # streamed answers reach the page at most this often
STOPPED_NOTE = "Stopped: the answer so far stays in the history."
INSTALL_HINT = "pip install 'vllm-internvl[webui]'"
# offline pages: no font downloads (gradio's default theme links Google Fonts), no analytics calls
_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
_MONO = ["ui-monospace", "monospace"]
_CSS = "#usage {min-height: 1.5em} #chat img {max-height: 240px; width: auto} footer {display: none !important}"


class GradioMissing(RuntimeError):
    """gradio is not installed; the message says how to get it."""


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise GradioMissing(f"the web UI needs gradio: {INSTALL_HINT}") from None
    return gr


def connect(url: str, *, api_key: str = "EMPTY", model: str | None = None, image_limit: int | None = None):
    """(ServerInfo, openai.AsyncOpenAI) for a server URL; raises the client's error if it does not answer."""
    import openai

    from hub_cli.chat import api_base_url
    from hub_cli.webui_chat import probe_server

    base = api_base_url(url)
    with openai.OpenAI(base_url=base, api_key=api_key, max_retries=0, timeout=30) as probe:
        info = probe_server(probe, model, image_limit=image_limit)
    return info, openai.AsyncOpenAI(base_url=base, api_key=api_key, max_retries=0, timeout=600)


def build_app(info, client, *, system: str = "", max_tokens: int = 512, temperature: float = 0.7,
              top_p: float = 1.0):
    """The gradio Blocks page for one server (``info`` from :func:`connect`)."""
    gr = _gradio()
    from hub_cli.webui_chat import MAX_TILES, Conversation, Settings

    limit = f"at most {info.image_limit}" if info.image_limit else "as many as the server takes"
    tiles = (f"tile budget per request: `{info.tile_key}`" if info.tile_key
             else "tile budget: the server's (it refuses per-request processor arguments)")
    header = (f"### vllm-internvl · `{info.model}`\nServer `{info.base_url}` · images per request: {limit} · "
              f"{tiles}. Drop images on the box or use the clip; Enter sends.")

    with gr.Blocks(title=f"vllm-internvl: {info.model}", analytics_enabled=False) as app:
        conv = gr.State(Conversation())
        ticket = gr.State(0)   # the epoch a submit was made in (Conversation.begin)
        gr.Markdown(header, elem_id="header")
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(elem_id="chat", height=480, label="Chat", buttons=["copy"],
                                  feedback_options=None)
                box = gr.MultimodalTextbox(elem_id="box", file_types=["image"], file_count="multiple",
                                           placeholder="Ask about your images...", show_label=False,
                                           sources=["upload"])
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop", variant="stop", size="sm")
                    reset = gr.Button("Reset", elem_id="reset", size="sm")
                usage = gr.Markdown("", elem_id="usage")
            with gr.Column(scale=1):
                sys_box = gr.Textbox(system, label="System prompt", lines=3, elem_id="system")
                max_tok = gr.Slider(1, 8192, value=max_tokens, step=1, label="Max new tokens", elem_id="max_tokens")
                temp = gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature", elem_id="temperature")
                topp = gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="Top-p", elem_id="top_p")
                tile = gr.Slider(1, MAX_TILES, value=info.tile_default, step=1, visible=bool(info.tile_key),
                                 label=f"Tile budget ({info.tile_key or 'max_dynamic_patch'})", elem_id="tiles")

        async def respond(message, history, state, epoch, system_text, n_tokens, temperature_, top_p_, tiles_):
            # Reset after the submit (it already cleared the page), or a reply of this chat still streaming (the
            # box keeps the question): nothing to do
            if state.epoch != epoch or state.busy:
                yield gr.skip(), gr.skip(), state, gr.skip()
                return
            message = message or {}
            text = (message.get("text") or "").strip()
            paths = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
            if not text and not paths:
                yield gr.skip(), gr.skip(), state, gr.skip()
                return
            if not text:
                text = "Describe the image."
            history = list(history or [])
            history.append({"role": "user", "content": [*({"path": p} for p in paths), text]})
            history.append({"role": "assistant", "content": "..."})
            state.busy = True
            settings = Settings(system=system_text or "", max_tokens=n_tokens, temperature=temperature_,
                                top_p=top_p_, tiles=tiles_ if info.tile_key else None)
            try:
                async with contextlib.aclosing(_stream(state, epoch, history, text, paths, settings)) as outs:
                    async for out in outs:
                        yield out
            finally:
                state.busy = False

        async def _stream(state, epoch, history, text, paths, settings):
            yield history, None, state, ""
            if state.epoch != epoch:   # Reset while the question was drawn
                yield [], gr.skip(), state, gr.skip()
                return
            shown_notes, shown_at = 0, 0.0
            async for update in state.reply(client, info, text, paths, settings, epoch):
                if state.epoch != epoch:   # Reset while streaming: what this reply drew before goes too
                    yield [], gr.skip(), state, gr.skip()
                    return
                # Each page update sends and renders the whole chat: at most ~10 a second, or a long answer makes the
                # page fall behind the server (and Stop would come after the server had finished).
                if not (update.done or update.error or len(update.notes) > shown_notes) \
                        and time.monotonic() - shown_at < UPDATE_EVERY_S:
                    continue
                shown_at = time.monotonic()
                for note in update.notes[shown_notes:]:   # notes go above the answer they concern
                    history.insert(len(history) - 1, {"role": "assistant", "content": f"ℹ️ {note}"})
                shown_notes = len(update.notes)
                if update.stopped:
                    if update.answer:
                        history[-1] = {"role": "assistant", "content": update.answer}
                    else:
                        history.pop()   # stopped before the first word
                    history.append({"role": "assistant", "content": f"⏹️ {STOPPED_NOTE}"})
                    yield history, gr.skip(), state, STOPPED_NOTE
                    return
                if update.error:
                    error = {"role": "assistant", "content": f"⚠️ {update.error}"}
                    if update.answer:
                        history[-1] = {"role": "assistant", "content": update.answer}
                        history.append(error)
                    else:
                        history[-1] = error
                    yield history, gr.skip(), state, "The last message failed; the chat goes on."
                    return
                history[-1] = {"role": "assistant", "content": update.answer or "..."}
                status = gr.skip()
                if update.usage:
                    status = (f"Last reply: prompt {update.usage['prompt_tokens']} tokens, "
                              f"answer {update.usage['completion_tokens']} tokens.")
                yield history, gr.skip(), state, status

        # Stop and Reset are coroutines so that gradio runs them on the event loop of the streaming reply (a plain
        # function would run on a worker thread, between the reply's checks and its changes to the turns).
        async def on_reset(state):
            state.reset()
            return [], None, state, ""

        async def on_stop(state):
            state.stop()

        async def on_submit(state):
            return state.begin()

        # The submit's first step skips the queue: it runs before a Stop or Reset that comes while the answer
        # waits in the queue, so that Stop ends that answer (Conversation.stop) and Reset drops it (the epoch).
        box.submit(on_submit, conv, ticket, queue=False, show_progress="hidden").then(
            respond, [box, chat, conv, ticket, sys_box, max_tok, temp, topp, tile], [chat, box, conv, usage])
        # Stop and Reset skip the queue (they act while a reply streams) and end the reply through the
        # conversation rather than by cancelling the page's task: the reply's own last update then draws the
        # outcome (the answer so far and the Stopped note, or the empty chat), and no update in flight can come
        # after it.
        stop.click(on_stop, conv, None, queue=False, show_progress="hidden")
        reset.click(on_reset, conv, [chat, box, conv, usage], queue=False, show_progress="hidden")
        chat.clear(on_reset, conv, [chat, box, conv, usage], queue=False,
                   show_progress="hidden")   # the chat's own bin icon
    return app


def _theme():
    gr = _gradio()
    return gr.themes.Default(font=_FONTS, font_mono=_MONO)


def launch(app, *, server_name: str, server_port: int, block: bool = True) -> str:
    """Serve the page; returns its URL (``block``: until Ctrl-C)."""
    app.queue(default_concurrency_limit=8)
    app.launch(server_name=server_name, server_port=server_port, share=False, inbrowser=False, show_error=True,
               theme=_theme(), css=_CSS, prevent_thread_lock=True, quiet=True)
    from hub_cli.launch import connect_host

    url = f"http://{connect_host(server_name)}:{server_port}"
    print(f"hub_cli webui: open {url} in a browser (Ctrl-C stops)", flush=True)
    if block:
        # not app.block_thread(): it swallows KeyboardInterrupt, and `hub_cli webui` exits 130 when interrupted
        try:
            while app.is_running:
                time.sleep(0.1)
        finally:
            app.close()
    return url


def require_gradio() -> None:
    """Raise :class:`GradioMissing` (one line, with the install command) unless gradio can be imported."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise GradioMissing(f"the web UI needs gradio: {INSTALL_HINT}")


def launch_in_background(server_url: str, served_name: str, *, server_name: str, server_port: int,
                         api_key: str = "EMPTY", image_limit: int | None = None, echo=print) -> str | None:
    """For ``hub_cli serve --webui``: the page for a server that just became healthy, without blocking.

    A failure (the port taken, ...) is one line and the API server goes on; returns the page's URL or None."""
    try:
        info, client = connect(server_url, api_key=api_key, model=served_name, image_limit=image_limit)
        return launch(build_app(info, client), server_name=server_name, server_port=server_port, block=False)
    except Exception as exc:   # the server is up and serving: the page is an extra
        echo(f"hub_cli serve: --webui: error: {' '.join(f'{type(exc).__name__}: {exc}'.split())}")
        return None


def run(model_or_url: str, vllm_args: tuple[str, ...], *, server_name: str, server_port: int, api_key: str,
        model_name: str | None, limit_images: int | None, system: str, max_tokens: int, temperature: float,
        top_p: float, options: dict[str, Any], echo=print) -> int:
    """``hub_cli webui``: returns the exit code; every failure is one line (2 usage, 6 no server, 1 other)."""
    import openai

    from hub_cli.chat import api_base_url
    from hub_cli.errors import HubCliError
    from hub_cli.launch import local_server, sigterm_as_interrupt
    from hub_cli.webui_chat import image_limit_from_args

    def fail(message: str, code: int) -> int:
        echo(f"hub_cli webui: error: {message}")
        return code

    try:
        require_gradio()   # checked before a server starts; imported later (seconds)
    except GradioMissing as exc:
        return fail(str(exc), 2)
    remote = model_or_url.startswith(("http://", "https://"))
    if remote and vllm_args:
        return fail("arguments after '--' go to a server that webui starts; a URL is already running", 2)
    # Ctrl-C or SIGTERM stops the page and the server webui started, if any
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(sigterm_as_interrupt())
            url, served = model_or_url, model_name
            if not remote:
                try:
                    url, served, argv = stack.enter_context(local_server(
                        model_or_url, dict(options, model_name=model_name), vllm_args, prog="hub_cli webui", echo=echo))
                    limit_images = limit_images or image_limit_from_args(argv)
                except HubCliError as exc:
                    return fail(exc.message, exc.exit_code)
                except RuntimeError as exc:
                    return fail(str(exc), 1)
            try:
                info, client = connect(url, api_key=api_key, model=served, image_limit=limit_images)
            except openai.APIConnectionError:
                return fail(f"cannot reach an OpenAI-compatible server at {api_base_url(url)}", 6)
            except openai.APIStatusError as exc:
                return fail(f"{api_base_url(url)} answered HTTP {exc.status_code}", 1)
            except ValueError as exc:
                return fail(str(exc), 2)
            for note in info.notes:
                echo(f"hub_cli webui: {note}")
            app = build_app(info, client, system=system, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
            try:
                launch(app, server_name=server_name, server_port=server_port)
            except OSError as exc:
                return fail(f"cannot serve the page on {server_name}:{server_port}: {exc}", 1)
    except KeyboardInterrupt:
        return 130
    return 0
