"""No file in a run directory runs code when hm3 reads it.

Each test plants a pickle gadget -- an object whose unpickling would create a marker file -- where
a run keeps its BO posterior, its level-2 policy or a training checkpoint, runs the command that
reads it (``hm3 request``, ``hm3 run --resume``) as a real subprocess, and checks that the marker
was never created, the command failed with a one-line message naming the file, and no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hm3.errors import ExitCode, RunFileError
from hm3.log import LOG_FILE
from hm3.run.config import parse_two_level_config
from hm3.run.two_level import run_two_level
from hm3.runfiles import load_legacy_pt, load_state, save_state
from tests.gadgets import plant
from tests.test_pipeline import _config


def hm3(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "hm3.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def assert_refused(proc: subprocess.CompletedProcess, marker: Path, file: Path) -> None:
    assert not marker.exists(), "the pickle gadget ran"
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert str(file) in proc.stderr and "hm3: error:" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def finished(tiny_family, tmp_path_factory):
    _, paths, objectives = tiny_family
    data = _config((paths, objectives))
    root = tmp_path_factory.mktemp("safety")
    run_two_level(parse_two_level_config(data), root / "run", progress=False)
    (root / "cfg.yml").write_text(yaml.safe_dump(data))
    return root / "run", root / "cfg.yml"


def _prefer(run: Path) -> str:
    """``--prefer`` for the run's first objective, by its full name: the tiny family's two objectives are
    both ``choice:...``, so their short name names neither."""
    return f"{json.loads((run / 'summary.json').read_text())['objectives'][0]}=1"


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_state_files_round_trip_without_pickle(tmp_path: Path) -> None:
    value = {
        "t": torch.arange(6, dtype=torch.float64).reshape(2, 3)[:, 1:],  # a view: stored on its own
        "flags": torch.tensor([True, False]),
        "by_int": {0: {"step": torch.tensor(3.0)}, 7: "seven"},
        "pair": (0.9, 0.999),
        "nested": [1, None, "x", float("nan"), {"$odd": 1}],
        "array": np.arange(4, dtype=np.uint32),
        "scalar": np.float32(0.25),
    }
    back = load_state(save_state(tmp_path / "s.safetensors", value), regenerate="-")
    torch.testing.assert_close(back["t"], value["t"])
    assert back["flags"].dtype == torch.bool and back["by_int"][7] == "seven"
    assert back["by_int"][0]["step"].item() == 3.0 and back["pair"] == (0.9, 0.999)
    assert back["nested"][:3] == [1, None, "x"] and np.isnan(back["nested"][3]) and back["nested"][4] == {"$odd": 1}
    np.testing.assert_array_equal(back["array"], value["array"])
    assert back["scalar"] == np.float32(0.25) and back["scalar"].dtype == np.float32


def test_a_pickle_gadget_is_refused_by_every_reader(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    plant(tmp_path / "x.pt", marker)
    with pytest.raises(RunFileError, match="refused: not a plain tensor file"):
        load_legacy_pt(tmp_path / "x.pt", regenerate="regenerate it")
    shutil.copy(tmp_path / "x.pt", tmp_path / "x.safetensors")  # a pickle under the new name
    with pytest.raises(RunFileError, match="not a readable hm3 state file"):
        load_state(tmp_path / "x.safetensors", regenerate="regenerate it")
    assert not marker.exists()


@pytest.mark.parametrize("stem", ["level1/posterior", "level2/policy"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_request_refuses_a_gadget_posterior_or_policy(finished, tmp_path, stem, suffix):
    run = _copy(finished[0], tmp_path)
    (run / f"{stem}.safetensors").unlink()
    marker = tmp_path / "pwned"
    plant(run / f"{stem}{suffix}", marker)
    proc = hm3("request", str(run), "--prefer", _prefer(finished[0]), str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert_refused(proc, marker, run / f"{stem}{suffix}")
    assert "resume" in proc.stderr  # says how to regenerate it
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_gadget_training_checkpoint(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    (run / "level2" / "pretrain.safetensors").unlink()
    marker = tmp_path / "pwned"
    plant(run / "level2" / "pretrain.pt", marker)
    before = _tree(run)
    proc = hm3("run", str(finished[1]), str(run), "--resume", "--quiet", cwd=tmp_path)
    assert_refused(proc, marker, run / "level2" / "pretrain.pt")
    assert "posix.system" in proc.stderr  # names what the pickle asked for
    assert _tree(run) == before  # refused before level 1 wrote its outputs again


def test_an_older_runs_plain_pt_files_are_still_read(finished, tmp_path):
    """A run written before state files (``.pt`` holding only tensors and containers) still answers."""
    from hm3.request import load_policy
    from hm3.search.posterior import load_posterior

    run = _copy(finished[0], tmp_path)
    for stem in ("level1/posterior", "level2/policy"):
        value = load_posterior(run / "level1") if stem.startswith("level1") else load_policy(run)
        torch.save(value, run / f"{stem}.pt")
        (run / f"{stem}.safetensors").unlink()
    proc = hm3("request", str(run), "--prefer", _prefer(finished[0]), str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "config.json").is_file()


def test_corrupt_state_file_is_refused_naming_it(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    path = run / "level1" / "posterior.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    proc = hm3("request", str(run), "--prefer", _prefer(finished[0]), str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(path) in proc.stderr


# --- --overwrite never destroys inputs or foreign directories -----------------------------------------


def _tree(d: Path) -> dict[str, bytes]:
    """A run's outputs, without the records every command appends to (the store, the log)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith(("hm3.sqlite", LOG_FILE))}


