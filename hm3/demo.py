"""The embedded default job (README Quick start, line 1): the whole two-level search on the zoo.

1. The micro zoo that ships inside hm3 (a tiny Llama base + math, code and translation experts,
   verified against the hashes in its manifest; nothing is trained or downloaded). ``--zoo DIR``
   runs on another zoo directory instead, e.g. one built with ``hm3 zoo build``.
2. ``hm3 run`` on it with :data:`DEMO_CONFIG`: level 1 (bo-mo over DARE-TIES coefficients and
   densities) -> level 2 (the λ-conditioned policy pretrained offline, fine-tuned for a few
   preferences) -> test split -> the two-level front (table, plot, recipes and paths).
3. A preference request at budget 0 (``math=0.6,code=0.3,translation=0.1``), written as a
   Hugging Face checkpoint.

The config is written beside the run (``OUT/config.yml``). Running the demo again with the same
config resumes that run (``hm3 run OUT/config.yml OUT/run --resume``): a demo killed half-way
continues where it stopped, and a finished one is read back from its run store without a new
evaluation, then prints its front and answers the request again. An OUT holding another config
is refused unless ``--overwrite``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hm3.atomic import atomic_write_text
from hm3.errors import OutputExistsError

log = logging.getLogger(__name__)

#: Sized to finish in a few minutes on 2 CPU cores (docs/BENCHMARKS.md quotes measured times).
DEMO_CONFIG: dict[str, Any] = {
    "search_space": {"dare": True, "rescale_mode": "l1", "weight_bounds": [0.0, 1.0], "density_bounds": [0.2, 1.0]},
    # half the default quasi-MC samples: qLogNEHVI partitions the front once per sample, the demo's
    # largest single cost; the searches' default stays 64
    "optimizer": {"name": "bo-mo", "budget": 30, "options": {"mc_samples": 32}},
    "evaluation": {"backend": "hf", "validation_examples": 32, "test_examples": 100, "batch_size": 64},
    "seed": 0,
    "level2": {
        "pool": "experts+merge",
        "preferences": 3,
        # the zoo models have 2 layers: paths of up to 4 hops may repeat and reorder them
        "rl": {"offline_episodes": 48, "online_episodes": 16, "episodes_per_update": 8, "epochs": 4,
               "data_scale": 0.5, "t_max": 4},  # 16 of the 32 examples per reward (DAR_MIN_REWARD_EXAMPLES)
    },
}
DEMO_REQUEST = "math=0.6,code=0.3,translation=0.1"


@dataclass(frozen=True)
class DemoResult:
    """What a demo produced: its run, the request's answer, and how long it all took."""

    run_dir: Path
    request_dir: Path
    summary: dict[str, Any]
    front_table: str
    answer: str
    scores: dict[str, float]  # the answer's validation scores, per objective
    scores_are: str  # "measured" (a front point), "estimated" (a policy path) or "predicted" (the posterior)
    seconds: float

    def report(self) -> str:
        """The front table and what to try next, as ``hm3 demo`` prints them."""
        s, run = self.summary, self.run_dir
        scores = ", ".join(f"{n}={v:.3f}" for n, v in self.scores.items())
        return "\n".join([
            self.front_table,
            f"[demo] front: {s['front_size']} points (level 1: {s['front_levels']['1']}, level 2: "
            f"{s['front_levels']['2']}); HV validation {s['hv_validation']:.4f} (level-1 candidates alone "
            f"{s['hv_validation_level1']:.4f}); plot {run / 'front.png'}",
            f"[demo] answer to --prefer {DEMO_REQUEST}: {self.answer}; {self.scores_are} validation scores {scores} "
            f"-> {self.request_dir}",
            f"[demo] done in {self.seconds:.0f} s. Next: hm3 front {run} | hm3 export {run} --point ID OUT | "
            f"hm3 request {run} --prefer code=1 OUT",
        ])

    def to_json(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "request_dir": str(self.request_dir), "answer": self.answer,
                "scores": self.scores, "scores_are": self.scores_are, "seconds": self.seconds, "summary": self.summary}


def _earlier_config(config_file: Path) -> Any:
    """What an earlier demo wrote to ``config.yml`` (None: no file; a file that is not YAML reads as
    itself, so it differs from every demo config)."""
    if not config_file.is_file():
        return None
    text = config_file.read_text(errors="replace")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def run_demo(out: Path, *, zoo: str | Path = "builtin:micro", overwrite: bool = False) -> DemoResult:
    """Run the demo into ``out`` on ``zoo`` (``builtin:NAME`` or a zoo directory)."""
    from hm3.request import answer_request
    from hm3.run.config import parse_two_level_config
    from hm3.run.directory import STORE_FILE, read_front
    from hm3.run.two_level import run_two_level
    from hm3.zoo.shipped import BUILTIN_PREFIX, resolve_zoo

    start = time.perf_counter()
    zoo_ref = str(zoo) if str(zoo).startswith(BUILTIN_PREFIX) else str(Path(zoo).resolve())
    run_dir, request_dir, config_file = out / "run", out / "request-model", out / "config.yml"
    data = {"zoo": zoo_ref, **DEMO_CONFIG}
    cfg = parse_two_level_config(data, source="demo config")  # reads the zoo: a bad one is refused before OUT is touched
    from hm3.outputs import check_not_input

    check_not_input(out, [resolve_zoo(zoo_ref)])  # a run written into the zoo would change what it reads
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"demo output {out} is a file, not a folder; choose another --out")
    resume = False
    if run_dir.exists() and overwrite:
        shutil.rmtree(out)
    elif run_dir.exists() or (config_file.exists() and not overwrite):  # a config.yml alone may be the user's
        earlier = _earlier_config(config_file)
        if earlier != data:
            raise OutputExistsError(
                f"demo output already exists: {out}, from another demo config ({config_file} "
                f"{'is missing' if earlier is None else 'differs'}); use --overwrite to replace it, "
                f"or --out for a new folder"
            )
        resume = (run_dir / STORE_FILE).is_file()  # else it stopped before its first evaluation
    log.info(f"demo 1/3: the model zoo {zoo_ref} ({resolve_zoo(zoo_ref)}; nothing is trained)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_file, yaml.safe_dump(data, sort_keys=False))
    what = "resuming the earlier demo run (same config; nothing evaluated twice)" if resume else "two-level search"
    log.info(f"demo 2/3: {what} -> {run_dir} (config: {config_file})")
    summary = run_two_level(cfg, run_dir, resume=resume)
    front, _ = read_front(run_dir)
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200, "display.precision", 3):
        table = front.to_string(index=False)
    log.info(f"demo 3/3: request --prefer {DEMO_REQUEST} (budget 0)")
    ans = answer_request(run_dir, DEMO_REQUEST, request_dir, budget=0, overwrite=True, progress=False)
    scores = {n: float(v) for n, v in zip(summary["objectives"], ans.scores, strict=True)}
    return DemoResult(run_dir=run_dir, request_dir=request_dir, summary=summary, front_table=table,
                      answer=ans.source, scores=scores, scores_are=ans.scores_are,
                      seconds=time.perf_counter() - start)
