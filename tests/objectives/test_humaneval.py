"""HumanEval adapter: bundled data, user files, and pass@1 through the real sandbox, which no early exit fakes."""

from __future__ import annotations

import pytest

from hm3.errors import DataFileError
from objectives.humaneval import DECODING, HumanEvalObjective

PROBLEM = {
    "task_id": "Tiny/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
    "split": "test",
}


def _sandbox_or_skip():
    try:
        from hm3.eval.sandbox import check_program
    except ImportError as exc:  # written in parallel by another engineer
        pytest.skip(f"hm3.eval.sandbox.check_program is not available yet: {exc}")
    return check_program


def test_bundled_problems_load_without_download():
    objective = HumanEvalObjective()
    validation, test = objective.examples("validation"), objective.examples("test")
    ids = [e.id for e in validation] + [e.id for e in test]
    assert len(ids) == len(set(ids)) == 164
    assert objective.name == "humaneval"
    assert objective.decoding == DECODING
    assert validation[0].meta["entry_point"] and "def check" in validation[0].meta["test"]


def test_correct_and_wrong_completions(write_jsonl):
    _sandbox_or_skip()
    objective = HumanEvalObjective(write_jsonl("he.jsonl", [PROBLEM]))
    (example,) = objective.examples("test")
    assert example.prompt == PROBLEM["prompt"]
    assert objective.score(example, "    return a + b\n") == 1.0
    assert objective.score(example, "    return a - b\n") == 0.0
    assert objective.score(example, "    return (\n") == 0.0  # syntax error
    assert objective.aggregate([example, example], ["    return a + b\n", "    return a * b\n"]) == 0.5


def test_bad_entry_point_names_line(write_jsonl):
    path = write_jsonl("he.jsonl", [PROBLEM, dict(PROBLEM, task_id="Tiny/1", entry_point="not valid")])
    with pytest.raises(DataFileError, match=r"he\.jsonl, line 2: field entry_point 'not valid'"):
        HumanEvalObjective(path)


def test_bundled_canonical_solutions_pass_and_empty_output_fails():
    _sandbox_or_skip()
    objective = HumanEvalObjective()
    examples = objective.examples("test")[:2]
    assert all(objective.score(e, e.target) == 1.0 for e in examples)
    assert objective.score(examples[0], "") == 0.0  # docstring-only function returns None


# Completions (appended to the prompt's signature and docstring) that end with status 0 before
# ``check`` returned: the upstream harness counts each as a failure, and so must we.
FAKE_PASSES = {
    "sys.exit(0) in the body": "    import sys\n    sys.exit(0)\n",
    "raise SystemExit in the body": "    raise SystemExit\n",
    "os._exit(0) in the body": "    import os\n    os._exit(0)\n",
    "sys.exit(0) at top level after the function": "    return 0\n\nimport sys\nsys.exit(0)\n",
    "os._exit(0) at top level after the function": "    return 0\n\nimport os\nos._exit(0)\n",
    "os._exit(0) from a thread": "    import os, threading\n"
    "    threading.Thread(target=os._exit, args=(0,)).start()\n    threading.Event().wait(5)\n",
    "atexit handler that exits 0": "    import atexit, os\n    atexit.register(os._exit, 0)\n    return 0\n",
    "kills itself": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "closes stdout and exits 0": "    import os\n    os.close(1)\n    os._exit(0)\n",
    "prints a token guess and exits 0": "    import os\n    print('0' * 32, flush=True)\n    os._exit(0)\n",
}


@pytest.mark.parametrize("completion", FAKE_PASSES.values(), ids=FAKE_PASSES.keys())
def test_early_exits_score_zero(write_jsonl, completion):
    _sandbox_or_skip()
    objective = HumanEvalObjective(write_jsonl("he.jsonl", [PROBLEM]))
    (example,) = objective.examples("test")
    assert objective.score(example, completion) == 0.0
    assert objective.score(example, "    return a + b\n") == 1.0  # the same task still passes honestly
