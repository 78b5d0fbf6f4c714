"""Translation adapter: prompt format, and chrF equal to sacrebleu's own corpus_chrf."""

from __future__ import annotations

import pytest
import sacrebleu

from hm3.errors import DataFileError
from objectives.base import Generate
from objectives.translation import TranslationObjective

REFERENCES = ["Der Hund schläft.", "Ich trinke Kaffee am Morgen.", "Das Haus ist rot."]
OUTPUTS = ["Der Hund schlaeft.", "Ich trinke morgens Tee.", "Das Haus ist rot."]


@pytest.fixture
def objective(write_jsonl):
    sources = ["The dog sleeps.", "I drink coffee in the morning.", "The house is red."]
    rows = [
        {"source": s, "target": t, "src_lang": "English", "tgt_lang": "German", "split": "test"}
        for s, t in zip(sources, REFERENCES, strict=True)
    ]
    rows.append({"source": "Hello", "target": "Hallo", "split": "validation"})
    return TranslationObjective(write_jsonl("pairs.jsonl", rows))


def test_prompt_and_decoding(objective):
    assert objective.examples("test")[0].prompt == "Translate to German: The dog sleeps.\n"
    assert objective.examples("validation")[0].prompt == "Translate: Hello\n"
    assert objective.decoding == Generate(max_new_tokens=128, stop=("\n",))


def test_aggregate_is_sacrebleu_corpus_chrf(objective):
    examples = objective.examples("test")
    expected = sacrebleu.corpus_chrf(OUTPUTS, [REFERENCES]).score / 100
    assert objective.aggregate(examples, OUTPUTS) == pytest.approx(expected, abs=1e-12)
    # Corpus chrF pools statistics: it is not the mean of sentence scores.
    mean = sum(objective.score(e, o) for e, o in zip(examples, OUTPUTS, strict=True)) / 3
    assert objective.aggregate(examples, OUTPUTS) != pytest.approx(mean, abs=1e-9)
    assert objective.aggregate(examples, REFERENCES) == pytest.approx(1.0)


def test_sentence_score(objective):
    example = objective.examples("test")[1]
    expected = sacrebleu.sentence_chrf(OUTPUTS[1], [REFERENCES[1]]).score / 100
    assert objective.score(example, OUTPUTS[1]) == pytest.approx(expected)
    assert 0.0 < objective.score(example, OUTPUTS[1]) < 1.0
    assert objective.score(example, "") == 0.0


def test_non_string_field_names_line(write_jsonl):
    path = write_jsonl("bad.jsonl", [{"source": "a", "target": "b"}, {"source": "a", "target": 3}])
    with pytest.raises(DataFileError, match=r"bad\.jsonl, line 2: field\(s\) target must be strings"):
        TranslationObjective(path)
