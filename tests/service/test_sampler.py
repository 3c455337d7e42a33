"""The shared sampler against a brute-force reference, and batched decoding == single decoding
for sampled requests (temperature > 0, top_p < 1, seeded), per-row parameters included."""

from __future__ import annotations

import math

import pytest
import torch

from service.config import CompressionConfig
from service.engine.sampler import RowSampling, nucleus_tokens, per_row, sample
from service.types import SamplingParams

TEXT = "The lighthouse keeper wrote in his log every night. The storm came on a Tuesday. " * 6


def _reference_nucleus(logits: list[float], temperature: float, top_p: float) -> list[tuple]:
    """Brute force in Python floats (float64): [(token, probability within the nucleus)],
    most probable first (ties: lower token id first)."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    probs = [w / sum(weights) for w in weights]
    nucleus, mass = [], 0.0
    for token in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        nucleus.append(token)
        mass += probs[token]
        if mass >= top_p:
            break
    return [(token, probs[token] / mass) for token in nucleus]


def _reference_token(logits: list[float], temperature: float, top_p: float, u: float) -> int:
    """The nucleus token whose cumulative interval (most probable first) holds u."""
    acc = 0.0
    nucleus = _reference_nucleus(logits, temperature, top_p)
    for token, p in nucleus:
        acc += p
        if u < acc:
            return int(token)
    return int(nucleus[-1][0])


def test_nucleus_tokens_match_the_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        b, v = 16, 12
        logits = torch.randn(b, v, generator=g) * 3
        temperature = 0.2 + 2 * torch.rand(b, generator=g, dtype=torch.float64)
        top_p = torch.rand(b, generator=g, dtype=torch.float64).clamp(min=0.01)
        top_p[:4] = 1.0
        u = torch.rand(b, generator=g, dtype=torch.float64)
        got = nucleus_tokens(logits, temperature, top_p, u).tolist()
        want = [
            _reference_token(
                logits[i].tolist(), float(temperature[i]), float(top_p[i]), float(u[i])
            )
            for i in range(b)
        ]
        assert got == want


def test_stratified_draws_reproduce_the_nucleus_distribution():
    """u on an even grid of N points: each nucleus token is picked N * p times (+-1) and
    tokens outside the nucleus never; top_p < 1 changes the distribution."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 10_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    counts = {}
    for top_p in (1.0, 0.9, 0.6, 0.3):
        tokens = nucleus_tokens(
            logits.expand(n, -1), torch.full((n,), 0.8), torch.full((n,), top_p), u
        )
        counts[top_p] = torch.bincount(tokens, minlength=7).tolist()
        want = dict(_reference_nucleus(logits.tolist(), 0.8, top_p))
        for token in range(7):
            assert abs(counts[top_p][token] - n * want.get(token, 0.0)) <= 1
    assert [sum(c > 0 for c in counts[p]) for p in (1.0, 0.9, 0.6, 0.3)] == [7, 4, 2, 1]


