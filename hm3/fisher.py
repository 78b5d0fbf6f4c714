"""Diagonal Fisher estimation for DF-Merge (Lee et al., NAACL 2025).

DF-Merge weights each model's task vector, parameter by parameter, by the
diagonal Fisher ``F_i(λ_i)`` of the *scaled* single-task model
``θ_base + λ_i τ_i``, estimated on a fixed set of N (default 30) validation
examples of task i with batch size 1. Because the Fisher depends on λ_i, a BO
loop over the coefficients would recompute it at every candidate;
:class:`FisherCache` keys it by (model, λ rounded to 1e-3, objective, example
ids) in memory and on disk so neither repeated coefficients nor a resumed run
pay for it twice.

What is differentiated, per decoding of the objective:

* :class:`~objectives.base.LogLikelihood` (multiple choice): the token-mean
  log-likelihood ``log p̄(c|x)`` of every choice c. The squared gradients are
  weighted by ``p(c|x) = softmax_c log p̄(c|x)``, the model's own distribution
  over the choices, so ``F = mean_x Σ_c p(c|x) (∇ log p̄(c|x))²`` is the *exact*
  expectation over the model's prediction (the true Fisher of the choice
  distribution), as DF-Merge's code does. The token mean is used even when the
  objective scores choices by summed log-likelihood: it is DF-Merge's choice
  and keeps long choices from dominating.
* :class:`~objectives.base.Generate` (free generation): the token-mean
  log-likelihood of the *reference answer* ``example.target`` given the
  prompt, ``F = mean_x (∇ log p̄(target|x))²``. This is the *empirical* Fisher:
  the true Fisher would take the expectation over sequences sampled from the
  model itself, which needs sampling (noisy) or is intractable (the sum over
  all continuations). The empirical Fisher measures how sensitive the loss of
  the task's actual answers is to each parameter, which is what the merge
  should protect; it is known to differ from the true Fisher where the model
  is poor at the task (Kunstner et al., 2019), so treat it as an importance
  score rather than a curvature estimate.

Tokenisation is the evaluators' (:func:`hm3.eval.backend.encode_pair`): prompt
and continuation are encoded as one string and the loss covers only the
continuation tokens, exactly the tokens the log-likelihood scorer reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hm3.atomic import atomic_path
from hm3.errors import ConfigError, DataFileError, FisherError
from hm3.eval.backend import encode_pair
from objectives.base import Example, Generate, LogLikelihood, Objective

if TYPE_CHECKING:
    from hm3.merge.inmemory import InMemoryMerger

log = logging.getLogger(__name__)

DEFAULT_EXAMPLES = 30  # DF-Merge's N per task
KEY_METADATA = "hm3_fisher_key"  # safetensors metadata entry naming what a cached file holds


# --- estimation -------------------------------------------------------------------------------------


def fisher_examples(
    objective: Objective, n: int = DEFAULT_EXAMPLES, *, split: str = "validation"
) -> list[Example]:
    """The fixed estimation set: the first ``n`` examples of ``split`` (fewer if the split is smaller).

    "First" in the objective's fixed order, so every candidate of a search and a
    resumed run see the same examples (and hit the same cache entries).
    """
    if n < 1:
        raise ConfigError(f"Fisher example count must be at least 1, got {n}")
    examples = list(objective.examples(split))[:n]
    if not examples:
        raise FisherError(f"objective {objective.name!r} has no {split} examples to estimate a Fisher on")
    return examples


def diagonal_fisher(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    decoding: LogLikelihood | Generate,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher of ``model`` on ``examples`` (batch 1), float32, keyed by parameter name.

    Keys are ``model.named_parameters()`` names, which are the checkpoint's
    tensor names; a tied ``lm_head`` is the embedding tensor and appears once,
    under the embedding's name (asking for ``lm_head.weight`` by name gives that
    entry too). ``names`` restricts the estimate to those tensors (the others
    get no gradient at all, which saves their memory). The model is run in
    eval mode; its training flag, ``requires_grad`` flags and ``.grad`` are
    restored on return.
    """
    if not examples:
        raise FisherError("no examples to estimate the Fisher on")
    if not isinstance(decoding, (LogLikelihood, Generate)):
        raise ConfigError(f"unknown decoding {decoding!r}: expected LogLikelihood or Generate")
    tracked = _tracked_parameters(model, names)
    device = next(iter(tracked.values())).device
    sums = {name: torch.zeros(p.shape, dtype=torch.float32, device=device) for name, p in tracked.items()}
    with _gradients_only_for(model, tracked):
        for example in examples:
            for weight, context, continuation in _weighted_sequences(model, tokenizer, example, decoding):
                for p in tracked.values():
                    p.grad = None
                _token_mean_loglikelihood(model, context, continuation).backward()
                _accumulate_squared_grads(sums, tracked, weight)
    for name, total in sums.items():
        total.div_(len(examples))
        if not torch.isfinite(total).all():
            raise FisherError(
                f"Fisher of tensor {name!r} is not finite: the model's weights or the examples "
                "give non-finite gradients"
            )
    return sums


