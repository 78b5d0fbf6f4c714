"""One path for what hm3 says while it works: the ``hm3`` logger and tqdm progress bars.

Library code logs through ``logging.getLogger(__name__)`` (every module is under ``hm3``) and draws
bars with :func:`progress_bar`; it never prints progress. A program that uses hm3 as a library sees
its warnings only, as Python's logging does by default; the ``hm3`` command calls :func:`configure`
(``-q``: warnings only, no bars; default: progress lines and bars; ``-v``: debug detail too) and
keeps a log file in every run directory it works in (:func:`run_log`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOGGER = "hm3"
#: The log file a command keeps in its run directory (appended to by every command on that run).
LOG_FILE = "hm3.log"

_console: logging.Handler | None = None


class _ConsoleFormatter(logging.Formatter):
    """``[hm3] progress`` lines; ``hm3: warning: ...`` for what a user must read."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"hm3: {record.levelname.lower()}: {text}"
        return f"[hm3] {text}"


class _ConsoleHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (as Python's last-resort handler does), above an active
    progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never end a run
            self.handleError(record)


def configure(verbosity: int = 0) -> None:
    """Show the ``hm3`` logger on stderr: ``verbosity`` -1 warnings only, 0 progress, 1 debug detail."""
    global _console
    logger = logging.getLogger(LOGGER)
    if _console is not None:
        logger.removeHandler(_console)
    _console = _ConsoleHandler()
    _console.setFormatter(_ConsoleFormatter())
    _console.setLevel(logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG)
    logger.addHandler(_console)
    logger.setLevel(logging.DEBUG)  # the handlers choose: the console by verbosity, a run log takes all


def bars_enabled() -> bool:
    """Whether progress bars are wanted: not under ``-q``."""
    return _console is None or _console.level <= logging.INFO


def progress_bar(enabled: bool, *, total: int, initial: int = 0, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr; a disabled one (updates cost nothing) when ``enabled`` is false or under ``-q``."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and bars_enabled()))


def progress_logger(enabled: bool) -> Callable[[str], None]:
    """``log(message)`` at info level on the ``hm3`` logger, or a no-op (a caller that wants silence)."""
    return logging.getLogger(LOGGER).info if enabled else _silent


def _silent(message: str) -> None:
    return None


class _RunLogHandler(logging.Handler):
    """Appends to ``RUN_DIR/hm3.log`` once the directory holds a run store; until then records wait in
    memory, so a command refused before it creates its run (a bad config, a foreign folder) leaves no
    file behind."""

    def __init__(self, run_dir: Path):
        super().__init__(logging.DEBUG)
        from hm3.store import STORE_FILE

        self.path, self.ready = run_dir / LOG_FILE, run_dir / STORE_FILE
        self.pending: list[str] = []
        self.stream: Any = None
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pending.append(self.format(record))
            self._flush_pending()
        except Exception:
            self.handleError(record)

    def _flush_pending(self) -> None:
        if self.stream is not None and self.stream.closed:
            self.stream = None  # closed under us (below), reopened for what is still logged
        if self.stream is None:
            if not self.ready.exists():
                return
            self.stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the handler's life)
        self.stream.write("".join(f"{line}\n" for line in self.pending))
        self.stream.flush()
        self.pending.clear()

    def close(self) -> None:
        """Also called from outside: ``logging.config.dictConfig`` closes every handler there is (vLLM
        configures its logging so when it is imported, mid-run); a later record reopens the file."""
        try:
            self._flush_pending()
        except OSError:
            pass
        finally:
            if self.stream is not None:
                self.stream.close()
                self.stream = None
            super().close()


@contextmanager
def run_log(run_dir: str | Path | None, *, first: str = "") -> Iterator[None]:
    """Copy every ``hm3`` log record, debug detail included, to ``RUN_DIR/hm3.log`` while the block runs
    (after :func:`configure`, which lets debug records through to the handlers), starting with ``first``
    (at debug level: the command line); ``None``: no log file."""
    if run_dir is None:
        yield
        return
    logger = logging.getLogger(LOGGER)
    handler = _RunLogHandler(Path(run_dir))
    logger.addHandler(handler)
    if first:
        logger.debug(first)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
