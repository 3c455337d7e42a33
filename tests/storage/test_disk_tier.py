"""DiskTier: restart safety, atomic writes, temp-file hygiene, sidecars, LRU capacity."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from storage import DiskTier


def hidden_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_a_new_instance_sees_everything(tmp_path: Path) -> None:
    first = DiskTier(tmp_path)
    await first.put("ctx:1", b"one")
    await first.put("ctx:2", b"two", ttl_s=3600)
    second = DiskTier(tmp_path)
    assert await second.keys() == ["ctx:1", "ctx:2"]
    assert await second.get("ctx:1") == b"one"
    assert await second.get("ctx:2") == b"two"
    assert second.bytes_used == 6


async def test_expiry_survives_a_restart(tmp_path: Path) -> None:
    await DiskTier(tmp_path).put("k", b"x", ttl_s=0.2)
    await asyncio.sleep(0.4)
    tier = DiskTier(tmp_path)
    assert await tier.get("k") is None
    assert list(tmp_path.iterdir()) == []  # object and sidecar both removed


async def test_the_file_holds_exactly_the_bytes(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("k", b"\x00safetensors\xff")
    assert (tmp_path / "k").read_bytes() == b"\x00safetensors\xff"


@pytest.mark.parametrize("failing", ["replace", "fsync"])
async def test_a_failed_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("k", b"old value")

    def boom(*args: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk on fire"):
        await tier.put("k", b"new value that never lands")
    with pytest.raises(OSError, match="disk on fire"):
        await tier.put("fresh", b"never lands either")
    monkeypatch.undo()
    assert await tier.get("k") == b"old value"
    assert await tier.get("fresh") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


async def test_temp_files_are_ignored_and_stale_ones_cleaned_on_startup(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("k", b"x")
    stale = tmp_path / ".k.0123abcd.tmp"
    fresh = tmp_path / ".other.4567ef.tmp"
    stale.write_bytes(b"half a wri")
    fresh.write_bytes(b"a write in progress elsewhere")
    age(stale, 3600)
    assert await tier.keys() == ["k"]
    DiskTier(tmp_path, stale_after_s=60)
    assert hidden_files(tmp_path) == [".other.4567ef.tmp"]
    DiskTier(tmp_path, stale_after_s=0)
    assert hidden_files(tmp_path) == []


async def test_orphan_sidecars_are_cleaned_on_startup(tmp_path: Path) -> None:
    (tmp_path / ".gone.ttl").write_text('{"expires_at": 9999999999}')
    age(tmp_path / ".gone.ttl", 3600)
    DiskTier(tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_keys_that_look_like_sidecars_do_not_collide(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("x", b"short-lived", ttl_s=0.2)
    await tier.put("x.ttl", b"a key of its own")
    await tier.put("x.tmp", b"another")
    await asyncio.sleep(0.4)
    assert await tier.keys() == ["x.tmp", "x.ttl"]
    assert await tier.get("x.ttl") == b"a key of its own"


async def test_a_damaged_sidecar_counts_as_expired(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("k", b"x", ttl_s=3600)
    (tmp_path / ".k.ttl").write_text("not json")
    assert await tier.get("k") is None


async def test_capacity_evicts_least_recently_read_files(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, capacity_bytes=100)
    await tier.put("a", b"a" * 40)
    await tier.put("b", b"b" * 40)
    assert await tier.get("a") is not None  # touches a: now b is least recently used
    await tier.put("c", b"c" * 40)
    assert await tier.keys() == ["a", "c"]
    assert tier.evictions == 1
    assert tier.bytes_used == 80


async def test_capacity_refuses_an_object_larger_than_itself(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, capacity_bytes=10)
    await tier.put("a", b"fits")
    await tier.put("a", b"does not fit at all")
    assert await tier.get("a") is None
    assert tier.bytes_used == 0
    assert list(tmp_path.iterdir()) == []


async def test_counts_hits_misses_and_bytes(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("a", b"12345")
    await tier.put("a", b"123")
    await tier.get("a")
    await tier.get("b")
    assert (tier.hits, tier.misses, tier.bytes_used) == (1, 1, 3)
    await tier.delete("a")
    assert tier.bytes_used == 0


async def test_get_view_maps_the_same_bytes_read_only(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    data = os.urandom(3 * 4096 + 17)
    await tier.put("big", data)
    await tier.put("empty", b"")
    view = await tier.get_view("big")
    assert view is not None and view.readonly and bytes(view) == data
    assert view.tobytes() == await tier.get("big")
    assert await tier.get_view("empty") == b""
    assert await tier.get_view("missing") is None
    assert (tier.hits, tier.misses) == (3, 1)


async def test_a_view_keeps_its_bytes_when_the_key_is_replaced_or_deleted(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("k", b"first version")
    view = await tier.get_view("k")
    await tier.put("k", b"second, longer version")
    assert await tier.get("k") == b"second, longer version"
    await tier.delete("k")
    assert view is not None and bytes(view) == b"first version"


async def test_get_view_honours_expiry(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("k", b"x", ttl_s=0.2)
    assert await tier.get_view("k") == b"x"
    await asyncio.sleep(0.4)
    assert await tier.get_view("k") is None
    assert list(tmp_path.iterdir()) == []
