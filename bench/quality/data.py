"""Benchmark inputs from the vendored SQuAD sample: multi-question documents and needles.

QA documents are whole articles cut at a paragraph boundary: as many consecutive paragraphs
as fit `max_tokens`, and every question of the included paragraphs. Needle haystacks are
cut from other articles' sentences, with a pass key sentence inserted at a depth.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "squad_train_sample.jsonl"
NEEDLE = "The pass key is {key}. Remember it."
NEEDLE_QUESTION = "What is the pass key? Answer with the number only."

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """One document and the questions asked against ONE compressed cache of it."""

    kind: str  # "qa" | "needle"
    name: str
    text: str
    questions: tuple[Question, ...]
    meta: dict[str, float | int | str] = field(default_factory=dict)


def load_articles(path: Path = DATA) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def qa_tasks(
    articles: list[dict], count: CountTokens, max_tokens: int, n_docs: int, max_questions: int
) -> list[Task]:
    """The first `n_docs` articles, each cut to the paragraphs that fit `max_tokens`.

    max_questions > 0 keeps that many questions per document (an even spread over the
    included paragraphs, in order); 0 keeps them all.
    """
    tasks = []
    for article in articles[:n_docs]:
        paragraphs = _fitting(article["paragraphs"], count, max_tokens)
        text = "\n\n".join(p["context"] for p in paragraphs)
        questions = [
            Question(q["id"], q["question"], tuple(q["answers"]))
            for p in paragraphs
            for q in p["qas"]
        ]
        if 0 < max_questions < len(questions):
            step = len(questions) / max_questions
            questions = [questions[int(i * step)] for i in range(max_questions)]
        tasks.append(
            Task("qa", article["title"], text, tuple(questions), {"paragraphs": len(paragraphs)})
        )
    return tasks


def _fitting(paragraphs: list[dict], count: CountTokens, max_tokens: int) -> list[dict]:
    kept: list[dict] = []
    for p in paragraphs:
        candidate = "\n\n".join(x["context"] for x in [*kept, p])
        if kept and count(candidate) > max_tokens:
            break
        kept.append(p)
    return kept


def _sentences(articles: list[dict]) -> Iterator[str]:
    for article in articles:
        for p in article["paragraphs"]:
            for s in p["context"].replace("\n", " ").split(". "):
                s = s.strip()
                if s:
                    yield s if s.endswith(".") else s + "."


def needle_tasks(
    articles: list[dict],
    count: CountTokens,
    lengths: list[int],
    depths: list[float],
    seed: int = 0,
) -> list[Task]:
    """A haystack per (length, depth): sentences of `articles` up to `length` tokens, the
    pass-key sentence inserted before the sentence at fraction `depth` of the haystack."""
    rng = random.Random(seed)
    pool = list(_sentences(articles))
    tasks = []
    for length in lengths:
        sentences: list[str] = []
        start = rng.randrange(len(pool) // 2)
        for s in pool[start:] + pool[:start]:
            # tokens ~ words * 1.4; re-count exactly only near the target
            if count(" ".join([*sentences, s])) > length - 24:
                break
            sentences.append(s)
        for depth in depths:
            key = f"{rng.randrange(10000, 100000)}"
            at = round(depth * len(sentences))
            text = " ".join([*sentences[:at], NEEDLE.format(key=key), *sentences[at:]])
            question = Question(f"needle-{length}-{depth}", NEEDLE_QUESTION, (key,))
            tasks.append(
                Task(
                    "needle",
                    f"needle {length} tokens, depth {depth:.2f}",
                    text,
                    (question,),
                    {"length": length, "depth": depth},
                )
            )
    return tasks
