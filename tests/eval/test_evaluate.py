"""The scoring loop: dispatch on decoding, subset selection, output checks; fake and real backends."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch
from tiny_lm import build_tiny_lm

from hm3.errors import BackendError, SplitTooSmallError
from hm3.eval.evaluate import EvalResult, evaluate_objective
from hm3.eval.hf import HFBackend
from objectives.base import Example, Generate, LogLikelihood, Objective
from objectives.choice import ChoiceObjective


class ListObjective(Objective):
    """Examples held in memory; exact match."""

    def __init__(self, examples: list[Example], decoding, name: str = "list"):
        self.name, self.decoding, self._examples = name, decoding, examples

    def examples(self, split: str) -> Sequence[Example]:
        return self._examples

    def score(self, example: Example, output: str) -> float:
        return float(output == example.target)


class FakeBackend:
    """Answers from lookup tables, recording how it was called."""

    name = "fake"
    tokenizer = None

    def __init__(
        self, answers: Mapping[str, str] | None = None, loglik: Mapping[tuple[str, str], float] | None = None
    ):
        self.answers, self.loglik, self.calls = dict(answers or {}), dict(loglik or {}), []
        self.drop_one = False

    def generate(self, prompts, *, max_new_tokens, stop=()):
        self.calls.append(("generate", list(prompts), max_new_tokens, tuple(stop)))
        out = [self.answers.get(p, "") for p in prompts]
        return out[:-1] if self.drop_one else out

    def loglikelihood(self, requests):
        self.calls.append(("loglikelihood", list(requests)))
        out = [self.loglik[r] for r in requests]
        return out[:-1] if self.drop_one else out

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def live_parameters(self):
        return None

    def close(self) -> None:
        pass


GEN_EXAMPLES = [Example(id=f"e{i}", prompt=f"{i}+{i}=", target=str(2 * i)) for i in range(4)]


def test_generate_objective_scores_outputs_in_order():
    objective = ListObjective(GEN_EXAMPLES, Generate(max_new_tokens=5, stop=("\n",)))
    backend = FakeBackend({"0+0=": "0", "1+1=": "2", "2+2=": "5", "3+3=": "6"})
    result = evaluate_objective(backend, objective, "test")
    assert isinstance(result, EvalResult)
    assert result.score == pytest.approx(0.75)
    assert (result.objective, result.split, result.count) == ("list", "test", 4)
    assert result.example_ids == ("e0", "e1", "e2", "e3")
    assert result.outputs == ("0", "2", "5", "6")
    assert backend.calls == [("generate", ["0+0=", "1+1=", "2+2=", "3+3="], 5, ("\n",))]


def test_seconds_time_the_backends_work(monkeypatch):
    """``seconds`` is the wall time around the backend's answers (a slow backend shows in it)."""
    import time

    backend = FakeBackend({"0+0=": "0"})
    slow = backend.generate

    def generate(prompts, **kwargs):
        time.sleep(0.2)
        return slow(prompts, **kwargs)

    monkeypatch.setattr(backend, "generate", generate)
    result = evaluate_objective(backend, ListObjective(GEN_EXAMPLES, Generate(max_new_tokens=5)), "test")
    assert 0.2 <= result.seconds < 5


def test_indices_select_a_subset_in_the_given_order():
    objective = ListObjective(GEN_EXAMPLES, Generate(max_new_tokens=5))
    result = evaluate_objective(FakeBackend({"3+3=": "6"}), objective, "validation", indices=[3, 1])
    assert result.example_ids == ("e3", "e1")
    assert result.score == pytest.approx(0.5)


def test_out_of_range_or_empty_indices_are_clear_errors():
    objective = ListObjective(GEN_EXAMPLES, Generate(max_new_tokens=5))
    with pytest.raises(
        SplitTooSmallError, match=r"'list' split 'test' has 4 examples; indices out of range: \[4, -1\]"
    ):
        evaluate_objective(FakeBackend(), objective, "test", indices=[0, 4, -1])
    with pytest.raises(SplitTooSmallError, match="no examples"):
        evaluate_objective(FakeBackend(), objective, "test", indices=[])


