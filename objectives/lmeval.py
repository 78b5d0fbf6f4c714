"""Any lm-evaluation-harness task as an objective: ``lm-eval:TASK[,OPTION=VALUE...][@SEED]``.

Options: ``metric=NAME`` (default: the first metric the task reports where higher is better, else its
first metric), ``filter=NAME`` (default: the
task's first filter), ``num_fewshot=N`` (default: the task's own), ``include_path=DIR`` (a folder of
local task YAMLs, lm-eval's include mechanism; its tasks are found before lm-eval's own) and
``name=SHORT`` (the objective's name in scores, fronts and ``--prefer``; default ``lm-eval:TASK`` plus
the options given). SEED picks the validation/test division described below (default 0).

The task is lm-eval's own -- prompts, few-shot setting, generation settings, filters, metric -- and
hm3 takes from it:

* examples: one per document. The validation and test splits are the task's own validation and test
  documents when it has both; otherwise the one split it evaluates is divided by hashing SEED and each
  document (:func:`objectives.jsonl.hashed_split`, the rule of users' JSONL files): disjoint halves that
  do not move when documents are added.
* each document's requests, built as lm-eval's evaluator builds them (``fewshot_context``, then
  ``construct_requests``) with the few-shot sampler seeded with lm-eval's default seed before the split
  is walked in document order, once per split: a document's prompt is the same whether it is scored
  alone, in a subset or in the whole split, and on the documents lm-eval evaluates it is lm-eval's own.
  (A one-split task's documents are walked as one split, then divided.) Where the few-shot examples
  would be drawn from the validation documents being scored, a document is kept out of its own prompt,
  as lm-eval does when its few-shot split is the evaluated one. A one-split task keeps lm-eval's prompts
  exactly, so where lm-eval leaves a document among its own few-shot examples (its few-shot split is the
  evaluated one but is not named the test split) hm3 does too, in both halves.
* the score: the chosen filter applied to the answers, the task's ``process_results`` per document,
  and the task's aggregation of the chosen metric over the examples asked for (so a corpus-level metric
  stays corpus-level).

Answers come from hm3's own backends through lm-eval's model interface (:mod:`hm3.eval.harness`), so a
search scores tasks on its live model. Data is read only from local files and the local Hugging Face
datasets cache (offline mode is forced while a task loads); a task whose data is not there is refused
with what to download. A metric where lower is better (the task's ``higher_is_better()`` says so:
perplexity, TER) is kept raw in the run store and ranked by its utility ``-raw``
(:func:`objectives.base.utility_map`: lm-eval's lower-is-better metrics are unbounded).
``loglikelihood_rolling`` tasks (word and byte perplexity, bits per byte over whole documents) are
served by the hf backend (:mod:`hm3.eval.harness`). Refused up front: groups and tags (an objective
is one task), sampling generation settings (the backends decode greedily), tasks that execute
generated code, multimodal tasks.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hm3.errors import ConfigError, DataFileError, Hm3Error
from hm3.extras import require
from objectives.base import SPLITS, Example, Generate, HarnessObjective, LogLikelihood
from objectives.jsonl import hashed_split, record_id
from objectives.options import check_name, parse_count, split_options

PREFIX = "lm-eval"
OPTIONS = ("metric", "filter", "num_fewshot", "include_path", "name")
SPEC_PATTERN = "lm-eval:TASK[,metric=M][,filter=F][,num_fewshot=N][,include_path=DIR][,name=SHORT]"
#: lm-eval's own default generation length, when a task sets none
DEFAULT_MAX_GEN_TOKS = 256
#: sampling settings that do nothing when decoding greedily (lm-eval's own YAMLs set some with do_sample false)
SAMPLING_ONLY = frozenset({"top_p", "top_k", "min_p", "typical_p", "seed"})
SERVED_OUTPUT_TYPES = ("generate_until", "loglikelihood", "multiple_choice", "loglikelihood_rolling")
# dataset_path values that are datasets' packaged builders over local files, not hub datasets
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


@dataclass(frozen=True)
class LmEvalSpec:
    """A parsed ``lm-eval:`` spec (syntax in the module docstring)."""

    task: str
    metric: str | None = None
    filter: str | None = None
    num_fewshot: int | None = None
    include_path: str | None = None
    name: str | None = None
    seed: int = 0

    def objective_name(self) -> str:
        """``name=`` if given, else ``lm-eval:TASK`` and the score-changing options, ``/``-separated: no
        ``=``, ``,`` or space, so the name can be typed in ``--prefer`` and joined into objective lists."""
        if self.name:
            return self.name
        parts = [f"{PREFIX}:{self.task}", self.filter, self.metric,
                 None if self.num_fewshot is None else f"{self.num_fewshot}shot"]
        return "/".join(p for p in parts if p) + (f"@{self.seed}" if self.seed else "")


def parse_spec(rest: str, *, seed: int = 0, spec: str | None = None) -> LmEvalSpec:
    """The spec after ``lm-eval:`` (``TASK[,OPTION=VALUE...]``); ``spec`` is the whole text, for messages."""
    spec = spec or f"{PREFIX}:{rest}"
    task, *items = [part.strip() for part in rest.split(",")]
    if not task or "=" in task:
        raise ConfigError(f"objective {spec!r} names no task; write {SPEC_PATTERN} (`lm-eval ls tasks` lists them)")
    values = split_options(items, spec=spec, allowed=OPTIONS)
    fewshot = values.pop("num_fewshot", None)
    if "name" in values:
        check_name(values["name"], spec=spec)
    return LmEvalSpec(task=task, num_fewshot=None if fewshot is None else parse_count(fewshot, key="num_fewshot", spec=spec),
                      seed=seed, **values)


# --- loading a task ---------------------------------------------------------------------------------


@contextmanager
def offline_datasets() -> Iterator[None]:
    """Hugging Face datasets and hub in offline mode, without progress bars, for the duration.

    ``datasets`` and ``huggingface_hub`` read ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` when imported,
    so their module flags are set too (and everything is put back afterwards)."""
    import datasets
    import huggingface_hub.constants as hub_constants
    from datasets import config as ds_config

    env = {key: os.environ.get(key) for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    flags = (ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    bars = datasets.is_progress_bar_enabled()
    os.environ.update({key: "1" for key in env})
    ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = flags
        if bars:
            datasets.enable_progress_bars()


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """lm-eval's index of task YAMLs (reading all of lm-eval's own takes seconds: kept per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _find(spec: LmEvalSpec) -> Any:
    """The task manager that knows ``spec.task``: the include path's alone when it defines the task (fast),
    else lm-eval's own tasks; an unknown name suggests close ones from both."""
    include, known = None, []
    if spec.include_path is not None:
        folder = Path(spec.include_path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"objective lm-eval:{spec.task}: include_path {spec.include_path} is not a folder")
        include = str(folder.resolve())
        local = _task_manager(include, False)
        if spec.task in local.task_index:
            return local
        known = list(local.all_tasks)
    # not defined under include_path: lm-eval's own index, built once per process whatever the include path
    manager = _task_manager(None, True)
    if spec.task not in manager.task_index:
        close = difflib.get_close_matches(spec.task, known + list(manager.all_tasks), n=5, cutoff=0.6)
        where = f"lm-eval's tasks or {include}" if include else "lm-eval's tasks (local YAMLs: include_path=DIR)"
        raise ConfigError(
            f"unknown lm-eval task {spec.task!r}: not among {where}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + f" (`lm-eval ls tasks{' --include_path ' + include if include else ''}` lists them)"
        )
    return manager


def _refuse_collections(manager: Any, name: str) -> None:
    entry = manager.task_index[name]
    if name in manager.all_groups or name in manager.all_tags:
        members = sorted(entry.tags) if name in manager.all_tags else [
            m if isinstance(m, str) else str(m.get("task") or m.get("group")) for m in (entry.cfg or {}).get("task", [])]
        shown = ", ".join(members[:6]) + (f" (+{len(members) - 6} more)" if len(members) > 6 else "")
        kind = "tag" if name in manager.all_tags else "group"
        raise ConfigError(f"lm-eval:{name} is a {kind} of {len(members)} tasks ({shown}); an objective is one task: "
                          "name one of them (each can be its own objective)")


def _no_data(name: str, cfg: Mapping[str, Any], err: Exception) -> DataFileError:
    from datasets import config as ds_config

    cache = ds_config.HF_DATASETS_CACHE
    path, config = cfg.get("dataset_path"), cfg.get("dataset_name")
    head = f"lm-eval task {name!r} cannot read its data offline ({type(err).__name__}: {err}); hm3 reads task data " \
           f"only from local files and the Hugging Face datasets cache ({cache})"
    if not path or path in _LOCAL_BUILDERS or Path(str(path)).exists():
        return DataFileError(f"{head}: check the data files its YAML names (dataset_path: {path}, dataset_kwargs)")
    args = repr(path) + (f", {config!r}" if config else "")
    return DataFileError(
        f"{head}: download dataset {path!r}" + (f" (config {config!r})" if config else "")
        + f" where there is network, e.g. python -c \"import datasets; datasets.load_dataset({args})\", and copy "
        f"that cache to {cache} (or point HF_DATASETS_CACHE at the copy), or define the task over local files "
        "(dataset_path: json, dataset_kwargs: data_files) in a YAML under include_path"
    )


def declared_output_type(spec: LmEvalSpec) -> str | None:
    """The ``output_type`` the task's YAML declares, read without loading its data (None: it declares
    none, or names a group); unknown tasks are refused as :func:`load_task` refuses them."""
    require("lmeval", what="lm-eval objectives")
    value = (_find(spec).task_index[spec.task].cfg or {}).get("output_type")
    return value if isinstance(value, str) else None


def load_task(spec: LmEvalSpec) -> Any:
    """lm-eval's task object for ``spec`` (its data read offline), with the spec's few-shot count set."""
    require("lmeval", what="lm-eval objectives")
    manager = _find(spec)
    _refuse_collections(manager, spec.task)
    cfg = manager.task_index[spec.task].cfg or {}
    with offline_datasets():
        try:
            loaded = manager.load([spec.task])
        except (FileNotFoundError, ConnectionError) as err:  # datasets' "not cached" / "offline" errors
            raise _no_data(spec.task, cfg, err) from None
        except Hm3Error:
            raise
        except Exception as err:  # whatever lm-eval raises for a task definition it cannot build
            raise ConfigError(f"lm-eval cannot build task {spec.task!r}: {type(err).__name__}: {err}") from err
    (task,) = loaded["tasks"].values()
    return task


def generation_settings(gen_kwargs: Mapping[str, Any] | None, where: str) -> tuple[tuple[str, ...], int]:
    """(stop strings, max new tokens) of lm-eval generation settings, which must ask for greedy decoding.

    lm-eval's own normalisation reads them (``max_gen_toks`` and its aliases, ``do_sample`` vs
    ``temperature``), so a task means here what it means to lm-eval's models."""
    from lm_eval.models.utils import normalize_gen_kwargs

    kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs or {}), DEFAULT_MAX_GEN_TOKS))
    if kwargs.pop("do_sample", False):
        raise ConfigError(f"{where}: its generation settings sample (do_sample: true or temperature > 0); "
                          "hm3's backends decode greedily")
    until, max_new = kwargs.pop("until"), int(kwargs.pop("max_gen_toks"))
    kwargs.pop("temperature", None)
    unknown = sorted(set(kwargs) - SAMPLING_ONLY)
    if unknown:
        raise ConfigError(f"{where}: generation settings {', '.join(unknown)} are not supported by hm3's greedy "
                          "backends (they take stop strings and max_gen_toks)")
    if max_new < 1:
        raise ConfigError(f"{where}: max_gen_toks must be >= 1, got {max_new}")
    return tuple(str(s) for s in until), max_new


def _doc_key(doc: Mapping[str, Any]) -> str:
    """What a document is hashed by for the validation/test division: its id field, else its content."""
    if "id" in doc:
        return str(doc["id"])
    return record_id(json.loads(json.dumps(doc, sort_keys=True, default=str)))


# --- the objective ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Built:
    """One hm3 split: its examples and, per example, the request templates lm-eval built for it."""

    examples: tuple[Example, ...]
    requests: tuple[tuple[Any, ...], ...]


class LmEvalObjective(HarnessObjective):
    """One lm-evaluation-harness task, its chosen filter and metric (module docstring)."""

    def __init__(self, spec: LmEvalSpec):
        self.spec = spec
        self.name = spec.objective_name()
        self.task = task = load_task(spec)
        where = f"lm-eval task {spec.task!r}"
        self.output_type = output_type = task.OUTPUT_TYPE
        if getattr(task, "UNSAFE_CODE", False):
            raise ConfigError(f"{where} executes generated code; hm3 runs generated code only in its own sandbox "
                              "(the humaneval objectives)")
        if getattr(task, "MULTIMODAL", False):
            raise ConfigError(f"{where} is multimodal (images or audio); hm3's backends take text")
        if output_type not in SERVED_OUTPUT_TYPES:
            raise ConfigError(f"{where} has output type {output_type!r}, which hm3's backends do not serve (they serve "
                              f"{', '.join(SERVED_OUTPUT_TYPES)})")
        metrics, higher = list(task.aggregation()), task.higher_is_better()
        maximised = [m for m in metrics if higher.get(m, True)]
        self.metric = self._choose(spec.metric, (maximised or metrics) if spec.metric is None else metrics,
                                   "metric", "reports metrics")
        # lm-eval's lower-is-better metrics (perplexities, bits per byte, TER) have no upper bound
        self.higher_is_better = self.bounded = bool(higher.get(self.metric, True))
        self._filters = {f.name: f for f in task._filters}  # lm-eval's FilterEnsembles, in the task's order
        self.filter = self._choose(spec.filter, list(self._filters), "filter", "has filters")
        self._set_fewshot(spec.num_fewshot)
        if output_type == "generate_until":
            stop, max_new = generation_settings(task.get_config("generation_kwargs"), where)
            self.decoding = Generate(max_new_tokens=max_new, stop=stop)
        else:
            self.decoding = LogLikelihood(length_normalized=False)
        self._sources = self._split_sources()
        self._built: dict[str, _Built] = {}
        self._by_id: dict[str, tuple[Any, ...]] = {}

    def _choose(self, wanted: str | None, known: list[str], what: str, verb: str) -> str:
        if not known:
            raise ConfigError(f"lm-eval task {self.spec.task!r} has no {what}")
        if wanted is None:
            return known[0]
        if wanted not in known:
            close = difflib.get_close_matches(wanted, known, n=3, cutoff=0.5)
            raise ConfigError(f"lm-eval task {self.spec.task!r} {verb} {', '.join(known)}, not {wanted!r}"
                              + (f" (did you mean {', '.join(close)}?)" if close else ""))
        return wanted

    def _set_fewshot(self, wanted: int | None) -> None:
        """As lm-eval's ``simple_evaluate`` sets it, except that overriding a task that fixes 0 is refused
        (lm-eval would ignore the override with a log line)."""
        configured = self.task.get_config("num_fewshot")
        if wanted is None:
            if configured is None:
                self.task.set_config(key="num_fewshot", value=0)
            return
        if configured == 0 and wanted > 0:
            raise ConfigError(f"lm-eval task {self.spec.task!r} fixes num_fewshot: 0 in its definition; "
                              f"num_fewshot={wanted} cannot apply")
        self.task.set_config(key="num_fewshot", value=wanted)

    # --- splits ---------------------------------------------------------------------------------------

    def _split_sources(self) -> dict[str, str]:
        """Which lm-eval documents each hm3 split takes: ``{"validation": ..., "test": ...}``."""
        task = self.task
        if task.has_validation_docs() and task.has_test_docs():
            return {"validation": "validation", "test": "test"}
        if not (task.has_validation_docs() or task.has_test_docs()):
            raise ConfigError(f"lm-eval task {self.spec.task!r} has neither validation nor test documents")
        return {"validation": "divided", "test": "divided"}

    def _build(self, split: str) -> _Built:
        if split not in self._built:
            for name, built in self._make(split).items():
                self._built[name] = built
                self._by_id.update(zip((e.id for e in built.examples), built.requests, strict=True))
        return self._built[split]

    def _make(self, split: str) -> dict[str, _Built]:
        """``split`` built (with the other one too when both divide one lm-eval split)."""
        task, source = self.task, self._sources[split]
        if source != "divided":
            docs = list(task.test_docs() if source == "test" else task.validation_docs())
            with self._own_doc_excluded(source):
                requests = self._build_requests(docs)
            return {split: self._examples(source, docs, requests)}
        label = "test" if task.has_test_docs() else "validation"
        docs = list(task.test_docs() if label == "test" else task.validation_docs())
        whole = self._examples(label, docs, self._build_requests(docs))
        out = {}
        for name in ("validation", "test"):
            keep = [k for k, doc in enumerate(docs) if hashed_split(_doc_key(doc), self.spec.seed) == name]
            out[name] = _Built(tuple(whole.examples[k] for k in keep), tuple(whole.requests[k] for k in keep))
        return out

    @contextmanager
    def _own_doc_excluded(self, source: str) -> Iterator[None]:
        """While validation documents are built from a pool that is the validation documents themselves,
        have lm-eval leave each document out of its own few-shot examples. lm-eval does that when its
        few-shot split is the evaluated (test) split, so the few-shot split is named so for the duration."""
        from lm_eval.api.task import ConfigurableTask

        task = self.task
        if source != "validation" or not isinstance(task, ConfigurableTask):
            yield
            return
        cfg = task.fewshot_cfg
        default_pool = cfg.split is None and cfg.samples is None and not task.has_training_docs()
        if not (default_pool or cfg.split == task.config.validation_split):
            yield
            return
        task.fewshot_cfg = dataclasses.replace(cfg, split=task.config.test_split)
        try:
            yield
        finally:
            task.fewshot_cfg = cfg

    def _build_requests(self, docs: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """Each document's lm-eval requests, as ``Task.build_all_requests`` makes them (no chat template, no
        system instruction), the few-shot sampler seeded as ``simple_evaluate`` seeds it."""
        from lm_eval.defaults import DEFAULT_OTHER_SEED

        task = self.task
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        num_fewshot = task.config.num_fewshot or 0
        out = []
        for position, doc in enumerate(docs):
            ctx = task.fewshot_context(
                doc=doc, num_fewshot=num_fewshot, system_instruction=None, apply_chat_template=False,
                fewshot_as_multiturn=False, chat_template=None, gen_prefix=task.doc_to_prefix(doc),
            )
            made = task.construct_requests(doc=doc, ctx=ctx, metadata=(task.config.task, position, task.config.repeats),
                                           apply_chat_template=False, chat_template=None)
            out.append(tuple(made) if isinstance(made, list) else (made,))
        return out

    def _examples(self, label: str, docs: Sequence[Mapping[str, Any]], requests: list[tuple[Any, ...]]) -> _Built:
        examples = []
        for index, (doc, made) in enumerate(zip(docs, requests, strict=True)):
            args = [list(r.args) for r in made]
            digest = hashlib.sha256(json.dumps(args, sort_keys=True, default=str, ensure_ascii=False).encode())
            example_id = f"{label}:{index}:{digest.hexdigest()[:12]}"  # a changed prompt is a new example
            examples.append(self._example(example_id, doc, made))
        return _Built(tuple(examples), tuple(requests))

    def _choice_count(self, doc: Mapping[str, Any], made: Sequence[Any]) -> int:
        """How many of a document's loglikelihood requests are its choices (``acc_mutual_info`` appends as many
        unconditioned ones)."""
        if getattr(self.task.config, "doc_to_choice", None) is not None:
            return len(self.task.doc_to_choice(doc))
        return len(made)

    def _example(self, example_id: str, doc: Mapping[str, Any], made: Sequence[Any]) -> Example:
        """What Fisher estimation and readers see: the (first) prompt, the reference, the choices."""
        if self.output_type == "loglikelihood_rolling":  # the document is the continuation, scored from its start
            return Example(id=example_id, prompt="", target=str(made[0].args[0]))
        prompt, gold = made[0].args[0], self.task.doc_to_target(doc)
        if isinstance(gold, list):  # several references: the first stands for them
            gold = gold[0] if gold else ""
        if self.output_type == "generate_until" or getattr(self.task, "multiple_input", 0):
            return Example(id=example_id, prompt=str(prompt), target=str(gold))
        choices = tuple(str(r.args[1]) for r in made[: self._choice_count(doc, made)])
        if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices):
            target = choices[gold]
        else:  # the gold choice's text, or (a loglikelihood task) the continuation itself
            target = next((c for c in choices if c.strip() == str(gold).strip()), str(gold))
        return Example(id=example_id, prompt=str(prompt), target=target, choices=choices)

    def examples(self, split: str) -> Sequence[Example]:
        if split not in SPLITS:
            raise DataFileError(f"{self.name}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if split == "train":
            raise DataFileError(f"{self.name}: lm-eval objectives have validation and test splits (the task's "
                                "training documents are its few-shot pool)")
        built = self._build(split)
        if not built.examples:
            raise DataFileError(f"{self.name}: lm-eval task {self.spec.task!r} gives its {split} split no documents "
                                "(a one-split task is divided by hashing: try another @SEED or more documents)")
        return built.examples

    # --- scoring --------------------------------------------------------------------------------------

    def requests(self, examples: Sequence[Example]) -> list[list[Any]]:
        out = []
        for position, example in enumerate(examples):
            templates = self._by_id.get(example.id)
            if templates is None:
                raise DataFileError(f"{self.name}: example {example.id!r} is not one of this objective's examples")
            out.append([dataclasses.replace(t, metadata=(t.task_name, position, t.repeats), resps=[],
                                            filtered_resps={}) for t in templates])
        return out

    def score_answered(self, examples: Sequence[Example], requests: Sequence[Sequence[Any]]) -> tuple[float, list[str]]:
        """The chosen filter over every answer, ``process_results`` per document, the metric's aggregation."""
        score, outputs, _ = self._score_answered(examples, requests, samples=False)
        return score, outputs

    def score_answered_samples(self, examples: Sequence[Example], requests: Sequence[Sequence[Any]]
                               ) -> tuple[float, list[str], list[dict[str, Any]]]:
        """:meth:`score_answered` and a record per document: its prompt (lm-eval's context), the output, the
        filtered response as lm-eval holds it, and the document's value of the metric (``score``; absent
        where the task gave the document none)."""
        score, outputs, records = self._score_answered(examples, requests, samples=True)
        return score, outputs, records

    def _score_answered(self, examples: Sequence[Example], requests: Sequence[Sequence[Any]], *, samples: bool
                        ) -> tuple[float, list[str], list[dict[str, Any]]]:
        from lm_eval.api.metrics import mean

        from hm3.samples import jsonable

        task = self.task
        if len(requests) != len(examples) or not examples:
            raise ValueError(f"{self.name}: {len(requests)} answered request sets for {len(examples)} examples")
        self._filters[self.filter].apply([r for made in requests for r in made])
        values, outputs, records = [], [], []
        for example, made in zip(examples, requests, strict=True):
            made = sorted(made, key=lambda r: r.idx)
            answers = [r.filtered_resps[self.filter] for r in made]
            metrics = task.process_results(made[0].doc, answers)
            if self.metric in metrics:
                values.append(metrics[self.metric])
            outputs.append(self._output_text(made, answers))
            if samples:
                record = {"example_id": example.id, "prompt": str(made[0].args[0]), "output": outputs[-1],
                          "target": example.target, "filtered_response": jsonable(answers), "metric": self.metric}
                if self.metric in metrics:
                    record["score"] = jsonable(metrics[self.metric])
                records.append(record)
        if not values:
            raise ConfigError(f"{self.name}: lm-eval task {self.spec.task!r} gave no {self.metric!r} for any of "
                              f"{len(examples)} examples")
        score = float(task.aggregation().get(self.metric, mean)(values))
        if self.higher_is_better and not 0.0 <= score <= 1.0:
            raise ConfigError(f"{self.name}: metric {self.metric!r} is {score}, outside [0, 1]; hm3 scores objectives "
                              "where higher is better in [0, 1]: choose a metric in that range (metric=)")
        if not math.isfinite(score):
            raise ConfigError(f"{self.name}: metric {self.metric!r} is {score}; hm3 ranks only finite scores")
        return score, outputs, records

    def _output_text(self, made: Sequence[Any], answers: Sequence[Any]) -> str:
        """The answer in words, for audit: the filtered text, or the choice with the highest log-likelihood."""
        if self.output_type == "generate_until":
            return str(answers[0])
        if self.output_type == "multiple_choice" and not getattr(self.task, "multiple_input", 0):
            count = self._choice_count(made[0].doc, made)
            lls = [a[0] if isinstance(a, tuple | list) else a for a in answers[:count]]
            return str(made[max(range(count), key=lls.__getitem__)].args[1])
        return repr(answers[0] if len(answers) == 1 else list(answers))
