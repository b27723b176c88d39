"""Shared by tests/console: the real headless Chromium (Debian's `chromium`, driven by Playwright for Python
through `executable_path`; `make test` installs both, never `playwright install`), the API tests' live uvicorn
server, `Console` (one browser context on the page, which records every URL it requests, its uncaught errors
and what its Content-Security-Policy blocked), the keys and HTTP
helpers, and where screenshots go. Without chromium or playwright the tests skip with the reason, except
under CI (the env var CI set), where that is a failure, so CI cannot pass by skipping the browser."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest

_API_TESTS = str(Path(__file__).resolve().parents[1] / "service" / "api")
if _API_TESTS not in sys.path:
    sys.path.append(_API_TESTS)

from _server import LiveServer  # noqa: E402

__all__ = ["LiveServer", "Console", "SCREENSHOTS", "chromium_args", "require_browser", "api", "form_files", "names"]

ADMIN, INFER = "console-admin-key", "console-inference-key"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
T = 120                                        # HTTP timeout: 2 cores, generation beside the browser

# Where a person finds the pages the tests saw (ignored by git; the README says so).
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"

# The machines' network is closed: no background traffic (updates, sync, component downloads) is attempted.
chromium_args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason}; CI is set, so a missing browser is a failure")
    pytest.skip(reason)


def require_browser() -> str:
    """Chromium's path (`CONSOLE_CHROMIUM` or `chromium` on PATH), with Playwright importable."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("playwright is not installed (the `test` extra: pip install -e '.[test]')")
    path = os.environ.get("CONSOLE_CHROMIUM") or shutil.which("chromium")
    if not path:
        _missing("chromium not found: install Debian's `chromium` package (`make test` does so when run as root "
                 "with apt-get)")
    return path


class Console:
    """One fresh browser context on the console; records every URL the page requests."""

    def __init__(self, browser, server):
        self.server = server
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.urls: list[str] = []
        self.page.on("request", lambda request: self.urls.append(request.url))
        # uncaught exceptions in the page, and anything the Content-Security-Policy blocked
        self.faults: list[str] = []
        self.page.on("pageerror", lambda error: self.faults.append(str(error)))
        self.page.on("console", lambda m: self.faults.append(m.text) if "Content Security Policy" in m.text else None)

    def open(self, key: str | None = None):
        response = self.page.goto(f"{self.server.url}/console")
        assert response.status == 200
        if key is not None:
            self.connect(key)
        return response

    def connect(self, key: str) -> None:
        self.page.fill("#key-input", key)
        self.page.click("#connect")
        self.page.wait_for_selector("#tabs", state="visible")

    def tab(self, name: str) -> None:
        self.page.click(f'#tabs button[data-tab="{name}"]')
        self.page.wait_for_selector(f"#{name}", state="visible")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        foreign = [u for u in self.urls if not (u.startswith(self.server.url + "/") or u.startswith("data:"))]
        self.context.close()
        assert foreign == [], f"the console contacted other hosts: {foreign}"
        assert self.faults == [], f"the page failed: {self.faults}"


def api(server, method: str, path: str, key: str = ADMIN, **kw) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers={"authorization": f"Bearer {key}"}, timeout=T, **kw)


def form_files(folder):
    return {name: (name, (folder / name).read_bytes()) for name in (CONFIG, WEIGHTS)}


def names(server) -> list[str]:
    return [a["name"] for a in api(server, "GET", "/admin/adapters").json()["adapters"]]
