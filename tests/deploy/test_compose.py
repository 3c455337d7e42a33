"""docker-compose.yml: valid against the Compose Specification schema, shaped as the
deployment needs (issue 7), and in step with app/settings.py and .env.example.

The schema is vendored (tests never download): tests/deploy/compose_spec.json is the
`compose/config/compose_spec.json` of Debian's docker-compose 1.29.2-3 package (the Compose
Specification, Apache-2.0), the version `make compose-check` runs.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jsonschema
import pytest
import yaml

from app.settings import ENV_PREFIX, Settings
from tests.deploy.compose_testing import (
    COMPOSE_FILE,
    ROOT,
    SCHEMA_FILE,
    env_example_names,
    environment,
    interpolate,
    load_compose,
    variables,
)

SETTINGS_VARS = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
FIXED_BY_IMAGE = {"KVZIP_HOST", "KVZIP_PORT", "KVZIP_DATA_DIR"}
FIXED_BY_IMAGE |= {"KVZIP_WORKER_METRICS_HOST", "KVZIP_WORKER_METRICS_PORT"}  # scraped there
PER_WORKER = {"KVZIP_MODEL", "KVZIP_DEVICE", "KVZIP_WORKER_NAME"}


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def services(compose: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if n.startswith(prefix)}


def seconds(duration: str) -> float:
    """A Compose duration ("10m", "1m30s", "90s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, duration
    return sum(float(a) * units[b] for a, b in parts)


# --- the schema --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"COMPOSE_PROFILES": "cpu", "API_PUBLISH": "127.0.0.1:18000", "REDIS_PASSWORD": "s3cret"},
        {
            "COMPOSE_PROFILES": "gpu,monitoring",
            "PROMETHEUS_PUBLISH": "127.0.0.1:19090",
            "GRAFANA_ADMIN_PASSWORD": "s3cret",
        },
    ],
    ids=["defaults", "overridden", "monitoring"],
)
def test_the_compose_file_validates_against_the_compose_spec(validator, env) -> None:
    errors = sorted(validator.iter_errors(load_compose(env)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_validator_really_rejects_a_broken_file(validator, compose) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["imagee"] = "typo"
    broken["services"]["redis-queue"]["healthcheck"]["retries"] = "ten"
    errors = list(validator.iter_errors(broken))
    assert len(errors) >= 2, [e.message for e in errors]


def test_compose_yaml_blocks_in_the_deploy_guide_validate(validator) -> None:
    """docs/deploy.md's override files (other hosts, shared volume) are real compose files."""
    text = (ROOT / "docs/deploy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    blocks = [b for b in blocks if re.search(r"^(services|volumes):", b, re.M)]
    assert blocks, "docs/deploy.md shows no compose override"
    for block in blocks:
        data = interpolate(yaml.safe_load(block), {"REDIS_PASSWORD": "x"})
        errors = list(validator.iter_errors(data))
        assert not errors, (block, [e.message for e in errors])


# --- the services ------------------------------------------------------------------------------


def test_api_publishes_a_port_checks_readyz_and_waits_for_a_healthy_queue(compose) -> None:
    api = compose["services"]["api"]
    assert api["ports"] == ["8000:8000"]
    assert api["healthcheck"]["test"] == ["CMD", "kvzip-healthcheck", "api"]
    assert "/readyz" in (ROOT / "docker/healthcheck.py").read_text()
    assert api["depends_on"]["redis-queue"]["condition"] == "service_healthy"
    assert api["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert "profiles" not in api


def test_one_worker_per_gpu_each_reserving_its_own_device(compose) -> None:
    gpu = services(compose, "worker-gpu")
    assert len(gpu) >= 2
    devices = []
    for name, worker in gpu.items():
        assert worker["profiles"] == ["gpu"], name
        (reservation,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["capabilities"] == ["gpu"] and reservation["driver"] == "nvidia"
        devices += reservation["device_ids"]
        env = environment(worker)
        assert env["KVZIP_DEVICE"] == "cuda"  # the one GPU the container sees
        assert env["KVZIP_WORKER_NAME"].endswith(f"-gpu{reservation['device_ids'][0]}")
        assert worker["build"]["args"]["VARIANT"] == "cuda"
    assert len(devices) == len(set(devices)), devices
    names = [environment(w)["KVZIP_WORKER_NAME"] for w in services(compose, "worker").values()]
    assert len(names) == len(set(names)), names


def test_the_cpu_profile_runs_the_default_model_without_a_gpu(compose) -> None:
    worker = compose["services"]["worker-cpu"]
    assert worker["profiles"] == ["cpu"]
    assert "deploy" not in worker
    assert worker["build"]["args"]["VARIANT"] == "cpu"
    env = environment(worker)
    assert env["KVZIP_MODEL"] == "SmolLM2-135M-Instruct" == Settings.model_fields["model"].default
    assert env["KVZIP_DEVICE"] == "cpu"


def test_workers_outlast_an_ingest_on_stop_and_share_the_volumes(compose) -> None:
    for name, worker in services(compose, "worker").items():
        assert seconds(worker["stop_grace_period"]) >= 300, name
        assert worker["healthcheck"]["test"] == ["CMD", "kvzip-healthcheck", "worker"]
        assert seconds(worker["healthcheck"]["start_period"]) >= 120, name
        assert set(worker["volumes"]) == {"kvzip-data:/data", "kvzip-models:/models"}
        assert worker["depends_on"]["redis-queue"]["condition"] == "service_healthy"
        assert worker["restart"] == "unless-stopped"
    assert {"kvzip-data", "kvzip-models", "redis-queue-data"} <= set(compose["volumes"])


def redis_args(command: list[str]) -> dict[str, str]:
    assert command[0] == "redis-server"
    flags = command[1:]
    assert len(flags) % 2 == 0 and all(f.startswith("--") for f in flags[::2]), flags
    return {flags[i][2:]: flags[i + 1] for i in range(0, len(flags), 2)}


def test_redis_queue_keeps_everything_and_redis_cache_is_an_lru_cache(compose) -> None:
    queue = redis_args(compose["services"]["redis-queue"]["command"])
    assert queue["appendonly"] == "yes" and queue["maxmemory-policy"] == "noeviction"
    assert queue["dir"] == "/data"
    assert "redis-queue-data:/data" in compose["services"]["redis-queue"]["volumes"]
    cache = redis_args(compose["services"]["redis-cache"]["command"])
    assert cache["appendonly"] == "no" and cache["save"] == ""
    assert cache["maxmemory-policy"] == "allkeys-lru"
    assert cache["maxmemory"] not in ("", "0")
    assert "volumes" not in compose["services"]["redis-cache"]
    for name in ("redis-queue", "redis-cache"):
        test = compose["services"][name]["healthcheck"]["test"]
        assert "redis-cli ping" in " ".join(test)


# --- settings and .env.example -------------------------------------------------------------


def test_every_kvzip_variable_in_the_compose_file_is_a_setting(compose) -> None:
    for name, service in compose["services"].items():
        unknown = {k for k in environment(service) if k.startswith(ENV_PREFIX)} - SETTINGS_VARS
        assert not unknown, f"{name}: {sorted(unknown)} are not in app/settings.py"


def test_every_setting_reaches_the_containers(compose) -> None:
    """A new setting in app/settings.py must be passed through (x-kvzip-env) or be fixed by
    the deployment; add `KVZIP_X: ${KVZIP_X:-}` to x-kvzip-env in docker-compose.yml."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    passed = set(raw["x-kvzip-env"])
    missing = SETTINGS_VARS - passed - FIXED_BY_IMAGE - PER_WORKER
    assert not missing, f"add to x-kvzip-env in docker-compose.yml: {sorted(missing)}"
    for name, worker in services(compose, "worker").items():
        assert set(environment(worker)) >= PER_WORKER, name


def test_env_example_documents_every_variable() -> None:
    """Every `${VAR}` of the compose file and every KVZIP_ setting appears in .env.example
    (`VAR=value` or `# VAR=default`)."""
    documented = env_example_names()
    text = (ROOT / ".env.example").read_text()
    used = variables(COMPOSE_FILE.read_text()) | {"COMPOSE_PROFILES"}
    assert not used - documented, f"add to .env.example: {sorted(used - documented)}"
    undocumented = {v for v in SETTINGS_VARS if v not in documented and v not in text}
    assert not undocumented, f"add to .env.example: {sorted(undocumented)}"


@pytest.mark.parametrize("service", ["api", "worker-gpu0", "worker-cpu"])
def test_the_compose_environment_is_a_valid_configuration(
    compose, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each service's environment, defaults interpolated, is accepted by Settings (plus the
    image's own ENV), in distributed mode."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    env = environment(compose["services"][service])
    env |= {"KVZIP_HOST": "0.0.0.0", "KVZIP_PORT": "8000", "KVZIP_DATA_DIR": "/data"}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.mode == "distributed"
    assert settings.redis_url == "redis://redis-queue:6379/0"
    config = settings.to_service_config()
    assert config.distributed.redis_url == settings.redis_url


def test_the_env_example_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example values shown for KVZIP_ settings (commented lines) parse."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    pattern = re.compile(r"^#?\s*(KVZIP_[A-Z0-9_]+)=(.*)$", re.MULTILINE)
    for name, value in pattern.findall((ROOT / ".env.example").read_text()):
        if name in SETTINGS_VARS:
            monkeypatch.setenv(name, value.strip())
    Settings()
