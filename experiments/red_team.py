"""Re-measure how hm3 handles bad inputs and faults, through its real CLI.

Each case is a small function that prepares one bad input or fault in a scratch copy of a tiny lab
(models, a finished level-1 search and two-level run, a recipe; built here, nothing downloaded) and
returns the ``hm3`` command to run on it, with what must hold afterwards. Every case is judged on:

* **exit**: non-zero (or, for cases whose right answer is a result, zero);
* **message**: exactly one error line (``hm3: error:``, or argparse's ``hm3 COMMAND: error:`` after the usage
  block that a command-line mistake gets, exit 2) or the expected warning/answer, and no traceback;
* **nothing lost**: the hashes of every protected file are unchanged;
* **nothing left behind**: no hidden staging directory or temporary file, no half-written output;
* **no code run**: a pickle gadget's marker file was never created.

A case is *handled* when all of its checks hold. The table goes to stdout and everything to
``experiments/results/red_team_DATE_COMMIT.json`` (date, git commit, machine, command). To add cases (e.g. the
sandbox's fake passes and escapes), append functions with :func:`case`; each gets a :class:`Lab`.

    python experiments/red_team.py [--out FILE] [--only SUBSTRING]  (with --only: label `only`)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import harness
import torch
import yaml

REPO = harness.REPO
sys.path.insert(0, str(REPO))  # the tests' tiny-model and pickle-gadget helpers
from tests.gadgets import plant  # noqa: E402

_STAGING = re.compile(r"^\..+\.(tmp|old|frame)-|\.tmp$|\.building$")
_SIDE_FILES = ("hm3.sqlite-wal", "hm3.sqlite-shm", "hm3.lock")


# --- the lab: tiny models and finished runs, built once ---------------------------------------------


@dataclass
class Lab:
    root: Path
    models: dict[str, Path]
    objectives: list[str]
    recipe: Path
    level1_cfg: Path
    two_level_cfg: Path
    level1_run: Path
    two_level_run: Path
    no_tokenizer: Path

    def scratch(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root / "cases"))
        return path

    def copy_run(self, which: str, into: Path) -> Path:
        src = self.level1_run if which == "level1" else self.two_level_run
        dst = into / "run"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("hm3.lock"))
        return dst


def build_lab(root: Path) -> Lab:
    from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
    from hm3.run.config import parse_two_level_config
    from hm3.run.two_level import run_two_level
    from hm3.search.level1 import run_level1
    from hm3.search.run_config import parse_run_config
    from tests.conftest import _questions
    from tests.eval.tiny_lm import build_tiny_lm

    (root / "cases").mkdir(parents=True)
    base = build_tiny_lm(root / "models" / "base", seed=0)
    models = {"base": base}
    for i in (1, 2):
        models[f"m{i}"] = build_finetuned_variant(base, root / "models" / f"m{i}", seed=i, scale=0.5)
    objectives = [f"choice:{_questions(root / f'q{s}.jsonl', s)}" for s in (1, 2)]
    level1 = {
        "models": {k: str(v) for k, v in models.items()}, "objectives": objectives,
        "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False},
        "optimizer": {"name": "random", "budget": 4},
        "evaluation": {"validation_examples": 8, "test_examples": 8, "batch_size": 16}, "seed": 1,
    }
    two_level = level1 | {"level2": {"preferences": 2, "rl": {
        "offline_episodes": 8, "online_episodes": 4, "episodes_per_update": 4, "epochs": 2, "data_scale": 0.5}}}
    (root / "level1.yml").write_text(yaml.safe_dump(level1))
    (root / "two_level.yml").write_text(yaml.safe_dump(two_level))
    run_level1(parse_run_config(level1), root / "runs" / "level1", progress=False)
    run_two_level(parse_two_level_config(two_level), root / "runs" / "two_level", progress=False)
    recipe = root / "recipes" / "ties.yml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(models[m]), "parameters": {"weight": 0.5, "density": 0.5}} for m in ("m1", "m2")],
    }))
    no_tok = build_random_llama(root / "models" / "no_tokenizer", hidden_size=32, num_layers=2, vocab_size=64,
                                seed=5)
    return Lab(root, models, objectives, recipe, root / "level1.yml", root / "two_level.yml", root / "runs" / "level1",
               root / "runs" / "two_level", no_tok)


# --- cases ------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One command and what must hold after it."""

    argv: list[str]
    protect: list[Path] = field(default_factory=list)  # files/dirs whose content must not change
    watch: list[Path] = field(default_factory=list)  # dirs that must hold no staging/temporary leftovers
    absent: list[Path] = field(default_factory=list)  # must not exist afterwards (no half output)
    marker: Path | None = None  # a pickle gadget's marker: must never appear
    expect: str = "refuse"  # "refuse"; "ok" (exit 0); or a substring stdout/stderr must hold with exit 0
    python: str | None = None  # run this Python wrapper around hm3's main instead of the plain CLI


