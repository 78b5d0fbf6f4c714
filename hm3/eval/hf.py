"""The transformers backend: batched greedy generation and log-likelihood on a live ``nn.Module``.

It is the reference backend (everything runs wherever transformers does) and
the fastest for the search loop's weight swaps, because the in-memory merge
path writes straight into :meth:`HFBackend.live_parameters`. Prompts are sorted
by length before batching (less padding) and answers restored to input order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from hm3.errors import BackendError, CheckpointError
from hm3.eval.backend import (
    as_torch_dtype,
    check_generate_args,
    check_model_dir,
    check_output_count,
    check_tokenizer_fits,
    decode_generated,
    encode_pair,
    fit_loglikelihood_input,
    generation_eos_ids,
    generation_prompt_ids,
    load_tokenizer,
    max_input_length,
    validate_state,
)


class HFBackend:
    """A transformers causal LM and its tokenizer, scored greedily in batches."""

    name = "hf"

    def __init__(
        self, model: Any, tokenizer: Any, *, batch_size: int = 32, model_dir: str | Path = "<model>"
    ):
        if batch_size < 1:
            raise BackendError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.model_dir = Path(model_dir)
        check_tokenizer_fits(tokenizer, model.get_input_embeddings().num_embeddings, model_dir)
        self.pad_id = _pad_id(tokenizer)
        self.eos_ids = generation_eos_ids(model_dir, tokenizer)
        #: longer inputs are left-truncated as lm-eval's HFLM truncates them (:func:`fit_generation_prompt`,
        #: :func:`fit_loglikelihood_input`)
        self.max_length = max_input_length(model.config, tokenizer)
        self._stop_cache: dict[tuple[str, ...], Any] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> HFBackend:
        """Model and tokenizer from the same directory (a tokenizer from elsewhere is not trusted)."""
        from transformers import AutoModelForCausalLM

        path = check_model_dir(model_dir)
        tokenizer = load_tokenizer(path)
        try:
            with _quiet_progress():
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=as_torch_dtype(dtype))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: transformers cannot load the model ({e})") from e
        return cls(model.to(device), tokenizer, batch_size=batch_size, model_dir=path)

    # --- generation -------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations of ``prompts`` (new text only, cut at the first stop string); a prompt too long
        for the model keeps its last ``max_length - max_new_tokens`` tokens."""
        check_generate_args(prompts, max_new_tokens)
        encoded = [generation_prompt_ids(self.tokenizer, p, self.max_length, max_new_tokens) for p in prompts]
        outputs: list[str] = [""] * len(encoded)
        for batch in _length_sorted_batches([len(e) for e in encoded], self.batch_size):
            new_ids = self._generate_ids([encoded[i] for i in batch], max_new_tokens, stop)
            for i, ids in zip(batch, new_ids, strict=True):
                outputs[i] = decode_generated(self.tokenizer, ids, self.eos_ids, stop)
        return outputs

    def _generate_ids(
        self, batch: list[list[int]], max_new_tokens: int, stop: Sequence[str]
    ) -> list[list[int]]:
        from transformers import GenerationConfig

        input_ids, mask = _left_pad(batch, self.pad_id)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
        )
        with torch.inference_mode(), _greedy_defaults(self.model):
            out = self.model.generate(
                input_ids=input_ids.to(self.model.device),
                attention_mask=mask.to(self.model.device),
                generation_config=config,
                stopping_criteria=self._stop_criteria(tuple(s for s in stop if s), input_ids.shape[1]),
                logits_processor=_finite_logits_check(self.model_dir),
            )
        return [row[input_ids.shape[1] :].tolist() for row in out]

    def _stop_criteria(self, stop: tuple[str, ...], prompt_width: int) -> Any:
        """transformers' own stop-string criterion, built once per set of stop strings (building it reads the
        whole vocabulary, about a second for a 49k-token tokenizer, which ``generate(stop_strings=...)``
        would pay again for every batch of every candidate), shown only the tokens after the (padded)
        prompt: on the whole sequence it also matches a stop string that begins in the prompt (a prompt
        ending in "\\n", stop "\\n\\n"), ending an answer that vLLM and lm-eval's HFLM, which search the new
        text only, would continue."""
        from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

        if not stop:
            return StoppingCriteriaList([])
        if stop not in self._stop_cache:
            self._stop_cache[stop] = StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stop))
        criterion = self._stop_cache[stop]

        class NewTokensOnly(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                return criterion(input_ids[:, prompt_width:], scores, **kwargs)

        return StoppingCriteriaList([NewTokensOnly()])

    # --- log-likelihood ---------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """``sum log p(continuation | context)`` per request, one forward pass per batch."""
        return [score for score, _ in self.greedy_loglikelihood(requests)]

    def greedy_loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(``sum log p(continuation | context)``, whether greedy decoding would produce the continuation)
        per request: lm-evaluation-harness's loglikelihood answer (its ``acc`` on loglikelihood tasks).

        The model reads ``context + continuation[:-1]`` (the last token is only predicted), so requests whose
        inputs are equal -- a multiple-choice question's choices that differ only in their last token, as
        " A"/" B"/" C"/" D" or " 12"/" 13" do -- share one row of a forward pass (lm-eval groups them too).
        An input longer than the model reads loses its first tokens (:func:`fit_loglikelihood_input`)."""
        scores = self.token_loglikelihood([encode_pair(self.tokenizer, ctx, cont) for ctx, cont in requests])
        check_output_count("loglikelihood", len(scores), len(requests))
        return scores

    def token_loglikelihood(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """:meth:`greedy_loglikelihood` of requests already tokenised as (context ids, continuation ids): what
        lm-eval's rolling windows over a whole document are (:mod:`hm3.eval.harness`)."""
        rows: dict[tuple[int, ...], list[int]] = {}  # the model's input -> the requests that read it
        for i, (ctx, cont) in enumerate(pairs):
            rows.setdefault(tuple(fit_loglikelihood_input(ctx, cont, self.max_length)), []).append(i)
        inputs = list(rows)
        scores: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for batch in _length_sorted_batches([len(r) for r in inputs], self.batch_size):
            readers = [[(i, pairs[i][1]) for i in rows[inputs[b]]] for b in batch]
            for answers in self._batch_loglikelihood([list(inputs[b]) for b in batch], readers):
                for i, answer in answers:
                    scores[i] = answer
        return scores

    def _batch_loglikelihood(self, inputs: list[list[int]], readers: list[list[tuple[int, list[int]]]]
                             ) -> list[list[tuple[int, tuple[float, bool]]]]:
        """One forward pass over ``inputs``; for each row, the (request, answer) of every continuation read
        from it, a continuation being the row's last ``len(continuation)`` predictions. Left-padded so every
        row ends at the last position: only the logits of the last ``max continuation`` positions are
        computed (the full vocab × length tensor would dominate memory for real vocabularies)."""
        input_ids, mask = _left_pad(inputs, self.pad_id)
        keep = max(len(cont) for row in readers for _, cont in row)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = self.model.device
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=keep,
            ).logits.cpu()
        check_finite_logits(logits, self.model_dir)
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # the last position predicts the token after the row
        answers = []
        for row, reading in enumerate(readers):
            answered = []
            for i, cont in reading:
                targets = torch.tensor(cont)
                steps = logprobs[row, keep - len(cont) :]
                picked = steps.gather(-1, targets[:, None])
                answered.append((i, (float(picked.sum()), bool((steps.argmax(-1) == targets).all()))))
            answers.append(answered)
        return answers

    # --- weights ----------------------------------------------------------------------------------

    def live_parameters(self) -> dict[str, torch.Tensor]:
        """The model's own parameter tensors by checkpoint name; ``copy_`` into them swaps weights.

        A tied ``lm_head`` is the embedding tensor itself, so it appears once, under the
        embedding's name, exactly as in a tied checkpoint's safetensors.
        """
        return dict(self.model.named_parameters())

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the live parameters (no new tensors, no reload).

        Everything is validated before the first copy, so a bad state leaves the model unchanged.
        """
        params = self.live_parameters()
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        updates = validate_state(state, shapes, tied_head=self._is_tied(), model_dir=self.model_dir)
        with torch.no_grad():
            for name, tensor in updates.items():
                params[name].copy_(tensor)

    def _is_tied(self) -> bool:
        head = self.model.get_output_embeddings()
        return head is not None and head.weight is self.model.get_input_embeddings().weight

    def close(self) -> None:
        """Drop the model so its memory can be reclaimed (the backend is unusable afterwards)."""
        self.model = None


def check_finite_logits(logits: torch.Tensor, model_dir: Path) -> None:
    """Refuse to score a model whose logits hold NaN or +inf (non-finite weights, an overflowing dtype):
    greedy decoding and argmax over NaN pick token 0, and the objective would score those answers as
    if they were real, giving e.g. 0.0 with no hint that the model is broken. (-inf is a masked token.)"""
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise BackendError(
            f"{model_dir}: the model produced non-finite logits (NaN or inf), so it cannot be scored; its "
            "weights are probably not finite (a broken merge or checkpoint), or the dtype overflows"
        )


def _finite_logits_check(model_dir: Path) -> Any:
    """A transformers logits processor running :func:`check_finite_logits` at every generation step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FiniteLogits(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            check_finite_logits(scores, model_dir)
            return scores

    return LogitsProcessorList([FiniteLogits()])


@contextmanager
def _greedy_defaults(model: Any) -> Iterator[None]:
    """The model with a blank generation config while it generates: transformers fills every setting the
    config passed to ``generate`` leaves unset from the model's own generation_config.json, so a model
    shipping sampling and penalty settings (Qwen2.5-Instruct: ``repetition_penalty`` 1.05) would have its
    "greedy" answers penalised, unlike vLLM's. Only its EOS ids are read (:func:`generation_eos_ids`)."""
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """No "Loading weights" bar: a search loads models often and the bar is noise in its log."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, longest first (an OOM shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    """Padding is masked out, so any id works when the tokenizer defines none."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0
