"""The ``hm3`` command's shared behaviour: global flags, --json, exit codes, --set, run logs, --version,
and a library import that leaves the process environment alone."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hm3.cli
from hm3 import __version__
from hm3.cli import Outcome, build_parser, main
from hm3.errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    DeviceError,
    ExitCode,
    MissingExtraError,
    SandboxUnavailableError,
)
from hm3.overrides import apply_overrides, load_config, parse_assignment

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_help_name_the_exit_codes(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hm3 {__version__}"
    assert main(["merge", "--help"]) == 0
    shown = capsys.readouterr().out
    for code in ExitCode:
        assert f"\n  {int(code):<4} " in shown, code


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_flags_work_before_and_after_the_command(where, capsys):
    flags = ["--json", "-q"]
    argv = [*flags, "methods"] if where == "before" else ["methods", *flags]
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = {row["name"]: row for row in json.loads(captured.out)["methods"]}
    assert rows["ties"]["mergekit"] == "ties" and rows["df_merge"]["mergekit"] is None
    assert captured.err == ""


def test_methods_lists_each_with_its_equation_and_reference(capsys):
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "(mergekit: slerp)" in lines["slerp"] and "sin((1−t)Ω)" in lines["slerp"]
    assert lines["slerp"].endswith("[https://en.wikipedia.org/wiki/Slerp]")
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["methods"]
    assert all(row["doc"] for row in rows)
    assert [row["name"] for row in rows if not row["reference"]] == ["df_merge"]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("bad key"), ExitCode.BAD_INPUT),
        (CheckpointError("truncated"), ExitCode.BAD_INPUT),
        (BackendError("non-finite logits"), ExitCode.EVALUATION_FAILED),
        (MissingExtraError("needs pymoo"), ExitCode.ENVIRONMENT),
        (DeviceError("no CUDA"), ExitCode.ENVIRONMENT),
        (SandboxUnavailableError("no unshare"), ExitCode.ENVIRONMENT),
        (OSError(28, "No space left on device"), ExitCode.ENVIRONMENT),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED),
    ],
)
def test_each_kind_of_failure_has_its_exit_code_and_one_line(error, code, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(hm3.cli, "cmd_methods", fail)
    assert main(["methods"]) == code
    err = capsys.readouterr().err
    assert err.startswith("hm3: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    assert main(["merge"]) == ExitCode.USAGE
    assert main(["no-such-command"]) == ExitCode.USAGE
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["methods", "--no-such-flag"], ["eval", "m", "--objectives", "x", "--threads", "0"],
                                  ["search"], ["no-such-command"], []])
def test_json_usage_errors_are_json_too(argv, capsys):
    """A program reading ``--json`` output gets JSON for a usage error as for every other failure; a
    person gets argparse's usage text on stderr either way, and no JSON without ``--json``."""
    assert main([*argv, "--json"]) == ExitCode.USAGE
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["exit_code"] == ExitCode.USAGE and result["error"] and "usage:" in captured.err
    assert main(argv) == ExitCode.USAGE
    captured = capsys.readouterr()
    assert "usage:" in captured.err + captured.out and not captured.out.startswith("{")


def test_a_file_in_the_way_of_an_output_path_is_bad_input(tmp_path, capsys):
    """A path the user gave that cannot be used (a file where a folder must be) is bad input (3), named;
    not the environment (5)."""
    (tmp_path / "afile").write_text("mine\n")
    dest = tmp_path / "afile" / "zoo"
    assert main(["zoo", "copy", "micro", str(dest), "--json"]) == ExitCode.BAD_INPUT
    captured = capsys.readouterr()
    assert json.loads(captured.out)["exit_code"] == ExitCode.BAD_INPUT
    assert str(dest) in captured.err and "afile is a file, not a folder" in captured.err, captured.err
    assert (tmp_path / "afile").read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("command", [["merge"], ["export-mergekit"], ["run"]])
def test_a_folder_given_as_a_config_is_named_as_a_folder(command, tmp_path, capsys):
    rest = {"merge": [str(tmp_path / "out")], "export-mergekit": ["-"], "run": [str(tmp_path / "out")]}
    assert main([*command, str(tmp_path), *rest[command[0]], "--json"]) == ExitCode.BAD_INPUT
    error = json.loads(capsys.readouterr().out)["error"]
    assert str(tmp_path) in error and "a folder, not a config file" in error, error


