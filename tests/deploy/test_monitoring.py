"""The compose `monitoring` profile: Prometheus scrapes the api and every worker on the ports
their images serve; Grafana's provisioned datasource is that Prometheus; the provisioned
dashboard is valid Grafana dashboard JSON (a schema of the structure Grafana needs) and every
metric its PromQL names is a series the api or a worker registers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import REGISTRY

from app.settings import Settings
from tests.deploy.compose_testing import DOCKERFILES, ROOT, load_compose, parse_dockerfile

PROMETHEUS_FILE = ROOT / "docker/prometheus/prometheus.yml"
GRAFANA = ROOT / "docker/grafana"
DASHBOARD_FILE = GRAFANA / "dashboards/kvzip.json"
PROMETHEUS_TARGET_LABELS = {"up"}  # series Prometheus itself writes for every target

DATASOURCE_REF = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"const": "prometheus"}, "uid": {"type": "string", "minLength": 1}},
}
DASHBOARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time"],
    "properties": {
        "id": {"type": "null"},  # provisioned: Grafana assigns it
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "panels": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/panel"}},
    },
    "$defs": {
        "gridPos": {
            "type": "object",
            "required": ["h", "w", "x", "y"],
            "additionalProperties": False,
            "properties": {
                "h": {"type": "integer", "minimum": 1},
                "w": {"type": "integer", "minimum": 1, "maximum": 24},
                "x": {"type": "integer", "minimum": 0, "maximum": 23},
                "y": {"type": "integer", "minimum": 0},
            },
        },
        "target": {
            "type": "object",
            "required": ["refId", "expr"],
            "properties": {
                "refId": {"type": "string", "pattern": "^[A-Z]$"},
                "expr": {"type": "string", "minLength": 1},
                "datasource": DATASOURCE_REF,
            },
        },
        "panel": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table"]},
                "title": {"type": "string", "minLength": 1},
                "gridPos": {"$ref": "#/$defs/gridPos"},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"required": ["panels"], "properties": {"panels": {"maxItems": 0}}},
            "else": {
                "required": ["targets", "datasource"],
                "properties": {
                    "datasource": DATASOURCE_REF,
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"$ref": "#/$defs/target"},
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(DASHBOARD_SCHEMA)
    cls.check_schema(DASHBOARD_SCHEMA)
    return cls(DASHBOARD_SCHEMA)


def image_env(image: str) -> dict[str, str]:
    return parse_dockerfile(DOCKERFILES[image]).env()


def graph_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (p for p in dashboard["panels"] if p["type"] != "row")


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in graph_panels(dashboard) for t in p["targets"]]


# --- the dashboard -------------------------------------------------------------------------------


def test_the_dashboard_is_valid_grafana_dashboard_json(validator, dashboard) -> None:
    errors = sorted(validator.iter_errors(dashboard), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "two panels share an id"
    boxes = [p["gridPos"] for p in dashboard["panels"]]
    for box in boxes:
        assert box["x"] + box["w"] <= 24, box  # Grafana's grid is 24 columns wide
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap_x = a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            overlap_y = a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]
            assert not (overlap_x and overlap_y), (a, b)


def test_the_schema_really_rejects_a_broken_dashboard(validator, dashboard) -> None:
    broken = json.loads(json.dumps(dashboard))
    panel = next(p for p in broken["panels"] if p["type"] != "row")
    del panel["gridPos"]
    panel["targets"][0].pop("expr")
    broken["schemaVersion"] = "39"
    messages = [e.message for e in validator.iter_errors(broken)]
    assert len(messages) >= 3, messages


def registered_series() -> set[str]:
    """Every series name the api (distributed mode) and a worker expose, with the suffixes
    Prometheus sees (_total, _bucket/_sum/_count, _created)."""
    import app.main  # noqa: F401  (the HTTP series)
    import service.serving.distributed.stream_worker  # noqa: F401  (the worker's modules)
    from service.config import DistributedConfig, ServiceConfig
    from service.serving.distributed.remote import RemoteContextService

    # the API process's own gauges appear once a RemoteContextService exists (no connection)
    api = RemoteContextService(
        ServiceConfig(distributed=DistributedConfig(redis_url="redis://x:1/0"))
    )
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    del api
    return names


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)  # label matchers, ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(kvzip_x_bucket{route!="/a(b)"}[5m])))'
        ' / on (job) group_left sum(up{job=~"a|b"}) * 1e-3 - time() and kvzip_y offset 5m'
    )
    assert metric_names(expr) == {"kvzip_x_bucket", "up", "kvzip_y"}


def test_every_metric_the_dashboard_names_is_registered(dashboard) -> None:
    registered = registered_series() | PROMETHEUS_TARGET_LABELS
    assert "kvzip_worker_jobs_claimed_total" in registered  # the collection sees the worker's
    for expr in exprs(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - registered
        assert not unknown, f"{expr!r} names {sorted(unknown)}, which nothing registers"
        assert expr.count("(") == expr.count(")"), expr


def test_the_dashboard_has_the_panels_on_call_needs(dashboard) -> None:
    used = set().union(*(metric_names(e) for e in exprs(dashboard)))
    needs = {
        "request rate and errors": {"kvzip_http_requests_total"},
        "TTFT percentiles": {"kvzip_time_to_first_token_seconds_bucket"},
        "inter-token latency percentiles": {"kvzip_inter_token_latency_seconds_bucket"},
        "throughput": {"kvzip_generation_tokens_total", "kvzip_context_tokens_sum"},
        "queue depth": {"kvzip_queue_depth", "kvzip_decode_waiting"},
        "batch size": {"kvzip_decode_batch_size"},
        "decode step time": {"kvzip_decode_step_seconds_bucket"},
        "ingest time": {"kvzip_ingest_phase_seconds_bucket"},
        "cache hit ratio": {"kvzip_tier_hits_total", "kvzip_tier_misses_total"},
        "worker liveness": {"up", "kvzip_worker_heartbeat_timestamp_seconds"},
        "jobs": {"kvzip_worker_jobs_claimed_total", "kvzip_worker_jobs_dead_lettered_total"},
    }
    missing = {need: sorted(names - used) for need, names in needs.items() if names - used}
    assert not missing, missing
    quantiles = [e for e in exprs(dashboard) if e.startswith("histogram_quantile(")]
    assert quantiles and all(re.search(r"by \(le\b.*_bucket", e) for e in quantiles), quantiles


# --- Prometheus and Grafana configuration --------------------------------------------------------


def scrape_jobs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    return {job["job_name"]: job for job in config["scrape_configs"]}


def dns_targets(job: dict[str, Any]) -> tuple[set[str], int]:
    (sd,) = job["dns_sd_configs"]
    assert sd["type"] == "A"
    return set(sd["names"]), int(sd["port"])


def test_prometheus_scrapes_the_api_on_its_port(compose) -> None:
    api = scrape_jobs()["kvzip-api"]
    names, port = dns_targets(api)
    assert names == {"api"} and "api" in compose["services"]
    assert port == int(image_env("api")["KVZIP_PORT"])
    assert api["metrics_path"] == "/metrics"


def test_prometheus_scrapes_every_worker_on_its_metrics_port(compose) -> None:
    worker = scrape_jobs()["kvzip-worker"]
    names, port = dns_targets(worker)
    assert names == {n for n in compose["services"] if n.startswith("worker")}
    env = image_env("worker")
    assert port == int(env["KVZIP_WORKER_METRICS_PORT"])
    assert port == Settings.model_fields["worker_metrics_port"].default  # the documented one
    assert env["KVZIP_WORKER_METRICS_HOST"] == "0.0.0.0"  # reachable on the compose network
    assert f"EXPOSE {port}" in DOCKERFILES["worker"].read_text()


def test_the_monitoring_profile_runs_prometheus_and_grafana_on_loopback(compose) -> None:
    services = compose["services"]
    monitoring = {n for n, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    for name in monitoring:
        assert services[name]["profiles"] == ["monitoring"]
        (published,) = services[name]["ports"]
        assert published.startswith("127.0.0.1:"), published  # not on every interface
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    prometheus = services["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if "config.file" in a)
    assert f"./docker/prometheus/prometheus.yml:{config_path}:ro" in prometheus["volumes"]
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard(compose, dashboard) -> None:
    (source,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    published = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{published}"
    for panel in graph_panels(dashboard):
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == source["uid"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/kvzip.yml").read_text())[
        "providers"
    ]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert home == f"{provider['options']['path']}/{DASHBOARD_FILE.name}"
