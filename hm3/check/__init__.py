"""``hm3 check CONFIG``: whether a run config would run, learned in seconds on stand-ins.

A run on real models takes GPU hours; a typo in a key, a ``t_max`` deeper than the models, an
objective hm3 refuses or a model of the wrong family should cost seconds. A check therefore runs
the config through hm3's own pipeline (the parser ``hm3 run`` uses, then :func:`run_level1` or
:func:`run_two_level`) with three things replaced:

* models by tiny random ones of the same family and shape ratios (:mod:`hm3.check.models`);
* objectives whose data is not here by tiny stand-ins of the same kind (:mod:`hm3.check.objectives`);
* the budget by a 2-candidate level-1 search (or the fewest the optimiser accepts: BO needs a design
  and a model step)
  and, for two-level configs, one preference and 2 level-2 episodes (one offline, one online), on 2
  validation and 2 test examples per objective, on the CPU (hf backend, float32, in this process).

Everything is written in a temporary directory that is removed afterwards: a check leaves no run
directory, no stand-in and no data file behind. Its result is a checklist: what was checked, what
was substituted (and why), and PASS, or FAIL with the error that stopped it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hm3.errors import ConfigError, ExitCode, Hm3Error

log = logging.getLogger(__name__)

Status = Literal["ok", "substituted", "note", "fail"]
#: Level-1 evaluations of a check; BO optimisers refuse fewer than 3 (a design and a model step).
CHECK_BUDGET = 2
MAX_CHECK_BUDGET = 12
#: BO's acquisition settings in a check (the searches' defaults: 4 restarts, 128 raw samples, 64 MC samples).
BO_CHECK_OPTIONS = {"num_restarts": 1, "raw_samples": 16, "mc_samples": 16}
CHECK_EXAMPLES = 2


@dataclass(frozen=True)
class Item:
    """One line of the checklist."""

    status: Status
    what: str
    detail: str = ""


@dataclass
class CheckReport:
    """A check's checklist and verdict (``error`` is None on PASS)."""

    config: str
    items: list[Item] = field(default_factory=list)
    error: str | None = None
    exit_code: ExitCode = ExitCode.OK
    seconds: float = 0.0
    #: stand-in file -> what it stands in for, so that an error names the config's model or objective
    standins: dict[str, str] = field(default_factory=dict)

    def fail(self, message: str, exit_code: ExitCode) -> None:
        for path, name in sorted(self.standins.items(), key=lambda kv: -len(kv[0])):
            message = message.replace(path, name)
        self.error, self.exit_code = message, exit_code

    @property
    def passed(self) -> bool:
        return self.error is None

    def add(self, status: Status, what: str, detail: str = "") -> None:
        self.items.append(Item(status, what, detail))

    def text(self) -> str:
        marks = {"ok": "[ok]  ", "substituted": "[sub] ", "note": "[note]", "fail": "[FAIL]"}
        lines = [f"hm3 check {self.config}"]
        lines += [f"  {marks[i.status]} {i.what}" + (f": {i.detail}" if i.detail else "") for i in self.items]
        if self.passed:
            subs = sum(i.status == "substituted" for i in self.items)
            lines.append(f"PASS ({self.seconds:.1f} s): the config runs end to end on stand-ins"
                         + (f" ({subs} substitution{'s' * (subs != 1)} above)" if subs else ""))
        else:
            lines.append(f"FAIL ({self.seconds:.1f} s): {self.error}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "passed": self.passed, "error": self.error, "seconds": self.seconds,
                "items": [{"status": i.status, "what": i.what, "detail": i.detail} for i in self.items]}


