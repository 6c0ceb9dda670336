"""The shared-memory ring: records in order, wrapped at the end, and kept until released."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from langchain_tokenledger.ring import HEADER, Ring, available

pytestmark = pytest.mark.skipif(not available(), reason="rings need Linux on x86-64")


@pytest.fixture
def ring() -> Iterator[Ring]:
    """A ring with room for 256 bytes of records."""
    ring = Ring.create(HEADER + 256)
    yield ring
    ring.close()


def test_records_come_out_as_they_went_in(ring: Ring) -> None:
    assert ring.put(b"one") and ring.put(b"") and ring.put(b"three" * 10)
    records, end = ring.take()
    assert records == [b"one", b"", b"three" * 10]
    assert end == 8 + 8 + 56  # each record: its 4-byte length and itself, padded to 8
    assert ring.take() == ([], end)


def test_a_full_ring_refuses_until_the_writer_releases(ring: Ring) -> None:
    record = bytes(range(60))  # 64 bytes in the ring
    assert [ring.put(record) for _ in range(5)] == [True, True, True, True, False]
    records, end = ring.take()
    assert len(records) == 4
    assert not ring.put(record)  # taken is not released: the database may not have it yet
    ring.release(end)
    assert ring.put(record)


def test_a_record_that_would_cross_the_end_starts_again_at_the_start(ring: Ring) -> None:
    assert ring.put(b"a" * 100) and ring.put(b"b" * 100)  # 104 + 104 bytes: 48 left
    first, end = ring.take()
    ring.release(end)
    assert ring.put(b"c" * 60)  # 64 bytes do not fit in the last 48: skipped to offset 0
    records, end = ring.take()
    assert first + records == [b"a" * 100, b"b" * 100, b"c" * 60]
    assert end == 256 + 64  # positions keep growing past the end
    ring.release(end)
    assert ring.put(b"d" * 180) and ring.take()[0] == [b"d" * 180]


def test_a_record_bigger_than_the_ring_is_refused(ring: Ring) -> None:
    assert not ring.put(b"x" * 300)
    assert ring.put(b"small") and ring.take()[0] == [b"small"]


def test_unreleased_records_are_what_the_application_takes_back(ring: Ring) -> None:
    for name in (b"r1", b"r2", b"r3"):
        ring.put(name)
    records, _ = ring.take(limit=2)
    assert records == [b"r1", b"r2"]
    ring.release(8)  # r1 committed
    assert ring.unreleased() == [b"r2", b"r3"]  # r2 taken, not committed: it is taken back too
    assert ring.take() == ([b"r3"], 24)


def test_the_writer_process_opens_the_ring_by_its_path(ring: Ring) -> None:
    assert ring.path == f"/proc/{os.getpid()}/fd/{ring._fd}"
    reader = Ring.attach(ring.path)
    try:
        ring.put(b"shared")
        records, end = reader.take()
        assert records == [b"shared"]
        reader.release(end)
        assert ring.unreleased() == []
    finally:
        reader.close()


@pytest.mark.parametrize("size", [HEADER + 60, HEADER])
def test_a_ring_has_room_for_records(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 8, at least 128 bytes"):
        Ring.create(size)