@dataclass
class Case:
    name: str
    group: str
    make: Callable[[Lab, Path], Trial]


CASES: list[Case] = []


def case(group: str) -> Callable[[Callable[[Lab, Path], Trial]], Callable[[Lab, Path], Trial]]:
    def register(fn: Callable[[Lab, Path], Trial]) -> Callable[[Lab, Path], Trial]:
        CASES.append(Case(fn.__name__, group, fn))
        return fn

    return register


def _request(lab: Lab, run: Path, out: Path, prefer: str | None = None) -> list[str]:
    """``hm3 request`` of ``run``, by default for the first objective: by its full name, since the lab's two
    objectives are both ``choice:...`` and their short name names neither."""
    return ["request", str(run), "--prefer", prefer or f"{lab.objectives[0]}=1", str(out), "--quiet"]


def _gadget_request(lab: Lab, tmp: Path, which: str, stem: str, suffix: str) -> Trial:
    run = lab.copy_run(which, tmp)
    (run / f"{stem}.safetensors").unlink()
    marker = tmp / "pwned"
    plant(run / f"{stem}{suffix}", marker)
    return Trial(_request(lab, run, tmp / "out"), protect=[run], watch=[tmp], absent=[tmp / "out"], marker=marker)


for _which, _stem, _suffix in [("two_level", "level1/posterior", ".pt"),
                               ("two_level", "level1/posterior", ".safetensors"),  # a pickle renamed
                               ("two_level", "level2/policy", ".pt"),
                               ("two_level", "level2/policy", ".safetensors"),
                               ("level1", "posterior", ".pt")]:
    CASES.append(Case(f"gadget_{_which}_{_stem.replace('/', '_')}{_suffix.replace('.', '_')}_on_request", "gadget",
                      partial(_gadget_request, which=_which, stem=_stem, suffix=_suffix)))


def _gadget_resume(lab: Lab, tmp: Path, stem: str) -> Trial:
    run = lab.copy_run("two_level", tmp)
    (run / "level2" / f"{stem}.safetensors").unlink()
    marker = tmp / "pwned"
    plant(run / "level2" / f"{stem}.pt", marker)
    return Trial(["run", str(lab.two_level_cfg), str(run), "--resume", "--quiet"], protect=[run], watch=[tmp],
                 marker=marker)


@case("gadget")
def gadget_pretrain_checkpoint_on_resume(lab: Lab, tmp: Path) -> Trial:
    return _gadget_resume(lab, tmp, "pretrain")


@case("gadget")
def gadget_online_checkpoint_on_resume(lab: Lab, tmp: Path) -> Trial:
    return _gadget_resume(lab, tmp, "online-0")