def test_eval_log_samples_under_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine\n")
    folder = tmp_path / "afile" / "samples"
    argv = ["eval", str(tmp_path / "no-model"), "--objectives", "zoo:math", "--log-samples", str(folder)]
    assert main(argv) == ExitCode.BAD_INPUT  # the missing model would be found only after this check
    err = capsys.readouterr().err
    assert str(folder) in err and "afile is a file, not a folder" in err, err


@pytest.mark.parametrize(("where", "code"), [("given", ExitCode.BAD_INPUT), ("inside", ExitCode.BAD_INPUT),
                                             ("beside", ExitCode.BAD_INPUT), ("elsewhere", ExitCode.ENVIRONMENT)])
def test_a_permission_error_is_bad_input_only_on_a_path_the_user_gave(where, code, tmp_path, monkeypatch, capsys):
    import errno

    given = tmp_path / "out"
    denied = {"given": given, "inside": given / "sub" / "x.json", "beside": tmp_path / ".out.tmp-1-abcd1234",
              "elsewhere": tmp_path / "cache" / "x"}[where]

    def fail(args):
        raise PermissionError(errno.EACCES, "Permission denied", str(denied))

    monkeypatch.setattr(hm3.cli, "cmd_zoo_copy", fail)
    assert main(["zoo", "copy", "micro", str(given)]) == code
    err = capsys.readouterr().err
    assert err.startswith("hm3: error: ") and str(denied) in err and "Permission denied" in err, err


def test_json_output_of_a_result_with_numpy_values(monkeypatch, capsys):
    import numpy as np

    monkeypatch.setattr(hm3.cli, "cmd_methods",
                        lambda args: Outcome("text", {"hv": np.float64(0.5), "ids": np.arange(2), "p": Path("/x")}))
    assert main(["methods", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"hv": 0.5, "ids": [0, 1], "p": "/x"}


@pytest.mark.parametrize(("flags", "info", "debug"), [([], True, False), (["-q"], False, False),
                                                     (["-v"], True, True)])
def test_verbosity_flags_choose_what_reaches_stderr(flags, info, debug, monkeypatch, capsys):
    def talk(args):
        logging.getLogger("hm3.test").info("an info line")
        logging.getLogger("hm3.test").debug("a debug line")
        logging.getLogger("hm3.test").warning("a warning line")
        return Outcome("done")

    monkeypatch.setattr(hm3.cli, "cmd_methods", talk)
    assert main(["methods", *flags]) == 0
    captured = capsys.readouterr()
    assert captured.out == "done\n"
    assert ("[hm3] an info line" in captured.err) == info and ("a debug line" in captured.err) == debug
    assert "hm3: warning: a warning line" in captured.err


def _two_level_yaml(tmp_path: Path) -> Path:
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"zoo": "not-a-zoo", "optimizer": {"name": "random", "budget": 4},
                                   "level2": {"preferences": 2}}))
    return cfg


def test_set_overrides_a_config_without_changing_its_file(micro_zoo_dir, tmp_path):
    from hm3.run.config import parse_two_level_config

    cfg = _two_level_yaml(tmp_path)
    before = cfg.read_text()
    args = build_parser().parse_args(["run", str(cfg), str(tmp_path / "run"), "--set", f"zoo={micro_zoo_dir}",
                                      "--set", "level2.rl.t_max=3", "--set", "optimizer.budget=6"])
    loaded = load_config(args.config, parse_two_level_config, sets=args.set)
    assert loaded.level2.rl.t_max == 3 and loaded.level1.optimizer.budget == 6
    assert Path(loaded.level1.models["base"]) == micro_zoo_dir / "base"
    assert cfg.read_text() == before


def test_a_bad_set_is_refused_naming_it(micro_zoo_dir, tmp_path, capsys):
    cfg = _two_level_yaml(tmp_path)
    run = tmp_path / "run"
    assert main(["run", str(cfg), str(run), "--set", f"zoo={micro_zoo_dir}", "--set", "level2.colour=red"]) == 3
    err = capsys.readouterr().err
    assert "(with --set" in err and "level2.colour: unknown key" in err
    assert main(["run", str(cfg), str(run), "--set", "optimizer"]) == 3
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["run", str(cfg), str(run), "--set", "optimizer.name.x=1"]) == 3
    assert "optimizer.name is a str, not a section" in capsys.readouterr().err
    assert not run.exists()  # refused before the run directory was made: no log file either


@pytest.mark.parametrize("preferences", ["[[1.0]]", "0"])
def test_bad_preferences_are_refused_naming_the_file_and_the_key(micro_zoo_dir, tmp_path, capsys, preferences):
    cfg = _two_level_yaml(tmp_path)
    run = tmp_path / "run"
    assert main(["run", str(cfg), str(run), "--set", f"zoo={micro_zoo_dir}",
                 "--set", f"level2.preferences={preferences}"]) == 3
    err = capsys.readouterr().err
    assert str(cfg) in err and "level2.preferences" in err
    assert not run.exists()


