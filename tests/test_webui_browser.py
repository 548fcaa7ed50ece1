"""hub_cli webui in a real headless Chromium (Debian's chromium + chromium-driver, through selenium), over the tiny
InternVL served the way hub_cli serve serves it (one server for the module, started by the webui command itself).

The page: an uploaded PNG and a question get a streamed answer whose prompt token count is the tiling formula's
(the image goes unchanged); images dropped on the box beyond the server's limit are left out with a note; a
garbage file is an error message in the chat and the page goes on; Stop ends the request on the server (vLLM counts
it aborted), leaves the answer so far and a Stopped note, and the next question is answered; Reset clears the
history (the next prompt has no earlier turn); the tile budget slider changes the count as the formula says.
Without the browser, against the same server: Stop's cancel path, the image limit learned from the server's refusal, and
``hub_cli serve --webui`` opening the page. The screenshot of the first answer is written to
$VLLM_INTERNVL_WEBUI_SCREENSHOT when set (docs/webui.png was made that way)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import free_port

pytestmark = pytest.mark.slow

HUB_CLI = Path(sys.executable).with_name("hub_cli")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_TOKENS = 12
SERVED = "tiny-internvl2-2b"


def _png(path: Path, w: int, h: int, color) -> Path:
    Image.new("RGB", (w, h), color).save(path)
    return path


def _expected_prompt_tokens(model_dir, images, text, max_num=None):
    """The reference prompt's length: InternVL's template, each image's tiles x 256 context tokens."""
    from transformers import AutoTokenizer

    from internvl_plugin import register
    from reference import ref_build_prompt, ref_num_tiles

    register()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # one image: "<image>\n" before the text, as InternVL's chat() writes it; more: "Image-1: <image>\n..."
    question = ("<image>\n" if len(images) == 1 else "".join(f"Image-{i + 1}: <image>\n" for i in range(len(images)))) \
        + text
    tiles = [ref_num_tiles(im.width, im.height, max_num, model_dir) for im in images]
    return len(tok(ref_build_prompt(question, tiles, model_dir)).input_ids)


def _slow_and_never_ending(model_dir: Path, layers: int = 24) -> Path:
    """The tiny checkpoint reshaped so that Stop always lands mid-answer, the way it does with a real model.

    * Its 2 LLM layers repeated to ``layers``: the 2-layer model decodes some 400 tokens a second here, faster than
      vLLM's API server can stream them, and the server then streams nothing (nor notices a closed stream) until
      the engine is done; ~12 times the layers make the engine the slower side, as with any real model.
    * The output rows of its special tokens (end of sequence among them) zeroed, so that every answer runs to
      max_tokens: a zeroed row's logit is 0, and the other ~410 random rows in 128 dimensions leave no hidden state
      whose logits are all below 0 (for symmetric random rows the chance that they do is below 1e-14, Wendel's
      theorem), so greedy decoding never picks a special token.

    Prompt token counts are unchanged."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from internvl_plugin import register

    register()
    special = AutoTokenizer.from_pretrained(str(model_dir)).all_special_ids
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["language_model.output.weight"][special] = 0
    config = json.loads((model_dir / "config.json").read_text())
    have = config["llm_config"]["num_hidden_layers"]
    layer = re.compile(r"^(language_model\.model\.layers\.)(\d+)(\..+)$")
    for name, tensor in list(weights.items()):
        if m := layer.match(name):
            for copy in range(int(m.group(2)) + have, layers, have):
                weights[f"{m.group(1)}{copy}{m.group(3)}"] = tensor.clone()
    config["llm_config"]["num_hidden_layers"] = layers
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(page URL, vLLM base URL, model folder, log) of `hub_cli webui MODEL` with a 2-image limit, MODEL the tiny
    InternVL reshaped by _slow_and_never_ending (answers run to max_tokens at a real model's pace)."""
    from internvl_plugin.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("webui")
    model = _slow_and_never_ending(build_tiny_model("internvl2-2b", root / "tiny-internvl2-2b"))
    port = free_port()
    log = root / "webui.log"
    argv = [HUB_CLI, "webui", model, "--model-name", SERVED, "--server-port", port, "--trust-request-mm-kwargs",
            "--session-len", "4096",
            "--max-batch-size", "4", "--max-tokens", MAX_TOKENS, "--temperature", "0",
            "--", "--limit-mm-per-prompt", '{"image": 2}']
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE")}
    proc = subprocess.Popen([str(a) for a in argv], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    try:
        while f"open {url}" not in log.read_text():
            assert proc.poll() is None, f"hub_cli webui exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"page never up:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        api = re.search(r"vLLM ready at (http://127\.0\.0\.1:\d+)/v1", log.read_text()).group(1)
        yield url, api, model, log
    finally:
        proc.send_signal(signal.SIGTERM)   # as a service manager would stop it: the vLLM it started goes too
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, log.read_text()[-3000:]   # README: 130 = interrupted
    with pytest.raises(OSError):
        urllib.request.urlopen(api + "/health", timeout=5)


@pytest.fixture(scope="module")
def browser(page):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), "run bash scripts/setup.sh (Debian chromium)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,960"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(page[0])
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#box textarea"), 60, "the page to load")
    yield driver
    driver.quit()


