"""Translation pairs from a user's JSONL file, scored by chrF (sacrebleu).

Records: ``{"source": str, "target": str}`` with optional ``"src_lang"`` / ``"tgt_lang"`` (free text,
e.g. ``"German"``) and the optional ``"id"`` / ``"split"`` fields of :mod:`objectives.jsonl`.

Prompt: ``"Translate to <tgt_lang>: <source>\\n"`` (``"Translate: <source>\\n"`` when the record has
no ``tgt_lang``); greedy generation of up to 128 tokens, cut at the first newline.

chrF is a corpus-level metric, so :meth:`TranslationObjective.aggregate` computes sacrebleu's corpus
chrF over all outputs (not the mean of sentence scores); both are divided by 100 to lie in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hm3.extras import extra_imports, require
from objectives.base import Example, Generate
from objectives.jsonl import FileObjective, require_strings

DECODING = Generate(max_new_tokens=128, stop=("\n",))


def prompt_for(source: str, tgt_lang: str | None) -> str:
    """The instruction prompt; a newline ends it so the model's answer is the next line."""
    return f"Translate to {tgt_lang}: {source}\n" if tgt_lang else f"Translate: {source}\n"


#: What needs sacrebleu, in the message when it is not installed.
CHRF_USER = "chrF (translation objectives)"


def require_chrf() -> None:
    """Refuse up front, before a model is loaded, when sacrebleu (hm3's 'eval' extra) is missing."""
    require("eval", what=CHRF_USER)


def _chrf():
    with extra_imports("eval", CHRF_USER):
        from sacrebleu.metrics import CHRF
    return CHRF()


def sentence_chrf(hypothesis: str, reference: str) -> float:
    """chrF of one hypothesis against one reference, in [0, 1]."""
    return _chrf().sentence_score(hypothesis, [reference]).score / 100


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (statistics pooled over all sentences, as sacrebleu reports it), in [0, 1]."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return _chrf().corpus_score(list(hypotheses), [list(references)]).score / 100


class TranslationObjective(FileObjective):
    """Translation pairs JSONL: chrF of the generated line against the reference."""

    kind = "translation"
    required = ("source", "target")
    decoding = DECODING
    description = "translation pairs JSONL (source, target[, tgt_lang]): corpus chrF / 100"

    def __init__(self, path: str | Path, **options: Any) -> None:
        require_chrf()
        super().__init__(path, **options)

    @staticmethod
    def to_example(example_id: str, data: dict[str, Any]) -> Example:
        require_strings(data, ("source", "target", "src_lang", "tgt_lang"))
        return Example(
            id=example_id,
            prompt=prompt_for(data["source"], data.get("tgt_lang")),
            target=data["target"],
            meta={"src_lang": data.get("src_lang"), "tgt_lang": data.get("tgt_lang")},
        )

    def score(self, example: Example, output: str) -> float:
        """Sentence chrF of one output (for per-example views; the task score is corpus chrF)."""
        return sentence_chrf(output.strip(), example.target)

    def aggregate(self, examples: Sequence[Example], outputs: Sequence[str]) -> float:
        """Corpus chrF over the outputs (stripped of surrounding whitespace)."""
        if not examples:
            raise ValueError(f"{self.name}: cannot aggregate zero examples")
        return corpus_chrf([o.strip() for o in outputs], [e.target for e in examples])
