"""Fixtures shared across test folders: tiny models built on the fly (nothing is downloaded), the
shipped micro zoo, and a real ``kill -9`` of an ``hm3`` command for the crash-and-resume tests."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import Phase, settings

from hm3.threads import prefer_sleeping_openmp_workers

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose hm3 the tests' child processes run

# Property tests: 40 examples each by default. HM3_HYPOTHESIS_PROFILE=mutation (scripts/mutation.py) runs 10
# and reports the first counterexample without shrinking it: shrinking a failing property on model-building
# tests takes minutes, and a mutant only needs to be seen failing.
settings.register_profile("hm3", max_examples=40, deadline=None)
settings.register_profile("mutation", max_examples=10, deadline=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HM3_HYPOTHESIS_PROFILE", "hm3"))

prefer_sleeping_openmp_workers()  # before any test imports torch, as the hm3 command does
# No test reaches a model hub: hub ids resolve from a test's own cache (tests/hub_cache.py) or fail.
# Set before huggingface_hub is imported, which reads it once.
os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's torch gets its share of the cores: torch's default (every core
    in every worker) oversubscribes them and makes the parallel suite slower than a serial one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding ``slow`` tests run first, the most slow tests first; the rest keep their order.

    pytest-xdist (``--dist loadfile``) hands files to workers in this order when scripts/test.sh turns off
    its own reordering (by test count, which put the one-test demo file last: a minute with one worker
    busy and the other idle at the end of every run). Started first, long files overlap the short ones.
    """
    slow_per_file: dict[str, int] = {}
    for item in items:
        slow_per_file.setdefault(item.nodeid.split("::")[0], 0)
        if item.get_closest_marker("slow") is not None:
            slow_per_file[item.nodeid.split("::")[0]] += 1
    items.sort(key=lambda item: -slow_per_file[item.nodeid.split("::")[0]])  # stable: file order kept


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection left (the test modules and what they import: torch, transformers, …) out of the
    garbage collector's scans (``gc.freeze``), as ``hm3 merge`` freezes its imports (:mod:`hm3.process`).

    Those objects live as long as the run, and every full collection a test's garbage triggers re-scanned them
    all: the in-process merge and search tests ran about a sixth faster frozen. Garbage made later is
    collected as before.
    """
    gc.freeze()


# The child of sigkill_hm3: ``hm3`` with one function (argv[1], "module:attribute.path") wrapped so that each
# call first tells the parent (a byte on the pipe argv[2]) and waits for its answer (a byte on argv[3]).
_PAUSING_HM3 = """
import functools, importlib, os, sys
from hm3.cli import main

target, to_parent, from_parent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
module, _, path = target.partition(":")
*parents, name = path.split(".")
owner = importlib.import_module(module)
for parent in parents:
    owner = getattr(owner, parent)
original = getattr(owner, name)

@functools.wraps(original)
def paused(*args, **kwargs):
    os.write(to_parent, b"p")
    os.read(from_parent, 1)
    return original(*args, **kwargs)

setattr(owner, name, paused)
sys.argv = ["hm3", *sys.argv[4:]]
sys.exit(main())
"""


@pytest.fixture
def sigkill_hm3() -> Callable[..., None]:
    """``sigkill_hm3(args, ready, pause_at, timeout)``: start ``hm3 *args`` in its own process group, stopping it
    at every call of ``pause_at`` ("module:attribute.path"); there, while it waits, check ``ready()`` and
    SIGKILL the whole group once it holds (a real crash: no handler runs), else let it go on.

    The kill lands at a known point mid-run however fast the machine is: polling a free-running command
    missed its end on a fast one. Fails the test if the command ends before ``ready()`` holds at a pause,
    or the pause does not come within ``timeout`` seconds.
    """

    def run(args: Sequence[str], ready: Callable[[], bool], pause_at: str, timeout: float = 300) -> None:
        to_parent, child_out = os.pipe()
        child_in, from_parent = os.pipe()
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-c", _PAUSING_HM3, pause_at, str(child_out), str(child_in),
                                 *args], env=env, pass_fds=(child_out, child_in), start_new_session=True)
        os.close(child_out)
        os.close(child_in)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if not select.select([to_parent], [], [], 0.5)[0]:  # its forks may hold the pipe open: poll too
                    assert proc.poll() is None, "the command finished before it could be killed"
                    assert time.monotonic() < deadline, f"the command did not pause at {pause_at} within {timeout} s"
                    continue
                assert os.read(to_parent, 1) == b"p", "the command finished before it could be killed"
                if ready():
                    break
                os.write(from_parent, b"c")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            os.close(to_parent)
            os.close(from_parent)
        assert proc.returncode == -signal.SIGKILL, "the command ended before the kill"

    return run


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 32, 2 layers, vocab 64, untied); read-only: copy it before changing it."""
    from hm3.checkpoint.synthetic import build_random_llama

    return build_random_llama(
        tmp_path_factory.mktemp("tiny_llama") / "base", hidden_size=32, num_layers=2, vocab_size=64, seed=0
    )


