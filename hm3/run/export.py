"""``hm3 export RUN_DIR --point N OUT``: a front point of a finished run (either kind) as a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hm3.errors import ConfigError
from hm3.run.directory import read_finished_run


def export_point(run_dir: str | Path, point: int, out_dir: str | Path, *, overwrite: bool = False,
                 force: bool = False) -> Path:
    """Materialise front point ``point`` of a finished run as a Hugging Face checkpoint (never into,
    over or around the run directory or the models it merges; :mod:`hm3.outputs`)."""
    from hm3.materialise import write_merge, write_path
    from hm3.outputs import check_output_dir

    run = read_finished_run(run_dir)
    check_output_dir(out_dir, overwrite=overwrite, force=force, inputs=[run.run_dir, *run.config.level1.models.values()])
    rows = [p for p in run.front if p.point == point]
    if not rows:
        raise ConfigError(f"{run.run_dir}: no front point {point}; front points: "
                          f"{', '.join(str(p.point) for p in run.front)}")
    file = run.run_dir / rows[0].file
    if not file.is_file():
        raise ConfigError(f"{run.run_dir}: the file of front point {point} is missing: {file}")
    kw = {"overwrite": overwrite, "force": force, "inputs": [run.run_dir]}
    if file.suffix == ".json":
        return write_path(json.loads(file.read_text()), out_dir, **kw)
    return write_merge(yaml.safe_load(file.read_text()), out_dir, **kw)
