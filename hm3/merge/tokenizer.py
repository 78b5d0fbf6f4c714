"""The output tokenizer of a merge and where each model's tokens sit (mergekit 0.1.5's ``tokenizer_source``).

Models fine-tuned from one base often add tokens (chat markers, tool calls), so their embeddings have
different rows. A merge over them needs one vocabulary: the base's (``base``), another model's
(``MODEL``), or the ``union`` of all; the merged embedding and LM head then have one row per token of
it, and each model's rows are rearranged to match (:mod:`hm3.merge.vocab`). This module reads the
tokenizers (through ``transformers``, as mergekit does, so both see the same vocabularies) and builds
the output tokenizer the way mergekit 0.1.5 does:

* ``base``: the base model's tokenizer (the base is ``base_model``, else the first model);
* ``MODEL``: that model's tokenizer (it need not be one of the merged models);
* ``union``: the base's tokenizer with every other model's tokens appended: their ordinary tokens as
  plain added tokens, then their added tokens (specials) with their own settings, the first model's
  settings winning where two differ.

mergekit appends the union's tokens in an order that changes from run to run (it walks a hash map
and a set of models); hm3 appends them model by model (the base, then the recipe's order), each
model's in its own id order, so a recipe always gives the same token ids. A model without tokenizer
files is taken to have the base's vocabulary, as mergekit does. Tokens at or past a model's
``vocab_size`` have no embedding row and count as absent from it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hm3.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

#: Files that make a directory's tokenizer loadable (any one of them)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_MARKERS)


def load_tokenizer(directory: Path, ref: str) -> Any:
    """The fast tokenizer of a model directory (``AutoTokenizer``, as mergekit loads it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except Exception as err:  # transformers raises many types (OSError, ValueError, its own)
        raise CheckpointError(f"cannot load the tokenizer of model {ref} ({directory}): {err}") from None


@dataclass(frozen=True)
class TokenizedModel:
    """A model as the vocabulary sees it: its reference, directory, and how many embedding rows it has
    (tokens at or past this id have no row)."""

    ref: str
    path: Path
    rows: int


@dataclass(frozen=True)
class OutputTokenizer:
    """The merged model's tokenizer: its vocabulary (token -> id, ids 0..n-1) and how it is written.

    ``built`` is a tokenizer made here (a union, or tokens added) and saved with ``save_pretrained``;
    without it the tokenizer files of ``source`` are copied as they are. ``generation_config.json``
    comes from ``source`` either way: the ids it names are unchanged (the source's tokens keep theirs).
    """

    vocab: dict[str, int]
    source: Path
    built: Any | None = None

    def files(self, directory: Path) -> Path:
        """A directory holding the tokenizer files to copy into the output: ``source``, or ``directory``
        with the built tokenizer saved into it."""
        if self.built is None:
            return self.source
        self.built.save_pretrained(str(directory))
        if (self.source / "generation_config.json").is_file():
            shutil.copyfile(self.source / "generation_config.json", directory / "generation_config.json")
        return directory


def _own_rows(vocab: dict[str, int], rows: int) -> dict[str, int]:
    return {tok: i for tok, i in vocab.items() if i < rows}


def _union(base: TokenizedModel, tokenizers: Sequence[tuple[TokenizedModel, Any]]) -> Any:
    """The base's tokenizer with the other models' tokens appended (mergekit's ``union``)."""
    from transformers import AutoTokenizer

    added: dict[str, Any] = {}  # content -> AddedToken, the first model's settings
    ordinary: dict[str, None] = {}  # in order of first appearance
    for model, tok in tokenizers:
        own_added = {}
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i >= model.rows:
                continue
            own_added[info.content] = info
            first = added.setdefault(info.content, info)
            if first != info:
                log.warning(f"token {info.content!r} is added with other settings in {model.ref}; using "
                            f"the first model's")
        for token, i in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if i < model.rows and token not in own_added:
                ordinary.setdefault(token)
    with tempfile.TemporaryDirectory() as tmp:  # a fresh copy: the base's own tokenizer object stays as it is
        tokenizers[0][1].save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = tokenizers[0][1].get_vocab()
    for token in ordinary:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_output_tokenizer(
    source: str,
    base: TokenizedModel,
    models: Sequence[TokenizedModel],
    source_model: TokenizedModel | None,
    add_tokens: Sequence[str],
) -> tuple[OutputTokenizer, dict[str, dict[str, int]]]:
    """The output tokenizer for ``source`` (``base``, ``union``, or a model: ``source_model``) and each
    model's token -> embedding row (by reference; the base and ``models`` in the recipe's order).

    ``add_tokens`` (the ``tokenizer.tokens`` keys) are appended where the vocabulary lacks them.
    """
    if not has_tokenizer(base.path):
        raise ConfigError(
            f"tokenizer_source {source!r}: the base model {base.ref} ({base.path}) has no tokenizer files, and "
            "the merged vocabulary starts from its tokenizer"
        )
    base_tok = load_tokenizer(base.path, base.ref)
    loaded: list[tuple[TokenizedModel, Any]] = [(base, base_tok)]
    rows: dict[str, dict[str, int]] = {base.ref: _own_rows(base_tok.get_vocab(), base.rows)}
    for model in models:
        if model.ref in rows:
            continue
        if not has_tokenizer(model.path):
            log.warning(f"model {model.ref} has no tokenizer files; taking its vocabulary to be the base's")
            rows[model.ref] = _own_rows(base_tok.get_vocab(), model.rows)
            continue
        tok = load_tokenizer(model.path, model.ref)
        loaded.append((model, tok))
        rows[model.ref] = _own_rows(tok.get_vocab(), model.rows)

    if source in ("base", "union"):
        beyond = sorted(i for i in base_tok.get_vocab().values() if i >= base.rows)
        if beyond:
            raise ConfigError(
                f"tokenizer_source {source!r}: the tokenizer of the base model {base.ref} has {len(beyond)} "
                f"token(s) at ids {beyond[0]}..{beyond[-1]}, past its {base.rows} embedding rows; hm3 does not "
                "strip tokens from a tokenizer (mergekit does so for BPE tokenizers only): give another model "
                "as tokenizer_source, or a base whose tokenizer fits its embedding"
            )
    if source == "base":
        out_tok, out_dir, built = base_tok, base.path, None
    elif source == "union":
        out_tok, out_dir = _union(base, loaded), base.path
        built = out_tok
    else:
        assert source_model is not None
        if not has_tokenizer(source_model.path):
            raise ConfigError(f"tokenizer_source {source!r} ({source_model.path}) has no tokenizer files")
        out_tok = next((tok for m, tok in loaded if m.path == source_model.path), None)
        out_tok = out_tok if out_tok is not None else load_tokenizer(source_model.path, source_model.ref)
        out_dir, built = source_model.path, None

    vocab = out_tok.get_vocab()
    missing = [t for t in add_tokens if t not in vocab]
    if missing:
        if built is None:  # a copy: the source model's own tokenizer object is left as it is
            with tempfile.TemporaryDirectory() as tmp:
                from transformers import AutoTokenizer

                out_tok.save_pretrained(tmp)
                out_tok = AutoTokenizer.from_pretrained(tmp, use_fast=True)
            built = out_tok
        for token in missing:
            out_tok.add_tokens(token)
        vocab = out_tok.get_vocab()
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        gap = next(i for i, x in enumerate(ids) if x != i)
        raise ConfigError(
            f"tokenizer_source {source!r}: the output tokenizer's ids are not 0..{len(ids) - 1} (no token has "
            f"id {gap}), so its tokens cannot be the rows of one embedding"
        )
    return OutputTokenizer(vocab=dict(vocab), source=out_dir, built=built), rows