def _tracked_parameters(model: nn.Module, names: Sequence[str] | None) -> dict[str, nn.Parameter]:
    """Canonical name -> parameter for ``names`` (all parameters if None); aliases of a shared
    tensor (a tied lm_head) resolve to the name ``named_parameters()`` lists it under."""
    first_name: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias[name] = first_name.setdefault(id(p), name)
    params = dict(model.named_parameters())
    wanted = list(params) if names is None else list(names)
    unknown = [n for n in wanted if n not in alias]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5])
        raise FisherError(f"model has no parameter {shown}{' …' if len(unknown) > 5 else ''}")
    tracked = {alias[n]: params[alias[n]] for n in wanted}
    if not tracked:
        raise FisherError("no parameters to estimate the Fisher of")
    return tracked


@contextmanager
def _gradients_only_for(model: nn.Module, tracked: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Eval mode, gradients on exactly the tracked parameters; everything restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grads = {id(p): p.grad for p in tracked.values()}
    keep = {id(p) for p in tracked.values()}
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p in tracked.values():
            p.grad = grads[id(p)]
        model.train(was_training)


def _weighted_sequences(
    model: nn.Module, tokenizer: Any, example: Example, decoding: LogLikelihood | Generate
) -> list[tuple[float, list[int], list[int]]]:
    """``(weight, context ids, continuation ids)`` whose weighted squared gradients make up one
    example's Fisher term: the choices under the model's softmax, or the reference with weight 1."""
    if isinstance(decoding, Generate):
        if not example.target:
            raise DataFileError(
                f"example {example.id!r} has an empty target: no reference to estimate the Fisher on"
            )
        return [(1.0, *encode_pair(tokenizer, example.prompt, example.target))]
    if not example.choices:
        raise DataFileError(f"example {example.id!r} has no choices for a multiple-choice Fisher")
    empty = [c for c in example.choices if not c]
    if empty:
        raise DataFileError(f"example {example.id!r} has an empty choice")
    pairs = [encode_pair(tokenizer, example.prompt, choice) for choice in example.choices]
    with torch.no_grad():
        scores = torch.stack([_token_mean_loglikelihood(model, c, t) for c, t in pairs])
    probs = torch.softmax(scores.float(), dim=0).tolist()
    return [(p, c, t) for p, (c, t) in zip(probs, pairs, strict=True)]


def _token_mean_loglikelihood(model: nn.Module, context: list[int], continuation: list[int]) -> Tensor:
    """Mean log p of the continuation tokens given everything before them (a scalar, differentiable).

    Only the logits of the positions that predict the continuation are computed
    (``logits_to_keep``): the full vocabulary × length tensor would dominate
    memory for real vocabularies.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([context + continuation], device=device)
    keep = len(continuation) + 1
    logits = model(input_ids=input_ids, logits_to_keep=keep).logits[0, :-1].float()  # j predicts j+1
    targets = torch.tensor(continuation, device=device)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).mean()


def _accumulate_squared_grads(
    sums: dict[str, Tensor], tracked: Mapping[str, nn.Parameter], weight: float
) -> None:
    for name, p in tracked.items():
        if p.grad is None:  # the tensor did not take part in this forward pass: zero contribution
            continue
        g = p.grad.float()
        sums[name].addcmul_(g, g, value=weight)


# --- the scaled single-task model ------------------------------------------------------------------


def fisher_for_coefficient(
    merger: InMemoryMerger,
    model: nn.Module,
    model_index: int,
    coefficient: float,
    tokenizer: Any,
    examples: Sequence[Example],
    decoding: LogLikelihood | Generate,
) -> dict[str, Tensor]:
    """``F_i(λ_i)``: the Fisher of ``θ_base + λ_i τ_i`` (model ``model_index`` of ``merger``).

    The scaled model is written into ``model``'s own parameters (no second model
    in memory) and the previous weights are put back before returning, even on
    error, so ``model`` can be the search loop's live candidate model. This
    costs one copy of the merged tensors for the duration of the call. Keys are
    the merger's tensor names, ready for :meth:`InMemoryMerger.set_fishers`.
    """
    if not 0 <= model_index < len(merger.model_refs):
        raise ConfigError(
            f"model_index {model_index} out of range: the merger holds {len(merger.model_refs)} models"
        )
    if not math.isfinite(coefficient):
        raise ConfigError(
            f"coefficient for model {merger.model_refs[model_index]!r} is not finite: {coefficient}"
        )
    params = dict(model.named_parameters())
    for name in merger.tensor_names:
        target = params.get(name)
        if target is None:
            raise ConfigError(f"target model has no tensor {name!r}")
        if tuple(target.shape) != tuple(merger.base[name].shape):
            raise ConfigError(
                f"tensor {name!r}: target shape {tuple(target.shape)} "
                f"!= checkpoint {tuple(merger.base[name].shape)}"
            )
    saved = {name: params[name].detach().clone() for name in merger.tensor_names}
    try:
        with torch.no_grad():
            for name in merger.tensor_names:
                scaled = torch.add(merger.base[name], merger.deltas[name][model_index], alpha=coefficient)
                params[name].copy_(scaled)
        return diagonal_fisher(model, tokenizer, examples, decoding, names=merger.tensor_names)
    finally:
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)


# --- files ----------------------------------------------------------------------------------------


def save_fisher(
    path: str | Path, fisher: Mapping[str, Tensor], *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a Fisher as a safetensors file (float32, CPU), atomically.

    The file is what a recipe's per-model ``fisher:`` parameter expects: one
    tensor per checkpoint tensor name.
    """
    path = Path(path)
    check_fisher(fisher, where=str(path))
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in fisher.items()}
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
    return path


