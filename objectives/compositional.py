"""The compositional task family: a language the base cannot read, word problems, and both at once.

Level-2 layer paths pay (Akiba et al. 2024; Bandarkar et al. 2024) when a task needs two skills
*in sequence*: understanding a language, then reasoning in it. This family builds that regime from
a seed, with no download:

* **a pseudo-language** ("Velan"): a seeded word-level substitution of a closed English vocabulary
  of a few hundred words into pronounceable pseudo-words (:func:`lexicon`); digits and punctuation
  are kept. An English model reads none of it, so its scores on Velan input are near 0;
* ``compositional:language`` -- translate a Velan sentence into English; corpus chrF / 100;
* ``compositional:math`` -- an English arithmetic word problem (addition, subtraction,
  multiplication, exact division, two steps), the answer a number; exact match;
* ``compositional:composite`` -- the same kind of word problem written in Velan, answer in digits;
  exact match. Neither expert is trained on it (:func:`expert_training_examples`).

Prompts are plain text ending in a newline, the answer being the next line (as the zoo and the
translation objective prompt SmolLM2 today): ``"Solve: <problem>\\n"`` -> ``"42"``,
``"Translate Velan to English: <sentence>\\n"`` -> ``"<english>"``. The instruction words stay
English in every task: only the content is in Velan, so the composite differs from the math task
in the language of the problem alone.

Splits are disjoint *across the whole family*: every English problem text and every sentence is
drawn once per seed and lands in exactly one (task, split) -- so no composite problem is the
translation of a math training problem, and the language expert's parallel text (drawn from the
math *training* problems' statements and from sentences of its own train split) never contains a
validation or test item of any task.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from hm3.errors import ConfigError
from objectives.base import SPLITS, Example, Generate, Objective
from objectives.translation import corpus_chrf, sentence_chrf

TASKS = ("language", "math", "composite")
LANGUAGE_NAME = "Velan"
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
STOP = ("\n",)
# Answers are at most 4 digits (a few BPE tokens, 5 characters with the stop newline); an English
# sentence of up to 13 words is ~20 BPE tokens, ~80 characters (a toy character model is cut at 64).
MAX_NEW_TOKENS = {"language": 64, "math": 8, "composite": 8}
SOLVE = "Solve: {}\n"
TRANSLATE_TO_ENGLISH = f"Translate {LANGUAGE_NAME} to English: {{}}\n"
TRANSLATE_TO_VELAN = f"Translate English to {LANGUAGE_NAME}: {{}}\n"
ANSWER_IN_VELAN = f"Answer in {LANGUAGE_NAME}: {{}}\n"

# --- the closed English vocabulary ---------------------------------------------------------------

NAMES = ("anna", "ben", "clara", "david", "emma", "felix", "grace", "henry", "iris", "jack", "kate", "leo",
         "maria", "noah", "olivia", "paul", "rosa", "sam", "tom", "vera", "will", "zoe", "lucy", "omar")
OBJECTS = ("apples", "pears", "books", "pencils", "stamps", "marbles", "cookies", "cards", "coins", "eggs",
           "flowers", "shells", "stickers", "toys", "cups", "plums", "nuts", "candles", "buttons", "rocks")
ANIMALS = ("dog", "cat", "bird", "horse", "cow", "fish", "mouse", "rabbit", "goat", "duck", "fox", "bear",
           "sheep", "pig", "frog", "owl", "wolf", "deer", "lion", "tiger", "snake", "hen")
THINGS = ("house", "tree", "garden", "river", "road", "table", "window", "boat", "hill", "door", "field",
          "bridge", "wall", "lake", "forest", "market", "school", "kitchen", "village", "city", "farm", "barn",
          "shop", "park", "street", "station", "church", "tower", "beach", "island", "mountain", "valley",
          "castle", "library", "room", "roof", "gate", "fence", "well", "mill")
ADJECTIVES = ("red", "small", "big", "old", "young", "happy", "quiet", "green", "blue", "white", "black",
              "tall", "short", "warm", "cold", "bright", "dark", "fast", "slow", "kind", "brave", "clever", "gentle",
              "lazy", "loud", "proud", "strong", "tired", "hungry", "busy")
VERBS = ("sees", "likes", "follows", "finds", "watches", "helps", "carries", "paints", "visits", "calls",
         "meets", "hears", "pulls", "pushes", "feeds", "chases", "greets", "draws", "remembers", "thanks",
         "wakes", "guides", "admires", "avoids")
PLACES = ("near", "behind", "under", "beside", "above", "inside")
TIMES = ("today", "yesterday", "often", "sometimes", "again", "now")
# Words of the problem templates, sentences and instructions beyond the lists above.
FUNCTION_WORDS = (
    "the", "a", "has", "have", "had", "and", "buys", "more", "how", "many", "does", "now", "gives", "to",
    "boxes", "with", "in", "each", "box", "shares", "equally", "among", "friends", "friend", "get", "then",
    "finds", "loses", "of", "them", "bags", "bag", "every", "day", "days", "for", "after", "left", "there",
    "are", "is", "what", "collects", "puts", "into", "rows", "row", "total", "altogether", "away", "picks",
    "splits", "groups", "group", "gets", "on", "at", "while", "so", "but", "also", "own", "owns", "at",
)
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    NAMES + OBJECTS + ANIMALS + THINGS + ADJECTIVES + VERBS + PLACES + TIMES + FUNCTION_WORDS
))
_WORD = re.compile(r"[a-z]+")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@lru_cache(maxsize=8)
def lexicon(seed: int) -> dict[str, str]:
    """English word -> Velan pseudo-word: 2-3 consonant-vowel syllables, distinct, never an English word."""
    rng = random.Random(f"velan-lexicon-{seed}")
    english = set(VOCABULARY)
    out: dict[str, str] = {}
    used: set[str] = set()
    for word in VOCABULARY:
        while True:
            syllables = rng.randint(2, 3)
            pseudo = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
            if rng.random() < 0.3:
                pseudo += rng.choice("nrs")
            if pseudo not in used and pseudo not in english:
                break
        out[word] = pseudo
        used.add(pseudo)
    return out


def _substitute(text: str, table: dict[str, str]) -> str:
    def swap(match: re.Match[str]) -> str:
        word = match.group()
        if word not in table:
            raise ValueError(f"word {word!r} is not in the {LANGUAGE_NAME} vocabulary")
        return table[word]

    return _WORD.sub(swap, text)


def to_velan(text: str, seed: int = 0) -> str:
    """Lower-case English of :data:`VOCABULARY` in Velan, word by word (digits, spaces, punctuation kept)."""
    return _substitute(text, lexicon(seed))


def to_english(text: str, seed: int = 0) -> str:
    """The inverse of :func:`to_velan`."""
    return _substitute(text, {v: k for k, v in lexicon(seed).items()})


# --- generators ---------------------------------------------------------------------------------------

Problem = tuple[str, str, str]  # (operation, English problem, answer in digits)


def _problem(rng: random.Random) -> Problem:
    """One templated word problem; five operation types, two wordings each, small positive answers."""
    n1, n2 = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    op = rng.choice(("add", "sub", "mul", "div", "two-step"))
    wording = rng.randint(0, 1)
    if op == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        text = (f"{n1} has {a} {obj} and buys {b} more. how many {obj} does {n1} have now?",
                f"{n1} collects {a} {obj} and {n2} gives {n1} {b} more. how many {obj} does {n1} have now?")
        answer = a + b
    elif op == "sub":
        a = rng.randint(10, 80)
        b = rng.randint(1, a - 1)
        text = (f"{n1} has {a} {obj} and gives {b} to {n2}. how many {obj} does {n1} have now?",
                f"{n1} has {a} {obj} and loses {b} of them. how many {obj} are left?")
        answer = a - b
    elif op == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        text = (f"{n1} has {a} boxes with {b} {obj} in each box. how many {obj} does {n1} have?",
                f"{n1} puts {obj} into {a} rows with {b} in each row. how many {obj} are there altogether?")
        answer = a * b
    elif op == "div":
        b, answer = rng.randint(2, 9), rng.randint(2, 12)
        a = b * answer
        text = (f"{n1} shares {a} {obj} equally among {b} friends. how many {obj} does each friend get?",
                f"{n1} splits {a} {obj} into {b} groups. how many {obj} are in each group?")
    else:
        a, b = rng.randint(5, 50), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        text = (f"{n1} has {a} {obj}, buys {b} more and then gives {c} to {n2}. how many {obj} does {n1} have now?",
                f"{n1} finds {a} {obj} and {b} more, then loses {c} of them. how many {obj} are left?")
        answer = a + b - c
    return op, text[wording], str(answer)


def _sentence(rng: random.Random) -> str:
    """A simple English sentence of the vocabulary (the language task's and its expert's text)."""
    def noun_phrase() -> str:
        noun = rng.choice(ANIMALS + THINGS) if rng.random() < 0.7 else rng.choice(NAMES)
        if noun in NAMES:
            return noun
        return f"{rng.choice(('the', 'a'))} {rng.choice(ADJECTIVES) + ' ' if rng.random() < 0.6 else ''}{noun}"

    subject = noun_phrase()
    parts = [subject, rng.choice(VERBS), noun_phrase()]
    if rng.random() < 0.5:
        parts += [rng.choice(PLACES), f"the {rng.choice(THINGS)}"]
    if rng.random() < 0.4:
        parts.append(rng.choice(TIMES))
    return " ".join(parts) + "."


def _owns_item(rng: random.Random) -> tuple[str, str]:
    """An instruction in Velan: ``<name> has a <adj> <thing>. what does <name> have?`` -> ``a <adj> <thing>``."""
    name, adj, thing = rng.choice(NAMES), rng.choice(ADJECTIVES), rng.choice(ANIMALS + THINGS)
    return f"{name} has a {adj} {thing}. what does {name} have?", f"a {adj} {thing}"


@lru_cache(maxsize=8)
def family(seed: int) -> dict[str, dict[str, tuple[Example, ...]]]:
    """Every task's splits for ``seed``; held-out splits are drawn first, and every problem text or
    sentence is used once across the whole family (module docstring)."""
    rng = random.Random(f"compositional-{seed}")
    seen: set[str] = set()

    def draw(make: Callable[[], tuple[str, ...]], key: Callable[[tuple[str, ...]], str], n: int) -> list:
        items: list[tuple[str, ...]] = []
        for _ in range(200 * n):
            item = make()
            if key(item) not in seen:
                seen.add(key(item))
                items.append(item)
                if len(items) == n:
                    return items
        raise ConfigError(f"compositional tasks (seed {seed}) cannot draw {n} distinct items")

    out: dict[str, dict[str, tuple[Example, ...]]] = {t: {} for t in TASKS}
    for split in ("test", "validation", "train"):
        n = SPLIT_SIZES[split]
        for task in ("composite", "math"):
            problems = draw(lambda: _problem(rng), lambda p: p[1], n)
            out[task][split] = tuple(
                Example(id=f"{task}-{split}-{i}",
                        prompt=SOLVE.format(to_velan(text, seed) if task == "composite" else text),
                        target=answer, meta={"operation": op, "english": text})
                for i, (op, text, answer) in enumerate(problems))
        sentences = draw(lambda: (_sentence(rng),), lambda s: s[0], n)
        out["language"][split] = tuple(
            Example(id=f"language-{split}-{i}", prompt=TRANSLATE_TO_ENGLISH.format(to_velan(s, seed)), target=s)
            for i, (s,) in enumerate(sentences))
    return out


def expert_training_examples(expert: str, seed: int = 0, n: int | None = None) -> list[Example]:
    """Training data of an expert, from train splits only; neither expert sees a composite example.

    * ``math``: the English word problems of ``compositional:math``'s train split;
    * ``language``: parallel text in both directions (the language task's train sentences, and the
      *statements* of the math train problems, without answers, so the vocabulary of problems is
      learnt but never a Velan problem with its answer) plus simple instructions answered in Velan.

    ``n`` (default: all) takes a seeded sample of that size.
    """
    tasks = family(seed)
    if expert == "math":
        data = list(tasks["math"]["train"])
    elif expert == "language":
        data = []
        sentences = [e.target for e in tasks["language"]["train"]]
        statements = [e.meta["english"] for e in tasks["math"]["train"]]
        for i, text in enumerate(sentences + statements):
            velan = to_velan(text, seed)
            data.append(Example(f"lang-x-{i}", TRANSLATE_TO_ENGLISH.format(velan), text))
            data.append(Example(f"lang-y-{i}", TRANSLATE_TO_VELAN.format(text), velan))
        rng = random.Random(f"velan-instructions-{seed}")
        for i in range(len(sentences)):
            question, answer = _owns_item(rng)
            data.append(Example(f"lang-q-{i}", ANSWER_IN_VELAN.format(to_velan(question, seed)),
                                to_velan(answer, seed)))
    else:
        raise ConfigError(f"no compositional expert {expert!r}; experts: language, math")
    random.Random(f"expert-{expert}-{seed}").shuffle(data)
    return data if n is None else data[:n]


class CompositionalObjective(Objective):
    """One task of the compositional family (module docstring)."""

    def __init__(self, task: str, seed: int = 0):
        if task not in TASKS:
            raise ConfigError(f"unknown compositional task {task!r}; tasks: {', '.join(TASKS)}")
        self.task, self.seed = task, seed
        self.name = f"compositional:{task}" + (f"@{seed}" if seed else "")
        self.decoding = Generate(max_new_tokens=MAX_NEW_TOKENS[task], stop=STOP)
        self.description = DESCRIPTIONS[task]

    def examples(self, split: str) -> Sequence[Example]:
        if split not in SPLITS:
            raise ConfigError(f"{self.name}: unknown split {split!r}; splits: {', '.join(SPLITS)}")
        return family(self.seed)[self.task][split]

    def score(self, example: Example, output: str) -> float:
        if self.task == "language":
            return sentence_chrf(output.strip(), example.target)
        return float(output.strip() == example.target)

    def aggregate(self, examples: Sequence[Example], outputs: Sequence[str]) -> float:
        if self.task != "language":
            return super().aggregate(examples, outputs)
        if not examples:
            raise ValueError(f"{self.name}: cannot aggregate zero examples")
        return corpus_chrf([o.strip() for o in outputs], [e.target for e in examples])


DESCRIPTIONS = {
    "language": f"compositional: translate {LANGUAGE_NAME} (seeded pseudo-language) to English, chrF / 100",
    "math": "compositional: English arithmetic word problems (5 operation types), exact match",
    "composite": f"compositional: the word problems written in {LANGUAGE_NAME}, answer in digits, exact match",
}