@pytest.mark.parametrize("target", ["run", "run/level1", "base model", "around the run"])
def test_request_and_export_refuse_an_output_over_their_inputs(finished, tmp_path, capsys, target):
    from hm3.cli import main

    run = _copy(finished[0], tmp_path)
    base = Path(yaml.safe_load(finished[1].read_text())["models"]["base"])
    out = {"run": run, "run/level1": run / "level1", "base model": base, "around the run": tmp_path}[target]
    before_run, before_base = _tree(run), _tree(base)
    point = (run / "front.csv").read_text().splitlines()[1].split(",")[0]
    for argv in (["request", str(run), "--prefer", _prefer(finished[0]), str(out), "--quiet"],
                 ["export", str(run), "--point", point, str(out)]):
        assert main([*argv, "--overwrite", "--force"]) != 0
        err = capsys.readouterr().err
        assert "an input of this command" in err and "Traceback" not in err
    assert _tree(run) == before_run and _tree(base) == before_base


def test_request_replaces_only_a_directory_hm3_wrote(finished, tmp_path, capsys):
    from hm3.cli import main

    run = finished[0]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    argv = ["request", str(run), "--prefer", _prefer(finished[0]), str(foreign), "--quiet", "--overwrite"]
    assert main(argv) != 0
    assert "hm3 did not write" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"
    assert main([*argv, "--force"]) == 0 and (foreign / ".hm3-output").is_file()
    assert main(argv) == 0  # now hm3's own output: --overwrite replaces it
    assert not (foreign / "notes.txt").exists()


def test_zoo_build_and_demo_overwrite_refuse_foreign_directories(tmp_path, capsys):
    """Checked before anything is built: the user's files stay."""
    from hm3.cli import main

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    assert main(["zoo", "build", str(foreign), "--overwrite"]) != 0
    assert "hm3 did not write" in capsys.readouterr().err
    (foreign / "run").mkdir()
    assert main(["demo", "--out", str(foreign), "--zoo", str(tmp_path / "zoo"), "--overwrite"]) != 0
    assert "thesis.tex" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "keep me" and not (tmp_path / "zoo").exists()


# --- damaged run files: a message naming the file, never a traceback or a silent answer ---------------


@pytest.mark.parametrize("damage", ["summary not json", "summary without keys", "summary front size not a number",
                                    "summary base of another length", "front cut mid-row", "front row missing",
                                    "front score not a number", "front without its kind column"])
def test_a_damaged_summary_or_front_is_refused(finished, tmp_path, capsys, damage):
    from hm3.cli import main

    run = _copy(finished[0], tmp_path)
    summary, front = run / "summary.json", run / "front.csv"
    lines = front.read_text().splitlines(keepends=True)
    if damage == "summary not json":
        summary.write_text(summary.read_text()[:50])
    elif damage == "summary without keys":
        summary.write_text("{}")
    elif damage == "summary front size not a number":
        summary.write_text(json.dumps(json.loads(summary.read_text()) | {"front_size": "three"}))
    elif damage == "summary base of another length":
        data = json.loads(summary.read_text())
        summary.write_text(json.dumps(data | {"base_validation": data["base_validation"][:-1]}))
    elif damage == "front cut mid-row":
        front.write_text("".join(lines)[:-7])
    elif damage == "front row missing":
        front.write_text("".join(lines[:-1]))
    elif damage == "front without its kind column":
        front.write_text(pd.read_csv(front).drop(columns="kind").to_csv(index=False))
    else:
        front.write_text("".join(lines[:-1]) + lines[-1].replace(lines[-1].split(",")[3], "abc", 1))
    damaged = summary if damage.startswith("summary") else front
    for argv in (["request", str(run), "--prefer", _prefer(finished[0]), str(tmp_path / "out"), "--quiet"],
                 ["front", str(run)]):
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert str(damaged) in err and "Traceback" not in err and "--resume" in err, err
    assert not (tmp_path / "out").exists()