def _changed_level1_cfg(lab: Lab, tmp: Path) -> Path:
    data = yaml.safe_load(lab.level1_cfg.read_text())
    data["optimizer"]["budget"] = 5
    path = tmp / "changed.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _damaged_store(lab: Lab, tmp: Path, damage: Callable[[Path], None], cfg: Path | None = None) -> Trial:
    run = lab.copy_run("level1", tmp)
    damage(run / "hm3.sqlite")
    return Trial(["search", "param", str(cfg or lab.level1_cfg), str(run), "--resume", "--quiet"], protect=[run],
                 watch=[run])


def _truncate(store: Path) -> None:
    for side in ("-wal", "-shm"):
        Path(f"{store}{side}").unlink(missing_ok=True)
    store.write_bytes(b"")


def _sql(statement: str) -> Callable[[Path], None]:
    def run(store: Path) -> None:
        conn = sqlite3.connect(store)
        with conn:
            conn.execute(statement)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the damage in the main file, as a copy would hold it
        conn.close()

    return run


@case("store")
def zero_byte_store_resumed_with_a_changed_config(lab: Lab, tmp: Path) -> Trial:
    return _damaged_store(lab, tmp, _truncate, _changed_level1_cfg(lab, tmp))


@case("store")
def zero_byte_store_two_level_resume(lab: Lab, tmp: Path) -> Trial:
    run = lab.copy_run("two_level", tmp)
    _truncate(run / "hm3.sqlite")
    return Trial(["run", str(lab.two_level_cfg), str(run), "--resume", "--quiet"], protect=[run], watch=[run])


@case("store")
def zero_byte_store_request(lab: Lab, tmp: Path) -> Trial:
    run = lab.copy_run("two_level", tmp)
    _truncate(run / "hm3.sqlite")
    return Trial(_request(lab, run, tmp / "out"), protect=[run], watch=[tmp], absent=[tmp / "out"])


@case("store")
def garbage_store_file(lab: Lab, tmp: Path) -> Trial:
    return _damaged_store(lab, tmp, lambda p: p.write_bytes(b"not a database" * 300))


STORE_DAMAGE = {
    "malformed_schema_version": "UPDATE meta SET value='one' WHERE key='schema_version'",
    "newer_schema_version": "UPDATE meta SET value='99' WHERE key='schema_version'",
    "event_missing_a_field": "UPDATE events SET payload_json='{\"candidate\": 1}' WHERE kind='level1_tell'",
    "event_payload_not_json": "UPDATE events SET payload_json='{oops' WHERE kind='level1_tell'",
}
for _name, _statement in STORE_DAMAGE.items():
    CASES.append(Case(_name, "store", lambda lab, tmp, statement=_statement: _damaged_store(lab, tmp, _sql(statement))))


@case("store")
def store_deleted_new_run_over_outputs(lab: Lab, tmp: Path) -> Trial:
    run = lab.copy_run("level1", tmp)
    for f in run.glob("hm3.sqlite*"):
        f.unlink()
    return Trial(["search", "param", str(lab.level1_cfg), str(run), "--quiet"], protect=[run], watch=[run])


# --- --overwrite and outputs --------------------------------------------------------------------------


def _merge(lab: Lab, out: Path, *flags: str) -> Trial:
    return Trial(["merge", str(lab.recipe), str(out), *flags], protect=[lab.root / "models", lab.recipe],
                 watch=[lab.root / "models", lab.recipe.parent, out.parent])


@case("overwrite")
def merge_over_its_base_model(lab: Lab, tmp: Path) -> Trial:
    return _merge(lab, lab.models["base"], "--overwrite")


@case("overwrite")
def merge_over_its_base_model_forced(lab: Lab, tmp: Path) -> Trial:
    return _merge(lab, lab.models["base"], "--overwrite", "--force")


@case("overwrite")
def merge_into_its_base_model(lab: Lab, tmp: Path) -> Trial:
    trial = _merge(lab, lab.models["base"] / "sub", "--force")
    trial.absent.append(lab.models["base"] / "sub")
    return trial


