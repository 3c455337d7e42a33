"""KVzipEngine: a model, its prompt layout, and the few coarse operations on token ids.

    engine = KVzipEngine.load(EngineConfig())
    doc = engine.encode_document(text)
    ctx, timings = engine.ingest(doc, CompressionConfig("kvzip", 0.3))
    for token in engine.generate(ctx, engine.encode_question("..."), SamplingParams()): ...

Not thread-safe: one engine is driven by one worker thread (service.serving.engine_thread).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.compression.runner import Observer
from service.compression.scorers import Scorer, build_scorer
from service.compression.selection import compress, select
from service.config import CompressionConfig, EngineConfig
from service.engine.attention_hook import attach, attached_backend
from service.engine.backends import Backend, build_backend
from service.engine.batch_decode import BatchDecoder
from service.engine.fingerprints import ModelIdentity, model_fingerprint, tokenizer_fingerprint
from service.engine.generation import generate, prefill
from service.engine.kvcache import CompressedContext, Document, KVzipCache, RaggedLayer
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

__all__ = ["Document", "IngestTimings", "KVzipEngine", "Progress"]

Progress = Callable[[float], None]
PREFIX_CONTEXTS = 8
"""Prefix contexts an engine keeps (one per system prompt in use; see `prefix_context`)."""
MODEL_FIELDS = ("model", "gguf_file", "device", "dtype", "attention_backend")
"""EngineConfig fields that describe the loaded model itself (`with_config` keeps them)."""


@dataclass(frozen=True)
class IngestTimings:
    """Seconds one ingest spent in each phase."""

    prefill_s: float = 0.0
    scoring_s: float = 0.0
    selection_s: float = 0.0


class KVzipEngine:
    """Prefill, KVzip scoring, selection and decoding for one causal LM.

    Implements service.compression.runner.ModelRunner, what the scorers run the model with.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        config: EngineConfig,
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model.set_attn_implementation(
            attach(model, build_backend(config.attention_backend, model.device))
        )
        self.identity = ModelIdentity(
            name, model_fingerprint(model), tokenizer_fingerprint(tokenizer)
        )
        self.n_layers = model.config.num_hidden_layers
        self.max_positions = int(model.config.max_position_embeddings)
        self.eos_ids = self._eos_ids()
        self.reconstruction_passes = 0  # KVzip reconstruction forwards run (by the scorers)
        self._prefixes: dict[tuple[int, ...], CompressedContext] = {}

    @classmethod
    def load(cls, config: EngineConfig) -> KVzipEngine:
        """Load the configured model and tokenizer (no download)."""
        source = resolve_source(config)
        device = pick_device(config.device)
        model = load_model(source, device, pick_dtype(config.dtype, device))
        return cls(model, load_tokenizer(source), source.name, config)

    def with_config(self, **changes: object) -> KVzipEngine:
        """This engine under another config (paths, chunk sizes...), sharing the loaded
        model: e.g. `engine.with_config(head_scores_dir=tmp)`. The model's own fields
        (MODEL_FIELDS) cannot change here: load another engine, or `use_backend`."""
        fixed = sorted(set(changes) & set(MODEL_FIELDS))
        if fixed:
            raise ValueError(f"{fixed} describe the loaded model; load another engine")
        other = copy.copy(self)
        other.config = replace(self.config, **changes)  # type: ignore[arg-type]
        return other

    @property
    def backend(self) -> Backend:
        """The attention backend the model runs with (chosen by config.attention_backend)."""
        return attached_backend(self.model)

    def use_backend(self, name: str) -> Backend:
        """Run the model with another attention backend from now on (`auto` allowed); every
        engine sharing this model (`with_config`) follows."""
        backend = build_backend(name, self.model.device)
        attach(self.model, backend)
        self.config = replace(self.config, attention_backend=backend.name)
        return backend

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
    ) -> tuple[CompressedContext, IngestTimings]:
        """Prefill, score (by `compression.method`) and select: the compressed context, and
        the time each phase took."""
        compression = compression.normalized()
        scorer = _scorer(compression.method)
        t0 = time.perf_counter()
        with scorer.capture(self) if scorer is not None else nullcontext():
            full = self.prefill_context(doc, compression)  # kvzap scores in here
        t1 = time.perf_counter()
        if scorer is not None:
            full = self.score(full, progress, scorer)
        t2 = time.perf_counter()
        compressed = compress(full, compression)
        timings = IngestTimings(t1 - t0, t2 - t1, time.perf_counter() - t2)
        if progress:
            progress(1.0)
        return compressed, timings

    def check_method(self, method: str) -> None:
        """InvalidInputError when `method` cannot run here (e.g. kvzip_head without its
        calibration, kvzap without a predictor): the scorer's own check, before any work."""
        scorer = _scorer(method)
        if scorer is not None:
            scorer.check(self)

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

    def prefix_context(self, prefix_ids: Sequence[int]) -> CompressedContext:
        """The all-kept context of `prefix_ids` alone: the rows a stored object of format
        version 3 leaves out (service.engine.shared_prefix). One prefill per prefix, then
        kept (the last `PREFIX_CONTEXTS` prefixes asked for)."""
        key = tuple(prefix_ids)
        ctx = self._prefixes.pop(key, None)
        if ctx is None:
            ctx = self.prefill_context(Document(list(key), []), CompressionConfig())
        self._prefixes[key] = ctx  # most recent last
        while len(self._prefixes) > PREFIX_CONTEXTS:
            self._prefixes.pop(next(iter(self._prefixes)))
        return ctx

    def forward(
        self,
        context: CompressedContext | None,
        ids: Sequence[int],
        observer: Observer | None = None,
        piece: int | None = None,
    ) -> None:
        """Run `ids` after `context` (positions continue at its seq_len) in pieces of `piece`
        tokens (default: prefill_chunk_tokens), reporting every layer's queries to
        `observer`. The context is not modified."""
        cache = KVzipCache(context, self.n_layers)
        cache.scorer = observer
        prefill(self.model, ids, cache, piece or self.config.prefill_chunk_tokens)

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


def _scorer(method: str) -> Scorer | None:
    """The scorer of `method`; None for `none` (keep everything, nothing to score)."""
    return None if method == "none" else build_scorer(method)


def _with_context_scores(layer: RaggedLayer, scores: torch.Tensor, prefix_len: int) -> RaggedLayer:
    """Uniform layer + (H, n) context scores -> same layer with scores filled in."""
    h = layer.n_heads
    full = layer.scores.view(h, -1).clone()
    full[:, prefix_len:] = scores
    return RaggedLayer(layer.keys, layer.values, layer.cu_lens, full.reshape(-1), layer.positions)
