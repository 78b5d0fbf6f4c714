"""Atomic file output: write beside the target, fsync, then rename, so no half-written file is ever seen.

Every file hm3 writes whole (tables, summaries, plots, Fisher files, run-state files) goes through
:func:`atomic_path`. Outputs get the mode ``open()`` would give them (``0o666`` less the umask):
``tempfile.mkstemp``'s private ``0o600``, and safetensors' (it writes every file ``0o600``), would
survive the rename and hide a run's outputs from the teammates a shared machine's umask lets read them.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from hm3.errors import OutputExistsError


def umask_file_mode() -> int:
    """The mode ``open()`` gives a new file in this process: ``0o666`` less the umask."""
    try:  # Linux says it without changing it; os.umask() can only read it by setting it (not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def share_files(directory: Path) -> None:
    """Give the files of a directory hm3 just built (before it is published) the umask's mode."""
    mode = umask_file_mode()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.lstat().st_mode) != mode:
            os.chmod(path, mode)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Put a directory's entries (names created or renamed in it) on disk; a file system that cannot
    sync a directory (EINVAL) already keeps its names another way."""
    try:
        _fsync(directory)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def fsync_tree(directory: Path) -> None:
    """Put every file built under ``directory`` on disk, then the directories naming them, before the
    tree is published by a rename: otherwise a power cut can leave the published name over files whose
    data never reached the disk (a model's valid header over zeros)."""
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            _fsync(path)
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        fsync_dir(sub)
    fsync_dir(directory)


@contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary sibling of ``path`` for a writer that wants a file name (``savefig``, safetensors);
    on success it is fsynced and renamed onto ``path``, on any failure removed, the old ``path`` kept."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output file already exists: {path} (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_file_mode())  # mkstemp's 0o600, or a writer's own private file
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a read-only file system: name the target, not the temporary file
        tmp.unlink(missing_ok=True)
        kept = f"; any previous {path.name} is kept" if path.exists() else ""
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}{kept}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, overwrite: bool = True,
                encoding: str | None = None) -> Iterator[IO]:
    """A file object on a temporary sibling of ``path``; renamed onto ``path`` only if the block succeeds."""
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = True, encoding: str | None = None) -> Path:
    """Write ``text`` to ``path`` via a temporary sibling and ``os.replace`` (``encoding``: the locale's by default)."""
    with atomic_open(path, "w", overwrite=overwrite, encoding=encoding) as f:
        f.write(text)
    return Path(path)