@case("overwrite")
def merge_over_the_parent_of_its_models(lab: Lab, tmp: Path) -> Trial:
    return _merge(lab, lab.root / "models", "--overwrite", "--force")


@case("overwrite")
def merge_over_a_symlink_to_its_base(lab: Lab, tmp: Path) -> Trial:
    (tmp / "link").symlink_to(lab.models["base"])
    return _merge(lab, tmp / "link", "--overwrite", "--force")


@case("overwrite")
def merge_over_the_recipes_directory(lab: Lab, tmp: Path) -> Trial:
    return _merge(lab, lab.recipe.parent, "--overwrite", "--force")


@case("overwrite")
def merge_overwrite_onto_a_foreign_directory(lab: Lab, tmp: Path) -> Trial:
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    trial = _merge(lab, mine, "--overwrite")
    trial.protect.append(mine)
    return trial


@case("overwrite")
def export_mergekit_over_its_recipe(lab: Lab, tmp: Path) -> Trial:
    return Trial(["export-mergekit", str(lab.recipe), str(lab.recipe), "--overwrite"], protect=[lab.recipe],
                 watch=[lab.recipe.parent])


@case("overwrite")
def request_over_its_run_directory(lab: Lab, tmp: Path) -> Trial:
    run = lab.copy_run("two_level", tmp)
    return Trial([*_request(lab, run, run), "--overwrite", "--force"], protect=[run], watch=[tmp, run])


@case("overwrite")
def request_over_a_model_of_the_run(lab: Lab, tmp: Path) -> Trial:
    return Trial([*_request(lab, lab.two_level_run, lab.models["m1"]), "--overwrite", "--force"],
                 protect=[lab.root / "models"], watch=[lab.root / "models"])


@case("overwrite")
def request_overwrite_onto_a_foreign_directory(lab: Lab, tmp: Path) -> Trial:
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    return Trial([*_request(lab, lab.two_level_run, mine), "--overwrite"], protect=[mine], watch=[tmp])


@case("overwrite")
def export_over_its_run_directory(lab: Lab, tmp: Path) -> Trial:
    run = lab.copy_run("two_level", tmp)
    point = (run / "front.csv").read_text().splitlines()[1].split(",")[0]
    return Trial(["export", str(run), "--point", point, str(run / "level2"), "--overwrite", "--force"],
                 protect=[run], watch=[tmp, run])


@case("overwrite")
def zoo_build_overwrite_onto_a_foreign_directory(lab: Lab, tmp: Path) -> Trial:
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2,3\n")
    return Trial(["zoo", "build", str(mine), "--overwrite"], protect=[mine], watch=[tmp])


@case("overwrite")
def demo_overwrite_onto_a_foreign_directory(lab: Lab, tmp: Path) -> Trial:
    mine = tmp / "mine"
    (mine / "run").mkdir(parents=True)
    (mine / "paper.pdf").write_text("%PDF")
    return Trial(["demo", "--out", str(mine), "--zoo", str(tmp / "zoo"), "--overwrite"], protect=[mine],
                 watch=[tmp], absent=[tmp / "zoo"])


@case("overwrite")
def stale_staging_of_a_killed_merge_is_removed(lab: Lab, tmp: Path) -> Trial:
    """A writer killed with ``kill -9`` mid-write; the next merge to that output must clean up."""
    out = tmp / "merged"
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom hm3.checkpoint.writer import StagedDirectory\n"
         "s = StagedDirectory(sys.argv[1]); (s.tmp / 'x.safetensors').write_bytes(b'0' * 100000)\n"
         "print(s.tmp, flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True, env=_env())
    child.stdout.readline()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return Trial(["merge", str(lab.recipe), str(out)], protect=[lab.root / "models"], watch=[tmp], expect="ok")


# --- flags and values -----------------------------------------------------------------------------------


