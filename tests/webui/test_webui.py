"""The chat page (issue 17) in a real headless Chromium, against a real
`taper serve`.

Playwright for Python drives Debian's Chromium (``TAPER_CHROMIUM``, default
``/usr/bin/chromium``); no browser is downloaded. The server is the binary
(``TAPER_BIN``, default ``target/debug/taper``) on a copy of the tiny Qwen2
fixture whose ``max_position_embeddings`` is raised to 8192: the fixture
decodes thousands of tokens a second, and a reply of ~8,000 tokens (with
``--ignore-eos``) gives the Stop test a stream that is still running when
the button is pressed. The weights are unchanged (RoPE has no table), so
the output is random tokens as always, which is all streaming, Stop and
persistence need. Replies whose content must be chosen (script injection,
Markdown, screenshots) are served to the page by Playwright's ``route``.

Screenshots at 390 and 1280 px go to ``target/webui-screenshots/`` (or
``TAPER_WEBUI_SCREENSHOTS``). Run by ``scripts/test.sh``.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import expect, sync_playwright

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "models" / "qwen2"
NAME = "tiny-qwen2"
CONTEXT = 8192
KEY = "sesame"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # The CI machine's network is closed: Chromium's own background
    # connections would only fail and slow it down.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SHOTS = pathlib.Path(os.environ.get("TAPER_WEBUI_SCREENSHOTS") or ROOT / "target" / "webui-screenshots")

expect.set_options(timeout=15_000)


def taper_bin():
    path = os.environ.get("TAPER_BIN") or str(ROOT / "target" / "debug" / "taper")
    if not os.path.isfile(path):
        pytest.fail(f"{path} does not exist: build it with `cargo build` or set TAPER_BIN")
    return path


class Server:
    """`taper serve --port 0 ARGS` on `model`; its URL in `base`."""

    def __init__(self, model, *args):
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env.pop("TAPER_API_KEY", None)
        self.proc = subprocess.Popen(
            [taper_bin(), "serve", "--model", str(model), "--port", "0",
             "--served-model-name", NAME, "--max-batch", "4", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )
        port = {}
        found = threading.Event()

        def read_stderr():
            for line in self.proc.stderr:
                m = re.match(r"listening on http://[^ ]*:(\d+)", line)
                if m:
                    port["port"] = int(m.group(1))
                    found.set()
        threading.Thread(target=read_stderr, daemon=True).start()
        if not found.wait(60):
            self.close()
            pytest.fail("taper serve did not print `listening on http://HOST:PORT`")
        self.base = f"http://127.0.0.1:{port['port']}"
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(self.base + "/health") as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                self.close()
                pytest.fail("/health did not answer 200 within 60 s")
            time.sleep(0.05)

    def metric(self, name):
        with urllib.request.urlopen(self.base + "/metrics") as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} is not in /metrics:\n{text}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def long_model(tmp_path_factory):
    model = tmp_path_factory.mktemp("model") / "qwen2-long"
    shutil.copytree(FIXTURE, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="session")
def server(long_model):
    s = Server(long_model, "--ignore-eos")
    yield s
    s.close()


@pytest.fixture(scope="session")
def browser():
    executable = os.environ.get("TAPER_CHROMIUM", "/usr/bin/chromium")
    if not os.path.isfile(executable):
        pytest.fail(f"{executable} does not exist: install Debian's `chromium` or set TAPER_CHROMIUM")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, base, width=1280, height=800):
    """A fresh context (empty localStorage) on the page; uncaught errors and
    CSP violations are collected in `page.problems`."""
    context = browser.new_context(base_url=base, viewport={"width": width, "height": height},
                                  accept_downloads=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(f"uncaught: {e}"))
    page.on("console", lambda m: page.problems.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.goto("/")
    return page


@pytest.fixture
def page(browser, server):
    p = open_page(browser, server.base)
    yield p
    problems = p.problems
    p.context.close()
    assert not problems, problems


def chat_requests(page):
    """The bodies of the page's chat requests, as they are sent."""
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
    return bodies


def set_settings(page, system=None, temperature=None, top_p=None, max_tokens=None):
    page.click("#open-settings")
    for selector, value in [("#set-system", system), ("#set-temperature", temperature),
                            ("#set-top-p", top_p), ("#set-max-tokens", max_tokens)]:
        if value is not None:
            page.fill(selector, str(value))
    page.click("#save-settings")
    expect(page.locator("#settings")).not_to_be_visible()


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_reply_done(page):
    """The last reply's stats line once it has finished."""
    stats = page.locator(".msg.assistant").last.locator(".stats")
    expect(stats).to_have_text(re.compile(r"tokens"))
    expect(page.locator("#send")).to_be_visible()
    return stats.inner_text()


