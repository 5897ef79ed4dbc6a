"""The web playground (GET /) driven in headless Chromium against a real `loopserve serve` subprocess.

Needs Debian's `chromium` and `chromium-driver` (scripts/setup.sh installs them when run as root on
Debian) and the `selenium` package; without them the test is skipped with the reason.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `tests.*` imports below, also when run as plain `pytest`
    sys.path.insert(0, _ROOT)

from tests.conftest import build_tiny_model  # noqa: E402
from tests.e2e.server_proc import metric, start_server, wait_idle  # noqa: E402

CHROMIUM = os.environ.get("LOOPSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LOOPSERVE_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOT = os.environ.get("LOOPSERVE_PLAYGROUND_SCREENSHOT", "/tmp/playground.png")
API_KEY = "playground-test-key"

pytestmark = pytest.mark.timeout(420)


def _require_browser() -> None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        pytest.skip(f"headless browser test needs {' and '.join(missing)} "
                    "(Debian: apt-get install chromium chromium-driver, or run scripts/setup.sh as root)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require_browser()
    # No EOS id: every reply runs to max_tokens, so the second one is long enough to stop mid-stream.
    model_dir = build_tiny_model(tmp_path_factory.mktemp("playground-model"), "llama", eos_token_id=None)
    srv = start_server(model_dir, tmp_path_factory.mktemp("playground-logs"), max_model_len=512, api_key=API_KEY)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def driver(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach for the network
    profile = tempfile.mkdtemp(prefix="loopserve-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,860"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _set(el, value: str) -> None:
    el.clear()
    el.send_keys(value)


def _text(drv, css: str) -> str:
    return drv.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                              css) or ""


def test_playground_chat_and_stop(server, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 90, poll_frequency=0.05)
    driver.get(server.base_url + "/")
    find = lambda sel: driver.find_element(By.CSS_SELECTOR, sel)  # noqa: E731

    # No key yet: /v1/models is refused and the page says so; entering the key (stored, sent as Bearer) fixes it.
    wait.until(lambda d: "unauthorized" in _text(d, "#status"))
    _set(find("#api-key"), API_KEY)
    find("#api-key").send_keys(Keys.TAB)  # fires `change`
    wait.until(lambda d: _text(d, "#status") == "ready")
    assert driver.execute_script("return localStorage.getItem('loopserve.apiKey')") == API_KEY
    assert _text(driver, "#model"), "the model id from /v1/models should be shown"

    # 1) a short reply that streams to the end, with stats
    _set(find("#system"), "You are a terse assistant.")
    _set(find("#max-tokens"), "64")
    _set(find("#temperature"), "0.8")
    _set(find("#input"), "Hello there, playground!")
    find("#send").click()
    wait.until(lambda d: _text(d, "#status") in ("done", "error", "stopped"))
    assert _text(driver, "#status") == "done", driver.find_element(By.ID, "messages").text
    users = driver.find_elements(By.CSS_SELECTOR, "#messages .message.user")
    bots = driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")
    assert len(users) == 1 and len(bots) == 1
    assert users[0].find_element(By.CSS_SELECTOR, ".content").text == "Hello there, playground!"
    reply = _text(driver, "#messages .message.assistant:last-child .content")
    assert reply.strip(), "the assistant message should hold the streamed text"
    stats = _text(driver, "#messages .message.assistant:last-child .stats")
    assert "TTFT" in stats and "tok/s" in stats, stats
    assert "64 tok" in stats, f"usage.completion_tokens should be 64 (no EOS in this model): {stats}"
    assert "cached " in stats, stats
    assert find("#send").is_enabled() and not find("#stop").is_enabled()
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .error")
    assert find("#input").get_attribute("value") == ""

    # 2) a long reply, stopped while it streams: the request ends, the server frees it. A new chat
    # first: 400 new tokens on top of the first turn (~200 tokens) would not fit --max-model-len 512.
    # On a fast machine 400 tokens of this tiny model can take only ~1s: if the reply ends before
    # Stop can be clicked, try again (a few times) rather than fail.
    _set(find("#max-tokens"), "400")
    for _ in range(3):
        find("#clear").click()
        assert not driver.find_elements(By.CSS_SELECTOR, "#messages .message")
        find("#input").send_keys("Now tell me a very long story.")
        find("#input").send_keys(Keys.ENTER)  # Enter sends
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")) == 1)
        wait.until(lambda d: _text(d, "#messages .message.assistant:last-child .content").strip()
                   or _text(d, "#status") != "generating…")
        if _text(driver, "#status") != "generating…":
            assert _text(driver, "#status") == "done", _text(driver, "#messages .message:last-child")
            continue
        assert find("#stop").is_enabled() and not find("#send").is_enabled()
        find("#stop").click()
        t_stop = time.monotonic()
        wait.until(lambda d: _text(d, "#status") != "generating…")
        if _text(driver, "#status") == "done":
            continue  # the last token beat the click
        break
    else:
        pytest.fail("every 400-token reply finished before Stop could be clicked")
    assert _text(driver, "#status") == "stopped"
    assert find("#send").is_enabled() and not find("#stop").is_enabled()
    last = find("#messages .message.assistant:last-child")
    assert "stopped" in last.get_attribute("class")
    partial = _text(driver, "#messages .message.assistant:last-child .content")
    assert partial.strip()
    m = wait_idle(server, timeout=15, need_blocks=True)  # nothing running or waiting, every KV block free
    assert metric(m, "num_requests_running") == 0
    print(f"\nserver idle {time.monotonic() - t_stop:.2f}s after Stop; stopped reply: {len(partial)} chars; "
          f"first reply stats: {stats}")

    # The conversation goes on after a stop (the partial reply is kept as context).
    _set(find("#max-tokens"), "16")
    _set(find("#input"), "Thanks.")
    find("#send").click()
    wait.until(lambda d: _text(d, "#status") in ("done", "error", "stopped"))
    assert _text(driver, "#status") == "done"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")) == 2

    # An OpenAI error body from the server is shown inline: max_tokens far beyond --max-model-len.
    _set(find("#max-tokens"), "100000")
    _set(find("#input"), "This one is too long.")
    find("#send").click()
    wait.until(lambda d: _text(d, "#status") in ("done", "error", "stopped"))
    assert _text(driver, "#status") == "error"
    err = _text(driver, "#messages .message.assistant:last-child .error")
    assert "maximum context length" in err, err
    _set(find("#max-tokens"), "64")

    driver.save_screenshot(SCREENSHOT)
    wait_idle(server, timeout=15)
