"""The one interface every evaluator backend implements, and the pieces they share.

Objectives only ever need two model calls (greedy generation, log-likelihood of a
continuation) plus, for the search loop, a way to put new weights into the model
that is already loaded. Keeping the interface that small is what lets the
transformers and vLLM backends be swapped freely and checked against each other.

Both backends tokenize through the helpers here so they see exactly the same
token ids; otherwise "hf and vllm give the same scores" could fail on a
tokenization detail rather than a model difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from hm3.checkpoint.reader import open_checkpoint
from hm3.errors import BackendError, CheckpointError

BackendKind = Literal["hf", "vllm"]
BACKEND_KINDS: tuple[str, ...] = ("hf", "vllm")
LM_HEAD = "lm_head.weight"


@runtime_checkable
class Backend(Protocol):
    """A loaded model that objectives can be scored with.

    ``generate`` is greedy and returns only the new text, cut at the first stop
    string; ``loglikelihood`` returns ``sum log p(continuation | context)``;
    ``load_state`` swaps weights in place (checkpoint tensor names) without
    reloading; ``live_parameters`` exposes the model's own tensors when the
    in-memory merge path can ``copy_`` into them directly (else ``None``).
    """

    name: str
    tokenizer: Any

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]: ...

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]: ...

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None: ...

    def live_parameters(self) -> dict[str, torch.Tensor] | None: ...

    def close(self) -> None: ...


def open_backend(
    kind: BackendKind,
    model_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
    **kw: Any,
) -> Backend:
    """Load ``model_dir`` behind the backend ``kind`` ("hf" or "vllm").

    Imports are deferred so that the hf path never pays for (or requires) vLLM.
    """
    if kind == "hf":
        from hm3.eval.hf import HFBackend

        return HFBackend.from_pretrained(model_dir, dtype=dtype, batch_size=batch_size, **kw)
    if kind == "vllm":
        from hm3.eval.vllm import VLLMBackend

        return VLLMBackend(model_dir, dtype=dtype, batch_size=batch_size, **kw)
    raise BackendError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def check_generate_args(prompts: Sequence[str], max_new_tokens: int) -> None:
    """Refuse arguments that would otherwise fail deep inside a library."""
    if isinstance(prompts, str):
        raise BackendError("generate takes a sequence of prompts, not a single string")
    if max_new_tokens < 1:
        raise BackendError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's own special tokens (e.g. BOS) unless the text already
    starts with the BOS text (or EOS where there is no BOS), as a template that writes it does.

    Then none are added, so the model sees one BOS, not two: lm-evaluation-harness's ``HFLM`` decides the
    same way (``has_bos_prefix``), which keeps lm-eval objectives' scores equal to its own.
    """
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix_text = tokenizer.decode([prefix_id]) if prefix_id is not None else ""
    add_special = not (prefix_text and prompt.startswith(prefix_text))
    return list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as one user message in the tokenizer's chat template, ending where the assistant's
    turn begins (``add_generation_prompt``): what an instruct model was trained to answer.

    The result is text, tokenised like any prompt (:func:`encode_prompt`), so both backends and
    log-likelihood requests see it the same way. A template that writes the BOS token itself would get
    a second one from a tokenizer that adds BOS on encoding, so that leading BOS text is dropped here.
    """
    if not getattr(tokenizer, "chat_template", None):
        where = getattr(tokenizer, "name_or_path", "") or "the model"
        raise BackendError(f"chat=true (or evaluation.chat_template) needs a chat template, but the tokenizer of "
                           f"{where} has none (tokenizer_config.json sets no chat_template); drop the option "
                           "for a base model")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _special_prefix(tokenizer)[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for a log-likelihood request, as lm-evaluation-harness does.

    The pair is encoded as one string and split where the context's own
    encoding ends, so that BPE merges across the boundary match what the model
    sees at generation time; trailing whitespace of the context moves to the
    continuation for the same reason. An empty context is conditioned on
    BOS (or EOS) because the first continuation token needs something before it.
    """
    if not continuation:
        raise BackendError(f"log-likelihood request with an empty continuation (context {context[-40:]!r})")
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    whole = encode_prompt(tokenizer, context + continuation)
    ctx = encode_prompt(tokenizer, context) if context else _special_prefix(tokenizer)
    if context and whole[: len(ctx)] == ctx:
        cont = whole[len(ctx) :]
    else:  # the context's encoding is not a prefix (or the context is empty): encode separately
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    if not ctx:
        ctx = _fallback_prefix(tokenizer)
    if not cont:
        raise BackendError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


#: The longest input when neither the model's config nor its tokenizer says (lm-evaluation-harness's default).
DEFAULT_MAX_LENGTH = 2048
#: The ``model_max_length`` transformers gives a tokenizer that sets none (``int(1e30)``): no limit.
TOKENIZER_UNSET_LENGTH = int(1e30)
_LENGTH_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


def max_input_length(config: Any, tokenizer: Any) -> int:
    """The most tokens the model reads at once, found as lm-evaluation-harness's HFLM finds it: the first of
    n_positions, max_position_embeddings, n_ctx in the (text) config, else the tokenizer's
    ``model_max_length`` when set, else :data:`DEFAULT_MAX_LENGTH`. ``config`` is a transformers config or
    the config.json mapping."""
    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)

    text = get(config, "text_config") or config
    for key in _LENGTH_KEYS:
        value = get(text, key)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != TOKENIZER_UNSET_LENGTH:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def fit_generation_prompt(ids: list[int], max_length: int, max_new_tokens: int) -> list[int]:
    """A prompt's ids left-truncated so that it and ``max_new_tokens`` new tokens fit in ``max_length``, as
    HFLM truncates a generation context: the end of a long few-shot prompt (the question) is what the
    answer depends on, and the model never reads past its positions.

    A generation budget of ``max_length`` or more leaves no room to truncate into; HFLM refuses such a task
    (so does :class:`hm3.eval.harness.BackendLM`), while hm3's own objectives, whose budget is a cap that
    stop strings usually cut short, keep the whole prompt and meet the engine's own limit."""
    room = max_length - max_new_tokens
    return ids[-room:] if room >= 1 else ids