def test_a_front_table_newer_than_the_summary_is_refused_naming_both(finished, tmp_path, capsys):
    """front.csv is written before summary.json: a rewrite of a run's outputs cut between the two (a full
    disk, a kill during ``hm3 request --refine`` or ``--resume``) leaves a front the summary does not
    describe. One of the same size passes every per-file check; readers must still refuse it."""
    from hm3.cli import main

    run = _copy(finished[0], tmp_path)
    front, candidates = pd.read_csv(run / "front.csv"), pd.read_csv(run / "candidates.csv")
    off_front = candidates.loc[~candidates["point"].isin(front["point"]), "point"].iloc[0]
    front.loc[front.index[-1], "point"] = off_front  # another front of the same size, as a later write made it
    front.to_csv(run / "front.csv", index=False)
    for argv in (["request", str(run), "--prefer", _prefer(finished[0]), str(tmp_path / "out"), "-q"],
                 ["front", str(run)], ["export", str(run), "--point", str(front["point"].iloc[0]),
                                       str(tmp_path / "out")]):
        assert main(argv) == ExitCode.BAD_INPUT
        err = capsys.readouterr().err
        assert str(run / "front.csv") in err and str(run / "summary.json") in err and "--resume" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["candidates cut mid-row", "candidates score not a number",
                                    "candidates without its kind column", "candidates row missing",
                                    "candidates of a kind no page draws", "front without a test column"])
def test_front_refuses_a_damaged_candidates_table_or_a_front_without_test_scores(finished, tmp_path, capsys, damage):
    """``hm3 front`` (its plot and ``--html`` page) reads every candidate from candidates.csv and the front's
    test scores: a damaged table is refused naming it, not plotted as it is nor a traceback."""
    from hm3.cli import main

    run = _copy(finished[0], tmp_path)
    damaged = run / ("front.csv" if damage.startswith("front") else "candidates.csv")
    lines = damaged.read_text().splitlines(keepends=True)
    if damage == "candidates cut mid-row":
        damaged.write_text("".join(lines)[:-7])
    elif damage == "candidates score not a number":
        damaged.write_text("".join(lines[:-1]) + lines[-1].replace(lines[-1].split(",")[3], "abc", 1))
    elif damage == "candidates without its kind column":
        pd.read_csv(damaged).drop(columns="kind").to_csv(damaged, index=False)
    elif damage == "candidates of a kind no page draws":  # the page draws merges and paths: this row would vanish
        damaged.write_text("".join(lines[:-1]) + lines[-1].replace(",merge,", ",Merge,").replace(",path,", ",Path,"))
    elif damage == "candidates row missing":
        damaged.write_text("".join(lines[:-1]))
    else:
        table = pd.read_csv(damaged)
        table.drop(columns=[c for c in table.columns if c.endswith("_test")][:1]).to_csv(damaged, index=False)
    for argv in (["front", str(run)], ["front", str(run), "--html"]):
        assert main(argv) == ExitCode.BAD_INPUT
        err = capsys.readouterr().err
        assert str(damaged) in err and "--resume" in err, err
    assert not (run / "front.html").exists()


def test_a_full_disk_while_saving_the_posterior_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    import hm3.atomic

    path = save_state(tmp_path / "posterior.safetensors", {"X": torch.ones(3)})
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hm3.atomic.os, "fsync", full)
    with pytest.raises(OSError, match=f"cannot write {path}: No space left on device; any previous"):
        save_state(path, {"X": torch.zeros(3)})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_full_disk_at_the_end_of_a_search_is_a_message(tiny_family, tmp_path, monkeypatch, capsys):
    """The posterior is the first output a finished search writes: ENOSPC there is one line naming it."""
    import errno

    import hm3.atomic
    from hm3.cli import main
    from tests.search.test_level1 import _config as level1_config

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(level1_config(tiny_family, budget=4)))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hm3.atomic.os, "fsync", full)
    assert main(["search", "param", str(cfg), str(tmp_path / "run"), "--quiet"]) == ExitCode.ENVIRONMENT
    err = capsys.readouterr().err
    assert "posterior.safetensors: No space left on device" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_a_run_directory_in_or_over_a_model_is_refused(tiny_family, micro_zoo_dir, tmp_path, capsys):
    """A run's store, tables and points would land among a model's files (or a shipped zoo's, which then
    fails its hashes): refused before anything is written."""
    from hm3.cli import main
    from tests.search.test_level1 import _config as level1_config
    from tests.test_cli import _two_level_yaml

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(level1_config(tiny_family, budget=2)))
    model = Path(tiny_family[1]["m1"])
    before = sorted(p.name for p in model.iterdir())
    for run in (model, model / "run"):
        assert main(["search", "param", str(cfg), str(run), "-q"]) == ExitCode.BAD_INPUT
        assert "an input of this command" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before
    zoo = tmp_path / "zoo"
    shutil.copytree(micro_zoo_dir, zoo)
    assert main(["run", str(_two_level_yaml(tmp_path)), str(zoo), "--set", f"zoo={zoo}", "-q"]) == ExitCode.BAD_INPUT
    assert "contains an input of this command" in capsys.readouterr().err
    assert not (zoo / "hm3.sqlite").exists()


