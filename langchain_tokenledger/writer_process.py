"""The writer process: prices, serializes and writes the ledger's rows outside the application.

Pricing a record, turning it into a row and inserting it costs tens of microseconds of CPU per
LLM call. In a thread of the application's own interpreter that CPU holds the GIL the
application needs, so every call pays for it. Instead, each process runs one writer process
(started on first use, shared by its ledgers): the ledger's thread only forwards the records as
the handler packed them (:mod:`~langchain_tokenledger.packing`), in ``marshal`` frames, and the
writer process does the rest on another core, with the same code a thread-mode ledger runs
(:class:`~langchain_tokenledger.Ledger` with ``writer="thread"``).

Where shared memory can be used (:mod:`~langchain_tokenledger.ring`), the records do not go
through a thread of the application at all: the callback path puts them in a ring the writer
process reads every ``linger`` seconds (and at once on a flush). The pipe then carries only what
did not fit in the ring.

Nothing is lost when the writer process is: a record counts as written only once the process
reports it committed (a ring's records stay in the ring until then), and if the process dies the
ledger takes every record it has not confirmed back and writes it itself (writes are idempotent
on ``run_id``).

Protocol: length-prefixed ``marshal`` frames, tuples of plain values.

* to the process: ``("open", key, options)`` (``options["ring"]``: the ring's path, if any),
  ``("rows", key, [packed record, ...])``, ``("flush", key)``, ``("close", key, timeout)``
* from it: ``("done", key, ring_count, pipe_count)`` (records of that ledger committed or saved
  so far, from the ring and from the pipe), ``("log", key, level, message)``,
  ``("lost", key, reason)``, ``("noring", key)`` (the ring could not be opened: send through
  the pipe), ``("closed", key, ring_count, pipe_count)``
"""

from __future__ import annotations

import contextlib
import gc
import logging
import marshal
import os
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from .ring import Ring
from .store import Ledger

logger = logging.getLogger("langchain_tokenledger")

_HEADER = struct.Struct("<I")
REPORT_EVERY = 0.25
"""Seconds between reports of progress nobody waits for (see ``_ChildLedger.confirm``)."""
Message = tuple[Any, ...]
_abandoned: list[WriterProcess] = []
"""A forked child's copies of its parent's writer process handle."""


# -- frames ----------------------------------------------------------------------------------


def _write_frame(stream: IO[bytes], *messages: Message) -> None:
    """Write ``messages`` in one system call (each one is a thread switch in the application)."""
    parts: list[bytes] = []
    for message in messages:
        data = marshal.dumps(message)
        parts += (_HEADER.pack(len(data)), data)
    stream.write(b"".join(parts))
    stream.flush()


def _read_frame(stream: IO[bytes]) -> Message | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    message = marshal.loads(data)
    assert isinstance(message, tuple)
    return message


# -- the application's side ------------------------------------------------------------------


class Channel(Protocol):
    """What the writer process reports back to a ledger (implemented by ``Ledger``)."""

    def _remote_done(self, ring_count: int, pipe_count: int) -> None: ...

    def _remote_log(self, level: int, message: str) -> None: ...

    def _remote_lost(self, reason: str) -> None: ...
    def _remote_no_ring(self) -> None: ...

    def _remote_closed(self, ring_count: int, pipe_count: int) -> None: ...


