"""Render report pages in headless Chromium: the DOM after rendering and PNG screenshots.

Only the standard library: the browser binary is run as a subprocess (``--dump-dom``,
``--screenshot``); a full-page screenshot talks the DevTools protocol over
``--remote-debugging-pipe``. Every browser gets a fresh temporary profile, the flags a closed
network and a root user need, and a timeout after which its whole process group is killed.
Set ``QAF_CHROMIUM`` to use a browser that is not on ``PATH``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ENV_VAR = "QAF_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = (f"install it (apt-get install chromium) or set {ENV_VAR} to a Chromium/Chrome "
                "binary")

# Headless, as root, offline: without the background-networking flags the browser keeps trying
# (and failing) to reach Google's services on a closed network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         "--disable-breakpad", "--disable-crash-reporter", "--hide-scrollbars", "--mute-audio",
         "--force-device-scale-factor=1")
MAX_HEIGHT = 16384  # Chromium's largest texture; taller pages are cut there


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
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """Like :func:`find_chromium`, but raise when there is no browser.

    Returns
    -------
    str
        The browser binary.

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


def render_dom(html_path: str | os.PathLike, timeout: float = 60.0) -> str:
    """The page's DOM after Chromium has loaded and rendered it.

    Parameters
    ----------
    html_path : str | os.PathLike
        A local HTML file.
    timeout : float
        Seconds before the browser is killed.

    Returns
    -------
    str
        The serialized DOM (``--dump-dom``), parser-inserted ``<tbody>`` and all.

    Raises
    ------
    BrowserNotFound, BrowserError
        No browser; the browser failed or timed out.
    FileNotFoundError
        No such page.
    """
    out = _run_headless(["--dump-dom", _file_uri(html_path)], timeout)
    if not out.strip():
        raise BrowserError(f"Chromium printed no DOM for {html_path}")
    return out


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
        Viewport height; None captures the whole page (its content height, at least 1 and at
        most 16384 pixels; wider content widens the image).
    timeout : float
        Seconds before the browser is killed.

    Returns
    -------
    Path
        ``png_path``.

    Raises
    ------
    BrowserNotFound, BrowserError
        No browser; the browser failed, timed out or wrote nothing.
    FileNotFoundError
        No such page.
    """
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp.png")  # never leave half a file
    try:
        if height is None:
            tmp.write_bytes(_full_page_png(_file_uri(html_path), width, timeout))
        else:
            _run_headless([f"--screenshot={tmp}", f"--window-size={width},{height}",
                           _file_uri(html_path)], timeout)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise BrowserError(f"Chromium wrote no screenshot of {html_path}")
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    return png


# ---------------------------------------------------------------------------------- internals

def _file_uri(html_path: str | os.PathLike) -> str:
    path = Path(html_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such page: {path}")
    return path.as_uri()


def _kill(proc: subprocess.Popen) -> None:
    """Kill the browser and its helpers (they share the new session's process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait(timeout=10)


def _last_line(log: Path) -> str:
    """The last line of the browser's stderr that is not D-Bus noise (there is no bus here)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    useful = [ln.strip() for ln in lines if ln.strip() and "dbus" not in ln.lower()]
    return useful[-1] if useful else ""


def _run_headless(args: list[str], timeout: float) -> str:
    """Run the browser once with ``args``; its stdout."""
    exe = require_chromium()
    with tempfile.TemporaryDirectory(prefix="qaf-chromium-", ignore_cleanup_errors=True) as tmp:
        log = Path(tmp) / "stderr.log"
        cmd = [exe, *FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}", *args]
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                raise BrowserError(f"Chromium timed out after {timeout:g} s: "
                                   f"{' '.join(args)}") from None
        if proc.returncode != 0:
            raise BrowserError(f"Chromium exited with status {proc.returncode}: "
                               f"{_last_line(log) or ' '.join(args)}")
        return out.decode("utf-8", errors="replace")


class _DevTools:
    """A minimal DevTools-protocol client on the browser's pipe (NUL-separated JSON)."""

    def __init__(self, read_fd: int, write_fd: int, deadline: float) -> None:
        self.read_fd, self.write_fd, self.deadline = read_fd, write_fd, deadline
        self.buf = bytearray()
        self.last_id = 0

    def call(self, method: str, params: dict | None = None,
             session: str | None = None) -> dict[str, Any]:
        self.last_id += 1
        msg: dict[str, Any] = {"id": self.last_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = memoryview(json.dumps(msg).encode() + b"\0")
        while data:
            data = data[os.write(self.write_fd, data):]
        while True:  # events in between are not needed
            reply = self._next()
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise BrowserError(f"DevTools {method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def _next(self) -> dict[str, Any]:
        start = 0
        while (end := self.buf.find(b"\0", start)) < 0:
            start = len(self.buf)
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise BrowserError("Chromium closed the DevTools pipe")
            self.buf += chunk
        msg = bytes(self.buf[:end])
        del self.buf[:end + 1]
        return json.loads(msg)


# Resolves once the document, its images and its fonts are loaded.
_LOADED = """new Promise(done => {
  const ready = () => document.fonts.ready.then(() => done(location.href));
  if (document.readyState === "complete") ready(); else addEventListener("load", ready);
})"""


def _full_page_png(uri: str, width: int, timeout: float) -> bytes:
    """Load ``uri`` at ``width``, grow the viewport to the content, capture it."""
    import fcntl  # POSIX only, like the pipe set-up below

    exe = require_chromium()
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="qaf-chromium-", ignore_cleanup_errors=True) as tmp:
        log = Path(tmp) / "stderr.log"
        # The browser reads commands on fd 3 and answers on fd 4. Its two pipe ends are put
        # there between fork and exec, from duplicates above 9 so that placing one cannot
        # overwrite the other. Not `pass_fds=(3, 4)`: whatever holds 3 and 4 here (font files,
        # say) may close them meanwhile. Without `close_fds` the child keeps only descriptors
        # made inheritable on purpose (Python's own are not, PEP 446), and dup2's 3 and 4.
        to_browser, from_browser = os.pipe(), os.pipe()
        child_in = fcntl.fcntl(to_browser[0], fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser[1], fcntl.F_DUPFD_CLOEXEC, 10)

        def onto_3_and_4() -> None:  # runs in the child; dup2 leaves 3 and 4 inheritable
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        cmd = [exe, *FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}",
               "--remote-debugging-pipe", "about:blank"]
        try:
            with open(log, "wb") as err:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=err, close_fds=False, preexec_fn=onto_3_and_4,
                                        start_new_session=True)
        except BaseException:
            for fd in (to_browser[1], from_browser[0]):
                os.close(fd)
            raise
        finally:  # only the browser keeps its ends: EOF reaches us when it exits
            for fd in (child_in, child_out, to_browser[0], from_browser[1]):
                os.close(fd)
        cdp = _DevTools(from_browser[0], to_browser[1], deadline)
        try:
            png = _capture(cdp, uri, width)
            try:
                cdp.call("Browser.close")
                proc.wait(timeout=max(1.0, min(10.0, deadline - time.monotonic())))
            except (BrowserError, TimeoutError, subprocess.TimeoutExpired):
                pass  # the picture is taken; the finally below ends the browser
            return png
        except TimeoutError:
            raise BrowserError(f"Chromium timed out after {timeout:g} s on {uri}") from None
        except (BrowserError, OSError) as exc:
            detail = _last_line(log) if proc.poll() is not None else ""
            raise BrowserError(f"{exc}{f' ({detail})' if detail else ''}") from None
        finally:
            if proc.poll() is None:
                _kill(proc)
            os.close(from_browser[0])
            os.close(to_browser[1])


def _capture(cdp: _DevTools, uri: str, width: int) -> bytes:
    target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def viewport(w: int, h: int) -> None:
        cdp.call("Emulation.setDeviceMetricsOverride",
                 {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False}, session)

    viewport(width, 800)
    nav = cdp.call("Page.navigate", {"url": uri}, session)
    if nav.get("errorText"):
        raise BrowserError(f"Chromium could not open {uri}: {nav['errorText']}")
    loaded = cdp.call("Runtime.evaluate", {"expression": _LOADED, "awaitPromise": True,
                                           "returnByValue": True}, session)
    if loaded.get("result", {}).get("value") != uri:
        raise BrowserError(f"Chromium did not load {uri}")
    metrics = cdp.call("Page.getLayoutMetrics", session=session)
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    viewport(max(width, math.ceil(size["width"])),
             min(MAX_HEIGHT, max(1, math.ceil(size["height"]))))
    shot = cdp.call("Page.captureScreenshot", {"format": "png"}, session)
    return base64.b64decode(shot["data"])
