"""The exported ``mergekit_passthrough.yml``, run by mergekit itself, rebuilds exactly the exported tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hm3.arch.path import MERGEKIT_CONFIG_FILE, LayerPath, export_path
from hm3.checkpoint import open_checkpoint
from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama

pytestmark = pytest.mark.mergekit

def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(model_dir) as ckpt:
        return {n: ckpt.get(n) for n in ckpt.tensor_names()}


def test_mergekit_passthrough_config_rebuilds_the_export(tmp_path, mergekit_merge):
    base = build_random_llama(tmp_path / "base", hidden_size=32, num_layers=3, vocab_size=64, seed=5)
    dirs = [build_finetuned_variant(base, tmp_path / f"m{i}", seed=20 + i, scale=0.2) for i in range(3)]
    # first and last hops from experts: embeddings and head must still come from the merge (dirs[-1])
    path = LayerPath(((0, 2), (2, 0), (1, 1), (0, 2), (1, 0)), scales=(1.0, 0.5, 1.0, 2.5, 0.75))
    ours = export_path(dirs, path, tmp_path / "hm3")
    mergekit_merge(ours / MERGEKIT_CONFIG_FILE, tmp_path / "mk")
    mine, theirs = _tensors(ours), _tensors(tmp_path / "mk")
    assert set(mine) == set(theirs)
    unequal = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert unequal == []