def check_config(path: str | Path, *, sets: tuple[str, ...] = ()) -> CheckReport:
    """Check the run config at ``path`` (with ``--set`` overrides) on stand-ins (module docstring)."""
    report = CheckReport(str(path))
    start = time.perf_counter()
    try:
        # the searches' warnings are about the stand-ins' scores (no expert beats a random base, tiny
        # reward subsets), not the config: kept for -v
        with tempfile.TemporaryDirectory(prefix="hm3-check-") as tmp, warnings.catch_warnings(), \
                _standin_warnings_to_debug(), _datasets_cache(Path(tmp) / "hf-datasets"):
            warnings.showwarning = _debug_warning
            _check(Path(path), sets, Path(tmp), report)
    except Hm3Error as err:
        report.fail(str(err), err.exit_code)
    except Exception as err:  # a config hm3's own checks let through: still the check's finding
        log.debug("hm3 check: unexpected error", exc_info=True)
        report.fail(f"{type(err).__name__}: {err} (an error hm3 does not catch up front: run with -v for the "
                    "traceback)", ExitCode.BAD_INPUT)
    if report.error is not None:
        report.add("fail", "stopped", report.error)
    report.seconds = time.perf_counter() - start
    return report


class _DebugOnly(logging.Filter):
    """Keeps the searches' warnings out of a check's output: they are about the stand-ins' random scores
    (no expert beats a random base, tiny reward subsets), not the config. Logged at debug level (-v)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and not record.name.startswith(__name__):
            log.debug(f"(on stand-ins) {record.getMessage()}")
            return False
        return True


@contextmanager
def _standin_warnings_to_debug() -> Iterator[None]:
    handlers = logging.getLogger("hm3").handlers
    only = _DebugOnly()
    for handler in handlers:
        handler.addFilter(only)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(only)


@contextmanager
def _datasets_cache(folder: Path) -> Iterator[None]:
    """The datasets library's cache in ``folder`` for the duration: it writes Arrow copies of the stand-in
    lm-eval tasks' files there, and a check writes nothing outside its temporary directory."""
    try:
        from datasets import config
    except ImportError:  # no lm-eval extra: no lm-eval stand-ins either
        yield
        return
    kept = config.HF_DATASETS_CACHE
    config.HF_DATASETS_CACHE = folder
    try:
        yield
    finally:
        config.HF_DATASETS_CACHE = kept


def _debug_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    log.debug(f"(on stand-ins) {category.__name__}: {message}")


def _check(path: Path, sets: tuple[str, ...], tmp: Path, report: CheckReport) -> None:
    from hm3.overrides import apply_overrides, parse_assignment
    from hm3.run.config import parse_two_level_config
    from hm3.search.run_config import expand_zoo, parse_run_config, read_config_file

    data = apply_overrides(read_config_file(path), [parse_assignment(s) for s in sets])
    two_level = "level2" in data
    parse = parse_two_level_config if two_level else parse_run_config
    # every key and value as `hm3 run` reads them, before any model is looked at (base_dir=None: no
    # model is resolved, so no hub id is downloaded)
    source = f"{path} (with --set {', '.join(sets)})" if sets else str(path)
    data = expand_zoo(data, path.parent, source) if "zoo" in data else data
    parsed = parse(copy.deepcopy(data), source=source)
    level1 = parsed.level1 if two_level else parsed
    kind = "two-level run: hm3 run" if two_level else "level-1 search: hm3 search param"
    report.add("ok", "config", f"every key valid ({kind})")

    objectives = _standin_objectives(level1.objectives, tmp / "data", report)
    models = _standin_models(level1, path.parent, tmp / "models", report)
    standin = _standin_data(data, level1, models, objectives, report)
    if two_level:
        _check_two_level(standin, data, source, tmp, report)
    else:
        from hm3.search.level1 import run_level1

        cfg = parse_run_config(standin, source=f"{source} (stand-ins)")
        result = run_level1(cfg, tmp / "run", progress=False)
        report.add("ok", "level 1", f"{len(result.candidate_ids)} candidates merged, scored and stored; front, "
                   "summary and points written (in the temporary run directory)")