def test_empty_output_scores_zero():
    objective = ListObjective(GEN_EXAMPLES[:2], Generate(max_new_tokens=5))
    result = evaluate_objective(FakeBackend({}), objective, "test")
    assert result.outputs == ("", "") and result.score == 0.0


@pytest.mark.parametrize("decoding", [Generate(max_new_tokens=3), LogLikelihood()])
def test_wrong_number_of_backend_outputs_is_an_error(decoding):
    examples = [Example(id="q", prompt="p", target=" a", choices=(" a", " b"))]
    backend = FakeBackend({"p": " a"}, {("p", " a"): -1.0, ("p", " b"): -2.0})
    backend.drop_one = True
    with pytest.raises(BackendError, match="returned 1 .* for 2 requests|returned 0 .* for 1 requests"):
        evaluate_objective(backend, ListObjective(examples, decoding), "test")


def test_loglikelihood_picks_argmax_and_length_normalises():
    examples = [
        Example(id="q1", prompt="P1", target=" long answer", choices=(" no", " long answer")),
        Example(id="q2", prompt="P2", target=" b", choices=(" a", " b", " c")),
    ]
    loglik = {
        ("P1", " no"): -3.0,  # per char of "no" -1.5
        ("P1", " long answer"): -6.0,  # per char of "long answer" -0.55
        ("P2", " a"): -2.0,
        ("P2", " b"): -1.0,
        ("P2", " c"): -1.0,  # a tie: the first maximal choice wins
    }
    raw = evaluate_objective(FakeBackend(loglik=loglik), ListObjective(examples, LogLikelihood()), "test")
    assert raw.outputs == (" no", " b") and raw.score == pytest.approx(0.5)
    normed = evaluate_objective(
        FakeBackend(loglik=loglik), ListObjective(examples, LogLikelihood(length_normalized=True)), "test"
    )
    assert normed.outputs == (" long answer", " b") and normed.score == pytest.approx(1.0)


def test_length_normalisation_is_lm_evals_acc_norm_over_the_choice_without_its_delimiter():
    """lm-eval's acc_norm divides by ``len(choice)``, the text after the target delimiter (the leading space
    the choices here carry, as :mod:`objectives.choice` writes them): ``-1.2/1 > -2.1/2`` picks " bb",
    where dividing by the spaced lengths (``-1.2/2 > -2.1/3``) would pick " a"."""
    examples = [Example(id="q", prompt="P", target=" bb", choices=(" a", " bb"))]
    loglik = {("P", " a"): -1.2, ("P", " bb"): -2.1}
    lls = np.array([loglik[("P", c)] for c in examples[0].choices])
    acc_norm_pick = examples[0].choices[int(np.argmax(lls / np.array([len(c[1:]) for c in examples[0].choices])))]
    result = evaluate_objective(FakeBackend(loglik=loglik),
                                ListObjective(examples, LogLikelihood(length_normalized=True)), "test")
    assert result.outputs == (acc_norm_pick,) == (" bb",)


def test_real_choice_objective_with_hf_backend(tmp_path):
    """End to end on a real adapter and model: the choice made is the backend's own argmax."""
    records = [
        {"question": f"{a}+{b}", "choices": [str(a + b), str(a + b + 1), "x"], "answer": 0, "split": "test"}
        for a, b in [(1, 2), (3, 4), (5, 6)]
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    objective = ChoiceObjective(data)
    backend = HFBackend.from_pretrained(build_tiny_lm(tmp_path / "m", seed=0), batch_size=2)
    result = evaluate_objective(backend, objective, "test")
    for example, chosen in zip(objective.examples("test"), result.outputs, strict=True):
        scores = backend.loglikelihood([(example.prompt, c) for c in example.choices])
        assert chosen == example.choices[scores.index(max(scores))]
    gold = [e.target for e in objective.examples("test")]
    assert result.score == pytest.approx(sum(o == g for o, g in zip(result.outputs, gold, strict=True)) / 3)
