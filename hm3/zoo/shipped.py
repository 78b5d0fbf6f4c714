"""The zoos that ship inside the package, so that no default path trains a model.

A run config names one as ``zoo: builtin:micro``; ``hm3 zoo path micro`` prints its
folder and ``hm3 zoo copy micro DIR`` copies it out. A shipped zoo is an ordinary
zoo directory (``zoo.json`` and one Hugging Face model folder per model) whose
manifest also records the SHA-256 of every file. The files are checked against
those hashes once per process before any use, so a corrupted or edited weight file
is refused with the file's name instead of silently scoring something else. The
manifest itself (which folder is the base, which the experts) is checked against a
digest kept in this module, since it cannot carry its own hash.

Why ship weights rather than a recipe: training depends on the CPU's float kernels,
so the same seed trains other weights on other machines (and a recipe's quality
bar would hold on one CPU family only). Shipping one build makes every machine
start from the same models; their measured scores stay portable within greedy
float32's tolerance (``tests/zoo/test_shipped_zoo.py``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from hm3.errors import ConfigError, OutputExistsError

SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"
SHIPPED_ZOOS = ("micro",)
BUILTIN_PREFIX = "builtin:"
# sha256 of each shipped zoo's zoo.json: ship_zoo returns the new one to put here
SHIPPED_MANIFEST_SHA256 = {
    "micro": "afa41b2092def4603a87da759bfd127dfa14853eae6fa33e928cb7b447e3fc41",
}
_verified: set[Path] = set()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(zoo_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a zoo, by path relative to the zoo; not ``zoo.json`` (which holds them)
    nor the marker hm3 leaves in a folder it published (a copy made by :func:`copy_shipped_zoo`)."""
    from hm3.outputs import MARKER_FILE

    out = {}
    for path in sorted(p for p in zoo_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(zoo_dir).as_posix()
        if rel not in ("zoo.json", MARKER_FILE):
            out[rel] = _sha256(path)
    return out


def verify_files(zoo_dir: Path, expected: dict[str, str], hashed: dict[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` naming the first file that is missing, unexpected or changed
    (``hashed``: the files' digests when not those of :func:`file_hashes`)."""
    actual = file_hashes(zoo_dir) if hashed is None else hashed
    for rel, digest in expected.items():
        if rel not in actual:
            raise ConfigError(f"{zoo_dir / rel}: missing from the shipped zoo (reinstall hm3)")
        if actual[rel] != digest:
            raise ConfigError(f"{zoo_dir / rel}: content does not match the shipped zoo's hash "
                              f"(sha256 {actual[rel][:16]}…, expected {digest[:16]}…): the file was corrupted "
                              "or edited; reinstall hm3 or restore it with git")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise ConfigError(f"{zoo_dir / extra[0]}: not part of the shipped zoo; remove it")


def _manifest_hash(zoo_dir: Path) -> dict[str, str]:
    """``{"zoo.json": its sha256}``, or nothing when the zoo has no manifest."""
    path = zoo_dir / "zoo.json"
    return {"zoo.json": _sha256(path)} if path.is_file() else {}


def shipped_zoo(name: str) -> Path:
    """The verified folder of the shipped zoo ``name`` (checked once per process)."""
    from hm3.zoo.build import ZooManifest

    if name not in SHIPPED_ZOOS:
        raise ConfigError(f"unknown shipped zoo {name!r}; shipped zoos: {', '.join(SHIPPED_ZOOS)} "
                          f"(name one as {BUILTIN_PREFIX}{SHIPPED_ZOOS[0]})")
    zoo_dir = SHIPPED_ROOT / name
    if zoo_dir not in _verified:
        # the manifest's own digest first: an edited zoo.json is to be restored, whatever the edit
        verify_files(zoo_dir, {"zoo.json": SHIPPED_MANIFEST_SHA256[name]}, hashed=_manifest_hash(zoo_dir))
        manifest = ZooManifest.read(zoo_dir)
        if not manifest.files:
            raise ConfigError(f"{zoo_dir / 'zoo.json'}: the shipped zoo's manifest lists no file hashes")
        verify_files(zoo_dir, manifest.files)
        _verified.add(zoo_dir)
    return zoo_dir


def resolve_zoo(ref: str | Path, base_dir: Path | None = None) -> Path:
    """A zoo reference as a folder: ``builtin:NAME`` is a shipped zoo, anything else a path
    (relative to ``base_dir`` when given and the path does not exist as written)."""
    text = str(ref)
    if text.startswith(BUILTIN_PREFIX):
        return shipped_zoo(text[len(BUILTIN_PREFIX):])
    path = Path(text)
    if base_dir is not None and not path.is_absolute() and not path.exists():
        path = base_dir / path
    return path


def copy_shipped_zoo(name: str, dest: str | Path) -> Path:
    """Copy a shipped zoo to ``dest`` (which must not exist), staged like every output hm3 publishes."""
    from hm3.checkpoint.writer import StagedDirectory
    from hm3.outputs import check_not_input

    source = shipped_zoo(name)
    dest = Path(dest)
    check_not_input(dest, [source])  # a copy inside the zoo would copy itself, and break the zoo's hashes
    if dest.exists():
        raise OutputExistsError(f"{dest} already exists; choose a new directory")
    staged = StagedDirectory(dest, what="zoo")
    try:
        shutil.copytree(source, staged.tmp, dirs_exist_ok=True)
        return staged.commit()
    except BaseException:
        staged.abort()
        raise


def ship_zoo(built: Path, name: str) -> tuple[Path, str]:
    """Install a zoo built by ``hm3 zoo build`` as the shipped zoo ``name`` (a maintainer's step).

    Copies the model folders and writes ``zoo.json`` with the files' hashes; the
    result is what ``git add hm3/zoo/shipped/NAME`` commits. Returns the folder and the
    new ``zoo.json``'s sha256, which goes into :data:`SHIPPED_MANIFEST_SHA256`.
    """
    from hm3.zoo.build import MODELS

    data = json.loads((built / "zoo.json").read_text())
    target = SHIPPED_ROOT / name
    tmp = SHIPPED_ROOT / f".{name}.{time.time_ns()}.tmp"
    try:
        for model in MODELS:
            shutil.copytree(built / model, tmp / model)
        data["files"] = file_hashes(tmp)
        (tmp / "zoo.json").write_text(json.dumps(data, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _verified.discard(target)
    return target, _sha256(target / "zoo.json")
