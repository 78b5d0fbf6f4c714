"""Resolving a recipe parameter for one tensor, with mergekit's semantics.

A setting is a scalar, a *gradient* (a list interpolated over depth), or a list
of ``{filter, value}`` conditions matched by tensor-name substring. Depth ``t``
runs from 0 (first layer) to 1 (last layer); tensors outside the layers
(embeddings, final norm, LM head) use ``t = 0``, as mergekit does.

As in mergekit 0.1.5, each value (each end of a gradient) of a number parameter is first read by its
type (``validate``): PyYAML reads ``1e-3`` (no dot) as a string, which mergekit merges as the float it
means. A value the type does not accept is kept as given, so the parameter's own check names it; unlike
mergekit, booleans and numbers are not read as one another (``normalize: 1``, ``weight: true`` are refused).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

from hm3.config import ConditionalParameter, MergeConfig


def layer_position(layer: int | None, num_layers: int) -> float:
    """Depth ``t`` of a tensor for gradient interpolation (mergekit's rule)."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


Validate = Callable[[Any], Any]


def _as_given(value: Any) -> Any:
    return value


@cache
def validator(value_type: Any) -> Validate:
    """Reads a value as ``value_type`` the way mergekit does (pydantic's lax mode), else returns it as given;
    a string that reads as NaN or infinity stays a string, as a recipe's numbers must be finite."""
    if value_type is None:
        return _as_given
    adapter = TypeAdapter(value_type)

    def read(value: Any) -> Any:
        if isinstance(value, bool):  # true/false are no numbers: the parameter's check refuses them by name
            return value
        try:
            out = adapter.validate_python(value)
        except ValidationError:
            return value
        return value if isinstance(out, float) and not math.isfinite(out) else out  # "nan", "inf": refused by name

    return read


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate_setting(tensor_name: str, setting: Any, t: float, validate: Validate = _as_given) -> Any:
    """Value of one setting at depth ``t`` for ``tensor_name``; ``None`` if no filter matches."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if not isinstance(setting, list) or not setting:
        return None
    if all(isinstance(e, ConditionalParameter) for e in setting):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate_setting(tensor_name, cond.value, t, validate)
        return None
    values = [validate(e) for e in setting]
    if all(_is_number(e) for e in values):
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    return values[int(t * (len(values) - 1))]


def resolve_in(
    scopes: Sequence[Mapping[str, Any] | None], name: str, *, tensor_name: str, t: float, default: Any,
    validate: Validate = _as_given,
) -> Any:
    """The first scope's setting of ``name`` that gives a value for this tensor, else ``default``.

    ``scopes`` run from the most to the least specific (mergekit's precedence: a source's or model's
    own parameters, then its slice's, then the recipe's); a setting whose filters all miss the
    tensor gives no value, so the next scope is asked.
    """
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(tensor_name, scope[name], t, validate)
            if value is not None:
                return value
    return default


def resolve(
    config: MergeConfig, name: str, *, tensor_name: str, t: float, model: str | None, default: Any
) -> Any:
    """Model-level setting first, then the global one, then ``default`` (mergekit's precedence)."""
    own = [m.parameters for m in config.models or () if m.model == model] if model is not None else []
    return resolve_in([*own, config.parameters], name, tensor_name=tensor_name, t=t, default=default)
