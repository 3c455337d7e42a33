"""Faults of the stored caches, on a deployment of real processes (one worker, one API, the
shared volume and the Redis tier; no resident copies, so every question reads a tier):
objects damaged (4 KiB flipped) or truncated on disk, damaged or evicted in Redis, and the
volume filling up (ENOSPC: the worker runs as tests.faults.full_volume, whose volume has a
size the test sets).

A damaged copy is never served: a good copy in another tier answers (and repairs the disk
copy); with none left the context answers 410 and shows FAILED with why, and registering
the document again rebuilds it. A full volume refuses a new context with 507 and loses
nothing already stored; once space is back, the same registration succeeds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.distributed.metrics_testing import scrape
from tests.distributed.processes_testing import QUESTION, Deployment, deployed, document
from tests.faults.conftest import SETTINGS, WAIT_TIMEOUT_S

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

CORRUPTIONS = 'kvzip_tier_corruptions_total{tier="disk"}'


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("storage-faults")
    settings = {**SETTINGS, "FAULTS_VOLUME_SIZE_FILE": str(tmp / "volume-size")}
    worker = ["-m", "tests.faults.full_volume"]
    with deployed(tiny_model_dir, tmp, ["w1"], ["api"], worker, **settings) as running:
        yield running


@pytest.fixture
def http(deployment: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.apis[0], timeout=WAIT_TIMEOUT_S + 10) as client:
        yield client


def volume(deployment: Deployment) -> Path:
    return Path(deployment.env["KVZIP_DATA_DIR"])


def blob_file(deployment: Deployment, cid: str) -> Path:
    return volume(deployment) / "contexts" / f"{cid}.safetensors"


def flip_4k(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(b ^ 0xFF for b in raw[middle : middle + 4096])
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


DISK_DAMAGE = {"flipped": flip_4k, "truncated": truncate}


def redis_parts(deployment: Deployment, cid: str) -> list[bytes]:
    match = deployment.key(f"blob:{cid}.safetensors*")
    return sorted(deployment.cache.scan_iter(match=match))


def break_redis_copy(deployment: Deployment, cid: str) -> None:
    parts = [k for k in redis_parts(deployment, cid) if b":part:" in k]
    assert parts, "the Redis tier holds no copy"
    for key in parts:
        deployment.cache.set(key, b"\0" * 10, keepttl=True)


def evict_redis_copy(deployment: Deployment, cid: str) -> None:
    keys = redis_parts(deployment, cid)
    assert keys, "the Redis tier holds no copy"
    deployment.cache.unlink(*keys)  # what the cache server's LRU does


REDIS_DAMAGE = {"damaged": break_redis_copy, "evicted": evict_redis_copy}


def registered(http: httpx.Client, text: str) -> tuple[str, str]:
    """Register `text`; its id and the answer to QUESTION."""
    created = http.post("/contexts", json={"text": text})
    assert created.status_code == 201, created.text
    cid = created.json()["id"]
    return cid, answer(http, cid)


def answer(http: httpx.Client, cid: str) -> str:
    response = http.post(f"/contexts/{cid}/query", json=QUESTION)
    assert response.status_code == 200, response.text
    return str(response.json()["answer"])


def fresh(i: int) -> str:
    return f"Record {uuid.uuid4().hex}.\n{document(i)}"


@pytest.mark.parametrize("damage", list(DISK_DAMAGE))
def test_a_damaged_disk_copy_is_never_served_and_is_repaired_from_redis(
    deployment: Deployment, http: httpx.Client, damage: str
) -> None:
    with deployment.explained():
        cid, before = registered(http, fresh(1))
        path = blob_file(deployment, cid)
        intact = path.read_bytes()
        corruptions = scrape(*deployment.live_metrics())[CORRUPTIONS]
        DISK_DAMAGE[damage](path)
        assert answer(http, cid) == before  # the Redis copy answered
        assert path.read_bytes() == intact  # and was written back over the damaged file
        assert scrape(*deployment.live_metrics())[CORRUPTIONS] == corruptions + 1
        assert answer(http, cid) == before
        assert scrape(*deployment.live_metrics())[CORRUPTIONS] == corruptions + 1  # repaired


@pytest.mark.parametrize(("disk", "redis"), [("flipped", "damaged"), ("truncated", "evicted")])
def test_a_context_with_no_intact_copy_left_answers_410_then_registers_again(
    deployment: Deployment,
    http: httpx.Client,
    disk: str,
    redis: str,
    recovered: Callable[[str, float], None],
) -> None:
    with deployment.explained():
        text = fresh(2)
        cid, before = registered(http, text)
        DISK_DAMAGE[disk](blob_file(deployment, cid))
        REDIS_DAMAGE[redis](deployment, cid)
        lost = http.post(f"/contexts/{cid}/query", json=QUESTION)
        assert lost.status_code == 410, lost.text
        error = lost.json()["error"]
        assert error["code"] == "context_lost"
        assert "register the same document again" in error["message"]
        shown = http.get(f"/contexts/{cid}").json()
        assert shown["state"] == "FAILED" and "lost its stored cache" in shown["error"]
        started = time.monotonic()
        again = http.post("/contexts", json={"text": text})
        took = time.monotonic() - started
        recovered(f"disk {disk}, Redis {redis}: registered again, READY", took)
        assert again.status_code == 201, again.text
        assert (again.json()["id"], again.json()["state"]) == (cid, "READY")
        assert answer(http, cid) == before


def test_a_full_volume_refuses_new_contexts_with_507_and_keeps_the_stored_ones(
    deployment: Deployment, http: httpx.Client, recovered: Callable[[str, float], None]
) -> None:
    size_file = Path(deployment.env["FAULTS_VOLUME_SIZE_FILE"])
    with deployment.explained():
        kept, before = registered(http, fresh(3))  # small: evicting it cannot make room
        big = "\n".join([f"Page {uuid.uuid4().hex}.", *(document(i) for i in range(20))])
        used = sum(p.stat().st_size for p in volume(deployment).rglob("*") if p.is_file())
        try:
            size_file.write_text(str(used + 4096))  # another program filled the volume
            refused = http.post("/contexts", json={"text": big})
            assert refused.status_code == 507, refused.text
            error = refused.json()["error"]
            assert error["code"] == "storage_full" and "disk is full" in error["message"]
            assert answer(http, kept) == before  # nothing stored was lost or evicted
        finally:
            size_file.unlink(missing_ok=True)  # the space is back
        started = time.monotonic()
        stored = http.post("/contexts", json={"text": big})
        recovered("volume full: the refused registration READY once space is back",
                  time.monotonic() - started)  # fmt: skip
        assert stored.status_code == 201, stored.text
        assert stored.json()["state"] == "READY"
        assert answer(http, stored.json()["id"])
