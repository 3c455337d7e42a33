"""Generated needle haystacks for the needle grid (bench/quality/needle_grid.py).

Each haystack is a run of SQuAD-sample sentences (articles the QA tasks and the
calibrations do not use) of a drawn length, with TWO needles at drawn depths: facts of
different templates ("The access code of the north gate is 48213.") asked separately.
Lengths, depths, templates, names and 5-digit keys all come from one seeded generator, so
`haystacks(..., seed)` is the same set on every machine. The two questions of a haystack
share one compressed cache: the grid resamples haystacks, not questions, for its intervals.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator

from bench.quality.data import Question, Task, _sentences

KEY = re.compile(r"\d{5}")

TEMPLATES = (
    (
        "The access code of the {thing} is {key}.",
        "What is the access code of the {thing}? Answer with the number only.",
    ),
    (
        "The locker number of {name} is {key}.",
        "What is the locker number of {name}? Answer with the number only.",
    ),
    (
        "The serial number written on the {thing} is {key}.",
        "What is the serial number written on the {thing}? Answer with the number only.",
    ),
    (
        "{name}'s membership number is {key}.",
        "What is {name}'s membership number? Answer with the number only.",
    ),
)
THINGS = (
    "north gate",
    "old boathouse",
    "blue cabinet",
    "library archive",
    "copper telescope",
    "river mill",
    "east tower",
    "green van",
)
NAMES = ("Mara Lind", "Tomas Okafor", "Ines Varga", "Pavel Hruby", "Lena Ortiz", "Jonah Reyes")


def haystacks(
    articles: list[dict],
    count: Callable[[str], int],
    n: int,
    lengths: tuple[int, int] = (500, 1500),
    seed: int = 16,
) -> list[Task]:
    """`n` haystacks of lengths drawn uniformly in `lengths` (tokens), two needles each."""
    rng = random.Random(seed)
    pool = list(_sentences(articles))
    tasks = []
    for index in range(n):
        target = rng.randint(*lengths)
        start = rng.randrange(len(pool))
        sentences: list[str] = []
        for s in pool[start:] + pool[:start]:
            if count(" ".join([*sentences, s])) > target - 40:
                break
            sentences.append(s)
        first, second = rng.sample(range(len(TEMPLATES)), 2)
        depths = sorted(rng.random() for _ in range(2))
        facts, questions = [], []
        for k, (t, depth) in enumerate(zip((first, second), depths, strict=True)):
            fact, question = TEMPLATES[t]
            fill = {"thing": rng.choice(THINGS), "name": rng.choice(NAMES)}
            key = str(rng.randrange(10000, 100000))
            facts.append((round(depth * len(sentences)), fact.format(key=key, **fill)))
            questions.append(Question(f"hay{index}-q{k}", question.format(**fill), (key,)))
        text_parts = list(sentences)
        for at, fact in sorted(facts, reverse=True):  # later depth first: indices stay valid
            text_parts.insert(at, fact)
        text = " ".join(text_parts)
        tasks.append(
            Task(
                "needle",
                f"haystack {index}",
                text,
                tuple(questions),
                {"tokens": count(text), "depths": ",".join(f"{d:.2f}" for d in depths)},
            )
        )
    return tasks


def first_answer(tokens: Iterator[int], decode: Callable[[list[int]], str]) -> str:
    """The answer up to its first 5-digit number or its first sentence end, whichever
    comes first (the rest cannot turn a miss into a hit in the grid's sense: the first
    number given is the answer); `tokens` is a generator, so decoding stops there."""
    ids: list[int] = []
    text = ""
    for token in tokens:
        ids.append(token)
        text = decode(ids)
        if answered(text):
            break
    return text


def answered(text: str) -> bool:
    """The answer so far holds a 5-digit number or has ended a sentence or line."""
    return (
        bool(KEY.search(text)) or text.rstrip().endswith((".", "?", "!")) or ("\n" in text.strip())
    )