def test_a_config_read_from_a_relative_path_records_its_models_absolute(micro_zoo_dir, tmp_path, monkeypatch):
    """The recorded config names the run's models for every later resume and reader (``hm3 front``, ``export``,
    ``request``), which may run from another folder: a path relative to the CWD would name other files there.
    A run that recorded relative paths (from its CWD) still resumes from that CWD."""
    from hm3.run.config import stored_form
    from hm3.run.directory import open_run_store
    from hm3.search.run_config import parse_run_config

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "zoo").symlink_to(micro_zoo_dir)
    (tmp_path / "configs" / "cfg.yml").write_text("zoo: zoo\nsearch_space: {}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/cfg.yml", parse_run_config)
    assert cfg.models and all(Path(p).is_absolute() for p in cfg.models.values())
    assert Path(cfg.models["base"]) == tmp_path / "configs" / "zoo" / "base"
    recorded = parse_run_config(cfg.model_dump() | {"models": {
        ref: os.path.relpath(p) for ref, p in cfg.models.items()}})  # as a run of an earlier hm3 recorded it
    with open_run_store(tmp_path / "run", stored_form(recorded), 0, resume=False):
        pass
    with open_run_store(tmp_path / "run", stored_form(cfg), 0, resume=True):
        pass
    moved = cfg.model_dump() | {"models": cfg.models | {"base": str(tmp_path / "configs" / "zoo" / "math")}}
    with pytest.raises(ConfigError, match="differing keys"):
        open_run_store(tmp_path / "run", stored_form(parse_run_config(moved)), 0, resume=True)


def test_an_unknown_optimizer_is_refused_naming_the_file_and_the_key(micro_zoo_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"zoo": str(micro_zoo_dir), "optimizer": {"name": "bo-moo"}}))
    run = tmp_path / "run"
    assert main(["search", "param", str(cfg), str(run)]) == 3
    err = capsys.readouterr().err
    assert str(cfg) in err and "optimizer.name: unknown optimizer 'bo-moo'; known: bo-mo" in err
    assert not run.exists()


@pytest.mark.parametrize(("change", "mentions"), [
    ({"search_space": ["m1"]}, "search_space: Input should be a valid dictionary"),
    ({"search_space": "dare"}, "search_space: Input should be a valid dictionary"),
    ({"zoo": None}, "zoo: a zoo folder or builtin:NAME, got None"),
    ({"zoo": 5}, "zoo: a zoo folder or builtin:NAME, got 5"),
    ({"zoo": "not-a-zoo"}, "zoo: "),
])
def test_a_zoo_config_of_the_wrong_shape_is_refused_naming_the_file_and_the_key(micro_zoo_dir, tmp_path, capsys,
                                                                                change, mentions):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"zoo": str(micro_zoo_dir), "search_space": {}} | change))
    run = tmp_path / "run"
    assert main(["search", "param", str(cfg), str(run)]) == 3
    err = capsys.readouterr().err
    assert f"{cfg}" in err and mentions in err
    assert not run.exists()


def test_a_zoo_fills_only_what_agrees_with_the_keys_given(micro_zoo_dir):
    """A search over some of a zoo's experts, or for some of its objectives, needs no `experts:` written out:
    the zoo's fill-ins follow the keys given."""
    from hm3.search.run_config import parse_run_config

    some = parse_run_config({"zoo": str(micro_zoo_dir), "search_space": {"models": ["math", "code"]}}, source="c.yml")
    assert some.experts == {"math": "zoo:math", "code": "zoo:code"} and len(some.objectives) == 3
    two = parse_run_config({"zoo": str(micro_zoo_dir), "objectives": ["zoo:math", "zoo:code"]}, source="c.yml")
    assert two.search_space.models == ["math", "code"] and two.experts == some.experts


@pytest.mark.parametrize("key", ["level2.rl.rmm_back_penalty", "level2.rl.beta1", "level2.rl.max_grad_norm",
                                 "evaluation.resources_per_worker.num_cpus"])
@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_a_setting_that_is_not_a_finite_number_is_refused_naming_it(micro_zoo_dir, key, value):
    """A NaN or infinite reward, penalty or resource would spoil a run without an error."""
    from hm3.run.config import parse_two_level_config

    data = {"zoo": str(micro_zoo_dir), "evaluation": {"executor": "ray"}}
    with pytest.raises(ConfigError, match=rf"c\.yml: invalid run config:\n  {key}: Input should be a finite"):
        parse_two_level_config(apply_overrides(data, [parse_assignment(f"{key}={value}")]), source="c.yml")


