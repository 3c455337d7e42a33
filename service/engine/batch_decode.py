"""Batched decoding over one shared compressed context, with the step as a CUDA graph.

    decoder = BatchDecoder(model, context, prompts, max_new_tokens, eos_ids)
    for step_tokens in decoder.run(params): ...   # one list per step, None = row finished

`params` is one SamplingParams for every row or one per row; each row samples through
`service.engine.sampler` with its own temperature, top_p and seeded generator, so a row
draws exactly the tokens it would draw alone.

Rows are prefilled one by one (eager: prompts differ in length), then every decode step
feeds all rows at once through a StaticKVzipCache; on CUDA that step is captured once and
replayed, so per-token cost is kernels only, no Python.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel

from service.engine.generation import compiled_step_logits, forward, step_logits
from service.engine.kvcache import CompressedContext
from service.engine.sampler import RowSampling, per_row, sample
from service.engine.static_cache import StaticKVzipCache, bucket
from service.types import SamplingParams

log = logging.getLogger(__name__)
_compile_failed = False  # once torch.compile of the step fails, this process stops trying


class BatchDecoder:
    def __init__(
        self,
        model: PreTrainedModel,
        context: CompressedContext,
        prompts: list[list[int]],
        max_new_tokens: int,
        eos_ids: set[int],
        use_graph: bool | None = None,
        compiled: bool = False,
    ) -> None:
        cfg = model.config
        self.model, self.context, self.prompts, self.eos_ids = model, context, prompts, eos_ids
        self.max_new_tokens = max_new_tokens
        device = model.device
        self.cache = StaticKVzipCache(
            context,
            cfg.num_hidden_layers,
            len(prompts),
            bucket(max(len(p) for p in prompts) + max_new_tokens + 1),
            cfg.num_key_value_heads,
            getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            model.dtype,
            device,
        )
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.compiled = compiled and not _compile_failed
        self.ids = torch.zeros(len(prompts), 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(len(prompts), 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def prefill(self) -> torch.Tensor:
        """Run every row's prompt; returns next-token logits (B, V) fp32."""
        rows = []
        for b, prompt in enumerate(self.prompts):
            row = self.cache.row(b)
            rows.append(forward(self.model, prompt, self.context.seq_len, row))
            row.advance(len(prompt))
        return torch.stack(rows)

    def _run(self) -> torch.Tensor:
        if self.compiled:
            return compiled_step_logits(self.model, self.ids, self.pos, self.cache)
        return step_logits(self.model, self.ids, self.pos, self.cache)

    def _capture(self) -> None:
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up writes slot `length`, rewritten by the real step
            self._warm_up()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    def _warm_up(self) -> None:
        """Two eager runs before capture (compiles when `compiled`; a failed compile falls
        back to the eager step, logged, so a request never fails for it)."""
        try:
            for _ in range(2):
                self._run()
        except Exception:  # Inductor/Triton errors vary by version: any of them -> eager
            if not self.compiled:
                raise
            global _compile_failed
            _compile_failed = True
            log.exception("torch.compile of the decode step failed; decoding eagerly from now")
            self.compiled = False
            for _ in range(2):
                self._run()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens (B,) to every row; returns the next logits (B, V) fp32."""
        self.ids.copy_(tokens.view(-1, 1))
        torch.add(self.cache.length, self.context.seq_len, out=self.pos.view(-1))
        if self.use_graph:
            if self.graph is None:
                self._capture()
            assert self.graph is not None and self.logits is not None
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._run()
        self.cache.advance(1)
        return logits

    def run(self, params: SamplingParams | Sequence[SamplingParams]) -> Iterator[list[int | None]]:
        """Yield each step's token per row (None once a row hit EOS or its max_new_tokens,
        which is at most the decoder's). params: one for every row, or one per row."""
        per_request = per_row(params, len(self.prompts))
        rows = [RowSampling.from_params(p) for p in per_request]
        budgets = [p.max_new_tokens for p in per_request]
        logits = self.prefill()
        alive = [True] * len(rows)
        for step in range(self.max_new_tokens):
            tokens = sample(logits, rows)  # (B,) on the device
            host = tokens.tolist()
            alive = [
                a and step < n and t not in self.eos_ids
                for a, t, n in zip(alive, host, budgets, strict=True)
            ]
            if not any(alive):
                return
            yield [t if a else None for t, a in zip(host, alive, strict=True)]
            logits = self.step(tokens)