# ---- the page against the real server ------------------------------------------


def test_a_message_streams_a_reply_that_ends_with_tokens_per_second(page):
    expect(page.locator("#model-name")).to_have_text(NAME)
    expect(page.locator("#model-ctx")).to_have_text(f"· context {CONTEXT}")
    set_settings(page, max_tokens=48)
    bodies = chat_requests(page)
    # Shift+Enter is a new line, not a send.
    page.fill("#input", "Hello")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("there")
    expect(page.locator("#input")).to_have_value("Hello\nthere")
    assert bodies == []
    page.press("#input", "Enter")
    stats = wait_reply_done(page)
    assert re.fullmatch(r"48 tokens · [\d.]+ tokens/s · length", stats), stats
    assert page.locator(".msg.assistant .md").inner_text().strip(), "the reply has text"
    expect(page.locator("#input")).to_have_value("")
    [body] = bodies
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == NAME
    assert body["max_tokens"] == 48
    assert body["messages"] == [{"role": "user", "content": "Hello\nthere"}]


def test_settings_are_sent_and_kept(page):
    set_settings(page, system="You are terse.", temperature=0.3, top_p=0.8, max_tokens=5)
    bodies = chat_requests(page)
    send(page, "Hi")
    wait_reply_done(page)
    [body] = bodies
    assert body["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Hi"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.8, 5)
    page.reload()
    page.click("#open-settings")
    expect(page.locator("#set-system")).to_have_value("You are terse.")
    expect(page.locator("#set-temperature")).to_have_value("0.3")
    expect(page.locator("#set-top-p")).to_have_value("0.8")
    expect(page.locator("#set-max-tokens")).to_have_value("5")
    # An emptied field goes back to the server's default.
    page.fill("#set-temperature", "")
    page.fill("#set-max-tokens", "3")
    page.click("#save-settings")
    send(page, "Again")
    assert wait_reply_done(page).startswith("3 tokens")
    body = bodies[-1]
    assert "temperature" not in body, body
    assert (body["top_p"], body["max_tokens"]) == (0.8, 3)


def test_stop_mid_reply_frees_the_server(page, server):
    expect(page.locator("#model-name")).to_have_text(NAME)
    generated = server.metric("taper_generation_tokens_total")
    cancelled = server.metric("taper_requests_cancelled_total")
    # No max tokens: the reply runs to the end of the 8192-token context.
    send(page, "Tell me everything.")
    reply = page.locator(".msg.assistant").last.locator(".md")
    expect(reply).not_to_have_text("")
    first = len(reply.inner_text())
    page.wait_for_timeout(300)
    assert len(reply.inner_text()) > first, "the reply grows as it streams"
    assert server.metric("taper_requests_running") == 1
    page.click("#stop")
    deadline = time.time() + 10
    while server.metric("taper_requests_running") != 0:
        assert time.time() < deadline, "the generation went on after Stop"
        time.sleep(0.05)
    assert server.metric("taper_requests_cancelled_total") == cancelled + 1
    made = server.metric("taper_generation_tokens_total") - generated
    assert made < CONTEXT - 30, f"{made} tokens: the reply ran to its end"
    stats = wait_reply_done(page)
    assert stats.endswith("stopped"), stats
    # The partial reply stays and the next message goes out as usual.
    assert reply.inner_text()


def test_conversations_survive_a_reload(page):
    set_settings(page, max_tokens=8)
    send(page, "first question")
    wait_reply_done(page)
    first_reply = page.locator(".msg.assistant .md").inner_text()
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    send(page, "second question")
    wait_reply_done(page)

    page.reload()
    titles = page.locator("#conversations .open")
    expect(titles).to_have_text(["second question", "first question"])
    expect(page.locator(".msg.user .text")).to_have_text(["second question"])
    titles.nth(1).click()
    expect(page.locator(".msg.user .text")).to_have_text(["first question"])
    assert page.locator(".msg.assistant .md").inner_text() == first_reply

    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(pathlib.Path(download.value.path()).read_text())
    assert exported["model"] == NAME
    contents = sorted(m["content"] for c in exported["conversations"]
                      for m in c["messages"] if m["role"] == "user")
    assert contents == ["first question", "second question"]

    page.locator("#conversations li.active .delete").click()
    expect(titles).to_have_text(["second question"])
    page.reload()
    expect(titles).to_have_text(["second question"])