def _standin_models(level1: Any, config_dir: Path, out: Path, report: CheckReport) -> dict[str, Path]:
    from hm3.check.models import build_standins, model_shape, shape_conflicts, shape_value

    shapes = [model_shape(ref, value, config_dir) for ref, value in level1.models.items()]
    for s in shapes:
        c = s.config
        report.add("substituted", f"models.{s.ref}", f"{s.value}: shape from {s.source} ({c.get('model_type')}, "
                   f"{c.get('num_hidden_layers')} layers, {c.get('num_attention_heads')}/"
                   f"{shape_value(c, 'num_key_value_heads')} heads, tied embeddings "
                   f"{shape_value(c, 'tie_word_embeddings')}) -> tiny random stand-in of that family")
    own_vocabularies = level1.search_space.tokenizer_source is not None
    conflicts = shape_conflicts(shapes, own_vocabularies=own_vocabularies)
    if conflicts:
        only_vocabularies = all(c.startswith("vocab_size:") for c in conflicts)
        remedy = ("; only the vocabularies differ: set search_space.tokenizer_source: base to merge over the "
                  "base model's") if only_vocabularies else ""
        raise ConfigError(f"models: the models differ in {'; '.join(conflicts)}: a search merges them in memory, "
                          f"which needs one architecture and one vocabulary{remedy}")
    dirs = build_standins(shapes, level1.search_space.base_model, out, seed=level1.seed,
                          own_vocabularies=own_vocabularies)
    report.standins |= {str(p): f"models.{ref} (the stand-in for {level1.models[ref]})" for ref, p in dirs.items()}
    report.add("ok", "stand-in models", f"{len(dirs)} built (base random, others base + seeded perturbation), "
               "toy character tokenizer" + (", each with its model's vocab_size rows, merged over the base's "
                                             "(tokenizer_source: base)" if own_vocabularies else ""))
    return dirs


def _standin_objectives(specs: list[str], out: Path, report: CheckReport) -> dict[str, str]:
    from hm3.check.objectives import choose_objective

    out.mkdir(parents=True, exist_ok=True)
    chosen = {}
    for i, spec in enumerate(specs):
        choice = choose_objective(spec, out, i)
        chosen[spec] = choice.spec
        if choice.path is not None:
            report.standins[choice.path] = f"the stand-in data of objectives[{i}] ({spec})"
        if choice.note:
            report.add("substituted", f"objectives[{i}] {spec}", choice.note)
    return chosen


def _standin_data(data: dict[str, Any], level1: Any, models: dict[str, Path], objectives: dict[str, str],
                  report: CheckReport) -> dict[str, Any]:
    """The config with stand-in models and objectives, the check's budget and a CPU evaluation."""
    from hm3.search.level1 import make_optimizer

    out = copy.deepcopy(data)
    out["models"] = {ref: str(p) for ref, p in models.items()}
    out["objectives"] = [objectives[s] for s in level1.objectives]
    out["experts"] = {ref: objectives[s] for ref, s in level1.experts.items()}
    make_optimizer(level1)  # the optimiser with the config's own budget and options, as the run builds it
    report.add("ok", "optimizer", f"{level1.optimizer.name} accepts budget {level1.optimizer.budget} and its options")
    cheap = check_options(level1.optimizer.name, level1.optimizer.options)
    options = {**(data.get("optimizer") or {}).get("options", {}), **cheap}
    budget = check_budget(level1, options)
    optimizer = {**(data.get("optimizer") or {}), "budget": budget, "options": options}
    report.add("note", "optimizer", f"budget {level1.optimizer.budget} -> {budget}"
               + "".join(f", {k} {v}" for k, v in cheap.items()) + " for the check")
    out["optimizer"] = optimizer
    ev = level1.evaluation
    changed = [f"{k} {getattr(ev, k)} -> {v}" for k, v in (("backend", "hf"), ("device", "cpu"), ("dtype", "float32"),
                                                          ("executor", "local")) if getattr(ev, k) != v]
    evaluation = {k: v for k, v in dict(out.get("evaluation") or {}).items()
                  if k not in ("workers", "ray_address", "resources_per_worker", "vllm")}
    out["evaluation"] = evaluation | {"backend": "hf", "device": "cpu", "dtype": "float32", "executor": "local",
                                      "validation_examples": CHECK_EXAMPLES, "test_examples": CHECK_EXAMPLES,
                                      "batch_size": min(ev.batch_size, 8)}
    if changed:
        report.add("substituted", "evaluation", ", ".join(changed) + " (stand-ins run in this process)")
    out["fisher"] = {**(out.get("fisher") or {}), "examples": CHECK_EXAMPLES}
    return out


