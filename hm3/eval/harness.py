"""lm-evaluation-harness's model interface over an hm3 backend, and the loop that answers a task's requests.

:class:`BackendLM` is lm-eval's ``LM`` over the :class:`~hm3.eval.backend.Backend` a session already
holds, so lm-eval tasks (:mod:`objectives.lmeval`) are scored on the live model -- merges written into
it in place, vLLM's weights reloaded -- and a search never loads a model for them. lm-eval hands a
model three kinds of request:

* ``loglikelihood`` (also what ``multiple_choice`` tasks send): the backend's ``greedy_loglikelihood``,
  tokenised as lm-eval's own causal models do (:func:`hm3.eval.backend.encode_pair`);
* ``generate_until``: the backend's greedy ``generate``, grouped by (stop strings, max new tokens),
  the task's settings read through lm-eval's own normalisation;
* ``loglikelihood_rolling`` (perplexity over whole documents): the document tokenised as HFLM tokenises
  it, cut into lm-eval's own disjoint windows of at most the model's length (``get_rolling_token_windows``,
  ``make_disjoint_window``), each window scored by the backend's ``token_loglikelihood``, summed. The hf
  backend serves it; vLLM does not (its prompt log-probabilities cannot take HFLM's full-length window).

:func:`answer_and_score` is the evaluator's loop for these objectives: each example's requests are
answered by type (``repeats`` copies each, as lm-eval's evaluator makes them) and the objective scores
the answered set with the task's filter and metric.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from hm3.errors import BackendError
from hm3.eval.backend import Backend, check_output_count, encode_prompt
from hm3.extras import extra_imports
from objectives.base import Example, HarnessObjective
from objectives.lmeval import generation_settings

with extra_imports("lmeval", "lm-eval objectives"):
    from lm_eval.api.model import LM


class BackendLM(LM):
    """lm-eval's ``LM`` answered by an hm3 backend (greedy, text in and text out; module docstring)."""

    def __init__(self, backend: Backend):
        super().__init__()
        self.backend = backend

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether the continuation is the greedy one) per request."""
        if not requests:
            return []
        score = getattr(self.backend, "greedy_loglikelihood", None)
        if score is None:
            raise BackendError(f"the {self.backend.name} backend cannot tell whether a continuation is the greedy one, "
                               "which lm-eval's loglikelihood and multiple_choice requests need; use the hf or vllm "
                               "backend")
        answers = score([(r.args[0], r.args[1]) for r in requests])
        check_output_count("loglikelihood", len(answers), len(requests))
        return [(float(ll), bool(greedy)) for ll, greedy in answers]

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy continuations, cut at the task's stop strings, in request order."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[generation_settings(r.args[1], f"lm-eval task {r.task_name!r}")].append(i)
        outputs: list[str] = [""] * len(requests)
        max_length = getattr(self.backend, "max_length", None)
        for (stop, max_new_tokens), indices in groups.items():
            if max_length is not None and max_new_tokens >= max_length:  # HFLM refuses it too: no room for a prompt
                raise BackendError(f"lm-eval task {requests[indices[0]].task_name!r} generates up to {max_new_tokens} "
                                   f"tokens, but the model reads at most {max_length}: no room is left for the "
                                   "prompt (lm-eval's HFLM refuses this too)")
            texts = self.backend.generate([requests[i].args[0] for i in indices], max_new_tokens=max_new_tokens,
                                          stop=stop)
            check_output_count("generate", len(texts), len(indices))
            for i, text in zip(indices, texts, strict=True):
                outputs[i] = text
        return outputs

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """log p(document) per request, the sum over lm-eval's rolling windows (module docstring)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        score = getattr(self.backend, "token_loglikelihood", None)
        if score is None:
            raise BackendError(f"the {self.backend.name} backend cannot serve lm-eval's loglikelihood_rolling requests "
                               "(perplexity over whole documents); use the hf backend")
        tokenizer = self.backend.tokenizer
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        owners, windows = [], []
        for i, r in enumerate(requests):
            (text,) = r.args
            for window in get_rolling_token_windows(token_list=encode_prompt(tokenizer, text), prefix_token=prefix,
                                                    max_seq_len=self.backend.max_length, context_len=1):
                owners.append(i)
                windows.append(make_disjoint_window(window))
        answers = score(windows)
        check_output_count("loglikelihood_rolling", len(answers), len(windows))
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, answers, strict=True):
            totals[i] += float(ll)
        return totals


def answer_and_score(backend: Backend, objective: HarnessObjective, examples: Sequence[Example], *,
                     samples: bool = False) -> tuple[float, list[str]] | tuple[float, list[str], list[dict[str, Any]]]:
    """(score, one output per example) of ``objective`` on ``examples``, answered by ``backend``; with
    ``samples``, (score, outputs, one record per example) (:meth:`HarnessObjective.score_answered_samples`)."""
    requests = objective.requests(examples)
    lm = BackendLM(backend)
    by_type: dict[str, list[Any]] = defaultdict(list)
    for made in requests:
        for r in made:
            by_type[r.request_type].extend([r] * (r.repeats or 1))
    for request_type, batch in by_type.items():
        answer = getattr(lm, request_type, None)
        if answer is None:
            raise BackendError(f"objective {objective.name!r} sends lm-eval {request_type!r} requests, which hm3 "
                               "cannot answer")
        answers = answer(batch)
        check_output_count(request_type, len(answers), len(batch))
        for r, a in zip(batch, answers, strict=True):
            r.resps.append(a)
    if samples:
        return objective.score_answered_samples(examples, requests)
    return objective.score_answered(examples, requests)