def test_regenerate_and_edit_the_last_message(page):
    set_settings(page, max_tokens=6)
    bodies = chat_requests(page)
    send(page, "abc")
    wait_reply_done(page)
    page.click("button.regenerate")
    wait_reply_done(page)
    assert len(bodies) == 2
    assert bodies[1]["messages"] == [{"role": "user", "content": "abc"}]
    expect(page.locator(".msg.assistant")).to_have_count(1)

    page.click("button.edit")
    expect(page.locator("#input")).to_have_value("abc")
    expect(page.locator("#editing")).to_be_visible()
    send(page, "xyz")
    wait_reply_done(page)
    assert bodies[2]["messages"] == [{"role": "user", "content": "xyz"}]
    expect(page.locator(".msg.user .text")).to_have_text(["xyz"])
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(page.locator("#editing")).to_be_hidden()


# ---- model output is text, never markup ------------------------------------------


def sse(chunks, usage=None):
    """A chat completion stream as the server frames it."""
    events = []
    for delta in chunks:
        events.append({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": NAME,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    events.append({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": NAME,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        events.append({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": NAME,
                       "choices": [], "usage": usage})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def serve_reply(page, chunks, tokens=12):
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body=sse(chunks, {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3})))


HOSTILE = (
    "Hi <script>window.__pwned='script'</script>\n\n"
    "<img src=x onerror=\"window.__pwned='img'\">\n\n"
    "**bold** and *em* and `code <b>x</b>`\n\n"
    "```html\n<script>window.__pwned='code'</script>\n```\n\n"
    "| a | b |\n|---|---|\n| <i>1</i> | [x](javascript:window.__pwned='link') |\n\n"
    "- one\n- two\n\n"
    "[ok](https://example.com/a_b_c) \"><svg onload=\"window.__pwned='svg'\">"
)


