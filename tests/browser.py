"""Headless Chromium for tests: Debian's chromium (scripts/setup.sh --test installs it) driven by playwright,
whose own browser download never runs (the network is closed). Opens a page offline and collects what went
wrong on it, so a test asserts "no console errors, nothing fetched from outside" in one line.

    with open_page(path_or_url) as loaded:
        assert loaded.problems == []
        loaded.page.locator("img").count()
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path(os.environ.get("GENSERVE_CHROMIUM", "/usr/bin/chromium"))
# No sandbox: tests run as root in containers. The rest keeps Chromium from reaching out on its own.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@dataclass
class LoadedPage:
    page: object                                        # playwright.sync_api.Page
    console_errors: list[str] = field(default_factory=list)   # console.error calls and uncaught exceptions
    failed: list[str] = field(default_factory=list)     # requests that failed to load
    blocked: list[str] = field(default_factory=list)    # requests to hosts not allowed (left unanswered)

    @property
    def problems(self) -> list[str]:
        return ([f"console: {e}" for e in self.console_errors] + [f"failed: {u}" for u in self.failed]
                + [f"fetched from outside: {u}" for u in self.blocked])


@contextmanager
def open_page(target: str | Path, *, allow_hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
              viewport: tuple[int, int] = (1280, 900)) -> Iterator[LoadedPage]:
    """Load a file (a Path) or a URL in headless Chromium and yield it with what went wrong so far; requests
    to hosts other than `allow_hosts` are blocked and recorded. Fails the test when Chromium is missing."""
    if not CHROMIUM.is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `bash scripts/setup.sh --test` installs Debian's chromium "
                    "(or set GENSERVE_CHROMIUM)", pytrace=False)
    from playwright.sync_api import sync_playwright

    url = Path(target).resolve().as_uri() if isinstance(target, Path) else target
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            loaded = LoadedPage(page)
            page.on("console", lambda m: m.type == "error" and loaded.console_errors.append(m.text))
            page.on("pageerror", lambda exc: loaded.console_errors.append(str(exc)))
            page.on("requestfailed", lambda r: r.url not in loaded.blocked and loaded.failed.append(r.url))

            def gate(route) -> None:
                host = urlsplit(route.request.url).hostname
                if host and host not in allow_hosts:
                    loaded.blocked.append(route.request.url)
                    route.abort()
                else:
                    route.continue_()

            page.route("**/*", gate)
            page.goto(url, wait_until="load")
            yield loaded
        finally:
            browser.close()
