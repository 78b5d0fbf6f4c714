"""Layer pools over a live session's models: the experts plus a frame, and their layer features φ(θ).

A path is drawn from a pool of K experts plus a *frame* (pool index K): the level-1 merge chosen
for the preference at hand (a stored candidate id), or the base model (``"base"``) when level 2
runs alone. The frame supplies embeddings, final norm and LM head (:mod:`hm3.arch.path`).
:class:`LayerPools` keeps the experts' states (rebuilt once from the merger's base + task vectors)
and the last few frames' merged states, and assembles them into :class:`~hm3.arch.path.LayerPool`s.

φ(θ), the layer summary the policy sees, is per pool layer and per tensor: log RMS of the weight
and log RMS of its difference from the base model's same layer, z-scored over the pool. During
offline pretraining the frame changes with λ; its features are the mean over the candidate
frames, so the policy's inputs stay fixed while λ (an input too) tells it which frame it has.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hm3.arch.path import LayerPool
from hm3.eval.session import FrameKey

State = dict[str, torch.Tensor]


def layer_features(states: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor],
                   num_layers: int) -> torch.Tensor:
    """φ(θ) for every pool layer: ``[pool, layers, 2 × tensors-per-layer]``, z-scored over the pool."""
    return _zscore(layer_summaries(states, reference, num_layers))


def _zscore(phi: torch.Tensor) -> torch.Tensor:
    """Per-feature z-scores over every model and layer of ``phi`` [pool, layers, F]."""
    mean = phi.mean(dim=(0, 1), keepdim=True)
    std = phi.std(dim=(0, 1), keepdim=True).clamp_min(1e-6)
    return (phi - mean) / std


def layer_summaries(states: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor],
                    num_layers: int) -> torch.Tensor:
    """φ(θ) before normalisation: log RMS of each layer tensor and of its difference from ``reference``."""
    from hm3.checkpoint.layers import layer_tensor_names

    names = list(reference)
    rows = []
    for state in states:
        per_layer = []
        for layer in range(num_layers):
            feats = []
            for name in sorted(layer_tensor_names(names, layer)):
                w, ref = state[name].float(), reference[name].float()
                feats.append(torch.log(w.pow(2).mean().sqrt() + 1e-8))
                feats.append(torch.log((w - ref).pow(2).mean().sqrt() + 1e-8))
            per_layer.append(torch.stack(feats))
        rows.append(torch.stack(per_layer))
    return torch.stack(rows)


class LayerPools:
    """Experts' states (given once) and frames (merges or the base), assembled into layer pools.

    ``frame_merge(id)`` builds a stored merge's state; the last ``cache_size`` frames are kept, since
    consecutive episodes mostly share their frame and a merge costs a pass over every tensor.
    """

    def __init__(self, experts: Mapping[str, State], base: State, config: Mapping[str, Any], num_layers: int,
                 frame_merge: Callable[[int], State], *, cache_size: int = 2):
        self.expert_refs = list(experts)
        self.experts = [experts[ref] for ref in self.expert_refs]
        self.base = base
        self.config = dict(config)
        self.num_layers = int(num_layers)
        self.frame_merge = frame_merge
        self._frames: OrderedDict[FrameKey, State] = OrderedDict()
        self.cache_size = cache_size

    @property
    def size(self) -> int:
        return len(self.experts) + 1

    def frame_state(self, key: FrameKey) -> State:
        if key == "base":
            return self.base
        if key in self._frames:
            self._frames.move_to_end(key)
            return self._frames[key]
        state = self.frame_merge(int(key))
        self._frames[key] = state
        while len(self._frames) > self.cache_size:
            self._frames.popitem(last=False)
        return state

    def pool(self, key: FrameKey) -> LayerPool:
        states = [*self.experts, self.frame_state(key)]
        names = [*self.expert_refs, f"frame {key}"]
        return LayerPool.from_states(states, [self.config] * len(states), names)

    def features(self, frames: Sequence[FrameKey]) -> torch.Tensor:
        """φ for experts + the mean over ``frames`` in the frame slot (module docstring), z-scored together:
        the frames are averaged in the same units as the experts' rows, whatever their order."""
        experts = layer_summaries(self.experts, self.base, self.num_layers)
        frame = torch.stack([layer_summaries([self.frame_state(key)], self.base, self.num_layers)[0]
                             for key in frames]).mean(0, keepdim=True)
        return _zscore(torch.cat([experts, frame]))
