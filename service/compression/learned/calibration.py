"""`calibrate-scorer`: fit KVzap predictors of one model on the ranks of its own KVzip scores.

For every calibration text:

1. prefill it exactly as an ingest does (the service's prompt layout) while forward
   pre-hooks record every layer's attention input x (n, D) of the context tokens;
2. score it with the service's own scorer (`kvzip`, or `kvzip_plus`) in chunks of
   `chunk_size` tokens, exactly the scores an ingest computes (`chunk_size=None`: one
   softmax over the whole text, the KVzap recipe);
3. leave out the last `window` context tokens (threshold selection keeps them anyway, and
   their reconstruction scores carry a recency bias no hidden state knows), turn the
   text's log-scores into targets (`transform`: the normal scores of their ranks among the
   text's L*H*n pairs, or the raw log-scores; service.compression.learned.targets), and
   sample `tokens_per_text` positions: x (L, D) and y (L, H) each.

Why these defaults (measured on the default model, docs/quality.md "kvzap retrained on
KVzip ranks"): plain KVzip keeps more needle facts than KVzip+ on that model, selection is a
global top-k per document (only the order of the pairs counts, and rank targets do not
move with a document's length), and held-out rank correlation stops improving at about 48
texts of ~1,000 tokens.

Texts are then split (the last `heldout` fraction held out, whole texts), a ridge map and
an MLP are fitted per layer on the rest, and each gets its training loss (MSE), held-out R²,
held-out Spearman correlation and top-30% recall in its metadata.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from service.compression.learned.fit import (
    MLPSettings,
    fit_mlp,
    fit_ridge,
    predict_all,
    r2_per_layer,
    r2_score,
)
from service.compression.learned.predictor import KINDS, KVzapPredictor
from service.compression.learned.targets import spearman, top_recall, transform
from service.compression.runner import ModelRunner
from service.compression.scorers.kvzip import KVzipScorer
from service.compression.scorers.kvzip_plus import KVzipPlusScorer
from service.compression.selection import WINDOW
from service.config import CompressionConfig
from service.engine.attention_hook import attention_inputs
from service.errors import InvalidInputError

DEFAULT_JSONL = Path(__file__).resolve().parents[2] / "bench" / "data" / "squad_train_sample.jsonl"
SCORE_FLOOR = 1e-30  # log(0) guard: a score that underflowed becomes log(1e-30) = -69
TARGETS = {"kvzip_plus": KVzipPlusScorer, "kvzip": KVzipScorer}


@dataclass(frozen=True)
class CalibrationSettings:
    """What `calibrate_scorer` does (see the module docstring for why these defaults)."""

    target: str = "kvzip"
    chunk_size: int | None = 2000  # the service's own chunks; None: one softmax per text
    tokens_per_text: int = 400
    heldout: float = 0.1  # fraction of the texts held out for R² and rank metrics
    kinds: tuple[str, ...] = KINDS
    mlp: MLPSettings = field(default_factory=MLPSettings)
    transform: str = "rank"  # targets.TRANSFORMS: rank-normal scores, or raw log-scores
    window: int = WINDOW  # the last context tokens of a text: kept anyway, not fitted
    seed: int = 0

    def describe_target(self) -> str:
        chunks = "full softmax" if self.chunk_size is None else f"chunks of {self.chunk_size}"
        what = "rank-normal scores" if self.transform == "rank" else "log-scores"
        return f"{self.target}, {chunks}, {what}, last {self.window} tokens left out"


@dataclass
class Samples:
    """x (N, L, D) attention inputs, y (N, L, H) targets (log-scores transformed per text),
    text (N,) index of the text; log_y (N, L, H) the untransformed log-scores, if kept."""

    x: torch.Tensor
    y: torch.Tensor
    text: torch.Tensor
    log_y: torch.Tensor | None = None

    def where(self, mask: torch.Tensor) -> Samples:
        log_y = None if self.log_y is None else self.log_y[mask]
        return Samples(self.x[mask], self.y[mask], self.text[mask], log_y)


def texts_from_jsonl(
    path: Path,
    tokenizer: object,
    tokens: int = 1000,
    limit: int | None = None,
    articles: slice | None = None,
) -> list[str]:
    """Consecutive paragraphs of SQuAD-style articles ({"paragraphs": [{"context"}]}, one
    per line) packed into texts of about `tokens` tokens (0.75-1.25x), article by article."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    out: list[str] = []
    for article in rows[articles] if articles is not None else rows:
        paragraphs = [p["context"] for p in article["paragraphs"]]
        counts = [len(tokenizer.encode(p, add_special_tokens=False)) for p in paragraphs]  # type: ignore[attr-defined]
        out.extend(_pack(paragraphs, counts, tokens))
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def _pack(paragraphs: list[str], counts: list[int], tokens: int) -> Iterator[str]:
    """Greedy packing; a paragraph that would overshoot 1.25x closes the text before it."""
    current: list[str] = []
    total = 0
    for paragraph, n in zip(paragraphs, counts, strict=True):
        if current and total + n > 1.25 * tokens:
            if total >= 0.75 * tokens:
                yield "\n\n".join(current)
            current, total = [], 0
        if n > 1.25 * tokens:
            continue
        current.append(paragraph)
        total += n + 1
        if total >= tokens:
            yield "\n\n".join(current)
            current, total = [], 0


