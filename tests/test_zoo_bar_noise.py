"""experiments/zoo_bar_noise.py: its bar is the zoo build's own, and its bootstrap resamples the examples paired."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import zoo_bar_noise  # noqa: E402

from hm3.zoo.build import quality_bar  # noqa: E402
from objectives.zoo import ZOO_TASKS  # noqa: E402


@pytest.mark.parametrize("seed", range(20))
def test_the_bar_of_one_matrix_is_the_zoo_builds_own(seed):
    rng = np.random.default_rng(seed)
    scores = {m: {t: float(rng.choice([rng.uniform(), 0.5])) for t in ZOO_TASKS}
              for m in ("base", *ZOO_TASKS, zoo_bar_noise.MERGE)}
    margins, kept, ok = zoo_bar_noise.bar_of(scores)
    matrix = {m: scores[m] for m in ("base", *ZOO_TASKS)}
    bar = quality_bar(matrix, scores[zoo_bar_noise.MERGE])
    assert ok == bar["ok"]
    for t in ZOO_TASKS:
        assert margins[t] == pytest.approx(bar["checks"][t]["expert_margin"], abs=5e-5)
        assert kept[t] == pytest.approx(bar["checks"][t]["ties_gain_kept"], abs=5e-5)


N = 40  # examples per task: a resample with no example the base gets wrong is then all but impossible


def _toy(answers: dict[str, dict[str, list[bool]]]):
    """Examples and outputs of every zoo task where each model's output is right or wrong as given."""
    from objectives.zoo import zoo_objective

    examples = {t: list(zoo_objective(t).examples("validation"))[:N] for t in ZOO_TASKS}
    outputs = {m: {t: [e.target if ok else "x" for e, ok in zip(examples[t], answers[m][t], strict=True)]
                   for t in ZOO_TASKS} for m in answers}
    return examples, outputs


def test_the_bootstrap_keeps_the_full_sample_scores_and_resamples_every_model_alike():
    """The merge answers each task as its expert does, so on the same examples it keeps exactly all of the
    expert's gain: a paired resample keeps 100% every time, one that drew each model's examples apart would not."""
    base = [True, False, False, False] * (N // 4)
    expert = [True, True, False, False] * (N // 4)
    answers = {"base": {t: base for t in ZOO_TASKS}, zoo_bar_noise.MERGE: {t: expert for t in ZOO_TASKS}}
    for task in ZOO_TASKS:  # each expert gains on its own task and answers the others as the base
        answers[task] = {t: expert if t == task else base for t in ZOO_TASKS}
    examples, outputs = _toy(answers)
    found = zoo_bar_noise.bootstrap(examples, outputs, resamples=200, seed=3)
    for t in ("math", "code"):  # accuracy: the full-sample scores are plain means
        assert found["scores"]["base"][t] == 0.25 and found["scores"][t][t] == 0.5
        assert found["margins"][t] == 0.25 and found["kept"][t] == 1.0
        assert found["kept_se"][t] == 0.0 and found["kept_ok_share"][t] == 1.0
        assert found["margin_se"][t] > 0.02  # the margin does vary with the examples drawn