def load_fisher(path: str | Path) -> dict[str, Tensor]:
    """Read a Fisher file written by :func:`save_fisher` (or anyone else), checked non-negative and finite."""
    return _read_fisher(Path(path))[0]


def _read_fisher(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name).float() for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises several private error types
        raise FisherError(f"cannot read Fisher file {path}: {err}") from None
    check_fisher(tensors, where=str(path))
    return tensors, metadata


def check_fisher(fisher: Mapping[str, Tensor], *, where: str) -> None:
    """A Fisher must be non-empty, finite and non-negative (it is a mean of squares)."""
    if not fisher:
        raise FisherError(f"{where}: Fisher holds no tensors")
    for name, t in fisher.items():
        if not torch.isfinite(t).all() or (t < 0).any():
            raise FisherError(f"{where}: Fisher tensor {name!r} has negative or non-finite entries")


# --- cache ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FisherKey:
    """What a Fisher depends on within one run: the model, λ (to 1e-3), the task and its examples.

    λ is rounded because BO proposes continuous values and the Fisher changes
    negligibly within 1e-3; the rounding is what makes repeated and nearby
    proposals hit the cache.
    """

    model_ref: str
    coefficient: float
    objective: str
    example_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not math.isfinite(self.coefficient):
            raise ConfigError(f"Fisher coefficient for {self.model_ref!r} is not finite: {self.coefficient}")
        object.__setattr__(self, "coefficient", round(float(self.coefficient), 3) + 0.0)  # + 0.0: no -0.0
        object.__setattr__(self, "example_ids", tuple(self.example_ids))

    def as_json(self) -> str:
        return json.dumps(
            {
                "model": self.model_ref,
                "coefficient": f"{self.coefficient:.3f}",
                "objective": self.objective,
                "examples": list(self.example_ids),
            },
            sort_keys=True,
        )

    def file_name(self) -> str:
        return hashlib.sha256(self.as_json().encode()).hexdigest()[:32] + ".safetensors"


