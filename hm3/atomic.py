"""Atomic file output: write beside the target, then rename, so no half-written file is ever seen."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from hm3.errors import OutputExistsError


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, overwrite: bool = True) -> Iterator[IO]:
    """A file object on a temporary sibling of ``path``; renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output file already exists: {path} (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a read-only file system: name the target, not the temporary file
        Path(tmp).unlink(missing_ok=True)
        kept = f"; any previous {path.name} is kept" if path.exists() else ""
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}{kept}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` via a temporary sibling and ``os.replace``."""
    with atomic_open(path, "w", overwrite=overwrite) as f:
        f.write(text)
    return Path(path)
