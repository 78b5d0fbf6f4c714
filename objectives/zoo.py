"""The three tasks of the embedded model zoo, standing in for HM3's math, code and translation.

Generated deterministically from a seed, with disjoint train / validation /
test splits (an item's prompt appears in exactly one split). Prompts start with
a task tag so one model can be trained on the mixture. Formats are fixed-width
and values small on purpose: the zoo's micro models must learn these tasks in a
few hundred optimiser steps on a laptop CPU (harder variants were tried and a
64-wide two-layer model did not get off the ground within that budget).

* ``zoo:math`` — add or subtract a digit from a three-digit number
  (``M 247+8=`` -> ``255``), exact match;
* ``zoo:code`` — a straight-line program of three assignments over small
  integers (``C a=3;b=a+4;c=b-7;print(c)=`` -> ``0``), exact match; the reference
  answer comes from a tiny interpreter of exactly this grammar, never ``exec``;
* ``zoo:translation`` — word sequences through a seeded random bilingual lexicon
  whose target order swaps adjacent word pairs, scored by chrF (sacrebleu).
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from functools import lru_cache

from hm3.errors import ConfigError
from objectives.base import SPLITS, Example, Generate, Objective
from objectives.translation import corpus_chrf, require_chrf, sentence_chrf

ZOO_TASKS = ("math", "code", "translation")
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
STOP = ("\n",)
# Longest answer + its stop newline (one token per character): math "1008", code "-18", translation
# 4 words of up to 4 letters. Tight bounds keep generation short; a bound below an answer's length
# would cap every model's score (the old shared 12 cut translations off).
MAX_NEW_TOKENS = {"math": 5, "code": 4, "translation": 20}


# --- the tiny program language of zoo:code ---------------------------------------------------------


def run_program(program: str) -> int:
    """Value printed by ``x=3;y=x+4;print(y)``-style programs (assignments of ``atom (op atom)?``).

    A deliberately tiny interpreter: the grammar is ``stmt (';' stmt)*`` with
    ``stmt := VAR '=' atom ([+-] atom)? | 'print(' VAR ')'`` and ``atom := VAR | INT``.
    Anything else raises ``ValueError`` — there is no ``eval``/``exec`` anywhere.
    """
    env: dict[str, int] = {}
    printed: int | None = None

    def atom(tok: str) -> int:
        if tok.isdigit():
            return int(tok)
        if tok in env:
            return env[tok]
        raise ValueError(f"unknown name {tok!r}")

    for stmt in program.split(";"):
        if stmt.startswith("print(") and stmt.endswith(")"):
            printed = atom(stmt[6:-1])
            continue
        name, sep, expr = stmt.partition("=")
        if not sep or len(name) != 1 or not name.isalpha():
            raise ValueError(f"bad statement {stmt!r}")
        for op in "+-":
            left, found, right = expr.partition(op)
            if found:
                env[name] = atom(left) + atom(right) if op == "+" else atom(left) - atom(right)
                break
        else:
            env[name] = atom(expr)
    if printed is None:
        raise ValueError("program prints nothing")
    return printed


# --- generators ------------------------------------------------------------------------------------


def _math_item(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(1, 9)
    op = rng.choice("+-")
    return f"M {a}{op}{b}=", str(a + b if op == "+" else a - b)


def _code_item(rng: random.Random) -> tuple[str, str]:
    """``a=D;b=a±D;c=b±D;print(c)``: each statement reads the one before (3,240 distinct programs)."""
    program = (f"a={rng.randint(0, 9)};b=a{rng.choice('+-')}{rng.randint(1, 9)};"
               f"c=b{rng.choice('+-')}{rng.randint(1, 9)};print(c)")
    return f"C {program}=", str(run_program(program))


@lru_cache(maxsize=8)
def lexicon(seed: int) -> dict[str, str]:
    """A seeded random bilingual lexicon: 16 source words (a–m) -> target words (n–z)."""
    rng = random.Random(f"zoo-lexicon-{seed}")
    src_letters, tgt_letters = string.ascii_lowercase[:13], string.ascii_lowercase[13:]
    out: dict[str, str] = {}
    used: set[str] = set()
    while len(out) < 16:
        s = "".join(rng.choice(src_letters) for _ in range(rng.randint(2, 3)))
        t = "".join(rng.choice(tgt_letters) for _ in range(rng.randint(2, 4)))
        if s not in out and t not in used:
            out[s] = t
            used.add(t)
    return out


def translate(words: Sequence[str], seed: int) -> str:
    """Word-by-word through the lexicon, then swap each adjacent pair (the reordering rule)."""
    lex = lexicon(seed)
    out = [lex[w] for w in words]
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def _translation_item(rng: random.Random, seed: int) -> tuple[str, str]:
    words = [rng.choice(sorted(lexicon(seed))) for _ in range(rng.randint(2, 4))]
    return f"T {' '.join(words)}=", translate(words, seed)


@lru_cache(maxsize=16)
def zoo_splits(task: str, seed: int) -> dict[str, tuple[Example, ...]]:
    """Disjoint splits of ``task``: items are drawn until each split is full, duplicates skipped."""
    if task not in ZOO_TASKS:
        raise ConfigError(f"unknown zoo task {task!r}; zoo tasks: {', '.join(ZOO_TASKS)}")
    rng = random.Random(f"zoo-{task}-{seed}")
    seen: set[str] = set()
    out: dict[str, tuple[Example, ...]] = {}
    draws = 0
    for split in ("test", "validation", "train"):  # held-out splits first: they never vary with train size
        items: list[Example] = []
        while len(items) < SPLIT_SIZES[split]:
            draws += 1
            if draws > 50 * sum(SPLIT_SIZES.values()):  # a generator whose item space is too small
                raise ConfigError(f"zoo task {task!r} cannot fill {SPLIT_SIZES} with distinct prompts")
            if task == "math":
                prompt, target = _math_item(rng)
            elif task == "code":
                prompt, target = _code_item(rng)
            else:
                prompt, target = _translation_item(rng, seed)
            if prompt in seen:
                continue
            seen.add(prompt)
            items.append(Example(id=f"{task}-{split}-{len(items)}", prompt=prompt, target=target))
        out[split] = tuple(items)
    return out


class ZooObjective(Objective):
    """One zoo task; ``examples`` are generated (cheaply, cached) from the seed."""

    def __init__(self, task: str, seed: int = 0):
        self.task = task
        self.seed = seed
        self.name = f"zoo:{task}" if seed == 0 else f"zoo:{task}@{seed}"
        self.decoding = Generate(max_new_tokens=MAX_NEW_TOKENS[task], stop=STOP)
        self.description = {
            "math": "zoo: three-digit number plus/minus a digit, exact match",
            "code": "zoo: value printed by a 4-statement straight-line program, exact match",
            "translation": "zoo: lexicon translation with pair reordering, chrF",
        }[task]
        zoo_splits(task, seed)  # validate the task name now
        if task == "translation":
            require_chrf()

    def examples(self, split: str) -> Sequence[Example]:
        if split not in SPLITS:
            raise ConfigError(f"{self.name}: unknown split {split!r}; splits: {', '.join(SPLITS)}")
        return zoo_splits(self.task, self.seed)[split]

    def score(self, example: Example, output: str) -> float:
        if self.task == "translation":
            return sentence_chrf(output.strip(), example.target)
        return float(output.strip() == example.target)

    def aggregate(self, examples: Sequence[Example], outputs: Sequence[str]) -> float:
        if self.task == "translation":
            if not examples:
                raise ValueError(f"{self.name}: cannot aggregate zero examples")
            return corpus_chrf([o.strip() for o in outputs], [e.target for e in examples])
        return super().aggregate(examples, outputs)


def specialist_item(task: str, prompt: str, seed: int = 0) -> bool:
    """Whether an item exercises its task's *specialist* skill, which only that task's expert trains on.

    The zoo's base is pretrained on the other items of every task and so knows each
    task's format and half its skill; an expert adds the rest. That gap is structural, so
    an expert's lead does not hinge on how much of a task a seeded base run happened to
    pick up (the fragility of a base trained on whole tasks). The skills:

    * math: subtraction (``M 247-8=``); the base sees additions only;
    * code: programs with a subtraction; the base sees programs of additions only;
    * translation: sentences using a word from the second half of the sorted lexicon.
    """
    if task == "math":
        return "-" in prompt
    if task == "code":
        return "-" in prompt.split("=", 1)[1]
    if task == "translation":
        specialist_words = set(sorted(lexicon(seed))[len(lexicon(seed)) // 2 :])
        return any(w in specialist_words for w in prompt[2:].rstrip("=").split())
    raise ConfigError(f"unknown zoo task {task!r}; zoo tasks: {', '.join(ZOO_TASKS)}")


def zoo_objective(task: str, *, seed: int = 0) -> Objective:
    return ZooObjective(task, seed)