def test_a_reply_with_script_and_img_onerror_does_not_run(page):
    serve_reply(page, [
        {"role": "assistant"},
        {"reasoning_content": "<img src=y onerror=\"window.__pwned='reasoning'\">thinking"},
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "lookup", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\": \"<svg onload=alert(1)>\"}"}}]},
        # Tags split across chunks, as tokens split them.
        *({"content": HOSTILE[i:i + 7]} for i in range(0, len(HOSTILE), 7)),
    ])
    send(page, "say something nasty")
    assert wait_reply_done(page).startswith("12 tokens")
    page.wait_for_timeout(200)  # an onerror would fire after the image fails to load
    assert page.evaluate("window.__pwned") is None
    md = page.locator(".msg.assistant .md")
    for tag in ["script", "img", "svg", "i", "b"]:
        expect(page.locator(f"#messages {tag}")).to_have_count(0)
    text = md.inner_text()
    assert "<script>window.__pwned='script'</script>" in text
    assert "<img src=x onerror=\"window.__pwned='img'\">" in text
    # The Markdown around it is rendered.
    expect(md.locator("strong")).to_have_text("bold")
    expect(md.locator("em")).to_have_text("em")
    expect(md.locator("p code")).to_have_text("code <b>x</b>")
    expect(md.locator("pre code")).to_have_text("<script>window.__pwned='code'</script>")
    expect(md.locator("th")).to_have_text(["a", "b"])
    expect(md.locator("td").first).to_have_text("<i>1</i>")
    expect(md.locator("li")).to_have_text(["one", "two"])
    expect(md.locator("a")).to_have_count(1)
    expect(md.locator("a")).to_have_attribute("href", "https://example.com/a_b_c")
    # Reasoning is folded; tool calls are shown, both as text.
    reasoning = page.locator("details.reasoning")
    expect(reasoning).not_to_have_attribute("open", "")
    assert "<img src=y" in reasoning.inner_text() or "<img src=y" in reasoning.text_content()
    expect(page.locator("details.tool-calls pre")).to_have_text('lookup({"q": "<svg onload=alert(1)>"})')
    # The copy button copies the code as text.
    md.locator("button.copy").click()
    expect(md.locator("button.copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "<script>window.__pwned='code'</script>"


def test_the_renderer_makes_only_its_own_elements(page):
    # Whatever the input, the output holds only the renderer's tags and
    # attributes, and links only to http(s).
    nasty = [
        "<a href=\"javascript:alert(1)\">x</a>",
        "[x](javascript:alert(1)) [y](data:text/html,<script>alert(1)</script>)",
        "\"><img src=x onerror=alert(1)>",
        "`</code><img src=x onerror=alert(1)>`",
        "[a](https://x.example/\"onmouseover=\"alert(1))",
        "\ue0000\ue000 and \ue0001\ue000 `a` [b](https://b.example)",
        "| <img src=x onerror=1> | b |\n|---|---|\n| x | <script>alert(1)</script> |",
        "```\"><script>alert(1)</script>\n<iframe src=//evil>\n```",
        "# <style>*{display:none}</style>\n> <form action=//evil><input></form>\n1. <b onclick=alert(1)>x</b>",
        "**<u>*<em>*</em>*</u>**",
    ]
    allowed = {"P", "BR", "STRONG", "EM", "DEL", "CODE", "PRE", "A", "UL", "OL", "LI", "BLOCKQUOTE",
               "H1", "H2", "H3", "H4", "H5", "H6", "HR", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD",
               "DIV", "SPAN", "BUTTON"}
    found = page.evaluate("""(inputs) => inputs.map((text) => {
        const doc = new DOMParser().parseFromString('<body>' + taper.renderMarkdown(text), 'text/html');
        return [...doc.body.querySelectorAll('*')].map((el) => ({
            tag: el.tagName,
            attrs: [...el.attributes].map((a) => [a.name, a.value]),
        }));
    })""", nasty)
    for text, elements in zip(nasty, found):
        for el in elements:
            assert el["tag"] in allowed, (text, el)
            for name, value in el["attrs"]:
                assert name in {"class", "href", "target", "rel", "type", "start"}, (text, el)
                if name == "href":
                    # A quote may be part of the URL; it cannot end the
                    # attribute (no other attribute appeared above).
                    assert value.startswith(("http://", "https://")), (text, el)


# ---- the API key, --no-webui, layouts ---------------------------------------------


def test_the_page_asks_for_the_api_key_and_sends_it(browser):
    s = Server(FIXTURE, "--api-key", KEY)
    try:
        page = open_page(browser, s.base)
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.fill("#key-input", "wrong")
        page.click("#save-key")
        expect(page.locator("#key-message")).to_contain_text("refused")
        expect(dialog).to_be_visible()
        page.fill("#key-input", KEY)
        page.click("#save-key")
        expect(page.locator("#model-name")).to_have_text(NAME)
        set_settings(page, max_tokens=4)
        with page.expect_request("**/v1/chat/completions") as request:
            send(page, "Hi")
        assert request.value.headers["authorization"] == f"Bearer {KEY}"
        wait_reply_done(page)
        # Remembered across reloads.
        page.reload()
        expect(page.locator("#model-name")).to_have_text(NAME)
        expect(dialog).not_to_be_visible()
        assert not page.problems, page.problems
        page.context.close()
    finally:
        s.close()


def test_no_webui_leaves_the_root_404(long_model):
    s = Server(long_model, "--no-webui")
    try:
        for path in ["/", "/webui/app.js"]:
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(s.base + path)
            assert e.value.code == 404
            assert json.loads(e.value.read())["error"]["message"] == f"Invalid URL (GET {path})"
    finally:
        s.close()


SHOWCASE = (
    "Here is a **short** example with `inline code`:\n\n"
    "```python\ndef greet(name):\n    return f\"Hello, {name}!\"\n```\n\n"
    "| Format | Bits |\n|:--|--:|\n| Q8_0 | 8.5 |\n| Q4_K | 4.5 |\n\n"
    "1. Load the model\n2. Serve it\n   - at `/`\n   - and `/v1`"
)


@pytest.mark.parametrize("width,height,name", [(390, 844, "narrow"), (1280, 800, "wide")])
def test_layouts_at_phone_and_desktop_widths(browser, server, width, height, name):
    page = open_page(browser, server.base, width, height)
    serve_reply(page, [{"role": "assistant"}, {"reasoning_content": "The user wants an example."},
                       {"content": SHOWCASE}], tokens=57)
    narrow = width < 720
    send(page, "Show me what you can render.")
    wait_reply_done(page)
    if narrow:
        # The conversations are behind the menu button.
        expect(page.locator("#new-chat")).not_to_be_in_viewport()
        page.click("#toggle-sidebar")
    page.click("#new-chat")
    send(page, "A second conversation")
    wait_reply_done(page)
    if narrow:
        page.click("#toggle-sidebar")
    page.locator("#conversations .open").nth(1).click()
    expect(page.locator(".msg.user .text")).to_have_text(["Show me what you can render."])
    # Nothing is wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    composer = page.locator("#composer").bounding_box()
    assert composer["x"] >= 0 and composer["x"] + composer["width"] <= width
    sidebar = page.locator("#sidebar")
    SHOTS.mkdir(parents=True, exist_ok=True)
    if narrow:
        # Choosing a conversation closed the sidebar again.
        page.wait_for_timeout(300)
        box = sidebar.bounding_box()
        assert box["x"] + box["width"] <= 0, box
        page.screenshot(path=SHOTS / f"{name}.png")
        page.click("#toggle-sidebar")
        page.wait_for_timeout(300)
        assert sidebar.bounding_box()["x"] >= 0
        page.screenshot(path=SHOTS / f"{name}-sidebar.png")
    else:
        expect(page.locator("#toggle-sidebar")).to_be_hidden()
        assert sidebar.bounding_box()["x"] == 0
        page.screenshot(path=SHOTS / f"{name}.png")
    problems = page.problems
    page.context.close()
    assert not problems, problems
