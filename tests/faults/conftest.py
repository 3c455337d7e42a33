"""Fixtures of the fault suite: one deployment of real processes (2 workers, 1 API, the tiny
random model) on a test prefix of the real Redis, shared by the tests of the package (a
module may bring its own) and healed before each test (dead processes restarted, stopped
ones continued); short job timeouts so that every fault resolves in seconds; the recovery
time each test measured, printed at the end of the run (the figures of
docs/reliability.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.distributed.conftest import _hermetic_env, redis_env
from tests.distributed.processes_testing import Deployment, deployed

__all__ = ["_hermetic_env", "redis_env"]  # the distributed tests' fixtures, here too

HEARTBEAT_TTL_S = 3.0
CLAIM_IDLE_S = 2.0
WAIT_TIMEOUT_S = 30.0
"""Every request of the suite must end within this (then 503); each test asserts less."""

SETTINGS = {
    "KVZIP_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S),
    "KVZIP_CLAIM_IDLE_S": str(CLAIM_IDLE_S),
    "KVZIP_WAIT_TIMEOUT_S": str(WAIT_TIMEOUT_S),
}

_RECOVERIES: list[tuple[str, str, float]] = []


@pytest.fixture(scope="package")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("faults")
    with deployed(tiny_model_dir, tmp, workers=["w1", "w2"], apis=["api"], **SETTINGS) as running:
        yield running


@pytest.fixture
def deployment(cluster: Deployment) -> Iterator[Deployment]:
    """The module's deployment, every worker beating and the API ready; healed afterwards."""
    cluster.revive()
    yield cluster
    cluster.revive()


@pytest.fixture
def recovered(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """`recovered(what, seconds)`: note a recovery time for the summary of the run."""

    def note(what: str, seconds: float) -> None:
        _RECOVERIES.append((request.node.name, what, seconds))

    return note


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _RECOVERIES:
        terminalreporter.section("fault recovery times")
        for test, what, seconds in _RECOVERIES:
            terminalreporter.write_line(f"{seconds:6.2f} s  {what}  ({test})")
