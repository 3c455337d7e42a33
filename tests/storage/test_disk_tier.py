"""DiskTier: restart safety, atomic writes, temp-file hygiene, sidecars, capacity (expired
first, then least recently used), checksums (a damaged file is never served)."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path

import pytest

from storage import CorruptObjectError, DiskTier, TierFullError, disk_tier
from storage.disk_tier import HEADER_BYTES as H


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
    assert second.bytes_used == 6 + 2 * H


async def test_expiry_survives_a_restart(tmp_path: Path) -> None:
    await DiskTier(tmp_path).put("k", b"x", ttl_s=0.2)
    await asyncio.sleep(0.4)
    tier = DiskTier(tmp_path)
    assert await tier.get("k") is None
    assert list(tmp_path.iterdir()) == []  # object and sidecar both removed


async def test_the_file_holds_a_header_then_exactly_the_bytes(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("k", b"\x00safetensors\xff")
    raw = (tmp_path / "k").read_bytes()
    assert raw[:8] == b"\x89KVZOBJ\n" and raw[H:] == b"\x00safetensors\xff"


async def test_head_reads_the_objects_first_bytes_past_the_checksum_header(tmp_path: Path) -> None:
    """`head` (a self-describing object's header, for rebuilding its record) sees the
    object's bytes, not the file's frame; a file written before frames existed as it is."""
    tier = DiskTier(tmp_path)
    await tier.put("framed", b"0123456789")
    assert await tier.head("framed", 4) == (b"0123", 10)
    (tmp_path / "legacy").write_bytes(b"abcdefgh")
    assert await tier.head("legacy", 3) == (b"abc", 8)
    assert await tier.head("legacy", 100) == (b"abcdefgh", 8)
    assert await tier.head("missing", 4) is None


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
    tier = DiskTier(tmp_path, capacity_bytes=2 * (40 + H) + 10)
    await tier.put("a", b"a" * 40)
    await tier.put("b", b"b" * 40)
    assert await tier.get("a") is not None  # touches a: now b is least recently used
    await tier.put("c", b"c" * 40)
    assert await tier.keys() == ["a", "c"]
    assert tier.evictions == 1
    assert tier.bytes_used == 2 * (40 + H)


async def test_capacity_evicts_expired_objects_first_then_the_oldest(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, capacity_bytes=3 * (10 + H))
    evicted: list[str] = []

    async def heard(key: str) -> None:
        evicted.append(key)

    tier.on_evict.append(heard)
    await tier.put("oldest", b"o" * 10)
    await tier.put("expiring", b"e" * 10, ttl_s=0.2)
    await tier.put("recent", b"r" * 10)
    await asyncio.sleep(0.3)
    await tier.put("new1", b"1" * 10)  # room for one: the expired one goes, not the oldest
    assert evicted == ["expiring"]
    await tier.put("new2", b"2" * 10)  # then the least recently used
    assert evicted == ["expiring", "oldest"]
    assert await tier.keys() == ["new1", "new2", "recent"]
    assert tier.bytes_used == 3 * (10 + H) and tier.evictions == 2


async def test_a_write_never_takes_the_files_over_the_capacity(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, capacity_bytes=2 * (40 + H))
    sizes = []
    original = tier._make_room

    def watched(protect: str, size: int, limit: int) -> None:
        original(protect, size, limit)
        sizes.append(sum(p.stat().st_size for p in tmp_path.iterdir()) + size)

    tier._make_room = watched  # type: ignore[method-assign]
    for key in "abcde":
        await tier.put(key, key.encode() * 40)
    assert sizes and max(sizes) <= 2 * (40 + H)  # room is made before the file is written


async def test_keys_evictable_refuses_are_never_evicted(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, capacity_bytes=3 * (20 + H), evictable=lambda k: k.endswith(".b"))
    await tier.put("1.json", b"r" * 20)
    await tier.put("1.b", b"b" * 20)
    await tier.put("2.b", b"b" * 20)
    await tier.put("3.b", b"b" * 20)
    assert await tier.keys() == ["1.json", "2.b", "3.b"]


async def test_an_object_that_cannot_fit_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, capacity_bytes=2 * (10 + H), evictable=lambda k: k != "pinned")
    await tier.put("pinned", b"p" * 10)
    await tier.put("a", b"fits")
    with pytest.raises(TierFullError, match="does not fit"):
        await tier.put("a", b"does not fit at all" * 4)
    with pytest.raises(TierFullError):
        await tier.put("big", b"x" * (2 * (10 + H)))
    assert await tier.get("a") == b"fits" and await tier.get("pinned") == b"p" * 10
    assert tier.evictions == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["a", "pinned"]


async def test_a_full_disk_evicts_what_the_write_needs_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = DiskTier(tmp_path)  # no capacity: only the disk itself is full
    await tier.put("old", b"o" * 100)
    await tier.put("older-but-read", b"r" * 100)
    await tier.get("older-but-read")
    real = disk_tier.write_atomic
    full = {"new": 1}

    def write(path: Path, chunks: object) -> None:
        if full.get(path.name, 0) > 0:
            full[path.name] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, chunks)  # type: ignore[arg-type]

    monkeypatch.setattr(disk_tier, "write_atomic", write)
    await tier.put("new", b"n" * 100)
    assert await tier.keys() == ["new", "older-but-read"] and tier.evictions == 1
    full["newer"] = 2  # still full after the eviction: the write fails cleanly
    with pytest.raises(TierFullError, match="disk is full"):
        await tier.put("newer", b"n" * 100)
    assert await tier.get("newer") is None


async def test_a_full_disk_that_evicting_cannot_help_refuses_and_evicts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = DiskTier(tmp_path, evictable=lambda k: k != "pinned")
    await tier.put("pinned", b"p" * 100)
    await tier.put("small", b"s" * 10)

    def write(path: Path, chunks: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_tier, "write_atomic", write)
    with pytest.raises(TierFullError, match="the disk is full; an object of"):
        await tier.put("big", b"b" * 100)
    assert tier.evictions == 0 and await tier.get("small") == b"s" * 10


async def test_counts_hits_misses_and_bytes(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("a", b"12345")
    await tier.put("a", b"123")
    await tier.get("a")
    await tier.get("b")
    assert (tier.hits, tier.misses, tier.bytes_used) == (1, 1, 3 + H)
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


# -- integrity -------------------------------------------------------------------------------


def flip_4k_in_the_middle(path: Path) -> None:
    """What the live probe did: 4 KiB inverted in the middle of a stored object."""
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(b ^ 0xFF for b in raw[middle : middle + 4096])
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: int) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])


DAMAGES = {
    "flipped": flip_4k_in_the_middle,
    "truncated": lambda path: truncate(path, path.stat().st_size - 1000),
    "cut in the header": lambda path: truncate(path, 20),
    "extended": lambda path: path.write_bytes(path.read_bytes() + b"\0"),
}


@pytest.mark.parametrize("read", ["get", "get_view"])
@pytest.mark.parametrize("damage", list(DAMAGES))
async def test_a_damaged_file_is_never_served_even_after_a_restart(
    tmp_path: Path, read: str, damage: str
) -> None:
    data = os.urandom(64 * 1024)
    await DiskTier(tmp_path).put("ctx.safetensors", data, ttl_s=3600)
    DAMAGES[damage](tmp_path / "ctx.safetensors")
    restarted = DiskTier(tmp_path)
    with pytest.raises(CorruptObjectError, match="damaged") as caught:
        await getattr(restarted, read)("ctx.safetensors")
    assert caught.value.key == "ctx.safetensors"
    assert caught.value.ttl_s is not None and 3500 < caught.value.ttl_s <= 3600
    assert list(tmp_path.iterdir()) == []  # dropped, with its sidecar
    assert restarted.corruptions == 1 and restarted.bytes_used == 0
    assert await getattr(restarted, read)("ctx.safetensors") is None  # a plain miss now


async def test_an_object_written_before_checksums_is_served_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "legacy").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{} written by 0.3")
    (tmp_path / "legacy-empty").write_bytes(b"")
    tier = DiskTier(tmp_path)
    assert await tier.get("legacy") == b"\x10\x00\x00\x00\x00\x00\x00\x00{} written by 0.3"
    view = await tier.get_view("legacy")
    assert view is not None and bytes(view).endswith(b"written by 0.3")
    assert await tier.get("legacy-empty") == b"" and await tier.get_view("legacy-empty") == b""
    assert tier.corruptions == 0


async def test_retain_moves_an_expiry_later_never_earlier(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("short", b"x", ttl_s=0.3)
    await tier.put("long", b"x", ttl_s=3600)
    await tier.put("forever", b"x")
    assert await tier.retain("short", 3600)
    assert await tier.retain("long", 1)
    assert await tier.retain("forever", 1)
    assert not await tier.retain("missing", 1)
    await asyncio.sleep(0.5)
    assert await tier.keys() == ["forever", "long", "short"]
    assert tier._expires_at("long") > time.time() + 3000  # not shortened
    assert tier._expires_at("forever") is None  # no expiry stays none


async def test_retain_revives_an_object_whose_expiry_passed_unread(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    await tier.put("k", b"x", ttl_s=0.2)
    await asyncio.sleep(0.3)
    assert await tier.retain("k", 60)  # the record was extended meanwhile
    assert await tier.get("k") == b"x"


async def test_open_view_hands_the_map_out_while_its_checksum_runs(tmp_path: Path) -> None:
    """open_view: the bytes at once, `settled` the same view once they match; a damaged
    file's bytes are readable but `settled` raises, and the file is gone."""
    tier = DiskTier(tmp_path)
    data = os.urandom(3 * 4096 + 17)
    await tier.put("good", data)
    await tier.put("bad", data)
    flip_4k_in_the_middle(tmp_path / "bad")
    good = await tier.open_view("good")
    assert good is not None and bytes(good.data) == data
    assert await asyncio.wait_for(good.settled, 10) is good.data
    bad = await tier.open_view("bad")
    assert bad is not None and len(bad.data) == len(data) and bytes(bad.data) != data
    with pytest.raises(CorruptObjectError, match="do not match their checksum"):
        await asyncio.wait_for(bad.settled, 10)
    assert not (tmp_path / "bad").exists() and tier.corruptions == 1
    assert await tier.open_view("bad") is None
