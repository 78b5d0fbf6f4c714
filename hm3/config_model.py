"""The base of every config model: frozen, no unknown keys, and no ``true``/``false`` where a number goes.

pydantic's lax mode reads a boolean as a number (``budget: true`` is a budget of 1,
``density: false`` a density of 0), so a slip in a YAML file or a ``--set`` runs
another experiment silently. Strict mode would refuse that, but also every list
given for a tuple and every string for a path, which YAML cannot spell otherwise;
so the booleans alone are refused, by the field's own annotation.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class ConfigModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and misplaced_boolean(value, field.annotation):
            raise ValueError(f"{value!r} is a boolean (true/false) where a number goes; write the number")
        return value


class FiniteConfigModel(ConfigModel):
    """A config model whose numbers must be finite: an inf or NaN budget, bound or penalty would spoil a
    search silently (a NaN reward, a NaN coordinate) instead of being refused by key."""

    model_config = ConfigDict(allow_inf_nan=False)


def misplaced_boolean(value: Any, annotation: Any) -> bool:
    """Whether ``value`` holds a bool where ``annotation`` takes a number but no bool."""
    return _bool_verdict(value, annotation) is True


def _bool_verdict(value: Any, annotation: Any) -> bool | None:
    """True: a bool of ``value`` lands where a number goes; False: its bools land where bools go;
    None: no bool, or a shape ``annotation`` does not take (pydantic's own error then says so).

    A union takes a bool if any member takes it as a bool, and misplaces it if one would read it as
    a number: ``bool | int`` keeps ``true``; ``int | None`` refuses it.
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _bool_verdict(value, args[0])
    if origin is Union or origin is types.UnionType:
        verdicts = [_bool_verdict(value, a) for a in args]
        return False if False in verdicts else True if True in verdicts else None
    if isinstance(value, bool):
        if _takes_bool(annotation):
            return False
        return True if annotation in (int, float) else None
    if not args or not _is_container_for(value, annotation):
        return None
    if isinstance(value, Mapping):
        items = [(v, args[-1]) for v in value.values()]
    elif origin is tuple and args[-1] is not Ellipsis:
        items = list(zip(value, args, strict=False))
    else:
        items = [(v, args[0]) for v in value]
    verdicts = [_bool_verdict(v, a) for v, a in items]
    return True if True in verdicts else False if False in verdicts else None


def _takes_bool(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _takes_bool(get_args(annotation)[0])
    if origin is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return annotation is bool or annotation is Any


def _is_container_for(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is the kind of container ``annotation`` (``dict[...]``, ``list[...]``, ...) names."""
    origin = get_origin(annotation)
    if origin is None or not isinstance(origin, type):
        return False
    if issubclass(origin, Mapping):
        return isinstance(value, Mapping)
    return issubclass(origin, Sequence) and not issubclass(origin, str) and isinstance(value, (list, tuple))
