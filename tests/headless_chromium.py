"""A headless chromium driven over the DevTools protocol through ``--remote-debugging-pipe``: the
protocol's JSON messages, NUL-terminated, on file descriptors 3 (to the browser) and 4 (from it).

Why this and not a driver library: a browser test needs to load a page, run script in it, read what
it logged and take a screenshot, all in one browser start (each start costs seconds on a loaded
2-core machine); the pipe needs no websocket client, no chromedriver and no download.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

BINARY = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class BrowserError(RuntimeError):
    pass


class HeadlessChromium:
    """One browser with one page; ``events`` holds every protocol event received so far."""

    def __init__(self, profile: Path, *, width: int = 1300, height: int = 1500, timeout: float = 300):
        if BINARY is None:
            raise BrowserError("chromium is not installed")
        self.timeout = timeout
        to_browser, self._browser_in = os.pipe()
        self._browser_out, from_browser = os.pipe()

        def as_fds_3_and_4() -> None:  # in the child, before exec: the descriptors the protocol names
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [BINARY, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
             "--disable-backgrounding-occluded-windows",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "--hide-scrollbars", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=as_fds_3_and_4, close_fds=False,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._next_id, self._buffer, self.events = 0, b"", []
        self.session = None
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command (to the page once attached) and wait for its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._browser_in, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def _receive(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._browser_out], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._browser_out, 1 << 20) if ready else b""
            if not chunk:
                raise BrowserError("chromium did not answer in time" if not ready else "chromium closed the pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def open(self, url: str, *, ready: str = "document.readyState === 'complete'") -> None:
        """Navigate to ``url`` and wait until the expression ``ready`` is true in the page."""
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout
        while self.evaluate(ready) is not True:
            if time.monotonic() > deadline:
                raise BrowserError(f"{url}: {ready} did not become true in {self.timeout} s")
            time.sleep(0.2)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (an exception in it raises BrowserError)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))
        return path

    def console(self) -> list[str]:
        """What the page logged: console calls, uncaught exceptions and the browser's own log entries."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled":
                out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                out.append(f"uncaught: {details.get('exception', {}).get('description', details.get('text'))}")
            elif e["method"] == "Log.entryAdded":
                out.append(f"log {p['entry']['level']}: {p['entry']['text']}")
        return out

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.session = None
            self.send("Browser.close")
        except (BrowserError, OSError):
            pass
        finally:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            os.close(self._browser_in)
            os.close(self._browser_out)

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
