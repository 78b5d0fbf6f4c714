"""``hm3 export RUN_DIR --point N OUT``: a front point of a finished run (either kind) as a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hm3.errors import ConfigError, Hm3Error, RunFileError
from hm3.run.directory import FRONT_FILE, read_finished_run


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
    if not file.resolve().is_relative_to(run.run_dir.resolve()):  # an absolute path, '..', a symlink out
        raise RunFileError(f"{run.run_dir / FRONT_FILE}: front point {point}'s 'file' {rows[0].file!r} lies outside "
                           "the run directory (hm3 writes every point file inside it): refusing to read it")
    if not file.is_file():
        raise ConfigError(f"{run.run_dir}: the file of front point {point} is missing: {file}")
    kw = {"overwrite": overwrite, "force": force, "inputs": [run.run_dir]}
    damaged = f"{run.run_dir}: the file of front point {point}, {file}, is damaged"
    try:
        text = file.read_text()
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise RunFileError(f"{damaged} ({err})") from None
    problem = "not a mapping" if not isinstance(data, dict) else _path_point_problem(data) if file.suffix == ".json" \
        else None
    if problem:
        raise RunFileError(f"{damaged} ({problem})")
    try:
        return write_path(data, out_dir, **kw) if file.suffix == ".json" else write_merge(data, out_dir, **kw)
    except Hm3Error as err:  # e.g. a recipe cut short: say which file the merge came from
        raise type(err)(f"front point {point} ({file}): {err}") from None


def _path_point_problem(data: dict) -> str | None:
    """What a path point file (``points/point-N.json``) lacks of what :func:`hm3.materialise.write_path`
    reads, or None."""
    path, experts = data.get("path"), data.get("experts")
    if not isinstance(path, dict) or not isinstance(path.get("hops"), list):
        return "no 'path' with its 'hops'"
    if not isinstance(experts, dict) or not all(isinstance(m, str) for m in experts.values()):
        return "no 'experts' mapping objectives to models"
    if not isinstance(data.get("base_model"), str):
        return "no 'base_model'"
    if "frame_recipe" not in data or not isinstance(data["frame_recipe"], dict | None):
        return "no 'frame_recipe' (a recipe or null)"
    return None