class WriterProcess:
    """The application's handle on its writer process: one per process, shared by ledgers.

    Example:
        >>> process = WriterProcess.shared()  # doctest: +SKIP
    """

    _shared: WriterProcess | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_parent, env.get("PYTHONPATH", "")) if p
        )
        self.pid = os.getpid()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "langchain_tokenledger.writer_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for the application must not stop writes
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin = self._proc.stdin
        self._stdout = self._proc.stdout
        self._send_lock = threading.Lock()
        self._channels: dict[int, weakref.ReferenceType[Channel]] = {}
        self._next_key = 1
        self._alive = True
        self._reader = threading.Thread(
            target=self._read, name="tokenledger-writer-process", daemon=True
        )
        self._reader.start()

    @classmethod
    def shared(cls) -> WriterProcess | None:
        """This process's writer process, started on first use; ``None`` if it cannot run."""
        with cls._shared_lock:
            current = cls._shared
            if current is None or not current._alive or current.pid != os.getpid():
                try:
                    current = cls._shared = cls()
                except (OSError, ValueError) as exc:
                    logger.warning(
                        "langchain-tokenledger: no writer process (%r); writing in threads", exc
                    )
                    return None
            return current

    @property
    def process_id(self) -> int:
        """The writer process's pid."""
        return self._proc.pid

    def open(self, channel: Channel, options: dict[str, Any]) -> int | None:
        """Open a ledger in the process; its key, or ``None`` if the process is gone."""
        with self._send_lock:
            key = self._next_key
            self._next_key += 1
            self._channels[key] = weakref.ref(channel)
        if not self.send(("open", key, options)):
            self._channels.pop(key, None)
            return None
        return key

    def send(self, *messages: Message) -> bool:
        """Send messages, in one write; ``False`` if the process is gone."""
        if not self._alive:
            return False
        try:
            with self._send_lock:
                _write_frame(self._stdin, *messages)
        except (OSError, ValueError):  # a broken pipe, or a pipe closed by the reader
            self._lose("the writer process stopped reading")
            return False
        return True

    def forget(self, key: int) -> None:
        """Stop routing messages for ``key`` (its ledger closed)."""
        self._channels.pop(key, None)

    def _read(self) -> None:
        try:
            while True:
                message = _read_frame(self._stdout)
                if message is None:
                    break
                self._dispatch(message)
        except Exception:
            logger.exception("langchain-tokenledger: reading from the writer process failed")
        code = self._proc.poll()
        self._lose(f"the writer process ended (exit code {code})")

    def _dispatch(self, message: Message) -> None:
        kind, key = message[0], message[1]
        ref = self._channels.get(key) if key is not None else None
        channel = ref() if ref is not None else None
        if kind == "log":
            if channel is not None:
                channel._remote_log(message[2], message[3])
            else:
                logger.log(message[2], "%s", message[3])
        elif channel is None:
            return
        elif kind == "done":
            channel._remote_done(message[2], message[3])
        elif kind == "closed":
            self._channels.pop(key, None)
            channel._remote_closed(message[2], message[3])
        elif kind == "noring":
            channel._remote_no_ring()
        elif kind == "lost":
            self._channels.pop(key, None)
            channel._remote_lost(message[2])

    def _abandon(self) -> None:
        """In a forked child: stop using the parent's pipes, without flushing or closing the
        file objects (their buffers may hold half a frame of the parent's): /dev/null now
        stands behind their descriptors."""
        self._alive = False
        self._channels = {}
        null = os.open(os.devnull, os.O_RDWR)
        try:
            for stream in (self._stdin, self._stdout):
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(null, stream.fileno())
        finally:
            os.close(null)
        _abandoned.append(self)  # never collected here: its Popen must not wait for the process

    def _lose(self, reason: str) -> None:
        with self._send_lock:
            if not self._alive:
                return
            self._alive = False
            channels = list(self._channels.values())
            self._channels.clear()
        with contextlib.suppress(OSError):
            self._stdin.close()
        for ref in channels:
            channel = ref()
            if channel is not None:
                channel._remote_lost(reason)


def _after_fork_in_child() -> None:
    """A forked child starts its own writer process: it must not write into its parent's pipe
    (the frames would interleave), nor keep it open (the process would not see the parent
    exit)."""
    WriterProcess._shared_lock = threading.Lock()  # perhaps held by a thread of the parent
    inherited, WriterProcess._shared = WriterProcess._shared, None
    if inherited is not None:
        inherited._abandon()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the writer process ----------------------------------------------------------------------