def _wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {value!r}"
        time.sleep(0.1)


def _text(driver, css):
    """The visible text of each element matching ``css``, read in one go (gradio re-renders under us)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText.trim())", css)


def _usage(driver):
    return _text(driver, "#usage")[0]


def _send(driver, text, files=(), drop=()):
    """Attach ``files`` through the file picker and ``drop`` by a drag-and-drop on the box, then type and Enter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = _usage(driver)
    if files:
        picker = driver.find_element(By.CSS_SELECTOR, "#box input[type=file]")
        driver.execute_script("arguments[0].value = ''", picker)   # chromedriver adds to a 'multiple' input's list
        picker.send_keys("\n".join(str(f) for f in files))
    for path in drop:
        driver.execute_script("""
            const [b64, name, target] = arguments;
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, {type: 'image/png'}));
            for (const type of ['dragenter', 'dragover', 'drop'])
                target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));
        """, base64.b64encode(Path(path).read_bytes()).decode(), Path(path).name,
            driver.find_element(By.CSS_SELECTOR, "#box textarea"))
    want = len(files) + len(drop)
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#box .thumbnail-item")) == want, 30, "previews")
    box = driver.find_element(By.CSS_SELECTOR, "#box textarea")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    return before


def _bubbles(driver):
    return _text(driver, "#chat [data-testid=bot]")


def _set_slider(driver, elem_id, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    css = f"#{elem_id} input[type=number]"
    field = driver.find_element(By.CSS_SELECTOR, css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)
    _wait(lambda: driver.find_element(By.CSS_SELECTOR, css).get_attribute("value") == str(value), 10,
          f"{elem_id} = {value}")


def _prompt_tokens(driver, before, max_tokens=MAX_TOKENS):
    text = _wait(lambda: (u := _usage(driver)) != before and u.startswith("Last reply") and u, 120, "the answer")
    prompt, answer = map(int, re.search(r"prompt (\d+) tokens, answer (\d+) tokens", text).groups())
    assert 1 <= answer <= max_tokens
    return prompt


def test_image_question_streams_an_answer(browser, page, tmp_path):
    _, _, model, _ = page
    # every text the last answer bubble shows, recorded by the page itself as it changes
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
            const bots = document.querySelectorAll('#chat [data-testid=bot]');
            const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
            if (text && window.seen[window.seen.length - 1] !== text) window.seen.push(text);
        }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
    """)
    green = _png(tmp_path / "green.png", 640, 480, (10, 200, 30))
    _set_slider(browser, "max_tokens", 160)   # long enough to be seen growing
    try:
        before = _send(browser, "What is in the picture?", files=[green])
        prompt = _prompt_tokens(browser, before, 160)
    finally:
        _set_slider(browser, "max_tokens", MAX_TOKENS)
    # 640x480 -> 3x2 tiles + thumbnail at the model's max_dynamic_patch 6: the image went unchanged
    assert prompt == _expected_prompt_tokens(model, [Image.open(green)], "What is in the picture?")
    answer = _bubbles(browser)[-1]
    seen = [t for t in browser.execute_script("return window.seen") if t != "..."]
    assert seen[-1] == answer and len(seen) >= 2 and len(seen[0]) < len(answer), seen   # it grew: streamed
    assert "What is in the picture?" in _text(browser, "#chat [data-testid=user]")[-1]
    shot = tmp_path / "webui.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("VLLM_INTERNVL_WEBUI_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["VLLM_INTERNVL_WEBUI_SCREENSHOT"])


def test_dropped_images_beyond_the_limit_are_left_out_with_a_note(browser, tmp_path):
    red = _png(tmp_path / "red.png", 300, 200, (220, 20, 20))
    blue = _png(tmp_path / "blue.png", 200, 300, (20, 20, 220))
    before = _send(browser, "And these two?", drop=[red, blue])
    _prompt_tokens(browser, before)   # answered: the request kept to 2 images
    assert ("ℹ️ The server takes at most 2 image(s) per request: 1 image(s) from earlier turns left out of this "
            "request.") in _bubbles(browser)


def test_garbage_file_is_an_error_and_the_page_goes_on(browser, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all" * 20)
    before = _send(browser, "What is this?", files=[garbage])
    error = _wait(lambda: [b for b in _bubbles(browser) if b.startswith("⚠️")], 60, "the error message")
    assert error == ["⚠️ The server answered HTTP 400: image 2 (data URL): not an image in a supported format"]
    _wait(lambda: _usage(browser) == "The last message failed; the chat goes on.", 10, "the status line")
    before = _send(browser, "Still there?")
    _prompt_tokens(browser, before)


def _metrics(api):
    """vLLM's finished requests, running requests and generated tokens, from its /metrics."""
    text = urllib.request.urlopen(api + "/metrics", timeout=10).read().decode()

    def total(name):
        return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))

    return {"finished": total("vllm:request_success_total"), "running": total("vllm:num_requests_running"),
            "generated": total("vllm:generation_tokens_total")}


