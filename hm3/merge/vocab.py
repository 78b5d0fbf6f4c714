"""One vocabulary for models whose vocabularies differ: which row of each model's embedding becomes which
row of the output's, and what fills the rows a model lacks (mergekit 0.1.5's rules).

Each model's token embedding and LM head are rearranged into the output vocabulary before the merge
method sees them, so every method merges row *i* of each model as token *i* of the output. A token a
model lacks gets, in that model, a row made from the others:

* the row the recipe's ``tokenizer.tokens`` gives for it (a model's row for the token, a given row
  of a model, or zeros), which ``force`` makes every model take, even one that has the token;
* else, when exactly one model has it, that model's row; when none has it, zeros;
* else the base model's row, when the base has it and is among the merged tensor's inputs;
* else the mean of the rows of the models that have it.

"The models" are the inputs of the tensor being merged (base included): a ``slices`` recipe takes the
embedding from its first slice's sources and the LM head from its last slice's. Rows past the
vocabulary (``pad_to_multiple_of``) take the mean of the model's rows.

The planner resolves all of this into index tensors once (:func:`row_plan`); the engine then rearranges
each vocabulary tensor with a few gathers (:func:`remap_rows`), tensor by tensor, so the merge stays
streaming.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce

import torch

from hm3.config import ModelTokenSource, TokenSetting, ZeroTokenSource
from hm3.errors import ConfigError, IncompatibleModelsError


@dataclass(frozen=True)
class TokenRule:
    """A ``tokenizer.tokens`` entry resolved against the plan: ``kind`` is ``model`` (that checkpoint's row
    for the token), ``row`` (that checkpoint's row ``row``), ``zero`` or ``none`` (no source given)."""

    kind: str
    checkpoint: int | None = None
    row: int | None = None
    force: bool = False
    model: str = ""  # the reference, for messages


@dataclass(frozen=True, eq=False)
class MergedVocabulary:
    """The output vocabulary and where each checkpoint's tokens sit in it.

    ``positions[k][i]`` is the row of token ``i`` in checkpoint ``k``'s embedding, -1 where it lacks it.
    """

    tokens: tuple[str, ...]  # by output id
    rows: int  # output rows: the tokens, rounded up to pad_to_multiple_of
    positions: Mapping[int, torch.Tensor]
    rules: Mapping[int, TokenRule]  # by output id
    refs: Mapping[int, str]  # checkpoint -> reference, for messages
    input_rows: Mapping[int, int]  # checkpoint -> its embedding rows

    @property
    def is_identity(self) -> bool:
        """Every checkpoint already has exactly the output's rows in the output's order: nothing to rearrange."""
        n = len(self.tokens)
        identity = torch.arange(n)
        return (
            self.rows == n
            and not any(r.force for r in self.rules.values())
            and all(rows == n for rows in self.input_rows.values())
            and all(torch.equal(p, identity) for p in self.positions.values())
        )


def merged_vocabulary(
    vocab: Mapping[str, int],
    model_rows: Mapping[int, Mapping[str, int]],
    refs: Mapping[int, str],
    input_rows: Mapping[int, int],
    settings: Mapping[str, TokenSetting] | None,
    checkpoint_of: Mapping[str, int],
    pad_to_multiple_of: int | None = None,
) -> MergedVocabulary:
    """The vocabulary ``vocab`` (token -> output id) over checkpoints whose tokens sit at ``model_rows[k]``.

    ``checkpoint_of`` maps each model reference a ``tokens`` setting may name to its checkpoint.
    """
    tokens = tuple(sorted(vocab, key=vocab.__getitem__))
    positions = {k: torch.tensor([own.get(t, -1) for t in tokens], dtype=torch.long) for k, own in model_rows.items()}
    rows = len(tokens)
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows += pad_to_multiple_of - rows % pad_to_multiple_of
    rules = {}
    for token, setting in (settings or {}).items():
        rules[vocab[token]] = _rule(token, setting, model_rows, checkpoint_of)
    return MergedVocabulary(tokens=tokens, rows=rows, positions=positions, rules=rules, refs=dict(refs),
                            input_rows=dict(input_rows))


def _rule(token: str, setting: TokenSetting, model_rows: Mapping[int, Mapping[str, int]],
          checkpoint_of: Mapping[str, int]) -> TokenRule:
    where = f"tokenizer.tokens[{token!r}].source"
    source = setting.source
    if source is None:
        return TokenRule("none", force=setting.force)
    if isinstance(source, ZeroTokenSource):
        return TokenRule("zero", force=setting.force)
    ref = source.model if isinstance(source, ModelTokenSource) else source
    if ref not in checkpoint_of:
        raise ConfigError(f"{where}: model {ref!r} is not one of the merged models ({', '.join(checkpoint_of)})")
    k = checkpoint_of[ref]
    if isinstance(source, ModelTokenSource):
        row = source.token_id
        if row is None:
            if source.token not in model_rows[k]:
                raise ConfigError(f"{where}: model {ref} has no token {source.token!r}")
            row = model_rows[k][source.token]
        return TokenRule("row", checkpoint=k, row=row, force=setting.force, model=ref)
    return TokenRule("model", checkpoint=k, force=setting.force, model=ref)


@dataclass(frozen=True, eq=False)
class RowPlan:
    """How one vocabulary tensor's inputs are rearranged: index tensors over the inputs, in job order.

    Each input's output rows are its own rows (``own``: output rows, its rows) and default rows
    (``fill``: output rows, positions in the default table). The default table is built once per
    tensor from ``copies`` (input, positions, its rows) and ``average`` (positions; per input, the
    averaged tokens it has and their rows there; the count per position); the rest of it is zeros.
    """

    tokens: int
    rows: int
    defaults: int
    own: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    fill: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    copies: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]
    average: tuple[torch.Tensor, tuple[tuple[torch.Tensor, torch.Tensor], ...], torch.Tensor] | None


