"""``,OPTION=VALUE`` items after an objective spec: parsed and checked the same way for every kind.

lm-eval tasks, users' data files and plug-in objectives all take options after commas
(``gsm8k:data.jsonl,name=gsm8k,chat=true``). One parser means one set of messages: an unknown option
names itself and lists the valid ones, a repeated or empty one is refused, and a ``name=`` is checked
against the one rule every place that shows or reads names relies on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hm3.errors import ConfigError

#: What an objective name may not hold: commas and ``=`` separate specs and ``--prefer`` items, ``:``
#: separates a spec's kind (``short_name`` reads the part before it), ``@`` starts a seed, and
#: whitespace cannot be typed in ``--prefer`` unquoted.
BAD_NAME = re.compile(r"[\s,=:@]")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def split_options(items: Sequence[str], *, spec: str, allowed: Sequence[str] | None) -> dict[str, str]:
    """``{OPTION: VALUE}`` of the ``OPTION=VALUE`` items after a spec's head, in the order given.

    ``allowed`` lists the options this kind of objective takes (None: any identifier, a plug-in class's
    keyword arguments). Refused with a :class:`ConfigError` naming ``spec``: an item without ``=``, an
    unknown option (the valid ones listed), an option given twice, an empty value.
    """
    values: dict[str, str] = {}
    known = ", ".join(f"{o}=" for o in allowed) if allowed is not None else "KEY=VALUE with KEY a Python identifier"
    for item in items:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key:
            raise ConfigError(f"objective {spec!r}: cannot read option {item.strip()!r} (expected OPTION=VALUE); "
                              f"options are {known}")
        if (allowed is not None and key not in allowed) or (allowed is None and not key.isidentifier()):
            raise ConfigError(f"objective {spec!r}: cannot read option {item.strip()!r} (unknown option {key!r}); "
                              f"options are {known}")
        if key in values:
            raise ConfigError(f"objective {spec!r} gives {key}= twice")
        if not value:
            raise ConfigError(f"objective {spec!r}: option {key}= is empty")
        values[key] = value
    return values


def check_name(name: str, *, spec: str) -> str:
    """``name`` if it can serve as an objective name (score columns, ``--prefer``, the run store)."""
    if BAD_NAME.search(name):
        raise ConfigError(f"objective {spec!r}: name {name!r} may not hold spaces, ',', '=', ':' or '@' "
                          "(it is typed in --prefer and names score columns)")
    return name


def parse_bool(value: str, *, key: str, spec: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``, any case)."""
    lowered = value.strip().lower()
    if lowered in _TRUE or lowered in _FALSE:
        return lowered in _TRUE
    raise ConfigError(f"objective {spec!r}: {key}= must be true or false, got {value!r}")


def parse_count(value: str, *, key: str, spec: str) -> int:
    """A whole number >= 0."""
    if not value.strip().isdigit():
        raise ConfigError(f"objective {spec!r}: {key} must be a whole number >= 0, got {value!r}")
    return int(value)