def score_text(
    runner: ModelRunner, text: str, target: str = "kvzip_plus", chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One text -> x (n, L, D) attention inputs and y (n, L, H) log target scores (fp32)."""
    doc = runner.encode_document(text)
    n = len(doc.context_ids)
    if n == 0:
        raise InvalidInputError("a calibration text has no tokens")
    inputs: dict[int, list[torch.Tensor]] = {}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        inputs.setdefault(layer, []).append(hidden[0].float().cpu())

    with attention_inputs(runner.model, keep):
        full = runner.prefill_context(doc, CompressionConfig(target, 1.0, chunk_size or n))
    x = torch.stack([torch.cat(inputs[i])[-n:] for i in range(runner.n_layers)], dim=1)
    scores = TARGETS[target]().score(runner, full)  # per layer (H, n)
    y = torch.stack([s.float().cpu().clamp_min(SCORE_FLOOR).log().T for s in scores], dim=1)
    return x, y


def collect(
    runner: ModelRunner,
    texts: Sequence[str],
    settings: CalibrationSettings | None = None,
    bar: bool = True,
    keep_dtype: torch.dtype = torch.float32,
) -> Samples:
    """Score every text and sample `tokens_per_text` positions of each (seeded); the
    attention inputs are kept in `keep_dtype` (float16 halves a large corpus)."""
    s = settings or CalibrationSettings()
    if s.target not in TARGETS:
        raise InvalidInputError(f"target must be one of {sorted(TARGETS)}, not {s.target!r}")
    gen = torch.Generator().manual_seed(s.seed)
    xs, ys, ts, logs = [], [], [], []
    for i, text in enumerate(tqdm(texts, desc=f"{s.target} scores", unit="text", disable=not bar)):
        x, y = score_text(runner, text, s.target, s.chunk_size)
        kept = x.shape[0] - s.window  # the recent window is kept at ingest, never predicted
        if kept <= 0:
            raise InvalidInputError(f"calibration text {i} is not longer than the window")
        pick = torch.randperm(kept, generator=gen)[: s.tokens_per_text]
        xs.append(x[pick].to(keep_dtype))
        ys.append(transform(y[:kept], s.transform)[pick])
        logs.append(y[pick])
        ts.append(torch.full((len(pick),), i, dtype=torch.int32))
    if not xs:
        raise InvalidInputError("calibration needs at least one text")
    return Samples(torch.cat(xs), torch.cat(ys), torch.cat(ts), torch.cat(logs))


def split(samples: Samples, heldout: float) -> tuple[Samples, Samples]:
    """(train, held-out): the last round(heldout * texts) texts are held out (at least one
    text stays for training)."""
    n_texts = int(samples.text.max()) + 1
    held = min(max(1, round(heldout * n_texts)), n_texts - 1) if heldout > 0 else 0
    first_held = n_texts - held
    return samples.where(samples.text < first_held), samples.where(samples.text >= first_held)


def fit(
    train: Samples,
    test: Samples,
    settings: CalibrationSettings | None = None,
    bar: bool = True,
) -> dict[str, KVzapPredictor]:
    """Fit every kind of `settings.kinds` on `train`; metadata gets loss and held-out R²."""
    s = settings or CalibrationSettings()
    out: dict[str, KVzapPredictor] = {}
    for kind in s.kinds:
        steps = train.x.shape[1] if kind == "linear" else s.mlp.epochs
        t0 = time.perf_counter()
        with tqdm(total=steps, desc=f"fit {kind}", disable=not bar) as progress:
            if kind == "linear":
                predictor = fit_ridge(train.x, train.y, tick=progress.update)
            else:
                predictor = fit_mlp(train.x, train.y, s.mlp, tick=progress.update)
        out[kind] = predictor.with_meta(
            **evaluate(predictor, train, test), fit_s=round(time.perf_counter() - t0, 1)
        )
    return out


def evaluate(predictor: KVzapPredictor, train: Samples, test: Samples) -> dict[str, object]:
    """Training loss (MSE, log units) and held-out R² (pooled, and per layer)."""
    train_pred = predict_all(predictor, train.x)
    meta: dict[str, object] = {
        "train_loss": round(float((train_pred - train.y).pow(2).mean()), 6),
        "train_samples": train.x.shape[0],
        "heldout_samples": test.x.shape[0],
    }
    if test.x.shape[0]:
        test_pred = predict_all(predictor, test.x)
        meta["heldout_r2"] = round(r2_score(test.y, test_pred), 6)
        meta["heldout_loss"] = round(float((test_pred - test.y).pow(2).mean()), 6)
        meta["heldout_r2_per_layer"] = [round(v, 4) for v in r2_per_layer(test.y, test_pred)]
        meta.update(ranking(test, test_pred))
    return meta


def ranking(test: Samples, pred: torch.Tensor) -> dict[str, float]:
    """Per held-out text (its sampled pairs, all layers and heads), averaged over texts:
    Spearman's rank correlation and the recall of the true top 30% by the predicted."""
    rho, recall = [], []
    for t in sorted(set(test.text.tolist())):
        rows = test.text == t
        rho.append(spearman(test.y[rows], pred[rows]))
        recall.append(top_recall(test.y[rows], pred[rows], 0.3))
    return {
        "heldout_spearman": round(sum(rho) / len(rho), 6),
        "heldout_top30_recall": round(sum(recall) / len(recall), 6),
    }


def calibrate_scorer(
    runner: ModelRunner,
    texts: Iterable[str],
    settings: CalibrationSettings | None = None,
    bar: bool = True,
) -> dict[str, KVzapPredictor]:
    """Collect, split, fit: one predictor per kind, stamped with this model's identity."""
    s = settings or CalibrationSettings()
    texts = list(texts)
    samples = collect(runner, texts, s, bar)
    train, test = split(samples, s.heldout)
    return stamped(fit(train, test, s, bar), runner, len(texts), s)


def stamped(
    fitted: dict[str, KVzapPredictor], runner: ModelRunner, texts: int, s: CalibrationSettings
) -> dict[str, KVzapPredictor]:
    """The fitted predictors with the model's identity and what they were fitted to."""
    return {
        kind: p.to("cpu").with_meta(
            model=runner.identity.name,
            model_fingerprint=runner.identity.model_fingerprint,
            target=s.describe_target(),
            target_method=s.target,
            target_transform=s.transform,
            window=s.window,
            source="calibrated",
            texts=texts,
            tokens_per_text=s.tokens_per_text,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        for kind, p in fitted.items()
    }