@pytest.mark.parametrize("key", ["weight_bounds", "density_bounds"])
@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_a_search_bound_that_is_not_finite_is_refused_naming_it(micro_zoo_dir, key, value):
    """A NaN bound passes every range comparison: the search would decode NaN weights or densities."""
    from hm3.search.run_config import parse_run_config

    data = apply_overrides({"zoo": str(micro_zoo_dir)}, [parse_assignment(f"search_space.{key}=[{value}, 1]")])
    with pytest.raises(ConfigError, match=rf"c\.yml: invalid run config:\n  search_space: {key} \[.*\] must be finite"):
        parse_run_config(data, source="c.yml")


def test_fisher_weighting_on_vllm_is_refused_before_the_run_directory_is_made(micro_zoo_dir, tmp_path, capsys):
    """Fisher tensors need gradients through the live hf model: refused from the config, not once the run's
    store exists (a RUN_DIR holding a store the corrected config could neither start anew nor resume)."""
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"zoo": str(micro_zoo_dir), "search_space": {"fisher": True, "dare": False},
                                   "evaluation": {"backend": "vllm"}}))
    run = tmp_path / "run"
    assert main(["search", "param", str(cfg), str(run)]) == 3
    err = capsys.readouterr().err
    assert f"{cfg}: invalid run config" in err and "fisher: true needs evaluation.backend: hf" in err
    assert not run.exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_run_refused_while_its_session_opens_leaves_no_run_behind(micro_zoo_dir, tmp_path, capsys, existing):
    """An objective that does not resolve is found once the run's store exists: a store left behind, recording
    the bad config, would make the corrected config refused in that RUN_DIR (neither new nor a resume)."""
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"zoo": str(micro_zoo_dir), "objectives": ["nosuch-objective"],
                                   "optimizer": {"name": "random", "budget": 2}}))
    run = tmp_path / "run"
    if existing:
        run.mkdir()
    assert main(["search", "param", str(cfg), str(run)]) == 3
    assert "unknown objective 'nosuch-objective'" in capsys.readouterr().err
    assert run.exists() == existing and (not existing or not any(run.iterdir()))


def test_a_key_given_twice_in_a_run_config_is_refused_naming_it(micro_zoo_dir, tmp_path, capsys):
    """YAML keeps the last of two equal keys: the first section (here the evaluation's test_examples) would be
    dropped without a word."""
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"zoo: {micro_zoo_dir}\nevaluation: {{test_examples: 100}}\noptimizer: {{budget: 4}}\n"
                   "evaluation: {validation_examples: 8}\n")
    run = tmp_path / "run"
    assert main(["search", "param", str(cfg), str(run)]) == 3
    err = capsys.readouterr().err
    assert f"{cfg}: not valid YAML" in err and "'evaluation' is given twice (first on line 2)" in err and "line 4" in err
    assert not run.exists()
    from hm3.search.run_config import read_config_file

    cfg.write_text("common: &c {batch_size: 8, test_examples: 10}\nevaluation:\n  <<: *c\n  batch_size: 4\n")
    assert read_config_file(cfg)["evaluation"] == {"batch_size": 4, "test_examples": 10}  # a merge key overridden


def test_the_run_log_waits_for_the_run_store_and_keeps_every_record(tmp_path):
    from hm3.log import LOG_FILE, configure, run_log
    from hm3.store import STORE_FILE

    configure(-1)  # the console shows warnings only: the file still gets info and debug
    logger = logging.getLogger("hm3.test")
    with run_log(tmp_path / "refused", first="hm3 run a b"):
        logger.info("checking the config")
    assert not (tmp_path / "refused").exists()  # a command refused before its run: nothing written
    run = tmp_path / "run"
    with run_log(run, first="hm3 run a b"):
        logger.info("before the store")
        run.mkdir()
        (run / STORE_FILE).touch()
        logger.debug("after the store")
    with run_log(run, first="hm3 run a b --resume"):
        logger.warning("resumed")
    lines = (run / LOG_FILE).read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "hm3 run a b", "before the store", "after the store", "hm3 run a b --resume", "resumed"]
    configure(0)