class _ChildLedger(Ledger):
    """The writer process's thread-mode ledger for one of the application's ledgers: it takes
    records from the application's ring and pipe, and reports its progress back."""

    # A time.sleep(0) costs ~0.1 ms here (a system call); with no application threads to let
    # in, the process's short switch interval hands the GIL to the I/O thread soon enough.
    _yield_between_slices = False

    def __init__(
        self,
        key: int,
        report: Callable[[Message], None],
        shown_as: str,
        ring: str | None = None,
        poll: float = 0.05,
        **options: Any,
    ) -> None:
        self.key = key
        self.report = report
        self.shown_as = shown_as
        self._source: Ring | None = None
        if ring is not None:
            try:
                self._source = Ring.attach(ring)
            except (OSError, ValueError) as exc:  # a sandbox without /proc/<pid>/fd, say
                note = f"{shown_as}: no shared-memory ring ({exc!r}); records come by the pipe"
                report(("log", key, logging.INFO, note))
                report(("noring", key))
        # Taken records in order, each intake as (records enqueued after it, ring position
        # after it, ring records taken, pipe records taken): once the ledger has written as
        # many records as a mark's first figure, everything the mark counts is committed.
        self._intake_lock = threading.Lock()
        self._marks: deque[tuple[int, int, int, int]] = deque()
        self._ring_end = self._ring_taken = self._pipe_taken = 0
        self._confirmed = (0, 0)  # ring and pipe records committed and released, in all
        self._reported = (0, 0)
        self._reported_at = 0.0
        self._flush_asked = False  # until all taken so far is reported
        self._stop_pulling = threading.Event()
        super().__init__(**options, writer="thread")
        self._puller: threading.Thread | None = None
        if self._source is not None:
            self._puller = threading.Thread(
                target=self._pull_every, args=(poll,), name="tokenledger-ring", daemon=True
            )
            self._puller.start()

    def take_rows(self, rows: list[bytes]) -> None:
        """Queue records that came through the pipe."""
        with self._intake_lock:
            self._extend(rows)
            self._pipe_taken += len(rows)
            self._mark()

    def pull(self) -> None:
        """Queue the records put in the ring since the last pull."""
        with self._intake_lock:
            if self._source is None or self._stop_pulling.is_set():
                return
            records, self._ring_end = self._source.take()
            if records:
                self._extend(records)
                self._ring_taken += len(records)
                self._mark()

    def flush_asked(self) -> None:
        """The application waits on a flush: take the ring's records and write them now."""
        self.pull()
        with self._intake_lock:
            self._flush_asked = True
        self._flush_wanted.set()
        self._wake.set()
        if self.pending == 0:  # nothing for the writer: the application is told now
            self.confirm()

    def _mark(self) -> None:
        with self._lock:
            enqueued = self._enqueued
        self._marks.append((enqueued, self._ring_end, self._ring_taken, self._pipe_taken))

    def _pull_every(self, poll: float) -> None:
        while not self._stop_pulling.wait(poll):
            try:
                self.pull()
                self.confirm()  # progress not reported for a while
            except Exception:  # logged to the application; the next pull tries again
                logger.exception("%r: taking records from the ring failed", self)

    def stop_pulling(self) -> None:
        """Take what the ring holds one last time (before :meth:`close`)."""
        self.pull()
        self._stop_pulling.set()
        if self._puller is not None:
            self._puller.join()

    def close_ring(self) -> None:
        """Unmap the ring (after :meth:`close`)."""
        with self._intake_lock:
            source, self._source = self._source, None
        if source is not None:
            source.close()

    @property
    def taken(self) -> tuple[int, int]:
        """Records taken from the ring and from the pipe, in all."""
        return self._ring_taken, self._pipe_taken

    def __repr__(self) -> str:
        return self.shown_as

    def _prepare_database(self) -> None:
        """Nothing: the application's ledger created the schema (and a second creation could
        race with what the application does to its database meanwhile)."""

    def _write_until_done(self, batch: Any, prices: Any, rows: Any) -> None:
        super()._write_until_done(batch, prices, rows)
        self.confirm()

    def confirm(self) -> None:
        """Release what is committed, and tell the application so if it waits (a flush), if
        it keeps pipe records for it, or every :data:`REPORT_EVERY` seconds: each report wakes
        a thread of the application, and in between its figures only grow stale."""
        with self._intake_lock:
            done = self._done
            last = None
            while self._marks and self._marks[0][0] <= done:
                last = self._marks.popleft()
            pipe_news = False
            if last is not None:
                _, end, ring_count, pipe_count = last
                if self._source is not None:
                    self._source.release(end)
                pipe_news = pipe_count > self._confirmed[1]
                self._confirmed = ring_count, pipe_count
            now = time.monotonic()
            due = self._confirmed != self._reported and now - self._reported_at >= REPORT_EVERY
            if not (self._flush_asked or pipe_news or due):
                return
            if self._confirmed == (self._ring_taken, self._pipe_taken):
                self._flush_asked = False  # what the flush waits for is all in this report
            self._reported_at = now
            confirmed = self._reported = self._confirmed
        self.report(("done", self.key, *confirmed))


class _Forward(logging.Handler):
    """Sends the process's log records to the application, which logs them as its own."""

    def __init__(self, report: Callable[[Message], None]) -> None:
        super().__init__(logging.DEBUG)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message = f"{message}: {record.exc_info[1]!r}"
            owner = record.args[0] if isinstance(record.args, tuple) and record.args else None
            self.report(("log", getattr(owner, "key", None), record.levelno, message))
        except Exception:
            self.handleError(record)


def main() -> None:
    """The writer process: serve ledgers until the application closes our input."""
    # marshal frames own the real stdout; a stray print() goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    source = sys.stdin.buffer
    lock = threading.Lock()

    def report(message: Message) -> None:
        try:
            with lock:
                _write_frame(out, message)
        except (OSError, ValueError):
            pass  # the application is gone; its ledgers are closed below

    log = logging.getLogger("langchain_tokenledger")
    log.addHandler(_Forward(report))
    log.setLevel(logging.DEBUG)
    log.propagate = False
    ledgers: dict[int, _ChildLedger] = {}
    # A process that only allocates short-lived records: keep the modules out of every
    # collection, and collect the young generation less often.
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    # The I/O thread, back from SQLite or PostgreSQL with the GIL released, waits at most this
    # long for the thread that prices and serializes (default 5 ms, a third of a statement).
    sys.setswitchinterval(0.0005)
    while True:
        message = _read_frame(source)
        if message is None:
            break
        kind, key = message[0], message[1]
        try:
            if kind == "rows":
                ledgers[key].take_rows(message[2])
            elif kind == "flush":
                ledgers[key].flush_asked()
            elif kind == "open":
                ledgers[key] = _ChildLedger(key, report, **message[2])
            elif kind == "close":
                ledger = ledgers.pop(key)
                ledger.stop_pulling()
                ledger.close(timeout=message[2])
                ledger.close_ring()
                report(("closed", key, *ledger.taken))
        except Exception as exc:
            log.exception("writer process: %s failed", kind)
            failed = ledgers.pop(key, None)
            if failed is not None:  # the application writes what it had not confirmed again
                threading.Thread(target=failed.close, daemon=True).start()
            report(("lost", key, f"{kind} failed in the writer process: {exc!r}"))
    for ledger in ledgers.values():  # the application is gone: what its rings hold is still here
        ledger.stop_pulling()
        ledger.close()


if __name__ == "__main__":
    main()
