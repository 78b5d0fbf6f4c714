"""Resolving a recipe parameter for one tensor, with mergekit's semantics.

A setting is a scalar, a *gradient* (a list interpolated over depth), or a list
of ``{filter, value}`` conditions matched by tensor-name substring. Depth ``t``
runs from 0 (first layer) to 1 (last layer); tensors outside the layers
(embeddings, final norm, LM head) use ``t = 0``, as mergekit does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hm3.config import ConditionalParameter, MergeConfig


def layer_position(layer: int | None, num_layers: int) -> float:
    """Depth ``t`` of a tensor for gradient interpolation (mergekit's rule)."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(tensor_name: str, setting: Any, t: float) -> Any:
    """Value of one setting at depth ``t`` for ``tensor_name``; ``None`` if no filter matches."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list) or not setting:
        return None
    if all(isinstance(e, ConditionalParameter) for e in setting):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate_setting(tensor_name, cond.value, t)
        return None
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting[int(t * (len(setting) - 1))]


def resolve_in(
    scopes: Sequence[Mapping[str, Any] | None], name: str, *, tensor_name: str, t: float, default: Any
) -> Any:
    """The first scope's setting of ``name`` that gives a value for this tensor, else ``default``.

    ``scopes`` run from the most to the least specific (mergekit's precedence: a source's or model's
    own parameters, then its slice's, then the recipe's); a setting whose filters all miss the
    tensor gives no value, so the next scope is asked.
    """
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(tensor_name, scope[name], t)
            if value is not None:
                return value
    return default


def resolve(
    config: MergeConfig, name: str, *, tensor_name: str, t: float, model: str | None, default: Any
) -> Any:
    """Model-level setting first, then the global one, then ``default`` (mergekit's precedence)."""
    own = [m.parameters for m in config.models or () if m.model == model] if model is not None else []
    return resolve_in([*own, config.parameters], name, tensor_name=tensor_name, t=t, default=default)
