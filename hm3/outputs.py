"""Which output directories hm3 may replace, and the hidden staging directories it builds them in.

``--overwrite`` replaces a directory wholesale, so it must never be pointed at something hm3 did not
make: an input of the very command (a recipe's base model, a run directory), a directory that
contains one or lies inside one, or a folder of the user's own files. The rules:

* an output that is, contains or lies inside an input (after resolving symlinks) is always refused;
* an existing output is replaced only with ``--overwrite``, and only if it is empty or hm3 wrote it
  (its ``.hm3-output`` marker, or for outputs of older hm3 versions one of the files hm3 writes
  into its outputs), unless ``--force`` says the user really means it.

Every directory hm3 publishes gets the marker (:func:`marker_text`, written by
:class:`hm3.checkpoint.writer.StagedDirectory`). Staging directories are named
``.NAME.KIND-PID-TOKEN`` and hold an owner file with the host; a process killed with ``kill -9``
cannot remove its own, so the next hm3 writing beside them removes those whose process is gone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from hm3.errors import ConfigError, OutputExistsError

MARKER_FILE = ".hm3-output"
#: Files only hm3 writes into its outputs: evidence that a directory without the marker (made by an
#: older hm3) is still hm3's own (merges, paths, requests, run directories, zoos).
HM3_FILES = ("hm3_recipe.yml", "hm3_path.json", "hm3_request.json", "hm3.sqlite", "zoo.json")
OWNER_FILE = ".hm3-staging"
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|frame)-(?P<pid>\d+)-[0-9a-f]{8}$")


def marker_text(what: str) -> str:
    """The marker's content: who wrote the directory, when, and what it is."""
    from hm3 import __version__

    return json.dumps({"written_by": "hm3", "hm3_version": __version__, "what": what,
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2) + "\n"


def written_by_hm3(directory: Path) -> bool:
    return any((directory / f).exists() for f in (MARKER_FILE, *HM3_FILES))


def _relation(target: Path, other: Path) -> str | None:
    """How ``target`` stands to ``other``: "is", "contains", "lies inside", or None when unrelated."""
    if target == other:
        return "is"
    if target in other.parents:
        return "contains"
    return "lies inside" if other in target.parents else None


def check_not_input(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (symlinks resolved):
    writing it would replace or change what the command reads."""
    from hm3.zoo.shipped import SHIPPED_ROOT

    target = Path(out).resolve()
    # every command reads the shipped zoos; a stray file fails their hashes forever after
    if how := _relation(target, SHIPPED_ROOT.resolve()):
        raise ConfigError(f"output {out} {how} the zoos shipped with hm3 ({SHIPPED_ROOT}); hm3 never writes "
                          "there: choose another output path")
    for given in inputs:
        if how := _relation(target, Path(given).resolve()):
            raise ConfigError(f"output {out} {how} an input of this command ({given}); hm3 never writes over "
                              "its own inputs: choose another output path")


def file_in_the_way(path: str | Path) -> Path | None:
    """The first folder of ``path`` that exists but is a file (``out/model`` with ``out`` a file), or None:
    making ``path`` fails there with an errno (EEXIST, ENOTDIR) that does not say which part is wrong."""
    return next((p for p in reversed(Path(path).parents) if p.exists() and not p.is_dir()), None)


def check_output_dir(out: str | Path, *, overwrite: bool, force: bool = False, inputs: Iterable[str | Path] = ()) -> None:
    """The rules of the module docstring, checked before anything is read or written."""
    out = Path(out)
    check_not_input(out, inputs)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"output directory already exists: {out} (use --overwrite to replace it)")
    if force:
        return
    if not out.is_dir():
        raise OutputExistsError(f"--overwrite: {out} is a file, not an output directory hm3 wrote; refusing to "
                                "replace it (use --force to replace it anyway)")
    if any(out.iterdir()) and not written_by_hm3(out):
        raise OutputExistsError(
            f"--overwrite: {out} holds files hm3 did not write (no {MARKER_FILE} marker); refusing to replace it: "
            "choose another output, empty it, or add --force to replace it anyway"
        )


# --- staging directories ----------------------------------------------------------------------------


def make_staging_dir(parent: Path, name: str, kind: str) -> Path:
    """A new hidden staging directory for output ``parent/name`` (after removing stale ones)."""
    remove_stale_staging(parent, name)
    path = parent / f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    (path / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    return path


def staging_name(name: str, kind: str) -> str:
    """The name of a staging entry of this process (``kind`` ``old``: a replaced output being removed)."""
    return f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove the staging directories of output ``parent/name`` left by processes that are gone
    (on this host); returns what was removed. A replaced output (``old``) is removed only once the
    output itself is back in place, so a crash between the two renames loses nothing."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        m = _STAGING.match(entry.name)
        if m is None or m["name"] != name or entry.is_symlink() or not entry.is_dir():
            continue
        if _alive(int(m["pid"])) or not _same_host(entry):
            continue
        if m["kind"] == "old" and not (parent / name).exists():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _same_host(entry: Path) -> bool:
    """Whether a staging directory was made on this host (no owner file: assumed so, it was killed at once)."""
    try:
        owner = json.loads((entry / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return True
    return not isinstance(owner, dict) or owner.get("host") in (None, socket.gethostname())


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or an absurd number): not ours to judge
    return True