def row_plan(vocab: MergedVocabulary, inputs: Sequence[int], base: int | None, *, tensor: str,
             input_rows: Sequence[int]) -> RowPlan:
    """The rearrangement of tensor ``tensor`` whose inputs are checkpoints ``inputs`` (with ``input_rows``
    rows each); ``base`` is the checkpoint whose rows win for tokens several inputs have (None: none).

    Vectorised over the tokens (a union of two large vocabularies leaves ~10^5 rows to fill); only the
    ``tokens`` rules are visited one by one.
    """
    n = len(vocab.tokens)
    pos = torch.stack([vocab.positions[k] for k in inputs])  # (inputs, tokens)
    for k, rows in enumerate(input_rows):
        if n and int(pos[k].max()) >= rows:
            raise IncompatibleModelsError(
                f"{tensor} of model {vocab.refs[inputs[k]]} has {rows} rows, fewer than its token embedding"
            )
    present = pos >= 0
    ruled = torch.zeros(n, dtype=torch.bool)
    forced = torch.zeros(n, dtype=torch.bool)
    for i, rule in vocab.rules.items():
        ruled[i] = True
        forced[i] = rule.force
    needs_default = forced | ~present.all(dim=0)
    default_ids = needs_default.nonzero().flatten()
    slot = torch.full((n,), -1, dtype=torch.long)
    slot[default_ids] = torch.arange(len(default_ids))

    copies: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    count = present.sum(dim=0)
    open_ = needs_default & ~ruled  # filled by mergekit's defaults; no present model: zeros
    donor = present.long().argmax(dim=0)  # the one input that has it, where only one has it
    single = open_ & (count == 1)
    base_at = inputs.index(base) if base is not None and base in inputs else None
    by_base = open_ & (count > 1) & (present[base_at] if base_at is not None else torch.zeros(n, dtype=torch.bool))
    averaged = open_ & (count > 1) & ~by_base
    for k in range(len(inputs)):
        take = single & (donor == k)
        if k == base_at:
            take |= by_base
        ids = take.nonzero().flatten()
        if len(ids):
            copies.append((k, slot[ids], pos[k, ids]))
    for i, rule in sorted(vocab.rules.items()):
        if not needs_default[i]:
            continue  # every model has it and it is not forced: each keeps its own row
        source, row = _rule_row(vocab, rule, i, inputs, pos, tensor)
        if source is None:
            continue  # zeros
        if row >= input_rows[source]:
            raise ConfigError(
                f"tokenizer.tokens[{vocab.tokens[i]!r}]: row {row} of model {vocab.refs[inputs[source]]} is past "
                f"its {input_rows[source]} rows of {tensor}"
            )
        copies.append((source, slot[i : i + 1], torch.tensor([row])))

    own, fill = [], []
    for k in range(len(inputs)):
        mine = present[k] & ~forced
        dst = mine.nonzero().flatten()
        own.append((dst, pos[k, dst]))
        dst = (~mine).nonzero().flatten()
        fill.append((dst, slot[dst]))
    average = None
    ids = averaged.nonzero().flatten()
    if len(ids):
        per_input = []
        for k in range(len(inputs)):
            at = present[k, ids].nonzero().flatten()
            per_input.append((at, pos[k, ids[at]]))
        average = (slot[ids], tuple(per_input), count[ids])
    return RowPlan(
        tokens=n,
        rows=vocab.rows,
        defaults=len(default_ids),
        own=tuple(own),
        fill=tuple(fill),
        copies=tuple(copies),
        average=average,
    )


