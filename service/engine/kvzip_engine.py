"""KVzipEngine: a model, its prompt layout, and the few coarse operations on token ids.

    engine = KVzipEngine.load(EngineConfig())
    doc = engine.encode_document(text)
    ctx = engine.ingest(doc, CompressionConfig("kvzip", 0.3))
    for token in engine.generate(ctx, engine.encode_question("..."), SamplingParams()): ...

Not thread-safe: one engine is driven by one worker thread (service.serving.engine_thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.compression.scorers import Scorer, build_scorer
from service.compression.scorers.kvzap import engine_predictor, threshold_select
from service.compression.scorers.kvzip_head import load_head_scores
from service.compression.selection import select
from service.config import CompressionConfig, EngineConfig
from service.engine import backends
from service.engine.attention_hook import register
from service.engine.batch_decode import BatchDecoder
from service.engine.fingerprints import ModelIdentity, model_fingerprint, tokenizer_fingerprint
from service.engine.generation import generate, prefill
from service.engine.kvcache import CompressedContext, KVzipCache, RaggedLayer
from service.engine.loading import (
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_source,
)
from service.engine.prompt import build_layout, question_ids
from service.engine.sampler import per_row
from service.errors import InvalidInputError
from service.types import SamplingParams

Progress = Callable[[float], None]


@dataclass(frozen=True)
class Document:
    """Token ids of one registered document: protected prefix + context."""

    prefix_ids: list[int]
    context_ids: list[int]

    @property
    def all_ids(self) -> list[int]:
        return self.prefix_ids + self.context_ids


@dataclass
class IngestTimings:
    prefill_s: float = 0.0
    scoring_s: float = 0.0
    selection_s: float = 0.0


class KVzipEngine:
    """Prefill, KVzip scoring, selection and decoding for one causal LM."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        config: EngineConfig,
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model.set_attn_implementation(register())
        backends.set_backend(config.attention_backend, model.device)
        self.identity = ModelIdentity(
            name, model_fingerprint(model), tokenizer_fingerprint(tokenizer)
        )
        self.n_layers = model.config.num_hidden_layers
        self.max_positions = int(model.config.max_position_embeddings)
        self.eos_ids = self._eos_ids()
        self.last_timings = IngestTimings()
        self.reconstruction_passes = 0
        self.head_scores_dir = Path("data") / "head_scores"  # kvzip_head calibration store
        self.kvzap_dir: Path | None = None  # kvzap predictors; None: beside head_scores_dir
        self.kvzap_kind: str | None = None  # "linear" | "mlp"; None: the MLP when stored

    @classmethod
    def load(cls, config: EngineConfig) -> KVzipEngine:
        """Load the configured model and tokenizer (no download)."""
        source = resolve_source(config)
        device = pick_device(config.device)
        model = load_model(source, device, pick_dtype(config.dtype, device))
        return cls(model, load_tokenizer(source), source.name, config)

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids.update(extra if isinstance(extra, list) else [extra])
        return {int(i) for i in ids if i is not None}

    @property
    def max_context_tokens(self) -> int:
        """Prefix + context may use the window minus the room reserved for Q and A."""
        return self.max_positions - self.config.question_reserve_tokens

    def encode_document(self, text: str, system: str | None = None) -> Document:
        layout = build_layout(self.tokenizer, system)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return Document(list(layout.prefix_ids), list(ids))

    def encode_question(self, question: str) -> list[int]:
        return question_ids(build_layout(self.tokenizer), self.tokenizer, question)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def ingest(
        self, doc: Document, compression: CompressionConfig, progress: Progress | None = None
    ) -> CompressedContext:
        """Prefill, score (by `compression.method`) and select: the compressed context."""
        compression = compression.normalized()
        scorer = None if compression.method == "none" else build_scorer(compression.method)
        t0 = time.perf_counter()
        with scorer.capture(self) if scorer is not None else nullcontext():
            full = self.prefill_context(doc, compression)  # kvzap scores in here
        t1 = time.perf_counter()
        if scorer is not None:
            full = self.score(full, progress, scorer)
        t2 = time.perf_counter()
        if compression.threshold is None:
            compressed = select(full, compression.ratio)
        else:  # kvzap: predicted log-score >= threshold, recent window kept
            compressed = threshold_select(full, compression.threshold)
        self.last_timings = IngestTimings(t1 - t0, t2 - t1, time.perf_counter() - t2)
        if progress:
            progress(1.0)
        return compressed

    def check_method(self, method: str) -> None:
        """InvalidInputError when `method` cannot run here (kvzip_head, kvzap not calibrated)."""
        if method == "kvzip_head":
            load_head_scores(self.head_scores_dir, self.identity)
        if method == "kvzap":
            engine_predictor(self)

    def prefill_context(self, doc: Document, compression: CompressionConfig) -> CompressedContext:
        """Dense prefill of prefix + context into an all-kept context (scores 0, prefix +inf)."""
        cache = KVzipCache(None, self.n_layers, capacity=len(doc.all_ids))
        prefill(self.model, doc.all_ids, cache, self.config.prefill_chunk_tokens)
        s = len(doc.prefix_ids)
        layers = []
        for k, v in zip(cache.tail_keys, cache.tail_values, strict=True):
            assert k is not None and v is not None
            scores = torch.zeros(k.shape[1], k.shape[2], dtype=torch.float32, device=k.device)
            scores[:, :s] = float("inf")
            layers.append(RaggedLayer.from_dense(k[0], v[0], scores))
        ids = torch.tensor(doc.all_ids, dtype=torch.int32, device=self.model.device)
        return CompressedContext(
            tuple(layers), ids, s, compression.method, 1.0, compression.chunk_size, time.time()
        )

    def score(
        self,
        full: CompressedContext,
        progress: Progress | None = None,
        method: str | Scorer = "kvzip",
    ) -> CompressedContext:
        """Fill every context pair's score by `method` (default: KVzip, KVZIP.md steps 2-6).

        full: the all-kept context from `prefill_context`; its prefix keeps score +inf.
        """
        scorer = build_scorer(method) if isinstance(method, str) else method
        per_layer = scorer.score(self, full, progress)
        return full.with_layers(
            tuple(
                _with_context_scores(layer, sc, full.prefix_len)
                for layer, sc in zip(full.layers, per_layer, strict=True)
            )
        )

    def reselect(self, context: CompressedContext, ratio: float) -> CompressedContext:
        """Query-time ratio: re-select a stored context at ratio <= its own (no model run)."""
        if ratio > context.ratio + 1e-9:
            raise InvalidInputError(
                f"ratio {ratio} is larger than the stored context's ratio {context.ratio}"
            )
        return context if ratio == context.ratio else select(context, ratio)

    def generate(
        self, context: CompressedContext, prompt_ids: list[int], params: SamplingParams
    ) -> Iterator[int]:
        """Answer token ids for `prompt_ids` (question + postfix) after the context."""
        if self.model.device.type == "cuda":  # static tail + CUDA-graph decode steps
            return (
                row[0]
                for row in self.generate_batch(context, [prompt_ids], params)
                if row[0] is not None
            )
        cache = KVzipCache(context, self.n_layers)
        return generate(self.model, cache, prompt_ids, params, self.eos_ids)

    def generate_batch(
        self,
        context: CompressedContext,
        prompts: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        use_graph: bool | None = None,
        compiled: bool | None = None,
    ) -> Iterator[list[int | None]]:
        """Decode several prompts over one context together; one token list per step.

        params: one for every prompt, or one per prompt (own temperature, top_p, seed and
        max_new_tokens). compiled: torch.compile the step (default: the engine's
        `compile_decode` setting).
        """
        per_request = per_row(params, len(prompts))
        decoder = BatchDecoder(
            self.model,
            context,
            prompts,
            max(p.max_new_tokens for p in per_request),
            self.eos_ids,
            use_graph,
            self.config.compile_decode if compiled is None else compiled,
        )
        with torch.inference_mode():
            yield from decoder.run(per_request)


def _with_context_scores(layer: RaggedLayer, scores: torch.Tensor, prefix_len: int) -> RaggedLayer:
    """Uniform layer + (H, n) context scores -> same layer with scores filled in."""
    h = layer.n_heads
    full = layer.scores.view(h, -1).clone()
    full[:, prefix_len:] = scores
    return RaggedLayer(layer.keys, layer.values, layer.cu_lens, full.reshape(-1), layer.positions)
