"""Layer slices: which source layers make each part of a ``slices:`` recipe's output (mergekit's rules).

A slice whose sources each cover ``n`` layers gives ``n`` consecutive output layers: output layer
``k`` of the slice merges layer ``start + k`` of every source, so the sources of one slice must be
equally long. Slices are stacked in order, which is how a passthrough recipe builds a frankenmerge
or a depth up-scaled model (the same layers taken twice) and how an exported layer path is rebuilt.

Outside the layers, mergekit 0.1.5 (``MergePlanner.plan_module``) takes the input embeddings from
the first slice's sources and everything after the layers (final norm, LM head) from the last
slice's, pairing the last slice's sources with the first slice's one by one: where the last slice
lists more sources, only as many as the first slice lists take part. hm3 follows it, so a mergekit
config means the same here. Parameter gradients run over each slice on its own (``t = k / (n - 1)``,
``1`` for a one-layer slice); the tensors outside the layers sit at ``t = 0``.

This module is pure: it needs only the layer count of each model, and the planner
(:mod:`hm3.merge.plan`) turns each group into tensor jobs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from hm3.config import InputSlice, OutputSlice
from hm3.errors import ConfigError

Part = Literal["before", "layer", "after"]


@dataclass(frozen=True)
class SliceGroup:
    """Output tensors merged from the same sources with the same settings: one output layer, or the
    tensors before (embeddings) or after (final norm, LM head) the layers."""

    slice: int  # index in ``slices``: its base_model and parameters apply
    part: Part
    sources: tuple[InputSlice, ...]
    layer: int | None = None  # the output layer (part "layer")
    source_layers: tuple[int, ...] = ()  # the layer taken from each source (part "layer")
    t: float = 0.0  # depth for parameter gradients

    @property
    def where(self) -> str:
        """How messages name the group."""
        if self.part == "layer":
            return f"slices[{self.slice}] (output layer {self.layer})"
        return f"slices[{self.slice}] ({'embeddings' if self.part == 'before' else 'tensors after the layers'})"


def check_slice(index: int, definition: OutputSlice, depths: Mapping[str, int]) -> int:
    """The number of layers slice ``index`` gives; refuses a range past a model's depth or sources of
    different lengths, naming the slice, the source and the range."""
    for j, src in enumerate(definition.sources):
        start, end = src.layer_range
        depth = depths[src.model]
        if end > depth:
            raise ConfigError(
                f"slices[{index}].sources[{j}] ({src.model}): layer_range [{start}, {end}] goes beyond the "
                f"model's {depth} layers (layers 0 to {depth - 1})"
            )
    lengths = {src.num_layers for src in definition.sources}
    if len(lengths) > 1:
        listed = ", ".join(
            f"{src.model} [{src.layer_range[0]}, {src.layer_range[1]}] has {src.num_layers}"
            for src in definition.sources
        )
        raise ConfigError(
            f"slices[{index}]: its sources cover different numbers of layers ({listed}); a slice merges "
            "layer k of every source, so their layer_ranges must be equally long"
        )
    return definition.sources[0].num_layers


def slice_groups(slices: Sequence[OutputSlice], depths: Mapping[str, int]) -> list[SliceGroup]:
    """Every group of the output in order: embeddings, each output layer, the tensors after the layers.

    ``depths`` gives each source model's layer count.
    """
    counts = [check_slice(i, s, depths) for i, s in enumerate(slices)]
    groups = [SliceGroup(0, "before", tuple(slices[0].sources))]
    layer = 0
    for i, (definition, n) in enumerate(zip(slices, counts, strict=True)):
        for k in range(n):
            groups.append(SliceGroup(
                i,
                "layer",
                tuple(definition.sources),
                layer=layer,
                source_layers=tuple(src.layer_range[0] + k for src in definition.sources),
                t=k / (n - 1) if n > 1 else 1.0,
            ))
            layer += 1
    last = len(slices) - 1
    groups.append(SliceGroup(last, "after", tuple(slices[last].sources[: len(slices[0].sources)])))
    return groups
