"""Our side of the grid: one prefill and one scoring per (document, method), then a cheap
selection per ratio; every question is asked against that one compressed cache.

For every (task, method, ratio, question) one Row: the greedy answer and its SQuAD
F1 / EM (or needle hit), agreement with the full-cache greedy answer, and the fidelity of
the compressed cache: the full-cache answer teacher-forced under it, summed KL(full ||
compressed) of the next-token distributions and argmax flips over its positions.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from bench.quality import kvzap, metrics
from bench.quality.data import Task
from service.compression.selection import select
from service.config import CompressionConfig
from service.engine.kvcache import CompressedContext, KVzipCache
from service.engine.kvzip_engine import KVzipEngine
from service.types import SamplingParams

FULL = "full"


@dataclass
class Row:
    task: str
    kind: str
    method: str
    ratio: float
    qid: str
    answer: str
    score: float  # QA: SQuAD F1; needle: hit
    em: float  # QA: exact match; needle: hit
    agree: float  # answer text == the full-cache answer
    kl: float  # summed over `positions`
    flips: float  # summed over `positions`
    positions: int


@dataclass
class Timing:
    task: str
    kind: str
    method: str
    tokens: int
    prefill_s: float
    score_s: float


def _log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


@torch.inference_mode()
def teacher_forced(
    engine: KVzipEngine, ctx: CompressedContext, prompt: list[int], answer: list[int]
) -> torch.Tensor:
    """Logits (len(answer) + 1, V) predicting each answer token and what follows it."""
    cache = KVzipCache(ctx, engine.n_layers)
    ids = prompt + answer
    model = engine.model
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(
        input_ids=torch.tensor([ids], device=model.device),
        position_ids=torch.arange(ctx.seq_len, ctx.seq_len + len(ids), device=model.device)[None],
        use_cache=True,
        kvzip_cache=cache,
        logits_to_keep=len(answer) + 1,
        **{name: cache},
    )
    return out.logits[0].float().cpu()


class Grid:
    """Runs tasks x methods x ratios on one engine; rows and timings accumulate."""

    def __init__(
        self,
        engine: KVzipEngine,
        methods: list[str],
        ratios: list[float],
        max_new_tokens: dict[str, int],
        chunk_size: int = 2000,
    ) -> None:
        self.engine, self.methods, self.chunk_size = engine, methods, chunk_size
        self.ratios = sorted((r for r in ratios if r < 1.0), reverse=True)
        self.max_new = max_new_tokens
        self.rows: list[Row] = []
        self.timings: list[Timing] = []
        self.full_rows = True  # False: a later pass over the same tasks (full rows exist)

    def run(self, tasks: list[Task], on_task: Callable[[], None] | None = None) -> None:
        for i, task in enumerate(tasks):
            t0 = time.perf_counter()
            self.run_task(task)
            _log(f"task {i + 1}/{len(tasks)} {task.name!r}: {time.perf_counter() - t0:.1f}s")
            if on_task:
                on_task()

    def run_task(self, task: Task) -> None:
        engine = self.engine
        doc = engine.encode_document(task.text)
        t0 = time.perf_counter()
        full = engine.prefill_context(doc, CompressionConfig("kvzip", 1.0, self.chunk_size))
        prefill_s = time.perf_counter() - t0
        n = full.context_len
        if self.full_rows:
            self.timings.append(Timing(task.name, task.kind, FULL, n, prefill_s, 0.0))
        prompts = [engine.encode_question(q.text) for q in task.questions]
        params = SamplingParams(max_new_tokens=self.max_new[task.kind])
        reference = [list(engine.generate(full, p, params)) for p in prompts]
        ref_text = [engine.decode(r) for r in reference]
        ref_logits = [
            teacher_forced(engine, full, p, r) for p, r in zip(prompts, reference, strict=True)
        ]
        for q, text, logits in zip(task.questions, ref_text, ref_logits, strict=True):
            if self.full_rows:
                self._row(task, FULL, 1.0, q, text, text, 0.0, 0.0, logits.shape[0])
        for method in self.methods:
            t1 = time.perf_counter()
            if kvzap.is_kvzap(method):  # scored inside its own prefill: ingest it, minus ours
                scored = kvzap.ingest_scored(engine, doc, method, self.chunk_size)
                t1 += prefill_s
            else:
                scored = engine.score(full, method=method)
            self.timings.append(
                Timing(task.name, task.kind, method, n, prefill_s, time.perf_counter() - t1)
            )
            for ratio in self.ratios:
                ctx = select(scored, ratio)
                for q, prompt, ref, text, logits in zip(
                    task.questions, prompts, reference, ref_text, ref_logits, strict=True
                ):
                    answer = engine.decode(list(engine.generate(ctx, prompt, params)))
                    kl, flips = metrics.divergence(logits, teacher_forced(engine, ctx, prompt, ref))
                    self._row(task, method, ratio, q, answer, text, kl, flips, logits.shape[0])

    def _row(self, task, method, ratio, q, answer, full_answer, kl, flips, positions) -> None:  # type: ignore[no-untyped-def]
        if task.kind == "needle":
            score = em = metrics.needle_hit(answer, q.answers[0])
        else:
            score = metrics.best(metrics.f1, answer, q.answers)
            em = metrics.best(metrics.exact, answer, q.answers)
        agree = float(answer.strip() == full_answer.strip())
        self.rows.append(
            Row(
                task.name,
                task.kind,
                method,
                ratio,
                q.id,
                answer,
                score,
                em,
                agree,
                kl,
                flips,
                positions,
            )
        )

    def to_json(self) -> dict[str, list[dict]]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "timings": [asdict(t) for t in self.timings],
        }
