"""Settings: the environment parses, nonsense refuses to start, the config round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ByteSize, ValidationError

import app.settings
from app.settings import ENV_PREFIX, Settings, settings_table_markdown
from service.config import (
    BatchingConfig,
    CompressionConfig,
    DistributedConfig,
    EngineConfig,
    ServiceConfig,
)

ROOT = Path(__file__).resolve().parents[2]
ENV_VARS = [f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields]


def test_defaults_are_the_service_defaults() -> None:
    settings = Settings()

    assert settings.to_service_config() == ServiceConfig()
    assert (settings.host, settings.port, settings.log_level) == ("127.0.0.1", 8000, "info")
    assert settings.data_dir == Path("data")
    assert (settings.default_method, settings.default_ratio) == ("kvzip", 0.3)
    assert settings.default_quantization == "fp8"
    assert settings.default_compression() == CompressionConfig("kvzip", 0.3, quantization="fp8")


def test_environment_variables_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "KVZIP_MODEL": "Qwen/Qwen2.5-7B-Instruct",
        "KVZIP_GGUF_FILE": "model.Q4.gguf",
        "KVZIP_DEVICE": "cuda:1",
        "KVZIP_DTYPE": "bfloat16",
        "KVZIP_ATTENTION_BACKEND": "flash_attn",
        "KVZIP_PREFILL_CHUNK_TOKENS": "2048",
        "KVZIP_QUESTION_RESERVE_TOKENS": "512",
        "KVZIP_COMPILE_DECODE": "true",
        "KVZIP_DATA_DIR": "/var/lib/kvzip",
        "KVZIP_MEMORY_CACHE_BYTES": "1GiB",
        "KVZIP_DISK_CAPACITY_BYTES": "200GiB",
        "KVZIP_QUEUE_SIZE": "8",
        "KVZIP_MAX_NEW_TOKENS_LIMIT": "4096",
        "KVZIP_MAX_BATCH_ROWS": "32",
        "KVZIP_KV_BUDGET_BYTES": "4GiB",
        "KVZIP_QUESTION_CHUNK_TOKENS": "128",
        "KVZIP_DEFAULT_METHOD": "none",
        "KVZIP_DEFAULT_RATIO": "0.5",
        "KVZIP_DEFAULT_QUANTIZATION": "int4",
        "KVZIP_CHUNK_SIZE": "1024",
        "KVZIP_HEAD_MIN_RATIO": "0.25",
        "KVZIP_HOST": "0.0.0.0",
        "KVZIP_PORT": "9000",
        "KVZIP_LOG_LEVEL": "debug",
        "KVZIP_MODE": "distributed",
        "KVZIP_REDIS_URL": "redis://redis:6379/0",
        "KVZIP_REDIS_CACHE_URL": "redis://redis-cache:6379/0",
        "KVZIP_REDIS_PREFIX": "kvzip-prod:",
        "KVZIP_WORKER_NAME": "gpu-0",
        "KVZIP_WORKER_METRICS_HOST": "0.0.0.0",
        "KVZIP_WORKER_METRICS_PORT": "0",
        "KVZIP_HEARTBEAT_TTL_S": "5",
        "KVZIP_CLAIM_IDLE_S": "20",
        "KVZIP_MAX_DELIVERIES": "4",
        "KVZIP_REDIS_TTL_S": "3600",
        "KVZIP_WAIT_TIMEOUT_S": "120",
        "KVZIP_DEFAULT_TTL_SECONDS": "600",
        "KVZIP_MAX_TTL_SECONDS": "86400",
        "KVZIP_MAX_DOCUMENT_TOKENS": "32000",
        "KVZIP_MAX_BODY_BYTES": "1MiB",
        "KVZIP_TENANT_MAX_CONTEXTS": "500",
        "KVZIP_TENANT_MAX_BYTES": "20GiB",
        "KVZIP_API_KEYS": '{"sk-team-a-0001": "team-a", "sk-team-b-0002": "team-b"}',
        "KVZIP_ADMIN_API_KEY": "sk-admin-0003",
        "KVZIP_ALLOW_ANONYMOUS": "true",
        "KVZIP_RATE_LIMIT_PER_MINUTE": "120",
        "KVZIP_RATE_LIMIT_BURST": "5",
        "KVZIP_LOG_FORMAT": "json",
    }
    assert sorted(env) == sorted(ENV_VARS)  # one variable per setting, all covered here
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    settings = Settings()

    assert settings.model == "Qwen/Qwen2.5-7B-Instruct"
    assert settings.gguf_file == "model.Q4.gguf"
    assert settings.device == "cuda:1"
    assert settings.dtype == "bfloat16"
    assert settings.attention_backend == "flash_attn"
    assert settings.prefill_chunk_tokens == 2048
    assert settings.question_reserve_tokens == 512
    assert settings.compile_decode is True
    assert settings.to_service_config().engine.compile_decode is True
    assert settings.data_dir == Path("/var/lib/kvzip")
    assert settings.memory_cache_bytes == 1024**3
    assert settings.queue_size == 8
    assert settings.max_new_tokens_limit == 4096
    assert (settings.default_method, settings.default_ratio) == ("none", 0.5)
    assert settings.to_service_config().default_compression.quantization == "int4"
    assert settings.chunk_size == 1024
    assert settings.head_min_ratio == 0.25
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 9000, "debug")
    assert settings.to_service_config().distributed == DistributedConfig(
        redis_url="redis://redis:6379/0",
        redis_cache_url="redis://redis-cache:6379/0",
        redis_prefix="kvzip-prod:",
        worker_name="gpu-0",
        heartbeat_ttl_s=5.0,
        claim_idle_s=20.0,
        max_deliveries=4,
        redis_ttl_s=3600.0,
        wait_timeout_s=120.0,
    )
    assert settings.mode == "distributed"
    assert (settings.default_ttl_seconds, settings.max_ttl_seconds) == (600.0, 86400.0)
    assert (settings.max_document_tokens, settings.max_body_bytes) == (32000, 1024**2)
    assert settings.api_keys == {"sk-team-a-0001": "team-a", "sk-team-b-0002": "team-b"}
    assert settings.admin_api_key == "sk-admin-0003" and settings.auth_enabled
    assert settings.allow_anonymous is True
    assert (settings.rate_limit_per_minute, settings.rate_limit_burst) == (120, 5)
    assert settings.log_format == "json"
    assert (settings.worker_metrics_host, settings.worker_metrics_port) == ("0.0.0.0", 0)
    service = settings.to_service_config()
    assert service.batching == BatchingConfig(32, 4 * 1024**3, 8, 128)
    assert (service.default_ttl_s, service.max_ttl_s, service.max_document_tokens) == (
        600.0,
        86400.0,
        32000,
    )
    assert service.disk_capacity_bytes == 200 * 1024**3
    assert (service.tenant_max_contexts, service.tenant_max_bytes) == (500, 20 * 1024**3)


def test_zero_turns_a_storage_cap_off() -> None:
    service = Settings(
        disk_capacity_bytes=ByteSize(0), tenant_max_contexts=0, tenant_max_bytes=ByteSize(0)
    ).to_service_config()
    assert (service.disk_capacity_bytes, service.tenant_max_contexts) == (None, None)
    assert service.tenant_max_bytes is None
    defaults = Settings().to_service_config()  # capped by default: 50 GiB of disk tier
    assert (defaults.disk_capacity_bytes, defaults.tenant_max_contexts) == (50 * 1024**3, 10000)


def test_an_empty_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVZIP_GGUF_FILE", "")
    monkeypatch.setenv("KVZIP_QUEUE_SIZE", "")

    settings = Settings()

    assert (settings.gguf_file, settings.queue_size) == (None, 64)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KVZIP_QUEUE_SIZE", "0"),
        ("KVZIP_QUEUE_SIZE", "lots"),
        ("KVZIP_DEFAULT_RATIO", "2"),
        ("KVZIP_DEFAULT_RATIO", "0"),
        ("KVZIP_DEFAULT_RATIO", "nan"),
        ("KVZIP_DEFAULT_METHOD", "zip"),
        ("KVZIP_DEFAULT_QUANTIZATION", "int8"),
        ("KVZIP_DEVICE", "gpu"),
        ("KVZIP_DTYPE", "int3"),
        ("KVZIP_ATTENTION_BACKEND", "Flash Attn"),
        ("KVZIP_PREFILL_CHUNK_TOKENS", "0"),
        ("KVZIP_QUESTION_RESERVE_TOKENS", "-1"),
        ("KVZIP_MEMORY_CACHE_BYTES", "-1"),
        ("KVZIP_MEMORY_CACHE_BYTES", "2 elephants"),
        ("KVZIP_MAX_NEW_TOKENS_LIMIT", "0"),
        ("KVZIP_CHUNK_SIZE", "0"),
        ("KVZIP_PORT", "0"),
        ("KVZIP_PORT", "70000"),
        ("KVZIP_LOG_LEVEL", "loud"),
        ("KVZIP_DEFAULT_TTL_SECONDS", "0"),
        ("KVZIP_MAX_TTL_SECONDS", "-5"),
        ("KVZIP_MAX_DOCUMENT_TOKENS", "0"),
        ("KVZIP_MAX_BODY_BYTES", "0"),
        ("KVZIP_API_KEYS", "not json"),
        ("KVZIP_API_KEYS", '{"short": "team-a"}'),
        ("KVZIP_API_KEYS", '{"sk-long-enough": "bad tenant"}'),
        ("KVZIP_ADMIN_API_KEY", "short"),
        ("KVZIP_RATE_LIMIT_PER_MINUTE", "-1"),
        ("KVZIP_RATE_LIMIT_BURST", "0"),
        ("KVZIP_LOG_FORMAT", "xml"),
        ("KVZIP_WORKER_METRICS_PORT", "-1"),
        ("KVZIP_WORKER_METRICS_PORT", "65536"),
        ("KVZIP_DISK_CAPACITY_BYTES", "-1"),
        ("KVZIP_TENANT_MAX_CONTEXTS", "-3"),
        ("KVZIP_TENANT_MAX_BYTES", "lots"),
        ("KVZIP_HEAD_MIN_RATIO", "1.5"),
    ],
)
def test_nonsense_refuses_to_start(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    field = name.removeprefix(ENV_PREFIX).lower()

    with pytest.raises(ValidationError) as caught:
        Settings()

    assert [error["loc"][0] for error in caught.value.errors()] == [field]


def test_distributed_mode_needs_a_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVZIP_MODE", "distributed")

    with pytest.raises(ValidationError, match="KVZIP_REDIS_URL"):
        Settings()


def test_default_ttl_above_the_maximum_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVZIP_DEFAULT_TTL_SECONDS", "7200")
    monkeypatch.setenv("KVZIP_MAX_TTL_SECONDS", "3600")

    with pytest.raises(ValidationError, match="KVZIP_DEFAULT_TTL_SECONDS must be <="):
        Settings()


def test_admin_key_must_differ_from_tenant_keys() -> None:
    with pytest.raises(ValidationError, match="KVZIP_ADMIN_API_KEY must differ"):
        Settings(api_keys={"sk-same-key-1": "team-a"}, admin_api_key="sk-same-key-1")


def test_no_key_means_open_access() -> None:
    assert not Settings().auth_enabled
    assert Settings(admin_api_key="sk-admin-only").auth_enabled


def test_unknown_keyword_refuses() -> None:
    with pytest.raises(ValidationError, match="queue_sz"):
        Settings(queue_sz=3)  # type: ignore[call-arg]


def test_to_service_config_carries_every_setting() -> None:
    settings = Settings(
        model="/models/llama",
        gguf_file="m.gguf",
        device="cpu",
        dtype="float32",
        attention_backend="torch",
        prefill_chunk_tokens=512,
        question_reserve_tokens=128,
        data_dir=Path("/tmp/kvzip"),
        memory_cache_bytes=ByteSize(1000),
        queue_size=3,
        max_new_tokens_limit=64,
        max_batch_rows=5,
        kv_budget_bytes=ByteSize(7000),
        question_chunk_tokens=64,
        default_method="none",
        default_ratio=0.25,
        default_quantization="none",
        chunk_size=100,
        head_min_ratio=0.2,
    )

    assert settings.to_service_config() == ServiceConfig(
        engine=EngineConfig(
            model="/models/llama",
            gguf_file="m.gguf",
            device="cpu",
            dtype="float32",
            attention_backend="torch",
            prefill_chunk_tokens=512,
            question_reserve_tokens=128,
            head_scores_dir=Path("/tmp/kvzip/head_scores"),
        ),
        data_dir=Path("/tmp/kvzip"),
        memory_cache_bytes=1000,
        queue_size=3,
        max_new_tokens_limit=64,
        default_compression=CompressionConfig("none", 0.25, 100),
        batching=BatchingConfig(5, 7000, 3, 64),
        kvzip_head_min_ratio=0.2,
    )


def test_a_kvzip_head_default_below_its_floor_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="KVZIP_HEAD_MIN_RATIO"):
        Settings(default_method="kvzip_head", default_ratio=0.2)
    assert Settings(default_method="kvzip_head", default_ratio=0.2, head_min_ratio=0.0)


def test_the_docstring_table_is_current() -> None:
    assert settings_table_markdown() in (app.settings.__doc__ or "")


def test_the_table_lists_every_variable() -> None:
    table = settings_table_markdown()

    assert all(f"`{name}`" in table for name in ENV_VARS)


def test_readme_documents_every_variable() -> None:
    path = ROOT / "README.md"
    assert path.is_file(), "README.md is missing (it needs the configuration table)"
    readme = path.read_text(encoding="utf-8")

    assert [name for name in ENV_VARS if name not in readme] == []
