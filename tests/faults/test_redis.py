"""Faults of Redis and of API processes, on the deployment of real processes.

Redis losing its data. A FLUSHALL is done as the unlinking of every key of the deployment's
prefix, in both databases (jobs, records, heartbeats, events, the Redis tier): that is all
a FLUSHALL changes for this deployment, and the tests share the one Redis at 127.0.0.1:6379,
which they must never flush. A restart without persistence is that same loss plus the end of
every connection the deployment's processes hold (CLIENT KILL of the connections named after
the prefix; see processes_testing.client_name), which they see as a restart; the seconds the
server would be down are not reproduced (a Redis that is down answers 503 at once:
tests/distributed/test_http.py). Either way the contexts acknowledged before answer again
from their objects on the shared disk, new registrations work and the API is ready again,
with no operator.

An API process killed between a registration's record and its job (SIGKILLed at that very
point: tests.faults.api_dies); the in-process variant is
tests/distributed/test_worker_concurrency.py::
test_a_registration_whose_job_never_reached_the_stream_is_resubmitted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import httpx
import pytest

from service.serving.distributed.remote import ORPHAN_GRACE_S
from tests.distributed.processes_testing import QUESTION, Deployment, document, until
from tests.faults.conftest import WAIT_TIMEOUT_S

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

RECOVERY_S = 30.0  # the test fails when the deployment is not whole again by then


def fresh(i: int) -> str:
    return f"Ledger {uuid.uuid4().hex}.\n{document(i)}"


def served(http: httpx.Client, cid: str, answer: str) -> bool:
    """The context is READY and answers `answer` (False on any refusal, 503 included)."""
    try:
        shown = http.get(f"/contexts/{cid}")
        if shown.status_code != 200 or shown.json()["state"] != "READY":
            return False
        asked = http.post(f"/contexts/{cid}/query", json=QUESTION)
        return asked.status_code == 200 and asked.json()["answer"] == answer
    except httpx.TransportError:
        return False


def registers(http: httpx.Client, text: str) -> bool:
    try:
        created = http.post("/contexts", json={"text": text})
        return created.status_code in (200, 201) and created.json()["state"] == "READY"
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("loss", ["flushed", "restarted"])
def test_redis_losing_its_data_loses_no_acknowledged_context(
    deployment: Deployment, loss: str, recovered: Callable[[str, float], None]
) -> None:
    api = deployment.apis[0]
    with deployment.explained(), httpx.Client(base_url=api, timeout=WAIT_TIMEOUT_S + 10) as http:
        kept = [http.post("/contexts", json={"text": fresh(i)}) for i in range(3)]
        assert [r.status_code for r in kept] == [201] * 3, [r.text for r in kept]
        ids = [r.json()["id"] for r in kept]
        answers = [http.post(f"/contexts/{c}/query", json=QUESTION).json()["answer"] for c in ids]
        assert deployment.unlink_prefix() > 0
        if loss == "restarted":
            assert deployment.drop_connections() > 0
        lost = time.monotonic()
        new = fresh(9)  # the registration that stayed PROCESSING before issue 13 item 6
        until(lambda: registers(http, new), RECOVERY_S, "a new registration is READY")
        recovered(f"Redis {loss}: a new registration READY", time.monotonic() - lost)
        until(
            lambda: all(served(http, c, a) for c, a in zip(ids, answers, strict=True)),
            RECOVERY_S,
            "the acknowledged contexts answer again",
        )
        recovered(f"Redis {loss}: every acknowledged context answers", time.monotonic() - lost)
        assert http.get("/readyz").status_code == 200
        listed = http.get("/contexts", params={"page_size": 100}).json()["contexts"]
        assert set(ids) <= {c["id"] for c in listed}
        assert deployment.redis.xlen(deployment.key("jobs:dead")) == 0


def test_an_api_killed_between_record_and_job_leaves_nothing_a_retry_cannot_finish(
    deployment: Deployment, recovered: Callable[[str, float], None]
) -> None:
    text = fresh(5)
    dies = deployment.start_api("api-dies", module="tests.faults.api_dies")
    try:
        with deployment.explained(), httpx.Client(timeout=WAIT_TIMEOUT_S + 10) as http:
            deployment.wait_ready()
            with pytest.raises(httpx.TransportError):  # the client never got an answer
                http.post(f"{dies}/contexts", json={"text": text})
            killed = time.monotonic()
            deployment.procs["api-dies"].popen.wait(timeout=10)
            survivor = deployment.apis[0]
            stuck = http.post(f"{survivor}/contexts", json={"text": text, "wait": False})
            assert stuck.json()["state"] == "PROCESSING"  # a record, and no job behind it
            cid = stuck.json()["id"]

            def retried() -> bool:  # the client registers again until it is READY
                again = http.post(f"{survivor}/contexts", json={"text": text, "wait": False})
                return bool(again.json()["state"] == "READY")

            took = until(retried, ORPHAN_GRACE_S + 20, "the registration READY")
            recovered("API killed between record and job: READY on a retry", took)
            assert time.monotonic() - killed < ORPHAN_GRACE_S + 20
            assert deployment.ready_events().count(cid) == 1
            answer = http.post(f"{survivor}/contexts/{cid}/query", json=QUESTION)
            assert answer.status_code == 200, answer.text
    finally:
        deployment.retire("api-dies")
