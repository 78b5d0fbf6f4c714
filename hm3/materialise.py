"""Stored candidates -> Hugging Face checkpoints on disk (``hm3 export``, ``hm3 request``).

A level-1 point is a merge recipe: :func:`hm3.merge.engine.merge_to_disk` writes it. A level-2
point is a layer path over the experts and a frame (the level-1 merge it was found with, or the
base): the frame is merged into a scratch directory first (beside the output, removed afterwards),
then :func:`hm3.arch.path.export_path` writes the path with its mergekit passthrough config, which
names the frame as the directory ``frame`` beside it, with the frame's recipe to write it there.
Both writers publish their output directory only when it is complete.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hm3.arch.path import LayerPath, export_path
from hm3.config import parse_merge_config
from hm3.outputs import check_output_dir, make_staging_dir


def write_merge(recipe: Mapping[str, Any], out_dir: str | Path, *, overwrite: bool = False, force: bool = False,
                inputs: Sequence[str | Path] = ()) -> Path:
    """A merge recipe with absolute model paths -> a checkpoint directory (never over ``inputs``, nor
    the recipe's models; :mod:`hm3.outputs`)."""
    from hm3.merge.engine import merge_to_disk

    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite=overwrite, force=force, inputs=inputs)
    merge_to_disk(parse_merge_config(dict(recipe), source="stored recipe"), out_dir, overwrite=overwrite, force=force)
    return out_dir


def write_path(point: Mapping[str, Any], out_dir: str | Path, *, overwrite: bool = False, force: bool = False,
               inputs: Sequence[str | Path] = ()) -> Path:
    """A path point file (``points/point-N.json`` layout) -> a checkpoint directory of depth T."""
    out_dir = Path(out_dir)
    data = point["path"]
    path = LayerPath(hops=data["hops"], scales=data.get("scales"))
    experts = list(point["experts"].values())
    models = [*experts, point["base_model"]]
    check_output_dir(out_dir, overwrite=overwrite, force=force, inputs=[*inputs, *models])
    if point["frame_recipe"] is None:
        return export_path(models, path, out_dir, overwrite=overwrite, force=force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = make_staging_dir(out_dir.parent, out_dir.name, "frame")  # removed by a later hm3 if killed
    try:
        frame_dir = write_merge(point["frame_recipe"], scratch / "frame")
        return export_path([*experts, frame_dir], path, out_dir, overwrite=overwrite, force=force,
                           frame_recipe=dict(point["frame_recipe"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
