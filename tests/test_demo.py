"""The embedded default job (README Quick start line 1), run end to end on the micro zoo."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hm3.cli import main
from hm3.demo import DEMO_REQUEST
from hm3.errors import OutputExistsError


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_runs_the_two_level_search_and_answers_a_request(micro_zoo_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--threads", "1"]) == 0  # the default: the shipped zoo
    printed = capsys.readouterr().out
    run = out / "run"
    front = pd.read_csv(run / "front.csv")
    assert len(front) >= 1 and str(front["point"].iloc[0]) in printed  # the table was printed
    assert (run / "front.png").stat().st_size > 0 and (out / "request-model" / "config.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["candidates"] > 30 and len(summary["level2_paths"]) >= 3  # both levels ran
    prefix = f"[demo] answer to --prefer {DEMO_REQUEST}: "
    answer = next(line for line in printed.splitlines() if line.startswith(prefix))
    # a front point's scores are stored measurements, a policy path's an estimate, the posterior's a prediction
    source = answer.removeprefix(prefix).split()[0]
    label = {"front": "measured", "policy": "estimated"}.get(source, "predicted")
    assert f"; {label} validation scores " in answer
    logged = (run / "hm3.log").read_text()  # the run directory keeps its log: the command, then progress
    assert f"hm3 demo --out {out}" in logged and "level 2: pretraining" in logged
    from hm3.demo import run_demo
    from hm3.store import RunStore

    # line 1 of the README again: the same config resumes the finished run, evaluating nothing twice
    with RunStore.open(run, readonly=True) as store:
        before = len(store.evaluations())
    assert main(["demo", "--out", str(out), "--threads", "1"]) == 0
    again = capsys.readouterr()
    assert "resuming the earlier demo run" in again.err and "[demo] answer to --prefer" in again.out
    with RunStore.open(run, readonly=True) as store:
        assert len(store.evaluations()) == before
    assert pd.read_csv(run / "front.csv").equals(front)
    # another config in the same folder is refused before anything is built or run
    with pytest.raises(OutputExistsError, match="another demo config.*--overwrite"):
        run_demo(out, zoo=micro_zoo_dir)  # the same zoo named by its folder is another config


def test_a_folder_of_ones_own_files_is_not_written_into_without_overwrite(tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.yml").write_text("my: own config\n")
    assert main(["demo", "--out", str(out)]) == 3  # refused before anything is evaluated or written
    assert "already exists" in capsys.readouterr().err
    assert (out / "config.yml").read_text() == "my: own config\n" and sorted(p.name for p in out.iterdir()) == [
        "config.yml"]
    assert main(["demo", "--out", str(out / "config.yml")]) == 3  # a file: bad input, not the environment
    assert "is a file" in capsys.readouterr().err


def test_overwrite_replaces_a_config_yml_left_without_a_run(tmp_path, monkeypatch):
    import yaml

    out = tmp_path / "demo"
    out.mkdir()
    (out / "config.yml").write_bytes(b"\xff not: [yaml")  # not UTF-8, not YAML: e.g. a half-written file

    def stop(cfg, run_dir, resume):  # the search itself is not what is tested: stop where it would start
        raise KeyboardInterrupt

    monkeypatch.setattr("hm3.run.two_level.run_two_level", stop)
    assert main(["demo", "--out", str(out)]) == 3  # refused naming it, not a traceback
    assert main(["demo", "--out", str(out), "--overwrite"]) == 130  # replaced, then the search was reached
    assert yaml.safe_load((out / "config.yml").read_text())["zoo"] == "builtin:micro"
