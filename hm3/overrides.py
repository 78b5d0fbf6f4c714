"""``--set key.path=value``: change a run config from the command line without copying the file.

Values are read as YAML (``optimizer.budget=40`` is a number, ``level2.preferences=[[0.5,0.5]]`` a list,
``zoo=runs/zoo`` a string), keys are dotted paths into the config's mappings; a key that is not there
yet is added, and the config's own validation then refuses any key or value it does not accept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hm3.errors import ConfigError

Config = TypeVar("Config")


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` as ``("a.b", value)``, the value read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted KEY, e.g. optimizer.budget=40")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({err})") from None
    return key, value


def apply_overrides(data: Mapping[str, Any], assignments: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``data`` with each ``(dotted key, value)`` set, in order (a later one wins)."""
    out = copy.deepcopy(dict(data))
    for key, value in assignments:
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {key}: {where} is a {type(child).__name__}, not a section with keys")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, parse: Callable[..., Config], *, sets: Sequence[str] = (),
                preset: Iterable[tuple[str, Any]] = ()) -> Config:
    """A run config file with ``preset`` (from a command's own flags) and then ``sets`` (``--set``)
    applied, validated by ``parse`` (``parse_run_config``, ``parse_two_level_config``); relative paths
    stay relative to the file's folder, and errors name the ``--set`` given."""
    from hm3.search.run_config import read_config_file

    path = Path(path)
    data = apply_overrides(read_config_file(path), [*preset, *(parse_assignment(s) for s in sets)])
    source = f"{path} (with --set {', '.join(sets)})" if sets else str(path)
    return parse(data, source=source, base_dir=path.parent)
