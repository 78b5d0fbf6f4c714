"""``pip install hm3`` without extras, into a fresh venv (no system site-packages), merges a model.

The venv gets the core's dependencies from the package index (torch pinned by constraints.txt to the
CPU build of this machine) and hm3 itself from a copy of this checkout; none of the extras' packages
may be installed by it, ``hm3 merge`` must write the same tensors as this environment's merge, and a
command that needs an extra must name the pip command instead of failing on an import.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hm3.errors import ExitCode
from hm3.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
EVERY_EXTRA = sorted({name for names in EXTRAS.values() for name in names} | {"stable_baselines3"})


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=3000, **kwargs)


@pytest.mark.slow
def test_the_core_alone_installs_into_a_fresh_venv_and_merges(tmp_path):
    source = tmp_path / "hm3-src"  # a copy: building in the checkout would leave build/ and egg-info there
    for part in ("hm3", "objectives"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    python, hm3 = env_dir / "bin" / "python", env_dir / "bin" / "hm3"
    torch_pin = f"torch=={importlib.metadata.version('torch').split('+')[0]}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --no-compile: byte-compiling every module of torch's wheel is most of an install's time, and the
    # interpreter compiles the few modules the test imports on first use anyway
    pip = _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-compile", "-c",
                str(ROOT / "constraints.txt"), torch_pin, str(source)], env=env)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]

    probe = "import importlib.util, sys; print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])"
    installed = _run([str(python), "-c", probe, *EVERY_EXTRA], env=env, cwd=tmp_path)
    assert installed.stdout.strip() == "[]", installed.stdout + installed.stderr

    from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
    from hm3.merge.engine import merge_to_disk

    base = build_random_llama(tmp_path / "base", hidden_size=16, num_layers=1, vocab_size=32, seed=0)
    other = build_finetuned_variant(base, tmp_path / "m1", seed=1, scale=0.05)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(base), "seed": 0,
                                      "models": [{"model": str(other), "parameters": {"weight": 0.7, "density": 0.5}}]}))
    merged = _run([str(hm3), "merge", str(recipe), str(tmp_path / "core-merge")], env=env, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    merge_to_disk(recipe, tmp_path / "here-merge")
    core, here = (load_file(tmp_path / d / "model.safetensors") for d in ("core-merge", "here-merge"))
    assert core.keys() == here.keys() and all(torch.equal(core[k], here[k]) for k in core)

    search = _run([str(hm3), "search", "param", str(recipe), str(tmp_path / "run")], env=env, cwd=tmp_path)
    assert search.returncode == ExitCode.ENVIRONMENT, search.stderr
    assert "pip install 'hm3[search]'" in search.stderr and "Traceback" not in search.stderr