def _rule_row(vocab: MergedVocabulary, rule: TokenRule, i: int, inputs: Sequence[int], pos: torch.Tensor,
              tensor: str) -> tuple[int | None, int]:
    """The input and row a ``tokens`` rule takes token ``i``'s default from (None: zeros)."""
    token = vocab.tokens[i]
    if rule.kind == "zero":
        return None, 0
    if rule.kind == "none":
        raise ConfigError(
            f"tokenizer.tokens[{token!r}] gives no source, and {tensor} needs one: "
            + ("it is forced" if rule.force else "not every model has the token")
        )
    assert rule.checkpoint is not None
    if rule.checkpoint not in inputs:
        raise ConfigError(
            f"tokenizer.tokens[{token!r}].source: model {rule.model} is not among the models {tensor} is merged "
            f"from ({', '.join(vocab.refs[k] for k in inputs)})"
        )
    source = inputs.index(rule.checkpoint)
    if rule.kind == "row":
        assert rule.row is not None
        return source, rule.row
    row = int(pos[source, i])
    if row < 0:
        raise ConfigError(f"tokenizer.tokens[{token!r}].source: model {rule.model} has no token {token!r}")
    return source, row


def remap_rows(plan: RowPlan, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each input of one vocabulary tensor (rows first) rearranged into the output vocabulary.

    Pure: the inputs are not changed. The outputs share the inputs' promoted dtype and device.
    """
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    device = tensors[0].device
    width = tuple(tensors[0].shape[1:])

    def on(index: torch.Tensor) -> torch.Tensor:
        return index.to(device)

    table = torch.zeros((plan.defaults, *width), dtype=dtype, device=device)
    for k, slots, rows in plan.copies:
        table[on(slots)] = tensors[k][on(rows)].to(dtype)
    if plan.average is not None:
        slots, per_input, count = plan.average
        total = torch.zeros((len(slots), *width), dtype=dtype, device=device)
        for k, (at, rows) in enumerate(per_input):  # in input order, one model at a time
            at = on(at)
            total[at] = total[at] + tensors[k][on(rows)].to(dtype)
        table[on(slots)] = total / on(count).to(dtype).view(-1, *([1] * len(width)))
    out = []
    for k, t in enumerate(tensors):
        new = torch.zeros((plan.rows, *width), dtype=dtype, device=device)
        dst, src = plan.own[k]
        new[on(dst)] = t[on(src)].to(dtype)
        dst, slots = plan.fill[k]
        new[on(dst)] = table[on(slots)]
        if plan.rows > plan.tokens:
            new[plan.tokens:] = new[: plan.tokens].mean(dim=0)
        out.append(new)
    return out
