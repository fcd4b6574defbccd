"""Browser tier: a real ComfyUI server with this pack, and its web editor in headless Chromium driven by
Playwright. Skipped, with the reason in the summary, where no ComfyUI checkout, no Chromium or no Playwright is
found (the set-up command installs Playwright and, where it can, Debian's chromium package)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from preprint.runner.comfy_host import find_comfyui

from ..comfy_server import ServerError, comfy_server, get_json
from .editor import PageLog, close_dialogs, open_editor

COMFYUI = find_comfyui()
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    return os.environ.get("PREPRINT_CHROMIUM") or next((p for b in BROWSERS if (p := shutil.which(b))), None)


def why_no_browser_tier() -> str | None:
    if COMFYUI is None:
        return "no ComfyUI checkout found"
    if chromium_path() is None:
        return "no Chromium found (install Debian's chromium package, or set PREPRINT_CHROMIUM to a Chrome binary)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (bash scripts/setup.sh installs it)"
    return None


SKIP_REASON = why_no_browser_tier()
if SKIP_REASON is not None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def server():
    base = Path(tempfile.mkdtemp(prefix="preprint-browser-"))
    try:
        with comfy_server(COMFYUI, base) as url:
            # a first visit opens the "Get Started" templates dialog; a user who has seen it once does not get it
            import urllib.request

            req = urllib.request.Request(url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=30).close()
            yield url, base
    except ServerError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def _page(server, browser):
    url, _ = server
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    log = PageLog().attach(page)
    open_editor(page, url)
    yield page, log
    page.close()


@pytest.fixture
def editor(_page):
    """The editor page (1600 x 1000, opened once per session) with an empty graph and an empty log of errors."""
    page, log = _page
    close_dialogs(page)
    page.evaluate("() => window.app.graph.clear()")
    log.errors.clear()
    return page, log


@pytest.fixture(scope="session")
def history(server):
    url, _ = server
    return lambda: get_json(url + "/history")
