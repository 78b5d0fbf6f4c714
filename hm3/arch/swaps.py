"""Layer swaps: the structured family of paths published as a heuristic (Bandarkar et al. 2024).

A swap keeps a *frame* model's layers in order and replaces its bottom ``k_bottom`` and top
``k_top`` layers with a *donor*'s same layers: a math expert with a language expert's bottom ~5 and
top ~2 of 32 layers beat both experts, souping and TIES on math in the target language. Optionally
the ``transition`` frame layers next to each boundary come from a *blend* model (the average of
frame and donor, :func:`averaged_state`), the paper's smoothed variant, and the hidden state entering
each switch between models can be scaled (Sakana's transition scales, :func:`hm3.arch.path.with_switch_scales`).

In hm3 a swap is an ordinary :class:`~hm3.arch.path.LayerPath` over a pool, so it materialises,
exports and is scored exactly like any path. It serves twice:

* **the baseline without search**: score a handful of (k_bottom, k_top) and keep the best
  (``experiments/compositional/ablation.py``);
* **a prior for the policy**: ``level2.swaps`` in a run config adds, for each preference's frame
  (the level-1 merge: Sakana's parameter space, then data flow) and each expert as donor, the swaps
  of the listed (k_bottom, k_top) to the paths kept for the final front (:func:`swap_paths`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hm3.arch.path import LayerPath, with_switch_scales
from hm3.errors import ConfigError


def layer_swap(
    num_layers: int,
    frame: int,
    donor: int,
    k_bottom: int,
    k_top: int,
    *,
    transition: int = 0,
    blend: int | None = None,
    switch_scale: float | None = None,
) -> LayerPath:
    """The frame's ``num_layers`` layers in order, bottom ``k_bottom`` and top ``k_top`` from ``donor``.

    ``transition`` > 0 takes that many frame layers after the bottom block and before the top block
    from pool model ``blend`` (e.g. the frame/donor average). ``switch_scale`` multiplies the hidden
    state entering every switch between models (None: no scale).
    """
    if k_bottom < 0 or k_top < 0 or k_bottom + k_top > num_layers:
        raise ConfigError(f"swap of bottom {k_bottom} and top {k_top} layers does not fit {num_layers} layers")
    if transition < 0 or (transition and blend is None):
        raise ConfigError("averaged transition layers need transition >= 1 and the pool index of the blend model")
    middle = range(k_bottom, num_layers - k_top)
    if 2 * transition > len(middle):
        raise ConfigError(f"{transition} transition layers per side do not fit the {len(middle)} frame layers")
    hops = []
    for layer in range(num_layers):
        if layer < k_bottom or layer >= num_layers - k_top:
            model = donor
        elif transition and ((k_bottom and layer < k_bottom + transition)
                             or (k_top and layer >= num_layers - k_top - transition)):
            model = blend  # type: ignore[assignment]
        else:
            model = frame
        hops.append((model, layer))
    path = LayerPath(tuple(hops))
    return path if switch_scale is None else with_switch_scales(path, switch_scale)


def swap_paths(
    num_layers: int, frame: int, donors: Sequence[int], ks: Sequence[Sequence[int]], **options: object
) -> dict[str, LayerPath]:
    """Every swap of ``ks`` ((k_bottom, k_top) pairs) for every donor, by a readable label."""
    out = {}
    for donor in donors:
        for k_bottom, k_top in ks:
            label = f"donor {donor} bottom {k_bottom} top {k_top}"
            out[label] = layer_swap(num_layers, frame, donor, int(k_bottom), int(k_top), **options)  # type: ignore[arg-type]
    return out


def averaged_state(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], weight: float = 0.5
) -> dict[str, torch.Tensor]:
    """``(1 − weight)·a + weight·b`` per tensor (a blend pool member for averaged transition layers)."""
    if set(a) != set(b):
        raise ConfigError("cannot average models with different tensors")
    return {n: ((1 - weight) * a[n].float() + weight * b[n].float()).to(a[n].dtype) for n in a}