def _is_bayesian(name: str) -> bool:
    from hm3.search.optimizers import get_optimizer
    from hm3.search.optimizers.bayes import BayesOptimizer

    return issubclass(get_optimizer(name), BayesOptimizer)


def check_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """Optimiser options that keep a check's few candidates cheap: BO's acquisition optimised coarsely
    (and bo-tcheby's scalarisations cut to one), NSGA-II's population as small as it goes."""
    if name == "nsga2":
        return {"pop_size": 2}
    if not _is_bayesian(name):
        return {}
    if name == "bo-tcheby":  # a model step per preference vector: one vector, so the budget stays small
        one = {"preferences": given["preferences"][:1]} if given.get("preferences") else {"n_preferences": 1}
        return dict(BO_CHECK_OPTIONS) | one
    return dict(BO_CHECK_OPTIONS)


def check_budget(level1: Any, options: dict[str, Any]) -> int:
    """The smallest level-1 budget from :data:`CHECK_BUDGET` up that the config's optimiser accepts with
    ``options`` (BO needs a design and a model step; bo-tcheby a step per preference vector)."""
    from hm3.search.level1 import make_optimizer

    for budget in range(CHECK_BUDGET, MAX_CHECK_BUDGET + 1):
        update = {"budget": budget, "options": options}
        cfg = level1.model_copy(update={"optimizer": level1.optimizer.model_copy(update=update)})
        try:
            make_optimizer(cfg)
            return budget
        except ConfigError:
            if budget == MAX_CHECK_BUDGET:
                raise
    raise AssertionError("unreachable")


def _check_two_level(standin: dict[str, Any], original: dict[str, Any], source: str, tmp: Path,
                     report: CheckReport) -> None:
    from hm3.run.config import parse_two_level_config
    from hm3.run.two_level import check_depth, check_level2_models, run_two_level

    # the level-2 settings against the models' real depth with the config's own backend (vLLM's fixed depth)
    as_given = dict(standin) | {"evaluation": original.get("evaluation") or {}}
    cfg_given = parse_two_level_config(copy.deepcopy(as_given), source=source)
    check_depth(cfg_given)
    check_level2_models(cfg_given)
    report.add("ok", "level 2 vs the models' depth", "t_max, swaps and transition scales fit "
               f"{cfg_given.level2.rl.t_max if cfg_given.level2.rl.t_max is not None else 'the default'} hops")
    level2 = copy.deepcopy(standin["level2"] or {})
    prefs = cfg_given.level2.preferences  # as parsed: the YAML may say 4.0 or "4"
    level2["preferences"] = 1 if isinstance(prefs, int) else prefs[:1]
    level2["keep_best"] = min(cfg_given.level2.keep_best, 1)
    level2["rl"] = {**(level2.get("rl") or {}), "offline_episodes": 1, "online_episodes": 1,
                    "episodes_per_update": 1, "epochs": 1}
    report.add("note", "level2", "1 preference, 2 episodes (1 offline, 1 online), PPO updated after each")
    cfg = parse_two_level_config(standin | {"level2": level2}, source=f"{source} (stand-ins)")
    summary = run_two_level(cfg, tmp / "run", progress=False)
    report.add("ok", "level 1", "skipped (level2.pool: experts)" if cfg.level2.pool == "experts"
               else "candidates merged, scored and stored")
    report.add("ok", "level 2", f"policy pretrained and fine-tuned, {len(summary['level2_paths'])} path(s) kept; final "
               f"front of {summary['front_size']} scored on the test split and written (in the temporary run directory)")