def test_seeded_sampling_follows_the_nucleus_distribution():
    """Through `sample` with a seeded generator: empirical frequencies within 4 sigma of the
    reference nucleus probabilities, nothing outside the nucleus."""
    logits = torch.tensor([[1.0, 0.8, 0.3, 0.0, -0.5, -2.0]])
    row = RowSampling(temperature=1.3, top_p=0.7, generator=torch.Generator().manual_seed(3))
    n = 4000
    counts = torch.bincount(torch.cat([sample(logits, [row]) for _ in range(n)]), minlength=6)
    want = dict(_reference_nucleus(logits[0].tolist(), 1.3, 0.7))
    for token in range(6):
        p = want.get(token, 0.0)
        assert abs(int(counts[token]) - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_ties_and_tiny_top_p():
    """Equal probabilities keep vocabulary order; a tiny top_p keeps the top token only."""
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    one = torch.ones(1, dtype=torch.float64)
    assert nucleus_tokens(logits, one, one, torch.zeros(1)).tolist() == [1]
    assert nucleus_tokens(logits, one, one, torch.tensor([0.999])).tolist() == [0]
    assert nucleus_tokens(logits, one, torch.tensor([0.5]), torch.tensor([0.999])).tolist() == [2]
    assert nucleus_tokens(logits, one, torch.tensor([1e-9]), torch.tensor([0.999])).tolist() == [1]


def test_greedy_rows_take_the_argmax_and_draw_nothing():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    rows = [RowSampling(0.0, 0.5, generator) for _ in range(3)]
    assert torch.equal(sample(logits, rows), logits.argmax(-1))
    assert torch.equal(generator.get_state(), state)


def test_rows_are_independent_of_their_batch():
    """A row's tokens over several steps depend only on its own logits, parameters and
    seed: the batch gives exactly what each row gives alone."""
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.5, seed=2),
        SamplingParams(temperature=1.5, top_p=1.0, seed=1),
    ]
    steps = torch.randn(20, len(params), 300, generator=torch.Generator().manual_seed(4))
    rows = [RowSampling.from_params(p) for p in params]
    together = torch.stack([sample(logits, rows) for logits in steps])  # (steps, B)
    for b, p in enumerate(params):
        alone_row = [RowSampling.from_params(p)]
        alone = torch.stack([sample(logits[b : b + 1], alone_row)[0] for logits in steps])
        assert torch.equal(together[:, b], alone)
    assert not torch.equal(together[:, 0], together[:, 3])  # same seed, other parameters


def test_per_row_checks_the_count():
    p = SamplingParams()
    assert per_row(p, 3) == [p, p, p]
    with pytest.raises(ValueError, match="2 sampling parameters for 3 rows"):
        per_row([p, p], 3)


@pytest.fixture(scope="module")
def decode_setup(tiny_engine):
    doc = tiny_engine.encode_document(TEXT)
    ctx, _ = tiny_engine.ingest(doc, CompressionConfig("kvzip", 0.3, 64))
    questions = ["Who wrote the log?", "When did the storm come?", "Why?"]
    return ctx, [tiny_engine.encode_question(q) for q in questions]


def _batched(engine, ctx, prompts, params) -> list[list[int]]:
    steps = list(engine.generate_batch(ctx, prompts, params, use_graph=False))
    return [[s[b] for s in steps if s[b] is not None] for b in range(len(prompts))]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=8),
        SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11),
        SamplingParams(max_new_tokens=8, temperature=0.5, top_p=0.3, seed=12),
    ],
)
def test_batched_decoding_equals_single_decoding(tiny_engine, decode_setup, params):
    """BatchDecoder (static tail, CPU eager step) == generation.generate (dynamic tail),
    token for token, for the same request and seed."""
    ctx, prompts = decode_setup
    alone = [list(tiny_engine.generate(ctx, p, params)) for p in prompts]
    assert _batched(tiny_engine, ctx, prompts, params) == alone
    assert all(len(tokens) == 8 for tokens in alone)


def test_per_row_parameters_are_honoured_in_one_batch(tiny_engine, decode_setup):
    ctx, prompts = decode_setup
    params = [
        SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=21),
        SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.4, seed=22),
        SamplingParams(max_new_tokens=8),
    ]
    alone = [list(tiny_engine.generate(ctx, p, q)) for p, q in zip(prompts, params, strict=True)]
    assert _batched(tiny_engine, ctx, prompts, params) == alone
    assert [len(tokens) for tokens in alone] == [8, 5, 8]
    greedy = list(tiny_engine.generate(ctx, prompts[0], SamplingParams(max_new_tokens=8)))
    assert alone[0] != greedy  # the first row really sampled


def test_batched_decoding_honours_top_p(tiny_engine, decode_setup):
    """A vanishing top_p leaves only the top token, so hot sampling decodes greedily
    (the batched path used to ignore top_p)."""
    ctx, prompts = decode_setup
    hot = SamplingParams(max_new_tokens=6, temperature=2.0, top_p=1e-6, seed=3)
    greedy = SamplingParams(max_new_tokens=6)
    assert _batched(tiny_engine, ctx, prompts, hot) == _batched(tiny_engine, ctx, prompts, greedy)
    wide = SamplingParams(max_new_tokens=6, temperature=2.0, top_p=1.0, seed=3)
    assert _batched(tiny_engine, ctx, prompts, wide) != _batched(tiny_engine, ctx, prompts, greedy)