def _flag(lab: Lab, tmp: Path, *flags: str) -> Trial:
    trial = _merge(lab, tmp / "out", *flags)
    trial.absent.append(tmp / "out")
    return trial


@case("flags")
def merge_device_cuda_without_cuda(lab: Lab, tmp: Path) -> Trial:
    return _flag(lab, tmp, "--device", "cuda" if not torch.cuda.is_available() else "cuda:99")


@case("flags")
def merge_device_bogus(lab: Lab, tmp: Path) -> Trial:
    return _flag(lab, tmp, "--device", "bogus")


@case("flags")
def merge_threads_minus_one(lab: Lab, tmp: Path) -> Trial:
    return _flag(lab, tmp, "--threads", "-1")


@case("flags")
def merge_threads_minus_two(lab: Lab, tmp: Path) -> Trial:
    return _flag(lab, tmp, "--threads", "-2")


@case("flags")
def request_threads_zero(lab: Lab, tmp: Path) -> Trial:
    return Trial([*_request(lab, lab.two_level_run, tmp / "out"), "--threads", "0"], watch=[tmp], absent=[tmp / "out"])


@case("flags")
def prefer_weights_overflowing(lab: Lab, tmp: Path) -> Trial:
    """Must be answered with λ = (0.5, 0.5) -- before, the sum overflowed and λ was 0."""
    prefer = f"{lab.objectives[0]}=1e308,{lab.objectives[1]}=1e308"
    return Trial(_request(lab, lab.two_level_run, tmp / "out", prefer), protect=[lab.two_level_run], watch=[tmp],
                 expect="=0.500, ")


# --- damaged run files ----------------------------------------------------------------------------------


def _damaged_file(lab: Lab, tmp: Path, rel: str, damage: Callable[[Path], None], command: str = "request") -> Trial:
    run = lab.copy_run("two_level", tmp)
    damage(run / rel)
    argv = _request(lab, run, tmp / "out") if command == "request" else ["front", str(run)]
    return Trial(argv, protect=[run], watch=[tmp, run], absent=[tmp / "out"])


def _cut(n: int) -> Callable[[Path], None]:
    """Keep the first ``n`` bytes (or drop the last ``-n``): a copy or download cut short."""
    return lambda p: p.write_bytes(p.read_bytes()[:n])