class FisherCache:
    """Fisher tensors by :class:`FisherKey`: an LRU in memory (bounded in bytes) over optional files.

    With a ``directory`` (a run's ``RUN_DIR/fisher/``, see :meth:`for_run`),
    every computed Fisher is written there atomically with its key in the
    file's metadata, so a resumed search loads instead of recomputing; a file
    whose key does not match or that cannot be read is recomputed and replaced.
    Returned dicts are fresh, but their tensors are shared with the cache:
    do not modify them in place.
    """

    def __init__(self, directory: str | Path | None = None, *, max_bytes: int = 1 << 30):
        if max_bytes < 0:
            raise ConfigError(f"Fisher cache max_bytes must be >= 0, got {max_bytes}")
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self._memory: OrderedDict[FisherKey, dict[str, Tensor]] = OrderedDict()
        self._bytes = 0

    @classmethod
    def for_run(cls, run_dir: str | Path, *, max_bytes: int = 1 << 30) -> FisherCache:
        return cls(Path(run_dir) / "fisher", max_bytes=max_bytes)

    def path_for(self, key: FisherKey) -> Path | None:
        return self.directory / key.file_name() if self.directory is not None else None

    def get_or_compute(
        self, key: FisherKey, compute: Callable[[], Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The cached Fisher for ``key``, else ``compute()``'s result (then cached, and saved if on disk)."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return dict(self._memory[key])
        fisher = self._load(key)
        if fisher is None:
            fisher = dict(compute())
            check_fisher(fisher, where=f"Fisher for {key.as_json()}")
            path = self.path_for(key)
            if path is not None:
                save_fisher(path, fisher, metadata={KEY_METADATA: key.as_json()})
        self._remember(key, fisher)
        return dict(fisher)

    def _load(self, key: FisherKey) -> dict[str, Tensor] | None:
        path = self.path_for(key)
        if path is None or not path.exists():
            return None
        try:
            tensors, metadata = _read_fisher(path)
        except FisherError as err:
            log.warning("recomputing Fisher: %s", err)
            return None
        if metadata.get(KEY_METADATA) != key.as_json():
            log.warning(
                "recomputing Fisher: %s holds %s, not %s", path, metadata.get(KEY_METADATA), key.as_json()
            )
            return None
        return tensors

    def _remember(self, key: FisherKey, fisher: dict[str, Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in fisher.values())
        if size > self.max_bytes:
            return  # larger than the whole budget: served from disk (if any) next time
        self._memory[key] = fisher
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._memory.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in evicted.values())


def cached_fisher_for_coefficient(
    cache: FisherCache,
    merger: InMemoryMerger,
    model: nn.Module,
    model_index: int,
    coefficient: float,
    tokenizer: Any,
    objective_name: str,
    examples: Sequence[Example],
    decoding: LogLikelihood | Generate,
) -> dict[str, Tensor]:
    """:func:`fisher_for_coefficient` through ``cache``, keyed by the merger's ref for the model."""
    if not 0 <= model_index < len(merger.model_refs):
        raise ConfigError(
            f"model_index {model_index} out of range: the merger holds {len(merger.model_refs)} models"
        )
    key = FisherKey(
        merger.model_refs[model_index], coefficient, objective_name, tuple(e.id for e in examples)
    )
    # computed at the rounded λ, so the entry is the same whichever nearby proposal fills it
    return cache.get_or_compute(
        key,
        lambda: fisher_for_coefficient(
            merger, model, model_index, key.coefficient, tokenizer, examples, decoding
        ),
    )