def _assert_aborted(api, before):
    """vLLM dropped the request: nothing runs, no request finished (a client's abort is not counted as finished),
    it generated fewer than LONG tokens and generates no more."""
    after = _wait(lambda: (m := _metrics(api))["running"] == 0 and m, 20, "vLLM to drop the request")
    generated = after["generated"] - before["generated"]
    assert after["finished"] == before["finished"] and 0 < generated < LONG, (before, after)
    time.sleep(1)
    assert _metrics(api)["generated"] == after["generated"]


STOPPED = "Stopped: the answer so far stays in the history."
LONG = 3000   # new tokens (30 s and more here) that fit the 4096-token session after a short prompt


def test_stop_ends_the_request_and_the_page_goes_on(browser, page):
    from selenium.webdriver.common.by import By

    _, api, _, _ = page
    browser.find_element(By.ID, "reset").click()   # a short prompt, so that LONG new tokens fit the session
    _wait(lambda: not _bubbles(browser), 10, "an empty chat")
    _set_slider(browser, "max_tokens", LONG)
    try:
        before = _metrics(api)
        _send(browser, "Tell me a long story.")
        _wait(lambda: (b := _bubbles(browser)) and b[-1] != "...", 60, "a partial answer")
        browser.find_element(By.ID, "stop").click()
        _wait(lambda: _usage(browser) == STOPPED, 30, "the page to say Stopped")
    finally:
        _set_slider(browser, "max_tokens", MAX_TOKENS)
    _assert_aborted(api, before)
    *_, partial, note = _bubbles(browser)
    assert note == f"⏹️ {STOPPED}" and partial and not partial.startswith(("⚠️", "ℹ️", "..."))
    assert _bubbles(browser)[-2:] == [partial, note]   # nothing streamed after Stop
    before = _send(browser, "And then?")                # the page goes on
    _prompt_tokens(browser, before)
    assert _bubbles(browser)[-3] == partial and _bubbles(browser)[-2] == note


def test_stop_without_the_browser(page):
    """Conversation.stop, as the page's Stop calls it: the stream is closed, vLLM aborts the request, the answer so
    far is kept as the turn's, and the next question of the same conversation is answered; Conversation.reset while
    a reply streams (the page's Reset) aborts it the same way and keeps nothing."""
    from hub_cli.webui import connect
    from hub_cli.webui_chat import Conversation, Settings

    _, api, _, _ = page
    info, client = connect(api)
    conv = Conversation()
    assert conv.stop() is False   # nothing streams yet
    conv.begin()                  # the next question forgets that Stop (the page's submit does this)

    async def ask(text, max_tokens, interrupt_after=None, interrupt=None):
        updates = []
        async for update in conv.reply(client, info, text, [], Settings(max_tokens=max_tokens, temperature=0)):
            updates.append(update)
            if len(updates) == interrupt_after:
                interrupt()
        return updates

    async def scenario():   # one event loop: the client's connections belong to it
        before, stops = _metrics(api), []
        updates = await ask("Tell me a long story.", LONG, 3, lambda: stops.append(conv.stop()))
        assert stops == [True]
        last = updates[-1]
        assert last.stopped and last.done and last.error is None and last.usage is None
        assert len(updates) == 4 and last.answer == updates[2].answer   # nothing after Stop, though buffered
        _assert_aborted(api, before)
        assert [(t.text, t.answer) for t in conv.turns] == [("Tell me a long story.", last.answer)]

        last = (await ask("And then?", 2))[-1]
        assert last.done and not last.stopped and last.error is None and last.usage["completion_tokens"] == 2
        assert len(conv.turns) == 2

        before = _metrics(api)
        assert (await ask("Once more.", LONG, 2, conv.reset))[-1].stopped and conv.turns == []
        _assert_aborted(api, before)

    asyncio.run(scenario())


