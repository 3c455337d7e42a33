"""Documents to register for the serving benchmark, each cut to an exact token length.

`squad`: SQuAD articles (bench/data/squad_train_sample.jsonl), the next article appended
while one is too short, with questions from the article's first paragraph (always inside
the cut). `haystack`: generated filler sentences with one pass key per document.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BenchDocument", "build_documents"]

SQUAD = Path(__file__).resolve().parents[1] / "data" / "squad_train_sample.jsonl"
_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


@dataclass(frozen=True)
class BenchDocument:
    name: str
    text: str
    tokens: int
    questions: tuple[str, ...]


def build_documents(tokenizer: Any, source: str, count: int, tokens: int) -> list[BenchDocument]:
    """`count` documents of `tokens` tokens each (by `tokenizer`) from `source`."""
    if source == "squad":
        return _squad(tokenizer, count, tokens)
    if source == "haystack":
        return [_haystack(tokenizer, i, tokens) for i in range(count)]
    raise ValueError(f"unknown document source {source!r} (squad or haystack)")


def _cut(tokenizer: Any, text: str, tokens: int) -> tuple[str, int]:
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids), len(ids)


def _squad(tokenizer: Any, count: int, tokens: int) -> list[BenchDocument]:
    articles = [json.loads(line) for line in SQUAD.read_text().splitlines() if line.strip()]
    if count > len(articles):
        raise ValueError(f"{SQUAD.name} has {len(articles)} articles; asked for {count}")
    docs = []
    for i in range(count):
        first = articles[i]
        parts: list[str] = []
        j = i
        while sum(len(p) for p in parts) < 6 * tokens:  # ~4 characters a token, with margin
            parts += [p["context"] for p in articles[j % len(articles)]["paragraphs"]]
            j += 1
        text, n = _cut(tokenizer, "\n\n".join(parts), tokens)
        questions = tuple(q["question"] for q in first["paragraphs"][0]["qas"][:4])
        docs.append(BenchDocument(first["title"], text, n, questions or ("Summarise it.",)))
    return docs


def _haystack(tokenizer: Any, index: int, tokens: int) -> BenchDocument:
    rng = random.Random(index)
    key = rng.randrange(10_000, 100_000)
    needle = f"The pass key of document {index} is {key}. Remember it. "
    repeats = tokens // 16 + 1
    where = rng.randrange(repeats)
    body = "".join(needle if k == where else _FILLER for k in range(repeats))
    text, n = _cut(tokenizer, body, tokens)
    if needle.strip() not in text:  # the cut fell before it: put it at the front
        text, n = _cut(tokenizer, needle + body, tokens)
    question = f"What is the pass key of document {index}?"
    return BenchDocument(f"haystack-{index}", text, n, (question,))
