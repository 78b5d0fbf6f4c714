"""``--set key.path=value``: change a run config from the command line without copying the file.

Values are read as YAML (``optimizer.budget=40`` is a number, ``level2.preferences=[[0.5,0.5]]`` a list,
``zoo=runs/zoo`` a string), keys are dotted paths into the config's mappings; a part in double quotes
may hold dots and equals signs (``models."qwen2.5-math"=/models/math``); a key that is not there yet is
added, and the config's own validation then refuses any key or value it does not accept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hm3.errors import ConfigError

Config = TypeVar("Config")


def parse_assignment(text: str) -> tuple[tuple[str, ...], Any]:
    """``"a.b=value"`` as ``(("a", "b"), value)``, the value read as YAML."""
    parts, raw = _split_key(text)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({err})") from None
    return parts, value


def _split_key(text: str) -> tuple[tuple[str, ...], str]:
    """The key's parts (split at dots outside double quotes) and the raw value after the first ``=``
    outside quotes. Hand-written: the key is a path, not YAML, and no library reads this syntax."""
    parts: list[str] = []
    part, quoted, was_quoted = "", False, False
    for i, char in enumerate(text):
        if char == '"':
            if not quoted and (part.strip() or was_quoted):
                break  # a quote inside a bare part, or a second quoted string in one part
            if not quoted:
                part = ""  # the spaces before an opening quote are not the key's
            quoted, was_quoted = not quoted, True
        elif quoted:
            part += char
        elif char in ".=":
            if not (part.strip() or was_quoted):
                break
            parts.append(part if was_quoted else part.strip())
            part, was_quoted = "", False
            if char == "=":
                return tuple(parts), text[i + 1:]
        elif was_quoted:
            if not char.isspace():
                break  # text after a closing quote
        else:
            part += char
    raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted KEY, e.g. optimizer.budget=40 "
                      f'(a part holding dots in double quotes: models."qwen2.5"=/models/q)')


def dotted(parts: Sequence[str]) -> str:
    """A key path as written on the command line (parts holding a dot or ``=`` in double quotes)."""
    return ".".join(f'"{p}"' if any(c in p for c in '.="') or p != p.strip() else p for p in parts)


def apply_overrides(data: Mapping[str, Any], assignments: Iterable[tuple[Sequence[str], Any]]) -> dict[str, Any]:
    """A copy of ``data`` with each ``(key parts, value)`` set, in order (a later one wins)."""
    out = copy.deepcopy(dict(data))
    for parts, value in assignments:
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted(parts)}: {dotted(parts[: depth + 1])} is a "
                                  f"{type(child).__name__}, not a section with keys")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, parse: Callable[..., Config], *, sets: Sequence[str] = (),
                preset: Iterable[tuple[Sequence[str], Any]] = ()) -> Config:
    """A run config file with ``preset`` (from a command's own flags) and then ``sets`` (``--set``)
    applied, validated by ``parse`` (``parse_run_config``, ``parse_two_level_config``); relative paths
    stay relative to the file's folder, and errors name the ``--set`` given."""
    from hm3.search.run_config import read_config_file

    path = Path(path)
    data = apply_overrides(read_config_file(path), [*preset, *(parse_assignment(s) for s in sets)])
    source = f"{path} (with --set {', '.join(sets)})" if sets else str(path)
    return parse(data, source=source, base_dir=path.parent)