def test_reset_clears_the_history_and_tile_budget_counts(browser, page, tmp_path):
    from selenium.webdriver.common.by import By

    _, _, model, _ = page
    browser.find_element(By.ID, "reset").click()
    _wait(lambda: not _bubbles(browser) and not _text(browser, "#chat [data-testid=user]"), 10, "an empty chat")
    _wait(lambda: _usage(browser) == "", 10, "no status line")
    before = _send(browser, "hi")
    assert _prompt_tokens(browser, before) == _expected_prompt_tokens(model, [], "hi")   # no earlier turn sent
    browser.find_element(By.ID, "reset").click()
    _wait(lambda: not _bubbles(browser), 10, "an empty chat")
    _set_slider(browser, "tiles", 2)
    wide = _png(tmp_path / "wide.png", 900, 300, (200, 200, 20))
    before = _send(browser, "Describe.", files=[wide])
    assert _prompt_tokens(browser, before) == _expected_prompt_tokens(model, [Image.open(wide)], "Describe.", 2)


def test_image_limit_learned_from_the_server(page, tmp_path):
    """A server whose limit the page was not told: the refusal's number is used and the request sent again."""
    import openai

    from hub_cli.webui import connect
    from hub_cli.webui_chat import Conversation, Settings

    _, api, model, _ = page
    info, client = connect(api)
    assert info.image_limit is None and info.tile_key == "max_dynamic_patch" and info.tile_default == 6
    assert info.model == SERVED
    paths = [_png(tmp_path / f"{i}.png", 64, 64, (i * 80, 0, 0)) for i in range(3)]
    conv = Conversation()

    async def run():
        return [u async for u in conv.reply(client, info, "three?", paths, Settings(max_tokens=2, temperature=0))]

    updates = asyncio.run(run())
    assert updates[-1].error is None and updates[-1].done and info.image_limit == 2
    assert "only the last 2 of the 3 images you just added sent" in updates[-1].notes[0]
    assert updates[-1].usage["prompt_tokens"] == _expected_prompt_tokens(
        model, [Image.open(p) for p in paths[1:]], "three?")
    assert isinstance(client, openai.AsyncOpenAI)


def test_serve_webui_opens_the_page_beside_the_server(page, monkeypatch):
    """`hub_cli serve --webui`: once the server is healthy the page comes up on --webui-port (the server here is
    the module's; run_server is replaced by one that only reports it healthy)."""
    import gradio
    from click.testing import CliRunner

    import hub_cli.launch
    from hub_cli.cli import main

    _, api, model, _ = page
    port, webui_port = int(api.rsplit(":", 1)[1]), free_port()
    seen = {}

    def healthy_at_once(argv, env, base, on_ready=None):
        on_ready()
        with urllib.request.urlopen(f"http://127.0.0.1:{webui_port}/", timeout=30) as resp:
            seen["status"], seen["html"] = resp.status, resp.read().decode()
        gradio.close_all()
        return 0

    monkeypatch.setattr(hub_cli.launch, "run_server", healthy_at_once)
    result = CliRunner().invoke(main, ["serve", str(model), "--model-name", SERVED, "--server-port", str(port),
                                       "--session-len", "4096",
                                       "--webui", "--webui-port", str(webui_port), "--",
                                       "--limit-mm-per-prompt", '{"image": 2}'])
    assert result.exit_code == 0, result.output
    assert seen["status"] == 200 and f"vllm-internvl: {SERVED}" in seen["html"]
    assert "images per request: at most 2" in seen["html"]