def _drop_last_row(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


@case("run files")
def summary_json_truncated_request(lab: Lab, tmp: Path) -> Trial:
    return _damaged_file(lab, tmp, "summary.json", _cut(60))


@case("run files")
def summary_json_truncated_front(lab: Lab, tmp: Path) -> Trial:
    return _damaged_file(lab, tmp, "summary.json", _cut(60), "front")


@case("run files")
def summary_json_without_keys(lab: Lab, tmp: Path) -> Trial:
    return _damaged_file(lab, tmp, "summary.json", lambda p: p.write_text("{}"))


@case("run files")
def posterior_truncated(lab: Lab, tmp: Path) -> Trial:
    return _damaged_file(lab, tmp, "level1/posterior.safetensors", _cut(100))


@case("run files")
def policy_truncated(lab: Lab, tmp: Path) -> Trial:
    return _damaged_file(lab, tmp, "level2/policy.safetensors", _cut(-50))


@case("run files")
def front_csv_cut_mid_row(lab: Lab, tmp: Path) -> Trial:
    return _damaged_file(lab, tmp, "front.csv", _cut(-7))


@case("run files")
def front_csv_last_row_missing(lab: Lab, tmp: Path) -> Trial:
    return _damaged_file(lab, tmp, "front.csv", _drop_last_row)


@case("run files")
def front_csv_last_row_missing_front_command(lab: Lab, tmp: Path) -> Trial:
    return _damaged_file(lab, tmp, "front.csv", _drop_last_row, "front")


@case("run files")
def disk_full_while_saving_the_posterior(lab: Lab, tmp: Path) -> Trial:
    """``os.fsync`` raises ENOSPC in the hm3 process (a full disk at the first output of a search)."""
    wrapper = ("import errno, os, sys\nimport hm3.atomic\nfrom hm3.cli import main\n"
               "def full(fd):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
               "hm3.atomic.os.fsync = full\nsys.exit(main(sys.argv[1:]))")
    return Trial(["search", "param", str(lab.level1_cfg), str(tmp / "run"), "--quiet"], watch=[tmp / "run"],
                 python=wrapper)


# --- model directories ----------------------------------------------------------------------------------


def _copy_model(lab: Lab, tmp: Path, name: str = "m1") -> Path:
    dst = tmp / name
    shutil.copytree(lab.models[name], dst)
    return dst


def _recipe_with(lab: Lab, tmp: Path, **models: Path) -> Path:
    data = yaml.safe_load(lab.recipe.read_text())
    if "base" in models:
        data["base_model"] = str(models["base"])
    if "m1" in models:
        data["models"][0]["model"] = str(models["m1"])
    path = tmp / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@case("models")
def nan_weights_evaluated(lab: Lab, tmp: Path) -> Trial:
    from safetensors.torch import load_file, save_file

    model = _copy_model(lab, tmp)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return Trial(["eval", str(model), "--objectives", lab.objectives[0], "--split", "validation"], protect=[model],
                 watch=[tmp])


def _escaping_index(lab: Lab, tmp: Path, absolute: bool) -> Path:
    """m1 re-saved as two shards, its index naming the second one outside the model directory."""
    from safetensors.torch import load_file, save_file

    model = _copy_model(lab, tmp)
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    save_file({n: weights[n] for n in names[:half]}, model / "a.safetensors", metadata={"format": "pt"})
    save_file({n: weights[n] for n in names[half:]}, tmp / "outside.safetensors", metadata={"format": "pt"})
    target = str(tmp / "outside.safetensors") if absolute else "../outside.safetensors"
    index = {"metadata": {}, "weight_map": {n: ("a.safetensors" if i < half else target) for i, n in enumerate(names)}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


@case("models")
def shard_index_escaping_with_dotdot_merged(lab: Lab, tmp: Path) -> Trial:
    model = _escaping_index(lab, tmp, absolute=False)
    return Trial(["merge", str(_recipe_with(lab, tmp, m1=model)), str(tmp / "out")], protect=[model],
                 watch=[tmp], absent=[tmp / "out"])


@case("models")
def shard_index_escaping_absolute_evaluated(lab: Lab, tmp: Path) -> Trial:
    model = _escaping_index(lab, tmp, absolute=True)
    return Trial(["eval", str(model), "--objectives", lab.objectives[0]], protect=[model], watch=[tmp])


@case("models")
def truncated_shard_merged(lab: Lab, tmp: Path) -> Trial:
    model = _copy_model(lab, tmp)
    _cut(-100)(model / "model.safetensors")
    return Trial(["merge", str(_recipe_with(lab, tmp, m1=model)), str(tmp / "out")], protect=[model],
                 watch=[tmp], absent=[tmp / "out"])


@case("models")
def base_without_tokenizer_warns(lab: Lab, tmp: Path) -> Trial:
    """The right outcome is a merged model and a warning that it has no tokenizer."""
    data = {"merge_method": "linear", "models": [{"model": str(lab.no_tokenizer), "parameters": {"weight": 1.0}}]}
    recipe = tmp / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    return Trial(["merge", str(recipe), str(tmp / "out")], protect=[lab.no_tokenizer], watch=[tmp],
                 expect="hm3: warning:")


# --- running and judging --------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(REPO)}


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of each file under a directory; SQLite side files and locks skipped."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.name not in _SIDE_FILES}


def leftovers(dirs: list[Path]) -> list[str]:
    found = []
    for d in dirs:
        if d.is_dir():
            found += [str(p) for p in d.rglob("*") if _STAGING.search(p.name)]
    return found


#: hm3's one error line; a command-line mistake is argparse's, named by the subcommand (exit 2, after the usage)
ERROR_LINE = re.compile(r"hm3( [a-z-]+)*: error: ")

def judge(case: Case, lab: Lab) -> dict:
    tmp = lab.scratch(case.name)
    trial = case.make(lab, tmp)
    before = {f: h for p in trial.protect for f, h in digest(p).items()}
    start = time.perf_counter()
    cmd = ([sys.executable, "-c", trial.python, *trial.argv] if trial.python
           else [sys.executable, "-m", "hm3.cli", *trial.argv])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp, timeout=600)
    seconds = time.perf_counter() - start
    err_lines = [line for line in proc.stderr.splitlines() if ERROR_LINE.match(line)]
    checks: dict[str, bool] = {"no traceback": "Traceback" not in proc.stderr}
    if trial.expect == "refuse":
        checks["non-zero exit"] = proc.returncode != 0
        checks["one-line error"] = len(err_lines) == 1
    else:
        checks["exit 0"] = proc.returncode == 0
        if trial.expect != "ok":
            checks[f"says {trial.expect!r}"] = trial.expect in proc.stdout + proc.stderr
    after = {f: h for p in trial.protect if p.exists() for f, h in digest(p).items()}
    changed = sorted(f for f, h in before.items() if after.get(f) != h)
    checks["nothing lost"] = not changed
    checks["nothing left behind"] = not leftovers(trial.watch) and not any(p.exists() for p in trial.absent)
    if trial.marker is not None:
        checks["no code run"] = not trial.marker.exists()
    return {
        "case": case.name, "group": case.group, "command": "hm3 " + " ".join(trial.argv), "exit": proc.returncode,
        "handled": all(checks.values()), "checks": checks, "seconds": round(seconds, 2),
        "message": (err_lines or [""])[-1][:300], "leftovers": leftovers(trial.watch)[:5], "changed": changed[:5],
        "stderr_tail": "" if all(checks.values()) else proc.stderr[-800:],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_out_arguments(p, "red_team")
    p.add_argument("--only", default="", help="run only cases whose name contains one of these (comma-separated)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hm3-red-team-") as tmp:
        print("building the lab (tiny models, a level-1 search, a two-level run) ...", flush=True)
        lab = build_lab(Path(tmp))
        lab_seconds = time.perf_counter() - started
        rows = []
        for c in (c for c in CASES if any(part in c.name for part in args.only.split(","))):
            row = judge(c, lab)
            rows.append(row)
            failed = [k for k, ok in row["checks"].items() if not ok]
            print(f"{'ok ' if row['handled'] else 'BAD'} {row['group']:<10} {c.name:<52} exit {row['exit']:>3} "
                  f"{row['seconds']:5.1f} s  {', '.join(failed)}", flush=True)
    handled = sum(r["handled"] for r in rows)
    by_group: dict[str, list[int]] = {}
    for r in rows:
        by_group.setdefault(r["group"], [0, 0])
        by_group[r["group"]][0] += r["handled"]
        by_group[r["group"]][1] += 1
    print(f"\n{'group':<12}{'handled':>10}")
    for g, (ok, n) in by_group.items():
        print(f"{g:<12}{ok:>6} / {n}")
    print(f"{'all':<12}{handled:>6} / {len(rows)}  ({time.perf_counter() - started:.0f} s)")
    result = {
        "benchmark": "red_team",
        **harness.provenance(argv),
        # some cases only (--only): labelled apart, so the page's count of all cases is never a subset's
        "only": args.only or None,
        "cases": len(rows), "handled": handled, "by_group": {g: {"handled": ok, "cases": n} for g, (ok, n) in
                                                             by_group.items()},
        "lab_seconds": round(lab_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    out = harness.write_results(harness.out_path(args, "red_team", "only" if args.only else None), result)
    print(f"-> {out}")
    return 0 if handled == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