@pytest.mark.parametrize(("suffix", "damage"), [(".yml", "cut"), (".yml", "not a mapping")])
def test_a_damaged_point_file_is_refused_naming_it(finished, tmp_path, capsys, suffix, damage):
    """``hm3 export``: a front point's recipe or path file that was cut or edited is bad input, named."""
    from hm3.cli import main

    run = _copy(finished[0], tmp_path)
    front = pd.read_csv(run / "front.csv")
    row = front[front["file"].str.endswith(suffix)].iloc[0]  # the tiny run's front holds merges only
    file = run / row["file"]
    text = file.read_text()
    if damage == "cut":
        file.write_text(text[: len(text) // 2])
    elif damage == "no hops":
        data = json.loads(text)
        file.write_text(json.dumps(data | {"path": {k: v for k, v in data["path"].items() if k != "hops"}}))
    else:
        file.write_text("[1, 2]\n")
    assert main(["export", str(run), "--point", str(row["point"]), str(tmp_path / "out")]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert str(file) in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["absolute", "up", "symlink"])
def test_export_reads_no_point_file_outside_the_run(finished, tmp_path, capsys, where):
    """front.csv's ``file`` column names a file in the run directory: one that leads out of it (an absolute
    path, ``..``, a symlink) is refused naming the table, the column and the value, and nothing is read."""
    from hm3.cli import main

    run = _copy(finished[0], tmp_path)
    front = pd.read_csv(run / "front.csv")
    row = front.index[front["file"].str.endswith(".yml")][0]
    outside = tmp_path / "elsewhere.yml"
    shutil.copy(run / front.loc[row, "file"], outside)  # a recipe hm3 would merge if it read it
    if where == "symlink":
        (run / "points" / "link.yml").symlink_to(outside)
    value = {"absolute": str(outside), "up": "../elsewhere.yml", "symlink": "points/link.yml"}[where]
    front.loc[row, "file"] = value
    front.to_csv(run / "front.csv", index=False)
    point = str(front.loc[row, "point"])
    assert main(["export", str(run), "--point", point, str(tmp_path / "out"), "-q"]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert str(run / "front.csv") in err and "'file'" in err and value in err and "outside" in err, err
    assert not (tmp_path / "out").exists()


def test_a_path_point_file_missing_an_entry_is_named():
    from hm3.run.export import _path_point_problem

    point = {"path": {"hops": [[0, 0]], "scales": None}, "experts": {"m1": "/m1"}, "frame": "base",
             "frame_recipe": None, "base_model": "/base"}
    assert _path_point_problem(point) is None
    assert "hops" in _path_point_problem(point | {"path": {"scales": None}})
    assert "experts" in _path_point_problem(point | {"experts": ["/m1"]})
    assert "base_model" in _path_point_problem({k: v for k, v in point.items() if k != "base_model"})
    assert "frame_recipe" in _path_point_problem(point | {"frame_recipe": "x"})


@pytest.mark.parametrize("damage", ["not json", "trace not numbers"])
def test_front_refuses_a_damaged_level1_summary_naming_it(finished, tmp_path, capsys, damage):
    """``hm3 front`` (plot and page) draws level 1's hypervolume trace from a two-level run's
    level1/summary.json: a damaged one is refused naming it, not a traceback."""
    from hm3.cli import main

    run = _copy(finished[0], tmp_path)
    damaged = run / "level1" / "summary.json"
    data = json.loads(damaged.read_text())
    assert data["hv_trace_validation"]  # the run has a trace to draw
    damaged.write_text(damaged.read_text()[:40] if damage == "not json"
                       else json.dumps(data | {"hv_trace_validation": ["high", None]}))
    for argv in (["front", str(run)], ["front", str(run), "--html"]):
        assert main(argv) == ExitCode.BAD_INPUT, argv
        err = capsys.readouterr().err
        assert str(damaged) in err and "Traceback" not in err, err