def generation_prompt_ids(tokenizer: Any, prompt: str, max_length: int, max_new_tokens: int) -> list[int]:
    """The ids a generation starts from: the prompt's (:func:`encode_prompt`, :func:`fit_generation_prompt`),
    or for a prompt that encodes to none (an empty one, under a tokenizer that adds no BOS) the BOS, else
    EOS, token, as an empty log-likelihood context is conditioned (:func:`encode_pair`): a model cannot
    start from nothing (transformers crashes on an empty row, and answers one padded into a batch from
    a fully masked input)."""
    ids = encode_prompt(tokenizer, prompt) or _fallback_prefix(tokenizer)
    return fit_generation_prompt(ids, max_length, max_new_tokens)


def fit_loglikelihood_input(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The model's input for log p(``continuation`` | ``context``): ``context + continuation[:-1]`` (the last
    token is only predicted) keeping its last ``max_length`` tokens, HFLM's left truncation -- the
    continuation is always scored whole, on as much context as fits before it."""
    if len(continuation) > max_length:
        raise BackendError(f"a continuation of {len(continuation)} tokens cannot be scored by a model that reads "
                           f"at most {max_length} tokens")
    return (context + continuation)[-(max_length + 1) : -1]


def _special_prefix(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before any text (BOS for Llama), possibly nothing."""
    return list(tokenizer("")["input_ids"])


def _fallback_prefix(tokenizer: Any) -> list[int]:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [token_id]
    raise BackendError("empty context and the tokenizer has neither a BOS nor an EOS token to condition on")


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model directory's own tokenizer; a directory without one is refused, never guessed."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{model_dir}: no usable tokenizer in the model directory ({e})") from e


def as_torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept ``torch.float32`` or ``"float32"`` alike (CLI flags arrive as strings)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise BackendError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16, float16")
    return resolved


def check_model_dir(model_dir: str | Path) -> Path:
    """A readable Hugging Face model directory: config, index and shard headers are validated by the
    checkpoint reader, so a corrupt file is named here rather than deep inside a library."""
    with open_checkpoint(model_dir) as ckpt:
        return Path(ckpt.path)


def check_tokenizer_fits(tokenizer: Any, vocab_size: int | None, model_dir: str | Path) -> None:
    """A tokenizer that can emit ids beyond the model's embedding would crash (or silently wrap) later."""
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"{model_dir}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "the tokenizer does not belong to this model"
        )


def generation_eos_ids(model_dir: str | Path, tokenizer: Any) -> set[int]:
    """End-of-sequence ids as the model directory's generation config gives them (may be several),
    else the tokenizer's. Both backends stop and cut at exactly this set."""
    from transformers import GenerationConfig

    try:
        configured = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:  # no generation_config.json: transformers then uses the tokenizer's EOS too
        configured = None
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return {int(x) for x in (configured if isinstance(configured, list | tuple) else [configured])}


def decode_generated(tokenizer: Any, ids: Sequence[int], eos_ids: set[int], stop: Sequence[str]) -> str:
    """New text from generated ids: up to the first EOS, special tokens dropped, cut at the first stop string.

    Decoding the ids ourselves (rather than trusting each engine's incremental
    detokenizer) is what makes the two backends' texts comparable byte for byte.
    """
    end = next((k for k, t in enumerate(ids) if t in eos_ids), len(ids))
    return cut_at_stop(tokenizer.decode(list(ids[:end]), skip_special_tokens=True), stop)


def validate_state(
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    tied_head: bool,
    model_dir: str | Path,
) -> dict[str, torch.Tensor]:
    """``state`` checked against the model's tensor names and shapes, before any weight is touched.

    A tied model stores no ``lm_head.weight``; one in ``state`` is accepted (and
    dropped) only as an exact copy of the embedding, since one tensor cannot hold
    two different values.
    """
    updates = dict(state)
    if tied_head and LM_HEAD in updates and LM_HEAD not in shapes:
        embedding = next((n for n in shapes if n.endswith("embed_tokens.weight")), None)
        head = updates.pop(LM_HEAD)
        if embedding is None or embedding not in updates or not torch.equal(head, updates[embedding]):
            raise CheckpointError(
                f"cannot load state into {model_dir}: its lm_head is tied to the embedding, "
                f"but the state's {LM_HEAD!r} differs from {embedding!r}"
            )
    missing = sorted(set(shapes) - set(updates))
    unexpected = sorted(set(updates) - set(shapes))
    problems = []
    if missing:
        problems.append(f"missing tensors {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_first(unexpected)}")
    problems += [
        f"tensor {n!r} has shape {tuple(t.shape)}, the model's is {tuple(shapes[n])}"
        for n, t in updates.items()
        if n in shapes and tuple(t.shape) != tuple(shapes[n])
    ]
    if problems:
        raise CheckpointError(f"cannot load state into {model_dir}: " + "; ".join(problems))
    return updates


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def check_output_count(kind: str, got: int, want: int) -> None:
    """Every request must get exactly one answer, else scores would silently misalign."""
    if got != want:
        raise BackendError(f"backend returned {got} {kind} outputs for {want} requests")