def test_the_run_log_outlives_a_logging_reconfiguration_mid_run(tmp_path):
    """vLLM calls ``logging.config.dictConfig`` when it is imported, which closes every handler there is:
    the run log must keep the records after that, and closing it at the end must not fail."""
    import logging.config

    from hm3.log import LOG_FILE, configure, run_log
    from hm3.store import STORE_FILE

    configure(-1)
    logger = logging.getLogger("hm3.test")
    run = tmp_path / "run"
    run.mkdir()
    (run / STORE_FILE).touch()
    with run_log(run, first="hm3 search param c r"):
        logger.info("before the engine")
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
        logger.info("after the engine")
    lines = (run / LOG_FILE).read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "hm3 search param c r", "before the engine", "after the engine"]
    configure(0)


def test_a_library_import_leaves_the_environment_alone_and_the_command_sets_openmp():
    code = ("import os, sys\nimport hm3, hm3.cli, hm3.merge.engine, hm3.search.level1\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))\nhm3.cli.main(['methods', '-q', '--json'])\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "None" and proc.stderr.strip().endswith("PASSIVE")


@pytest.mark.parametrize("command", [["merge"], ["export-mergekit"], ["search", "param"], ["run"], ["check"]])
def test_a_config_file_that_is_not_text_is_refused_naming_it(command, tmp_path, capsys):
    config = tmp_path / "config.yml"
    config.write_bytes(b"\xff\xfe models: [\x00]\n")  # e.g. a UTF-16 file or a binary saved as .yml
    out = tmp_path / "out"
    rest = {"merge": [str(out)], "export-mergekit": ["-"], "search": [str(out)], "run": [str(out)], "check": []}
    assert main([*command, str(config), *rest[command[0]], "--json"]) == ExitCode.BAD_INPUT
    captured = capsys.readouterr()
    assert str(config) in captured.err + captured.out and "UTF-8" in captured.err + captured.out
    assert not out.exists()


def test_json_output_of_a_failure_is_json_naming_it(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.yml"
    for argv, code, says in ((["merge", str(missing), str(tmp_path / "out")], ExitCode.BAD_INPUT, str(missing)),
                             (["run", str(missing)], ExitCode.USAGE, "RUN_DIR is required")):
        assert main([*argv, "--json"]) == code
        captured = capsys.readouterr()
        result = json.loads(captured.out)
        assert result["exit_code"] == code and says in result["error"] and says in captured.err
    monkeypatch.setattr(hm3.cli, "cmd_methods", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["methods", "--json"]) == ExitCode.INTERRUPTED
    assert json.loads(capsys.readouterr().out) == {"error": "interrupted", "exit_code": 130}
    assert main(["run", str(missing)]) == ExitCode.USAGE and capsys.readouterr().out == ""  # no --json: no stdout


@pytest.mark.parametrize(
    ("text", "parts", "value"),
    [
        ("optimizer.budget=40", ("optimizer", "budget"), 40),
        ('models."qwen2.5-math"=/models/q', ("models", "qwen2.5-math"), "/models/q"),
        ('"a=b".c=x=y', ("a=b", "c"), "x=y"),
        (' optimizer . budget =7', ("optimizer", "budget"), 7),
        ('models."".x=1', ("models", "", "x"), 1),
        ('models. "qwen2.5" = /new', ("models", "qwen2.5"), "/new"),  # spaces outside the quotes: not the key's
        ('models." qwen 2.5 ".x=1', ("models", " qwen 2.5 ", "x"), 1),
        ("zoo=", ("zoo",), ""),
    ],
)
def test_a_set_key_splits_at_dots_outside_double_quotes(text, parts, value):
    assert parse_assignment(text) == (parts, value)


@pytest.mark.parametrize("text", ["optimizer", "=1", "a..b=1", "a.=1", '"a.b=1', 'a"b".c=1', '"a"b.c=1', ".a=1",
                                  '"a""b".c=1', '"a" "b".c=1'])
def test_a_set_key_that_is_not_a_dotted_path_is_refused(text):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignment(text)


def test_a_set_reaches_a_model_whose_name_holds_a_dot(tmp_path):
    """A model ref such as qwen2.5 is a key with a dot: quoted, --set changes that model, not a section qwen2."""
    data = {"models": {"qwen2.5": "/old", "base": "/b"}}
    out = apply_overrides(data, [parse_assignment('models."qwen2.5"=/new')])
    assert out == {"models": {"qwen2.5": "/new", "base": "/b"}} and data["models"]["qwen2.5"] == "/old"
    with pytest.raises(ConfigError, match=r'--set models\."qwen2\.5"\.x: models\."qwen2\.5" is a str'):
        apply_overrides(data, [parse_assignment('models."qwen2.5".x=1')])
