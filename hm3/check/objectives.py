"""Stand-in objectives for ``hm3 check``: each objective as the run would load it, or a tiny one like it.

Generated tasks (``zoo:``, ``compositional:``) and HumanEval's bundled problems are always here and
are used as they are. A data file (``gsm8k:PATH`` ...) is used when it exists; otherwise a four-record
file of the adapter's own format stands in, so the adapter, its prompts and its scorer still run, with
the objective's options but ``chat=`` (and as many train records as ``fewshot=`` asks for).

An lm-eval task is loaded as the run would load it when lm-eval and the task's data are here.
Otherwise a tiny task of the same output type (``generate_until``, ``multiple_choice`` or
``loglikelihood``, as the task's YAML declares it) takes its place: with lm-eval installed, an lm-eval
task over a local four-document file (:func:`write_lmeval_standin`), so hm3's lm-eval path (requests,
filters, metric) still runs; without lm-eval, an adapter file (a GSM8K-format file for generation, a
choice file, scored through the same log-likelihood call, for the other two), the output type then
coming from :data:`LMEVAL_OUTPUT_TYPES`. The check says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hm3.errors import ConfigError, DataFileError, MissingExtraError

#: Output types of lm-eval tasks that reproduction configs use, for when lm-eval is not installed
#: (lm-eval's task YAMLs say the same: ``output_type``). ``None``: the task executes generated code,
#: which hm3 refuses for lm-eval tasks (its own ``humaneval`` objectives run code in its sandbox).
LMEVAL_OUTPUT_TYPES: dict[str, str | None] = {
    "gsm8k": "generate_until", "gsm8k_cot": "generate_until", "mathqa": "multiple_choice",
    "mgsm_direct_ja": "generate_until", "mgsm_native_cot_ja": "generate_until", "mgsm_en_cot_ja": "generate_until",
    "cola": "multiple_choice", "mnli": "multiple_choice", "mrpc": "multiple_choice", "qnli": "multiple_choice",
    "qqp": "multiple_choice", "rte": "multiple_choice", "sst2": "multiple_choice", "wnli": "multiple_choice",
    "xnli_en": "multiple_choice", "xnli_de": "multiple_choice", "xnli_fr": "multiple_choice",
    "xnli_zh": "multiple_choice", "lambada_openai": "loglikelihood", "arc_easy": "multiple_choice",
    "wmt14-en-fr": "generate_until", "wmt14-fr-en": "generate_until", "wmt16-de-en": "generate_until",
    "wmt16-en-de": "generate_until", "iwslt2017-en-ar": "generate_until", "iwslt2017-ar-en": "generate_until",
    "humaneval": None, "mbpp": None,
}

_RECORDS = {
    "gsm8k": [{"question": f"Tom has {a} apples and buys {b} more. How many apples has he?",
               "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in ((2, 3), (4, 1), (5, 5), (7, 2))],
    "translation": [{"source": s, "target": t} for s, t in
                    (("guten Morgen", "good morning"), ("danke", "thank you"), ("ein Haus", "a house"),
                     ("der Hund", "the dog"))],
    "choice": [{"question": q, "choices": c, "answer": a} for q, c, a in
               (("2 + 2 =", ["4", "5"], 0), ("Is the sky green?", ["yes", "no"], 1),
                ("Capital of France?", ["Rome", "Paris", "Oslo"], 1), ("3 > 1?", ["true", "false"], 0))],
    "humaneval": [{"task_id": f"standin/{i}", "prompt": f"def add{i}(a, b):\n    \"\"\"Return a + b + {i}.\"\"\"\n",
                   "canonical_solution": f"    return a + b + {i}\n", "entry_point": f"add{i}",
                   "test": f"def check(f):\n    assert f(1, 2) == {3 + i}\n"} for i in range(4)],
}
_STANDIN_KIND = {"generate_until": "gsm8k", "multiple_choice": "choice", "loglikelihood": "choice"}
#: lm-eval task YAMLs of the stand-ins, by output type (data files are added by write_lmeval_standin)
_LMEVAL_TASKS: dict[str, dict[str, Any]] = {
    "generate_until": {"doc_to_text": "Q: {{q}}\nA:", "doc_to_target": "{{a}}",
                       "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                       "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
    "multiple_choice": {"doc_to_text": "Q: {{q}}\nA:", "doc_to_choice": "choices", "doc_to_target": "gold",
                        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    "loglikelihood": {"doc_to_text": "Q: {{q}}\nA:", "doc_to_target": " {{a}}",
                      "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
}
_LMEVAL_DOCS = [{"q": q, "a": a, "choices": [a, b], "gold": 0} for q, a, b in
                (("2 + 2", "4", "5"), ("sky colour", "blue", "green"), ("3 * 3", "9", "6"), ("cat sound", "meow", "moo"))]


@dataclass(frozen=True)
class ObjectiveChoice:
    """What a check evaluates for one objective of the config: ``spec`` and, if substituted, why."""

    original: str
    spec: str
    note: str | None = None  # None: the objective itself is used
    path: str | None = None  # the stand-in's file or task folder


def _write_standin(kind: str, data_dir: Path, index: int, shots: int = 0) -> Path:
    """A four-record ``kind`` JSONL file (two validation, two test records) in ``data_dir``, and ``shots``
    train records for an objective with ``fewshot=`` (its shots come from train)."""
    path = data_dir / f"objective-{index}-{kind}.jsonl"
    records = [r | {"split": "validation" if i < 2 else "test"} for i, r in enumerate(_RECORDS[kind])]
    records += [_RECORDS[kind][i % len(_RECORDS[kind])] | {"split": "train"} for i in range(shots)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _standin_options(options: str) -> tuple[str, int]:
    """A spec's options and seed (``,name=g,fewshot=2@3``) as its stand-in takes them, and its ``fewshot=``
    count. ``chat=`` is left out: a stand-in's toy tokenizer has no chat template, whether or not the model's has."""
    from objectives.registry import split_seed

    body, _ = split_seed(options)
    first, *items = body.split(",")  # first: "" or a seed right after the path ("@3")
    pairs = [(key.strip(), value.strip()) for key, _, value in (item.partition("=") for item in items)]
    kept = [item for item, (key, _) in zip(items, pairs, strict=True) if key != "chat"]
    shots = next((int(value) for key, value in pairs if key == "fewshot" and value.isdigit()), 0)
    return ",".join([first, *kept]) + options[len(body):], shots


def write_lmeval_standin(output_type: str, folder: Path, index: int, name: str | None) -> str:
    """An lm-eval task of ``output_type`` over four local documents (two validation, two test) in
    ``folder``, as an objective spec named ``name`` (None: the stand-in task's own default name)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    task = f"hm3_check_{index}"
    files = {}
    for split, docs in (("validation", _LMEVAL_DOCS[:2]), ("test", _LMEVAL_DOCS[2:])):
        files[split] = str(folder / f"{task}_{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
              "output_type": output_type, "validation_split": "validation", "test_split": "test", "num_fewshot": 0,
              **_LMEVAL_TASKS[output_type]}
    (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return f"lm-eval:{task},include_path={folder}" + (f",name={name}" if name is not None else "")


def _output_type(parsed: Any, spec: str, why: str, lmeval_here: bool) -> str:
    """The task's output type: its YAML's (lm-eval installed), else :data:`LMEVAL_OUTPUT_TYPES`; a task that
    executes code is refused, as the run would refuse it."""
    from objectives.lmeval import declared_output_type

    declared = declared_output_type(parsed) if lmeval_here else None
    known = parsed.task in LMEVAL_OUTPUT_TYPES
    if declared is None and not known:
        raise ConfigError(f"objective {spec!r}: {why}, and hm3 check does not know the task's output type: "
                          "install lm-eval and the task's data so that the check can load it")
    if known and LMEVAL_OUTPUT_TYPES[parsed.task] is None:
        raise ConfigError(f"objective {spec!r}: lm-eval task {parsed.task!r} executes generated code, which hm3 "
                          "refuses for lm-eval tasks; use hm3's humaneval objectives (humaneval, humaneval:PATH)")
    output_type = declared or LMEVAL_OUTPUT_TYPES[parsed.task]
    if output_type not in _STANDIN_KIND:
        raise ConfigError(f"objective {spec!r}: lm-eval task {parsed.task!r} has output type {output_type!r}, "
                          f"which hm3's backends do not serve (they serve {', '.join(_STANDIN_KIND)})")
    return output_type


def _lmeval_choice(spec: str, rest: str, data_dir: Path, index: int) -> ObjectiveChoice:
    from objectives.lmeval import parse_spec
    from objectives.registry import get_objective

    parsed = parse_spec(rest, spec=spec)  # its syntax is checked whether or not lm-eval is here
    try:
        get_objective(spec)
        return ObjectiveChoice(spec, spec)
    except MissingExtraError:
        lmeval_here = False
        why = "lm-eval is not installed here (pip install 'hm3[lmeval]'), so the task itself is not checked"
    except DataFileError:
        lmeval_here = True
        why = "its data is not in the local datasets cache"
    output_type = _output_type(parsed, spec, why, lmeval_here)
    if lmeval_here:
        # the original's name= where it gives one; a default name (lm-eval:TASK/...) holds ':', which name=
        # may not, so the stand-in then keeps its own default name
        # a folder per objective: an error naming it is traced back to this objective alone
        folder = data_dir / "lm-eval" / f"objective-{index}"
        standin = write_lmeval_standin(output_type, folder, index, parsed.name)
        return ObjectiveChoice(spec, standin, f"{why}: stand-in {output_type} lm-eval task (4 local documents)",
                               str(folder))
    kind = _STANDIN_KIND[output_type]
    path = _write_standin(kind, data_dir, index)
    return ObjectiveChoice(spec, f"{kind}:{path}", f"{why}: stand-in {output_type} task ({kind} adapter, 4 records)",
                           str(path))


def choose_objective(spec: str, data_dir: Path, index: int) -> ObjectiveChoice:
    """The objective a check evaluates in place of ``spec`` (module docstring)."""
    from objectives.registry import FILE_KINDS, get_objective, split_kind, split_seed

    body, _ = split_seed(spec.strip())
    kind, sep, rest = split_kind(body)
    if kind == "lm-eval" and sep == ":":
        return _lmeval_choice(spec, rest, data_dir, index)
    # the path ends where the options (,name=... ,chat=true) or a seed (@3) begin, as get_objective reads it
    data_file = split_seed(rest.partition(",")[0])[0]
    if kind in FILE_KINDS and data_file:
        if Path(data_file).is_file():
            get_objective(spec)  # a malformed file is refused here, naming its line, before any model is built
            return ObjectiveChoice(spec, spec)
        # the options stay: the stand-in is named, seeded and prompted (fewshot=) as the objective
        options, shots = _standin_options(spec.strip()[len(kind) + 1 + len(data_file):])
        path = _write_standin(kind, data_dir, index, shots)
        return ObjectiveChoice(spec, f"{kind}:{path}{options}", f"data file {data_file} not found: stand-in {kind} "
                               "file (4 records)", str(path))
    get_objective(spec)  # generated tasks, bundled HumanEval; an unknown spec is refused by name
    return ObjectiveChoice(spec, spec)
