"""A shared-memory queue of packed records, from the application to its writer process.

With a pipe, a thread of the application must wake up to forward the records, and every wake-up
takes the GIL from the threads that make LLM calls: about 4 us per call in a tight ``invoke``
loop, more than the handler's own work. With a ring, the callback path copies its packed record
into memory the writer process reads on its own schedule, and the application runs no thread at
all while the ring has room.

Layout: a 64-byte header of unsigned 64-bit counters (``write`` position, set by the
application; ``released`` position, set by the writer process once what lies before it is
committed), then the data area. A record is a 4-byte length and its bytes, padded to 8 bytes; one
that would cross the end leaves a skip marker and starts again at offset 0. Positions only grow,
the offset is the position modulo the capacity, and the application reuses the bytes before
``released`` only: a record stays in the ring until the database has it, so if the writer process
dies the application takes back what it had not committed.

One producer (the ledger, under its lock) and one consumer (the writer process, under its own
lock). The producer writes a record's bytes, then its length, then the ``write`` position; the
consumer reads the ``write`` position, then what lies before it. That order is enough on x86-64,
whose stores are seen in order and whose aligned 8-byte stores are atomic; elsewhere
:func:`available` is false and the ledger uses the pipe.
"""

from __future__ import annotations

import mmap
import os
import platform
from collections.abc import Iterator

HEADER = 64
"""Bytes before the data area."""
DEFAULT_SIZE = 8 << 20
"""8 MiB: about 35,000 typical records, several seconds of a busy application's calls. Pages
are only used once touched."""
_SKIP = 0xFFFFFFFF
_WRITE, _RELEASED = 0, 1  # header slots


def available() -> bool:
    """Whether rings can be used on this machine (Linux on x86-64).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return (
        hasattr(os, "memfd_create")
        and platform.machine().lower() in ("x86_64", "amd64")
        and os.path.isdir(f"/proc/{os.getpid()}/fd")
    )


def _step(size: int) -> int:
    """Bytes a record of ``size`` bytes takes: its length, itself, padding to 8."""
    return (size + 11) & ~7


class Ring:
    """One ring, as the application (:meth:`create`) or the writer process (:meth:`attach`) sees it.

    Example:
        >>> ring = Ring.create(4096)
        >>> ring.put(b"first"), ring.put(b"second")
        (True, True)
        >>> records, end = ring.take()
        >>> records
        [b'first', b'second']
        >>> ring.release(end)
        >>> ring.unreleased()
        []
        >>> ring.close()
    """

    def __init__(self, memory: mmap.mmap, fd: int | None) -> None:
        self._memory = memory
        self._fd = fd  # the application's: the writer process opens the ring through it
        self.capacity = len(memory) - HEADER
        view = memoryview(memory)
        self._header = view[:HEADER].cast("Q")
        self._data = view[HEADER:]
        self._lengths = self._data.cast("I")  # a record's length is at offset // 4
        # The producer's state: the position it writes next (its copy of the header's, which
        # only it sets), that position's offset, and the offset up to which there is room.
        self._written = self._header[_WRITE]
        self._offset = self._written % self.capacity
        self._room = 0  # unknown: the first put looks
        self._read = self._header[_RELEASED]  # the consumer's cursor: taken, maybe not released

    @classmethod
    def create(cls, size: int | None = None) -> Ring:
        """A new ring of ``size`` bytes (default :data:`DEFAULT_SIZE`) in anonymous shared
        memory (the application's side)."""
        if size is None:
            size = DEFAULT_SIZE
        if size < HEADER + 64 or size % 8:
            raise ValueError("a ring's size must be a multiple of 8, at least 128 bytes")
        fd = os.memfd_create("tokenledger-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(memory, fd)

    @classmethod
    def attach(cls, path: str) -> Ring:
        """The ring at ``path`` (:attr:`path` of the application's ring), for the writer process."""
        with open(path, "r+b") as file:
            memory = mmap.mmap(file.fileno(), 0)
        return cls(memory, None)

    @property
    def path(self) -> str:
        """Where another process of this user opens the ring, while the application has it."""
        assert self._fd is not None, "only the creating process has the ring's descriptor"
        return f"/proc/{os.getpid()}/fd/{self._fd}"

    # -- the application's side ----------------------------------------------------------

    def put(self, record: bytes) -> bool:
        """Append ``record``; ``False`` if there is no room (the caller serializes puts)."""
        size = len(record)
        offset = self._offset
        stop = offset + ((size + 11) & ~7)
        if stop > self._room:
            return self._put_at_new_room(record)
        self._data[offset + 4 : offset + 4 + size] = record
        self._lengths[offset >> 2] = size
        self._offset = stop
        self._written = written = self._written + stop - offset
        self._header[_WRITE] = written
        return True

    def _put_at_new_room(self, record: bytes) -> bool:
        """:meth:`put` past the room last known free: look again, and wrap at the end."""
        step = _step(len(record))
        capacity = self.capacity
        free_end = self._header[_RELEASED] + capacity
        lap_start = self._written - self._offset
        if self._offset + step > capacity:  # it would cross the end: skip to the start
            if lap_start + capacity + step > free_end:
                return False
            if self._offset < capacity:
                self._lengths[self._offset >> 2] = _SKIP  # published with the next record
            lap_start += capacity
            self._written, self._offset = lap_start, 0
        self._room = min(capacity, free_end - lap_start)
        if self._offset + step > self._room:
            return False
        return self.put(record)

    def unreleased(self) -> list[bytes]:
        """The records the writer process has not released: what it may not have committed."""
        return [record for _, record in self._walk(self._header[_RELEASED], self._written)]

    # -- the writer process's side -------------------------------------------------------

    def take(self, limit: int | None = None) -> tuple[list[bytes], int]:
        """The records put since the last take (at most ``limit``), and the position after them."""
        end = self._header[_WRITE]
        records: list[bytes] = []
        position = self._read
        for after, record in self._walk(position, end):
            records.append(record)
            position = after
            if limit is not None and len(records) >= limit:
                break
        else:
            position = end
        self._read = position
        return records, position

    def release(self, position: int) -> None:
        """Give the bytes before ``position`` back to the application (they are committed)."""
        self._header[_RELEASED] = position

    def close(self) -> None:
        """Unmap the ring (and close the application's descriptor)."""
        self._header.release()
        self._lengths.release()
        self._data.release()
        self._memory.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- both ----------------------------------------------------------------------------

    def _walk(self, position: int, end: int) -> Iterator[tuple[int, bytes]]:
        """``(position after it, record)`` for each record from ``position`` to ``end``."""
        capacity = self.capacity
        data = self._data
        lengths = self._lengths
        while position < end:
            offset = position % capacity
            size = lengths[offset >> 2]
            if size == _SKIP:
                position += capacity - offset
                continue
            position += (size + 11) & ~7
            yield position, bytes(data[offset + 4 : offset + 4 + size])
