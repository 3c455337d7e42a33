"""Service settings, read from the environment (prefix `KVZIP_`) in this one place.

`Settings` refuses to start on nonsense (a zero queue, a ratio above 1, an unknown dtype);
`Settings.to_service_config()` turns it into the frozen dataclasses service/ consumes.
Defaults come from those dataclasses, so the two never drift apart.

The table below is `settings_table_markdown()`; tests/app/test_settings.py checks that it is
current and that README.md names every variable.

| Setting | Environment variable | Default | Description |
|---|---|---|---|
| `model` | `KVZIP_MODEL` | `SmolLM2-135M-Instruct` | HF causal LM id or local path |
| `gguf_file` | `KVZIP_GGUF_FILE` | unset | GGUF file inside the model path |
| `device` | `KVZIP_DEVICE` | `auto` | auto, cpu, cuda, cuda:N or mps |
| `dtype` | `KVZIP_DTYPE` | `auto` | auto, float32, float16 or bfloat16 |
| `attention_backend` | `KVZIP_ATTENTION_BACKEND` | `auto` | auto or a kernel name (.env.example) |
| `prefill_chunk_tokens` | `KVZIP_PREFILL_CHUNK_TOKENS` | `16000` | Tokens per prefill forward |
| `question_reserve_tokens` | `KVZIP_QUESTION_RESERVE_TOKENS` | `384` | Window kept for Q and A |
| `compile_decode` | `KVZIP_COMPILE_DECODE` | `False` | torch.compile the decode step |
| `data_dir` | `KVZIP_DATA_DIR` | `data` | Disk tier directory |
| `memory_cache_bytes` | `KVZIP_MEMORY_CACHE_BYTES` | `2147483648` | Resident contexts (or 2GiB) |
| `disk_capacity_bytes` | `KVZIP_DISK_CAPACITY_BYTES` | `53687091200` | Disk cap (50GiB; 0: none) |
| `queue_size` | `KVZIP_QUEUE_SIZE` | `64` | Max jobs waiting for the engine |
| `max_new_tokens_limit` | `KVZIP_MAX_NEW_TOKENS_LIMIT` | `1024` | Upper bound on max_new_tokens |
| `max_batch_rows` | `KVZIP_MAX_BATCH_ROWS` | `16` | Requests decoded together |
| `kv_budget_bytes` | `KVZIP_KV_BUDGET_BYTES` | `2147483648` | KV budget of answers (or 2GiB) |
| `question_chunk_tokens` | `KVZIP_QUESTION_CHUNK_TOKENS` | `512` | Question tokens per step |
| `default_method` | `KVZIP_DEFAULT_METHOD` | `kvzip` | Compression method (see docs/quality.md) |
| `default_ratio` | `KVZIP_DEFAULT_RATIO` | `0.3` | Kept fraction of KV pairs |
| `default_quantization` | `KVZIP_DEFAULT_QUANTIZATION` | `fp8` | KV storage: none, fp8 or int4 |
| `chunk_size` | `KVZIP_CHUNK_SIZE` | `2000` | KVzip scoring chunk, in tokens |
| `head_min_ratio` | `KVZIP_HEAD_MIN_RATIO` | `0.3` | kvzip_head refused below it (0: never) |
| `host` | `KVZIP_HOST` | `127.0.0.1` | HTTP bind address |
| `port` | `KVZIP_PORT` | `8000` | HTTP port |
| `log_level` | `KVZIP_LOG_LEVEL` | `info` | Uvicorn log level |
| `mode` | `KVZIP_MODE` | `embedded` | embedded (model in process) or distributed |
| `redis_url` | `KVZIP_REDIS_URL` | unset | Redis URL; required when distributed |
| `redis_cache_url` | `KVZIP_REDIS_CACHE_URL` | unset | Redis of the cache tier (unset: redis_url) |
| `redis_prefix` | `KVZIP_REDIS_PREFIX` | `kvzip:` | Prefix of every Redis key |
| `worker_name` | `KVZIP_WORKER_NAME` | unset | Worker consumer name (default: host name) |
| `worker_metrics_host` | `KVZIP_WORKER_METRICS_HOST` | `127.0.0.1` | Worker metrics bind address |
| `worker_metrics_port` | `KVZIP_WORKER_METRICS_PORT` | `9410` | Worker Prometheus port (0: off) |
| `heartbeat_ttl_s` | `KVZIP_HEARTBEAT_TTL_S` | `10.0` | Worker heartbeat lifetime (s) |
| `claim_idle_s` | `KVZIP_CLAIM_IDLE_S` | `30.0` | Idle time before a job moves (s) |
| `max_deliveries` | `KVZIP_MAX_DELIVERIES` | `3` | Deliveries before dead-letter |
| `redis_ttl_s` | `KVZIP_REDIS_TTL_S` | `86400.0` | Lifetime of Redis-tier copies (s) |
| `wait_timeout_s` | `KVZIP_WAIT_TIMEOUT_S` | `600.0` | Longest wait for a worker (s) |
| `default_ttl_seconds` | `KVZIP_DEFAULT_TTL_SECONDS` | `3600.0` | Default context lifetime (s) |
| `max_ttl_seconds` | `KVZIP_MAX_TTL_SECONDS` | `2592000.0` | Longest context lifetime (s) |
| `max_document_tokens` | `KVZIP_MAX_DOCUMENT_TOKENS` | unset | Document token cap (unset: window) |
| `max_body_bytes` | `KVZIP_MAX_BODY_BYTES` | `16777216` | Largest request body (or 16MiB) |
| `tenant_max_contexts` | `KVZIP_TENANT_MAX_CONTEXTS` | `10000` | Contexts per tenant (0: no cap) |
| `tenant_max_bytes` | `KVZIP_TENANT_MAX_BYTES` | `0` | Stored bytes per tenant (0: no cap) |
| `api_keys` | `KVZIP_API_KEYS` | unset | JSON `{"<key>": "<tenant>"}`; unset: open |
| `admin_api_key` | `KVZIP_ADMIN_API_KEY` | unset | Bearer key that sees every tenant |
| `allow_anonymous` | `KVZIP_ALLOW_ANONYMOUS` | `False` | Serve without keys off loopback |
| `rate_limit_per_minute` | `KVZIP_RATE_LIMIT_PER_MINUTE` | `0` | Requests/minute per key (0: off) |
| `rate_limit_burst` | `KVZIP_RATE_LIMIT_BURST` | `10` | Requests a key may send at once |
| `log_format` | `KVZIP_LOG_FORMAT` | `text` | text, or json (one object per line) |
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal, cast

from pydantic import ByteSize, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.config import (
    BatchingConfig,
    CompressionConfig,
    DistributedConfig,
    EngineConfig,
    ServiceConfig,
)

__all__ = ["ENV_PREFIX", "ExposureError", "Settings", "settings_table_markdown"]

ENV_PREFIX = "KVZIP_"

_ENGINE = EngineConfig()
_SERVICE = ServiceConfig()
_COMPRESSION = CompressionConfig()
_DISTRIBUTED = DistributedConfig()

ApiKey = Annotated[str, Field(min_length=8, pattern=r"^[\x21-\x7e]+$")]
"""A Bearer key: at least 8 printable ASCII characters, no spaces."""
Quantization = Literal["none", "fp8", "int4"]
"""service.config.QUANTIZATIONS, spelled out for the type checker and the validation."""
TenantName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class ExposureError(ValueError):
    """Raised by `Settings.check_exposure()`: an open API bound to a non-loopback address."""


class Settings(BaseSettings):
    """Every knob of the service, one environment variable each (`KVZIP_<NAME>`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # `KVZIP_GGUF_FILE=` in a compose file means "the default"
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # engine
    model: str = Field(
        default=_ENGINE.model, min_length=1, description="HF causal LM id or local path"
    )
    gguf_file: str | None = Field(
        default=_ENGINE.gguf_file, min_length=1, description="GGUF file inside the model path"
    )
    device: str = Field(
        default=_ENGINE.device,
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="auto, cpu, cuda, cuda:N or mps",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto, float32, float16 or bfloat16"
    )
    attention_backend: str = Field(
        default=_ENGINE.attention_backend,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="auto or a kernel name (.env.example)",
    )
    prefill_chunk_tokens: int = Field(
        default=_ENGINE.prefill_chunk_tokens, ge=16, description="Tokens per prefill forward"
    )
    question_reserve_tokens: int = Field(
        default=_ENGINE.question_reserve_tokens, ge=1, description="Window kept for Q and A"
    )
    compile_decode: bool = Field(
        default=_ENGINE.compile_decode, description="torch.compile the decode step"
    )
    # service
    data_dir: Path = Field(default=_SERVICE.data_dir, description="Disk tier directory")
    memory_cache_bytes: Annotated[ByteSize, Field(ge=0)] = Field(
        default=ByteSize(_SERVICE.memory_cache_bytes), description="Resident contexts (or 2GiB)"
    )
    disk_capacity_bytes: Annotated[ByteSize, Field(ge=0)] = Field(
        default=ByteSize(_SERVICE.disk_capacity_bytes or 0),
        description="Disk cap (50GiB; 0: none)",
    )
    queue_size: int = Field(
        default=_SERVICE.queue_size,
        ge=1,
        le=1_000_000,
        description="Max jobs waiting for the engine",
    )
    max_new_tokens_limit: int = Field(
        default=_SERVICE.max_new_tokens_limit, ge=1, description="Upper bound on max_new_tokens"
    )
    max_batch_rows: int = Field(
        default=_SERVICE.batching.max_rows, ge=1, le=4096, description="Requests decoded together"
    )
    kv_budget_bytes: Annotated[ByteSize, Field(ge=1)] = Field(
        default=ByteSize(_SERVICE.batching.kv_budget_bytes),
        description="KV budget of answers (or 2GiB)",
    )
    question_chunk_tokens: int = Field(
        default=_SERVICE.batching.prefill_chunk,
        ge=1,
        description="Question tokens per step",
    )
    # default compression
    default_method: Literal[
        "kvzip", "kvzip_plus", "kvzip_head", "kvzap", "streaming", "snapkv", "h2o", "none"
    ] = Field(default="kvzip", description="Compression method (see docs/quality.md)")
    default_ratio: float = Field(
        default=_COMPRESSION.ratio, gt=0.0, le=1.0, description="Kept fraction of KV pairs"
    )
    default_quantization: Quantization = Field(
        default=cast(Quantization, _SERVICE.default_compression.quantization),
        description="KV storage: none, fp8 or int4",
    )
    chunk_size: int = Field(
        default=_COMPRESSION.chunk_size, ge=16, description="KVzip scoring chunk, in tokens"
    )
    head_min_ratio: float = Field(
        default=_SERVICE.kvzip_head_min_ratio,
        ge=0.0,
        le=1.0,
        description="kvzip_head refused below it (0: never)",
    )
    # HTTP server
    host: str = Field(default="127.0.0.1", min_length=1, description="HTTP bind address")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        default="info", description="Uvicorn log level"
    )
    # distributed mode: API processes (no model) and workers joined by Redis
    mode: Literal["embedded", "distributed"] = Field(
        default="embedded", description="embedded (model in process) or distributed"
    )
    redis_url: str | None = Field(
        default=_DISTRIBUTED.redis_url,
        pattern=r"^(redis|rediss|unix)://",
        description="Redis URL; required when distributed",
    )
    redis_cache_url: str | None = Field(
        default=_DISTRIBUTED.redis_cache_url,
        pattern=r"^(redis|rediss|unix)://",
        description="Redis of the cache tier (unset: redis_url)",
    )
    redis_prefix: str = Field(
        default=_DISTRIBUTED.redis_prefix,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,63}$",
        description="Prefix of every Redis key",
    )
    worker_name: str | None = Field(
        default=_DISTRIBUTED.worker_name,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,63}$",
        description="Worker consumer name (default: host name)",
    )
    worker_metrics_host: str = Field(
        default="127.0.0.1", min_length=1, description="Worker metrics bind address"
    )
    worker_metrics_port: int = Field(
        default=9410, ge=0, le=65535, description="Worker Prometheus port (0: off)"
    )
    heartbeat_ttl_s: float = Field(
        default=_DISTRIBUTED.heartbeat_ttl_s, gt=0, description="Worker heartbeat lifetime (s)"
    )
    claim_idle_s: float = Field(
        default=_DISTRIBUTED.claim_idle_s, gt=0, description="Idle time before a job moves (s)"
    )
    max_deliveries: int = Field(
        default=_DISTRIBUTED.max_deliveries, ge=1, description="Deliveries before dead-letter"
    )
    redis_ttl_s: float = Field(
        default=_DISTRIBUTED.redis_ttl_s, gt=0, description="Lifetime of Redis-tier copies (s)"
    )
    wait_timeout_s: float = Field(
        default=_DISTRIBUTED.wait_timeout_s, gt=0, description="Longest wait for a worker (s)"
    )
    # HTTP API: context lifetime, limits, API keys, logs
    default_ttl_seconds: float = Field(
        default=_SERVICE.default_ttl_s, gt=0, description="Default context lifetime (s)"
    )
    max_ttl_seconds: float = Field(
        default=_SERVICE.max_ttl_s, gt=0, description="Longest context lifetime (s)"
    )
    max_document_tokens: int | None = Field(
        default=_SERVICE.max_document_tokens,
        ge=1,
        description="Document token cap (unset: window)",
    )
    max_body_bytes: Annotated[ByteSize, Field(ge=1)] = Field(
        default=ByteSize(16 * 1024**2), description="Largest request body (or 16MiB)"
    )
    tenant_max_contexts: int = Field(
        default=_SERVICE.tenant_max_contexts or 0,
        ge=0,
        description="Contexts per tenant (0: no cap)",
    )
    tenant_max_bytes: Annotated[ByteSize, Field(ge=0)] = Field(
        default=ByteSize(_SERVICE.tenant_max_bytes or 0),
        description="Stored bytes per tenant (0: no cap)",
    )
    api_keys: dict[ApiKey, TenantName] | None = Field(
        default=None, description='JSON `{"<key>": "<tenant>"}`; unset: open'
    )
    admin_api_key: ApiKey | None = Field(
        default=None, description="Bearer key that sees every tenant"
    )
    allow_anonymous: bool = Field(default=False, description="Serve without keys off loopback")
    rate_limit_per_minute: int = Field(
        default=0, ge=0, description="Requests/minute per key (0: off)"
    )
    rate_limit_burst: int = Field(default=10, ge=1, description="Requests a key may send at once")
    log_format: Literal["text", "json"] = Field(
        default="text", description="text, or json (one object per line)"
    )

    @model_validator(mode="after")
    def _distributed_needs_redis(self) -> Settings:
        if self.mode == "distributed" and not self.redis_url:
            raise ValueError("KVZIP_MODE=distributed needs KVZIP_REDIS_URL (redis://host:port/db)")
        return self

    @model_validator(mode="after")
    def _consistent_limits_and_keys(self) -> Settings:
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise ValueError("KVZIP_DEFAULT_TTL_SECONDS must be <= KVZIP_MAX_TTL_SECONDS")
        if self.default_method == "kvzip_head" and self.default_ratio < self.head_min_ratio:
            raise ValueError(
                "KVZIP_DEFAULT_RATIO must be >= KVZIP_HEAD_MIN_RATIO with "
                "KVZIP_DEFAULT_METHOD=kvzip_head"
            )
        if self.admin_api_key is not None and self.admin_api_key in (self.api_keys or {}):
            raise ValueError("KVZIP_ADMIN_API_KEY must differ from every key in KVZIP_API_KEYS")
        return self

    @property
    def auth_enabled(self) -> bool:
        """True when requests need a Bearer key (some key is configured)."""
        return bool(self.api_keys) or self.admin_api_key is not None

    @property
    def loopback(self) -> bool:
        """True when `host` only takes connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False

    def check_exposure(self) -> None:
        """Refuse to serve an open API (no key) on a non-loopback address, unless
        `KVZIP_ALLOW_ANONYMOUS=true` says that is meant. Called where the server starts."""
        if self.auth_enabled or self.loopback or self.allow_anonymous:
            return
        raise ExposureError(
            f"refusing to serve without API keys on {self.host}:{self.port}, which is not a "
            "loopback address: anyone who can reach it could read and delete every context. "
            'Set KVZIP_API_KEYS (JSON {"<key>": "<tenant>"}) or KVZIP_ADMIN_API_KEY, bind '
            "KVZIP_HOST=127.0.0.1, or set KVZIP_ALLOW_ANONYMOUS=true to serve it open anyway "
            "(docs/deploy.md)"
        )

    def to_service_config(self) -> ServiceConfig:
        """The frozen configuration service/ is built from."""
        engine = EngineConfig(
            model=self.model,
            gguf_file=self.gguf_file,
            device=self.device,
            dtype=self.dtype,
            attention_backend=self.attention_backend,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            question_reserve_tokens=self.question_reserve_tokens,
            compile_decode=self.compile_decode,
            head_scores_dir=self.data_dir / "head_scores",  # kvzap_dir: beside it (None)
        )
        return ServiceConfig(
            engine=engine,
            data_dir=self.data_dir,
            memory_cache_bytes=int(self.memory_cache_bytes),
            queue_size=self.queue_size,
            max_new_tokens_limit=self.max_new_tokens_limit,
            default_compression=self.default_compression(),
            default_ttl_s=self.default_ttl_seconds,
            max_ttl_s=self.max_ttl_seconds,
            max_document_tokens=self.max_document_tokens,
            disk_capacity_bytes=int(self.disk_capacity_bytes) or None,
            tenant_max_contexts=self.tenant_max_contexts or None,
            tenant_max_bytes=int(self.tenant_max_bytes) or None,
            kvzip_head_min_ratio=self.head_min_ratio,
            batching=BatchingConfig(
                max_rows=self.max_batch_rows,
                kv_budget_bytes=int(self.kv_budget_bytes),
                queue_size=self.queue_size,
                prefill_chunk=self.question_chunk_tokens,
            ),
            distributed=DistributedConfig(
                redis_url=self.redis_url,
                redis_cache_url=self.redis_cache_url,
                redis_prefix=self.redis_prefix,
                worker_name=self.worker_name,
                heartbeat_ttl_s=self.heartbeat_ttl_s,
                claim_idle_s=self.claim_idle_s,
                max_deliveries=self.max_deliveries,
                redis_ttl_s=self.redis_ttl_s,
                wait_timeout_s=self.wait_timeout_s,
            ),
        )

    def default_compression(self) -> CompressionConfig:
        """Compression used when a request does not say."""
        return CompressionConfig(
            self.default_method,
            self.default_ratio,
            self.chunk_size,
            quantization=self.default_quantization,
        )


def settings_table_markdown() -> str:
    """The configuration table (setting | env var | default | description) as Markdown."""
    lines = [
        "| Setting | Environment variable | Default | Description |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else f"`{field.default}`"
        env = f"{ENV_PREFIX}{name.upper()}"
        lines.append(f"| `{name}` | `{env}` | {default} | {field.description} |")
    return "\n".join(lines)