@pytest.fixture(scope="session")
def micro_zoo_dir() -> Path:
    """The micro zoo that ships with hm3 (verified against its manifest's hashes once per run).

    Read-only: it lives in the package; copy it (``hm3 zoo copy``) before changing anything.
    """
    from hm3.zoo.shipped import shipped_zoo

    return shipped_zoo("micro")


@pytest.fixture(scope="session")
def mergekit_merge() -> Callable[[Path, Path], None]:
    """``mergekit_merge(config_yml, out_dir, **options)``: mergekit's own ``run_merge`` on a config file, in this
    process; ``options`` are ``MergeOptions`` fields (mergekit-yaml's flags, e.g. ``random_seed``).

    The oracle's tensors are the same as ``mergekit-yaml``'s (the CLI calls ``run_merge``); in-process
    saves the ~15 s each ``mergekit-yaml`` start pays for its imports. Skips where mergekit (dev extra)
    is absent.
    """
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    def merge(config: Path, out: Path, **options) -> None:
        parsed = MergeConfiguration.model_validate(yaml.safe_load(Path(config).read_text()))
        run_merge(parsed, str(out), MergeOptions(quiet=True, lazy_unpickle=False, **options))

    return merge


WORDS = ["ab", "ba", "abc", "cab", "bca", "aab", "bba", "cc"]


def _questions(path: Path, seed: int, count: int = 24) -> Path:
    """Multiple-choice questions: scored by log-likelihood (one forward pass), so the test stays fast."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(count):
            choices = [" ".join(rng.choice(WORDS, 2)) for _ in range(4)]
            if len(set(choices)) < 4:
                choices = [f"{c} {k}" for k, c in enumerate(choices)]
            record = {"id": f"{seed}-{i}", "question": " ".join(rng.choice(WORDS, 3)), "choices": choices,
                      "answer": int(rng.integers(4)), "split": "validation" if i < count // 2 else "test"}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """(root, model dirs {base, m1, m2}, two choice objectives): a tiny base, two variants, scored fast."""
    from hm3.checkpoint.synthetic import build_finetuned_variant
    from tests.eval.tiny_lm import build_tiny_lm

    root = tmp_path_factory.mktemp("tiny_family")
    base = build_tiny_lm(root / "base", seed=0)
    models = {"base": str(base)}
    for i in (1, 2):
        models[f"m{i}"] = str(build_finetuned_variant(base, root / f"m{i}", seed=i, scale=0.5))
    objectives = [f"choice:{_questions(root / f'q{s}.jsonl', s)}" for s in (1, 2)]
    return root, models, objectives


@pytest.fixture(scope="session")
def labelled_family(tiny_family):
    """``tiny_family``'s models with two objectives of their own, each variant made the expert of one:
    objective k's gold answers are m_k's own picks, so m_k scores 1 there and the base less wherever it
    picks otherwise. With random labels no model need beat the base (tiny_family's m1 picks what the
    base picks on all its validation questions), every protocol HV is then 0, and an HV check has
    nothing to measure; here each objective has a span and fronts have area."""
    from hm3.eval.hf import HFBackend

    root, models, _ = tiny_family
    folder = root / "labelled"
    folder.mkdir(exist_ok=True)
    backends = {name: HFBackend.from_pretrained(path) for name, path in models.items()}
    labelled = []
    for k in (1, 2):
        source = _questions(folder / f"q{k}-unlabelled.jsonl", 10 + k, count=48)
        records = [json.loads(line) for line in source.read_text().splitlines()]
        picks = {name: [int(np.argmax(b.loglikelihood([(f"Question: {r['question']}\nAnswer:", f" {c}")
                                                          for c in r["choices"]]))) for r in records]
                 for name, b in backends.items() if name in ("base", f"m{k}")}
        differ = sum(picks["base"][i] != picks[f"m{k}"][i] for i, r in enumerate(records) if r["split"] == "validation")
        if differ < 3:
            pytest.fail(f"the base picks what m{k} picks on all but {differ} validation questions")
        path = folder / f"q{k}.jsonl"
        path.write_text("".join(json.dumps(r | {"answer": a}) + "\n"
                                for r, a in zip(records, picks[f"m{k}"], strict=True)))
        labelled.append(f"choice:{path}")
    return root, models, labelled
