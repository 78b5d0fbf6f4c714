"""LayerPools: the layer features φ(θ) the level-2 policy sees."""

from __future__ import annotations

import torch

from hm3.arch.pools import LayerPools


def _state(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.{name}.weight": scale * torch.randn(4, 4, generator=g)
            for i in range(3) for name in ("self_attn.o_proj", "mlp.down_proj")}


def test_frame_slot_is_the_mean_over_frames_whatever_their_order() -> None:
    """Every row of φ shares one normalisation: the frames' mean, and the experts' rows, do not depend on
    which frame is listed first."""
    frames = {1: _state(1, 1.0), 2: _state(2, 5.0)}
    pools = LayerPools({"a": _state(3, 2.0), "b": _state(4, 0.5)}, _state(0, 1.0), {}, 3, frames.__getitem__)
    one, other = pools.features([1, 2]), pools.features([2, 1])
    assert one.shape == (3, 3, 4)
    assert torch.allclose(one, other, atol=1e-6)
