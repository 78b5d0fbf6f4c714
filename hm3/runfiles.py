"""Run-directory state files (BO posterior, level-2 policy, training checkpoints) that cannot run code.

People hand run directories to each other, so no file in one may execute anything when read.
Pickle (``torch.save``/``torch.load(weights_only=False)``) runs whatever a file asks for; these
files are therefore one safetensors file each: tensors as safetensors tensors, everything else
(numbers, strings, lists, dicts, tuples, numpy values) as a JSON tree in the header's metadata,
with tensors referenced by name. Reading parses JSON and copies bytes, nothing more.

Runs written before this format hold ``.pt`` pickles. Those are read with
``torch.load(weights_only=True)`` -- torch's restricted unpickler, which builds only tensors and
plain containers and refuses any other global -- and any file it refuses, or that is corrupt,
is reported with its path and how to regenerate it; it is never loaded another way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm3.atomic import atomic_open
from hm3.errors import RunFileError

STATE_SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"
_TREE_KEY = "hm3_state"  # the metadata entry holding the JSON tree
_FORMAT_KEY = "hm3_state_format"
FORMAT = "1"


# --- the tree codec ---------------------------------------------------------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON data; tensors and numpy arrays go to ``tensors`` and are referenced by name."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        # safetensors stores each tensor on its own: no views, no shared storage, CPU only
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"$tensor": name}
    if isinstance(value, np.ndarray):
        return {"$ndarray": _encode(torch.from_numpy(np.ascontiguousarray(value)), tensors)["$tensor"]}
    if isinstance(value, np.generic):
        return {"$numpy": value.dtype.str, "value": value.item()}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"$items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a run-directory state file")


def _decode(data: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    """Inverse of :func:`_encode`; anything not produced by it is refused as corrupt."""
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [_decode(v, tensors, where) for v in data]
    if not isinstance(data, dict):
        raise RunFileError(f"{where}: corrupt state file (unexpected {type(data).__name__} in its JSON tree)")
    if "$tensor" in data or "$ndarray" in data:
        name = data.get("$tensor", data.get("$ndarray"))
        if name not in tensors:
            raise RunFileError(f"{where}: corrupt state file (it refers to a tensor {name!r} it does not hold)")
        return tensors[name] if "$tensor" in data else tensors[name].numpy()
    if "$numpy" in data:
        try:
            return np.dtype(data["$numpy"]).type(data["value"])
        except (TypeError, ValueError, KeyError) as err:
            raise RunFileError(f"{where}: corrupt state file (bad numpy value {data!r}: {err})") from None
    if "$tuple" in data:
        return tuple(_decode(v, tensors, where) for v in data["$tuple"])
    if "$items" in data:
        return {_hashable(_decode(k, tensors, where), where): _decode(v, tensors, where) for k, v in data["$items"]}
    return {k: _decode(v, tensors, where) for k, v in data.items()}


def _hashable(key: Any, where: Path) -> Any:
    try:
        hash(key)
    except TypeError:
        raise RunFileError(f"{where}: corrupt state file (a dict key is a {type(key).__name__})") from None
    return key


# --- files ------------------------------------------------------------------------------------------


def save_state(path: str | Path, value: Any) -> Path:
    """Write ``value`` (tensors, numpy values and JSON data in dicts, lists and tuples) to ``path``
    as one safetensors file, atomically: a failed write (a full disk) leaves the previous file."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(value, tensors))
    data = save(tensors, metadata={_FORMAT_KEY: FORMAT, _TREE_KEY: tree})
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def load_state(path: str | Path, *, regenerate: str) -> Any:
    """The value :func:`save_state` wrote to ``path``; a file that is not one is refused, naming it
    and saying how to regenerate it (``regenerate``: the command that does)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # safetensors raises several private error types; all mean unreadable
        raise RunFileError(f"{path}: not a readable hm3 state file ({_first_line(err)}); {regenerate}") from None
    if metadata.get(_FORMAT_KEY) != FORMAT or _TREE_KEY not in metadata:
        raise RunFileError(f"{path}: a safetensors file but not an hm3 state file (format "
                           f"{metadata.get(_FORMAT_KEY)!r}, this hm3 reads {FORMAT!r}); {regenerate}")
    try:
        tree = json.loads(metadata[_TREE_KEY])
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path}: corrupt state file (its JSON tree: {err}); {regenerate}") from None
    return _decode(tree, tensors, path)


def load_legacy_pt(path: str | Path, *, regenerate: str) -> Any:
    """A ``.pt`` file of an older run, read with torch's restricted unpickler (tensors and plain
    containers only). Anything it refuses -- a pickle that names a function or class, i.e. code --
    or cannot parse is refused here with the file's path; it is never loaded another way."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...: all mean "not loaded"
        raise RunFileError(
            f"{path}: refused: not a plain tensor file that can be read without running code "
            f"({_first_line(err)}); hm3 never unpickles anything else from a run directory. {regenerate}"
        ) from None


def state_path(stem: Path) -> Path:
    """Where the state file of ``stem`` (a path without suffix) is written."""
    return stem.with_name(stem.name + STATE_SUFFIX)


def find_state(stem: Path) -> Path | None:
    """The state file of ``stem``: the current format if present, else an older run's ``.pt``, else None."""
    for path in (state_path(stem), stem.with_name(stem.name + LEGACY_SUFFIX)):
        if path.is_file():
            return path
    return None


def read_state(path: Path, *, regenerate: str) -> Any:
    """:func:`load_state` or, for an older run's ``.pt``, :func:`load_legacy_pt`."""
    if path.suffix == LEGACY_SUFFIX:
        return load_legacy_pt(path, regenerate=regenerate)
    return load_state(path, regenerate=regenerate)


def _first_line(err: BaseException) -> str:
    """The line of a loader's error that says what was wrong (torch's weights-only refusal names the
    global a pickle asked for, e.g. ``posix.system``, after advice hm3 must not pass on)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(err).__name__])[0]
