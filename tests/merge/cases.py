"""Inputs shared by the merge tests: small random models near a base, and how mergekit is asked for a merge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_models(seed: int, count: int = 3, shape=(37, 29)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base of scale 0.02 and ``count`` models 0.01 away from it, as fine-tunes are."""
    g = gen(seed)
    base = torch.randn(*shape, generator=g) * 0.02
    return base, [base + torch.randn(*shape, generator=g) * 0.01 for _ in range(count)]


def mergekit_params(weights: Sequence[float], densities: Sequence[float] | None = None, **shared: Any) -> dict:
    """mergekit ``merge_tensors`` parameters: per-model values keyed by the model's index (the base is 0)."""
    p: dict[str, Any] = {"weight": {k + 1: w for k, w in enumerate(weights)}, **shared}
    if densities is not None:
        p["density"] = {k + 1: d for k, d in enumerate(densities)}
    return p
