"""Render report pages in headless Chromium: the DOM after rendering and PNG screenshots.

Playwright drives the system's Chromium (no browser download: ``executable_path`` is the binary
found on ``PATH``, or ``$QAF_CHROMIUM``), headless, with the flags a closed network and a root user
need.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_VAR = "QAF_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = (f"install it (apt-get install chromium) or set {ENV_VAR} to a Chromium/Chrome "
                "binary")

# As root, offline: without the background-networking flags the browser keeps trying (and
# failing) to reach Google's services on a closed network.
FLAGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         "--disable-breakpad", "--hide-scrollbars", "--mute-audio")


class BrowserNotFound(RuntimeError):
    """No Chromium binary was found."""


class BrowserError(RuntimeError):
    """The browser failed, timed out or wrote nothing."""


def find_chromium() -> str | None:
    """Locate a Chromium or Chrome binary.

    Returns
    -------
    str | None
        ``$QAF_CHROMIUM`` when set (a path, or a name looked up on ``PATH``), otherwise the
        first of ``chromium``, ``chromium-browser``, ``google-chrome`` on ``PATH``; None when
        there is none (or ``$QAF_CHROMIUM`` names nothing executable).
    """
    explicit = os.environ.get(ENV_VAR, "").strip()
    if explicit:
        return shutil.which(explicit)  # a set but broken variable is not silently ignored
    return next((found for found in map(shutil.which, CANDIDATES) if found), None)


def require_chromium() -> str:
    """Like :func:`find_chromium`, but raise when there is no browser.

    Raises
    ------
    BrowserNotFound
        With a one-line message saying how to get one.
    """
    exe = find_chromium()
    if exe is None:
        explicit = os.environ.get(ENV_VAR, "").strip()
        where = (f"{ENV_VAR}={explicit} is not an executable" if explicit
                 else f"none of {', '.join(CANDIDATES)} is on PATH")
        raise BrowserNotFound(f"no Chromium found ({where}): {INSTALL_HINT}")
    return exe


def _on_page(html_path: str | os.PathLike, width: int, height: int, timeout: float,
             action: Callable[[Any], Any]) -> Any:
    """Open a local page in headless Chromium at ``width`` x ``height`` CSS pixels (scale 1) and
    return ``action(page)`` once it has loaded."""
    from playwright.sync_api import Error, sync_playwright

    path = Path(html_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such page: {path}")
    exe = require_chromium()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=exe, args=list(FLAGS), timeout=timeout * 1000)
            try:
                page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
                page.goto(path.as_uri(), wait_until="load", timeout=timeout * 1000)
                return action(page)
            finally:
                browser.close()
    except Error as err:
        raise BrowserError(f"Chromium failed on {path}: {str(err).splitlines()[0]}") from err


def render_dom(html_path: str | os.PathLike, timeout: float = 60.0) -> str:
    """The page's DOM after Chromium has loaded and rendered it (parser-inserted ``<tbody>`` and all).

    Raises
    ------
    BrowserNotFound, BrowserError
        No browser; the browser failed or timed out.
    FileNotFoundError
        No such page.
    """
    return _on_page(html_path, 1280, 720, timeout, lambda page: page.content())


def follow_links(html_path: str | os.PathLike, timeout: float = 60.0) -> dict[str, str | None]:
    """Open the page in Chromium, then every link on it in turn.

    Returns
    -------
    dict[str, str | None]
        Each link's URL as Chromium resolves it -> the text Chromium shows there (a folder's
        listing, a file's content), or None when it cannot open it.

    Raises
    ------
    BrowserNotFound, BrowserError
        No browser; the browser failed or timed out on the page itself.
    FileNotFoundError
        No such page.
    """
    from playwright.sync_api import Error

    def visit(page: Any) -> dict[str, str | None]:
        urls = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
        shown: dict[str, str | None] = {}
        for url in dict.fromkeys(urls):
            try:
                page.goto(url, wait_until="load", timeout=timeout * 1000)
                shown[url] = page.inner_text("body")
            except Error:
                shown[url] = None
        return shown

    return _on_page(html_path, 1280, 720, timeout, visit)


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1280,
               height: int | None = None, timeout: float = 60.0) -> Path:
    """Save a PNG of the page as Chromium renders it.

    Parameters
    ----------
    html_path : str | os.PathLike
        A local HTML file.
    png_path : str | os.PathLike
        Where to write the PNG; its directory is created.
    width : int
        Viewport width in CSS pixels (one pixel each: the device scale factor is 1).
    height : int | None
        Viewport height; None captures the whole page (wider content widens the image).
    timeout : float
        Seconds before the browser is given up.

    Returns
    -------
    Path
        ``png_path``.

    Raises
    ------
    BrowserNotFound, BrowserError
        No browser; the browser failed or timed out.
    FileNotFoundError
        No such page.
    """
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp.png")  # never leave half a file
    try:
        _on_page(html_path, width, height or 720, timeout,
                 lambda page: page.screenshot(path=str(tmp), full_page=height is None))
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    return png
