"""Faults of worker processes: SIGKILL (the process dies: OOM killer, a node lost) and
SIGSTOP (the process hangs: a blocked engine thread, a stalled VM; it stops beating and
stops keeping its job alive), each mid-ingest and mid-query.

Each case: the request in flight when the fault hits completes within its deadline
(another worker takes the job over after claim_idle_s), nothing acknowledged is lost (the
context is READY exactly once; registered contexts still answer), and the deployment
recovers by itself (a stopped worker that comes back drops the job it lost and serves
again; a killed one is restarted by the fixture, as its orchestrator would).
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import pytest

from tests.distributed.processes_testing import QUESTION, Deployment, document, until
from tests.faults.conftest import CLAIM_IDLE_S, WAIT_TIMEOUT_S

pytestmark = [pytest.mark.redis, pytest.mark.timeout(150)]

LONG_ANSWER = {"question": "Tell me everything about the archive.", "max_new_tokens": 384}
FAULTS = {"killed": signal.SIGKILL, "hung": signal.SIGSTOP}
T = TypeVar("T")


def in_background(call: Callable[[], T]) -> Future[tuple[T, float]]:
    """Run `call` on a thread; what it returned and the monotonic time it came back."""

    def timed() -> tuple[T, float]:
        response = call()
        return response, time.monotonic()

    pool = ThreadPoolExecutor(1)
    future = pool.submit(timed)
    pool.shutdown(wait=False)
    return future


def long_document() -> str:
    """A document that takes a while to ingest (and differs from every other one)."""
    lines = [f"Line {i}: the orchard keeps apples and pears." for i in range(170)]
    return "\n".join([f"Orchard {uuid.uuid4().hex}.", *lines])


def inflict(deployment: Deployment, fault: str, worker: str) -> float:
    """The fault on `worker`; when it hit (monotonic)."""
    deployment.signal(worker, FAULTS[fault])
    if fault == "killed":
        deployment.procs[worker].popen.wait(timeout=10)
    return time.monotonic()


def idle_again(deployment: Deployment, worker: str, timeout_s: float = 30.0) -> None:
    """Wait until a worker continued after SIGSTOP beats again with no job in hand (it has
    dropped or finished the job it held when it stopped)."""

    def idle() -> bool:
        raw = deployment.redis.get(deployment.key(f"worker:{worker}"))
        return raw is not None and json.loads(raw).get("current") is None

    until(idle, timeout_s, f"{worker} idle again after SIGCONT")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_worker_lost_mid_ingest_has_its_job_finished_by_another_exactly_once(
    deployment: Deployment, fault: str, recovered: Callable[[str, float], None]
) -> None:
    api = deployment.apis[0]
    with deployment.explained(), httpx.Client(base_url=api, timeout=WAIT_TIMEOUT_S + 10) as http:
        for _ in range(4):  # an ingest may finish before it is seen running: again
            text = long_document()
            accepted = http.post("/contexts", json={"text": text, "wait": False})
            assert accepted.status_code == 202, accepted.text
            cid = accepted.json()["id"]
            waiting = in_background(lambda t=text: http.post("/contexts", json={"text": t}))
            owner = ingesting_worker(deployment, http, cid)
            if owner is not None:
                break
            waiting.result(timeout=WAIT_TIMEOUT_S)
        assert owner is not None, "every ingest finished before the fault could hit it"
        hit = inflict(deployment, fault, owner)
        response, done = waiting.result(timeout=WAIT_TIMEOUT_S + 10)
        assert response.status_code == 200, response.text  # the waiting registration
        assert response.json()["state"] == "READY"
        assert done - hit < CLAIM_IDLE_S + 20
        recovered(f"worker {fault} mid-ingest: the waiting registration READY", done - hit)
        if fault == "hung":
            deployment.signal(owner, signal.SIGCONT)  # it resumes, finishes, finds it done
            idle_again(deployment, owner)
        survivor = ({"w1", "w2"} - {owner}).pop()
        assert deployment.record(cid)["worker"] == survivor
        assert deployment.ready_events().count(cid) == 1
        assert deployment.redis.xlen(deployment.key("jobs:dead")) == 0
        answer = http.post(f"/contexts/{cid}/query", json=QUESTION)
        assert answer.status_code == 200, answer.text


def ingesting_worker(deployment: Deployment, http: httpx.Client, cid: str) -> str | None:
    """The worker that holds the ingest job while it runs; None when the ingest finished
    before that could be seen."""
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the ingest was never taken"
        holders = deployment.holders()
        if http.get(f"/contexts/{cid}").json()["state"] != "PROCESSING":
            return None
        if holders:  # a worker holds it and works on it (progress may not show yet)
            return holders[0]
        time.sleep(0.02)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_worker_lost_mid_answer_has_the_question_answered_by_another(
    deployment: Deployment, fault: str, recovered: Callable[[str, float], None]
) -> None:
    api = deployment.apis[0]
    with deployment.explained(), httpx.Client(base_url=api, timeout=WAIT_TIMEOUT_S + 10) as http:
        cid = new_context(http)
        earlier = replies(deployment)
        asking = in_background(lambda: http.post(f"/contexts/{cid}/query", json=LONG_ANSWER))
        owner = answering_worker(deployment, earlier)
        hit = inflict(deployment, fault, owner)
        response, done = asking.result(timeout=WAIT_TIMEOUT_S + 10)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] > 0
        assert done - hit < CLAIM_IDLE_S + 20
        recovered(f"worker {fault} mid-answer: the answer complete", done - hit)
        if fault == "hung":
            deployment.signal(owner, signal.SIGCONT)
            idle_again(deployment, owner)
        again = http.post(f"/contexts/{cid}/query", json=QUESTION)  # acknowledged: still there
        assert again.status_code == 200, again.text
        assert deployment.redis.xlen(deployment.key("jobs:dead")) == 0


def test_a_stream_whose_worker_hangs_mid_answer_ends_with_a_clear_error_in_time(
    deployment: Deployment, recovered: Callable[[str, float], None]
) -> None:
    """Tokens already sent cannot be taken back: when another worker takes the question
    over, the stream ends with an error event that says to ask again (and the new attempt
    is cancelled), instead of hanging or mixing two answers."""
    api = deployment.apis[0]
    with deployment.explained(), httpx.Client(base_url=api, timeout=WAIT_TIMEOUT_S + 10) as http:
        cid = new_context(http)
        earlier = replies(deployment)
        body = {**LONG_ANSWER, "stream": True}
        streaming = in_background(lambda: sse_events(http, f"/contexts/{cid}/query", body))
        owner = answering_worker(deployment, earlier)
        hit = inflict(deployment, "hung", owner)
        events, done = streaming.result(timeout=WAIT_TIMEOUT_S + 10)
        assert "delta" in events[0] and "error" in events[-1], events
        assert events[-1]["error"]["code"] == "engine_unavailable"
        assert "ask again" in events[-1]["error"]["message"]
        assert done - hit < CLAIM_IDLE_S + 20
        recovered("worker hung mid-stream: the stream ends, 'ask again'", done - hit)
        deployment.signal(owner, signal.SIGCONT)
        idle_again(deployment, owner)
        again = http.post(f"/contexts/{cid}/query", json=QUESTION)
        assert again.status_code == 200, again.text


def new_context(http: httpx.Client) -> str:
    created = http.post("/contexts", json={"text": f"{uuid.uuid4().hex}\n{document(7)}"})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def sse_events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a streamed answer, up to [DONE] or the end of the stream."""
    events = []
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def replies(deployment: Deployment) -> set[bytes]:
    return set(deployment.redis.scan_iter(match=deployment.key("reply:*")))


def answering_worker(deployment: Deployment, earlier: set[bytes], timeout_s: float = 30.0) -> str:
    """The worker holding the query job once its first token is in the reply stream (one
    not among the `earlier` ones: a worker stopped mid-answer may write into its own)."""
    found: list[str] = []

    def streaming() -> bool:
        new = replies(deployment) - earlier
        holders = deployment.holders()
        if holders and any(deployment.redis.xlen(r) >= 2 for r in new):  # START, DELTA
            found.append(holders[0])
        return bool(found)

    until(streaming, timeout_s, "no worker started answering")
    return found[0]
