"""The chat page at ``/`` in headless Chromium (Debian's ``chromium`` driven by Playwright): it lists the
model, streams an answer from the same API, and shows the usage. Real HTTP on 127.0.0.1, no auth, engine in
process (the page and routes are the same code the Serve ingress runs)."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pw = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if CHROMIUM is None:
    pytest.skip("chromium is not installed", allow_module_level=True)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tiny_model_factory):
    import uvicorn

    from serving import EngineConfig, LLMEngine
    from serving.openai.engine_server import EngineServer, LocalBackend
    from serving.openai.routes import create_app

    eng = LLMEngine(tiny_model_factory("llama"), EngineConfig(dtype="float32", block_size=8, num_kv_blocks=128,
                                                               progress=False))
    srv = EngineServer(eng, "tiny")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(LocalBackend({"tiny": srv})), host="127.0.0.1", port=port,
                                           log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(timeout=10)
    srv.shutdown()


def test_chat_page_streams_an_answer(url):
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url + "/", timeout=60_000)
            page.wait_for_function("document.querySelector('#model').options.length > 0", timeout=30_000)
            assert page.eval_on_selector("#model", "e => e.value") == "tiny"
            page.fill("#max_tokens", "8")
            page.fill("#temperature", "0")  # greedy: the same answer every run
            page.fill("#prompt", "Hello, who are you?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
            assert page.locator(".msg.user").inner_text() == "Hello, who are you?"
            assert page.locator(".msg.error").count() == 0
            assert page.locator(".msg.assistant").inner_text().strip()
            assert "completion tokens" in page.inner_text("#stats")
            # a second turn sends the history (two user bubbles, two answers)
            page.fill("#prompt", "And then?")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='1']\").length == 2",
                                   timeout=60_000)
            assert page.locator(".msg.error").count() == 0
        finally:
            browser.close()
