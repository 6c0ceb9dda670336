"""``Ledger``: owns the SQL engine and the background writer that batches rows into it.

The callback path only calls :meth:`Ledger.record_packed`: a copy into the shared-memory ring the
writer process reads (:mod:`~langchain_tokenledger.ring`), or an append to an in-memory queue; no
I/O. One daemon thread per ledger drains the queue and hands the records to the writer process,
or prices them and writes them in multi-row, idempotent batches itself. A failed batch is
retried with backoff and kept in memory (bounded); what still cannot be written at
:meth:`Ledger.close` is saved to a JSON-lines file and reported loudly.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import marshal
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from .packing import pack_record, unpack_record, unpack_records, unpack_values
from .records import RECORD_FIELDS, UsageRecord, record_values
from .schema import create_schema
from .usage import usage_to_price
from .writers import BatchWriter, Price, Row, _as_datetime, _decimal, writer_for

if TYPE_CHECKING:
    from .handler import TokenLedgerHandler
    from .pricing import Pricer
    from .query import SummaryRow, When
    from .ring import Ring
    from .writer_process import WriterProcess

logger = logging.getLogger("langchain_tokenledger")

_Item = UsageRecord | bytes
"""What the queue holds: a record, or a call the handler packed (see packing.py)."""
_Prepared = tuple[list[_Item], list["Price"], "list[Row] | Exception"]
"""A batch on its way to the database: its items, their prices, and their rows (or why not)."""
_SLICE = 32  # records priced and serialized between two GIL releases (measured best)
_SEND_SLICE = 256  # packed records per frame to the writer process

DEFAULT_URL = "sqlite:///tokenledger.db"
URL_ENV = "TOKENLEDGER_URL"
WRITER_ENV = "TOKENLEDGER_WRITER"
WriterMode = Literal["process", "thread"]
"""Where rows are priced and written: a writer process (the default) or threads of this one."""

_DRIVER_DEFAULTS = {
    "postgresql": ("postgresql+psycopg", "postgres"),
    "postgres": ("postgresql+psycopg", "postgres"),
    "mysql": ("mysql+pymysql", "mysql"),
    "mariadb": ("mariadb+pymysql", "mysql"),
}
_EXTRAS = {"psycopg": "postgres", "pymysql": "mysql"}


class LedgerError(RuntimeError):
    """The ledger's database cannot be used (bad URL, missing driver, unreachable, ...)."""


def resolve_url(url: str | sa.URL | None = None) -> sa.URL:
    """The ledger URL: ``url``, else ``$TOKENLEDGER_URL``, else ``sqlite:///tokenledger.db``.

    A driverless ``postgresql://`` or ``mysql://`` gets the driver this package installs
    (psycopg 3, PyMySQL).

    Example:
        >>> resolve_url("postgresql://u@db/ledger").drivername
        'postgresql+psycopg'
    """
    raw = url if url is not None else os.environ.get(URL_ENV) or DEFAULT_URL
    try:
        parsed = sa.make_url(raw)
    except ArgumentError as exc:
        raise LedgerError(
            f"invalid ledger URL {raw!r}: expected e.g. sqlite:///usage.db or "
            "postgresql://user@host/db"
        ) from exc
    if parsed.drivername in _DRIVER_DEFAULTS:
        parsed = parsed.set(drivername=_DRIVER_DEFAULTS[parsed.drivername][0])
    return parsed


def _create_engine(url: sa.URL, engine_kwargs: Mapping[str, Any]) -> sa.Engine:
    kwargs: dict[str, Any] = dict(engine_kwargs)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if _is_memory_sqlite(url):
            kwargs.setdefault("poolclass", StaticPool)
        else:
            parent = Path(database).expanduser().resolve().parent
            if not parent.is_dir():
                raise LedgerError(f"cannot create ledger {database!r}: no directory {parent}")
        kwargs.setdefault("connect_args", {"check_same_thread": False})
    else:
        kwargs.setdefault("pool_pre_ping", True)
    try:
        engine = sa.create_engine(url, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as exc:
        extra = _EXTRAS.get(url.drivername.partition("+")[2], "")
        hint = f": pip install 'langchain-tokenledger[{extra}]'" if extra else ""
        raise LedgerError(f"no database driver for {url.drivername!r}{hint} ({exc})") from exc
    if url.get_backend_name() == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _is_memory_sqlite(url: sa.URL) -> bool:
    return url.get_backend_name() == "sqlite" and (
        (url.database or "") in ("", ":memory:") or url.query.get("mode") == "memory"
    )


def _memory_as_temp_file(url: sa.URL) -> tuple[sa.URL, Path | None]:
    """An in-memory SQLite ledger is backed by a temporary file, removed when it closes.

    One in-memory connection shared by the writer thread and readers would let a read roll
    back a batch being written; a file gives each its own connection, as for any ledger.
    """
    if not _is_memory_sqlite(url):
        return url, None
    tempdir = Path(tempfile.mkdtemp(prefix="tokenledger-"))
    return url.set(database=str(tempdir / "ledger.db"), query={}), tempdir


SQLITE_PAGE_SIZE = 16384
"""Page size of the SQLite ledgers this package creates (an existing file keeps its own): the
ledger's random-order indexes (user, session) cost a fifth to a quarter less to insert into with
16 KB pages and 32,000-row batches than with SQLite's 4 KB default and 8,000-row batches."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA page_size = {SQLITE_PAGE_SIZE}")  # only a new, empty file takes it
    cur.execute("PRAGMA busy_timeout = 10000")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.close()


_live: weakref.WeakSet[Ledger] = weakref.WeakSet()


def _new_ring() -> Ring | None:
    """A ring for a ledger the writer process opens; ``None`` where rings cannot be used."""
    from . import ring

    if not ring.available():
        return None
    try:
        return ring.Ring.create()
    except OSError as exc:
        logger.debug("no shared-memory ring (%r): records go through the pipe", exc)
        return None


def _after_fork_in_child() -> None:
    """A forked child (a ``gunicorn --preload`` worker, a ``multiprocessing`` fork) gets ledgers
    of its own: see :meth:`Ledger._after_fork`."""
    global _atexit_lock
    _atexit_lock = threading.Lock()  # perhaps held by a thread of the parent
    ledgers = [ledger for ledger in list(_live) if not ledger._closed]
    for ledger in ledgers:
        try:
            ledger._after_fork()
        except Exception:  # the child goes on; that ledger is left as it was
            logger.exception("%r: taking the ledger over in a forked child failed", ledger)
    util = sys.modules.get("multiprocessing.util")
    if ledgers and util is not None:
        # A multiprocessing child clears its finalizers, then runs these after-forkers.
        util.register_after_fork(_close_all, lambda _: _close_at_multiprocessing_exit())


def _close_at_multiprocessing_exit() -> None:
    """A ``multiprocessing`` child (fork, forkserver) ends with ``os._exit``, which skips
    ``atexit``: close the ledgers (flushing them) as it runs its finalizers instead."""
    global _finalizer_pid
    if _finalizer_pid == os.getpid():
        return
    process = sys.modules.get("multiprocessing.process")
    if process is None or process.parent_process() is None:
        return
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _close_all, exitpriority=10)
    _finalizer_pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
_atexit_lock = threading.Lock()
_atexit_registered = False
_finalizer_pid = 0  # the process whose multiprocessing finalizers close the ledgers


def _close_all() -> None:
    for ledger in list(_live):
        ledger.close()


class Ledger:
    """A SQL ledger of LLM calls: SQLite by default, PostgreSQL or MariaDB/MySQL at scale.

    Creating a ledger connects and creates the schema if missing, so a bad URL or an unreachable
    database fails here, not later inside a callback.

    Example:
        >>> ledger = Ledger("sqlite://")               # in memory; Ledger() reads $TOKENLEDGER_URL
        >>> ledger.record(UsageRecord(run_id="r1", model="gpt-4o-mini", input_tokens=3,
        ...                           output_tokens=2, total_tokens=5))
        >>> ledger.flush()
        >>> ledger.query("SELECT run_id, total_tokens FROM llm_calls")
        [{'run_id': 'r1', 'total_tokens': 5}]
        >>> ledger.close()

    Args:
        url: SQLAlchemy URL; default ``$TOKENLEDGER_URL``, else ``sqlite:///tokenledger.db``.
        prices: price overrides, a mapping or the path of a JSON/TOML price table (see README).
        batch_size: most rows per transaction; default 32,000 on SQLite (each commit rewrites
            every index page it touched: bigger batches write less per row), 2000 elsewhere.
        linger: seconds the writer waits for a batch to fill before writing (flush cuts it short).
        max_pending: most records held in this process's queue; past it :meth:`record` waits
            (back-pressure). The writer process's shared-memory ring, of a fixed 8 MiB, holds
            the others.
        fallback_dir: where rows that could not be written by :meth:`close` are saved.
        engine_kwargs: passed to :func:`sqlalchemy.create_engine`.
        writer: ``"process"`` (default; ``$TOKENLEDGER_WRITER`` can change it) prices and writes
            rows in a writer process shared by this process's ledgers, so that work does not
            take the GIL from the application; ``"thread"`` does it in threads of this process
            (also what a ledger falls back to when the writer process cannot run, and always
            with ``engine_kwargs``, which cannot be sent to another process).
    """

    def __init__(
        self,
        url: str | sa.URL | None = None,
        *,
        prices: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        batch_size: int | None = None,
        linger: float = 0.05,
        max_pending: int = 200_000,
        fallback_dir: str | os.PathLike[str] | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        writer: WriterMode | None = None,
    ) -> None:
        mode = writer or os.environ.get(WRITER_ENV) or "process"
        if mode not in ("process", "thread"):
            raise ValueError(f"writer must be 'process' or 'thread', not {mode!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if max_pending < (batch_size or 1):
            raise ValueError("max_pending must be at least batch_size")
        if linger < 0:
            raise ValueError("linger must not be negative")
        from .pricing import Pricer

        self.pricer: Pricer = Pricer(prices)
        self.url = resolve_url(url)
        engine_url, self._tempdir = _memory_as_temp_file(self.url)
        self.engine = _create_engine(engine_url, engine_kwargs or {})
        try:
            self._prepare_database()
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise LedgerError(
                f"cannot open ledger {self.url.render_as_string(hide_password=True)}: "
                f"{getattr(exc, 'orig', None) or exc}"
            ) from exc
        if batch_size is None:
            default = 32_000 if self.url.get_backend_name() == "sqlite" else 2000
            batch_size = min(default, max_pending)
        self.batch_size = batch_size
        self.linger = linger
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else Path.cwd()
        self._writer: BatchWriter = writer_for(self.engine)
        self.max_pending = max_pending
        self._closed = False
        self._closing_deadline = float("inf")
        self._handlers: weakref.WeakSet[TokenLedgerHandler] = weakref.WeakSet()
        # How the writer process opens this ledger (None: this process writes it).
        self._remote_plan: dict[str, Any] | None = None
        if mode == "process" and engine_kwargs is None:
            self._remote_plan = self._options_for_remote(engine_url, prices)
        self._start_writing()
        _live.add(self)
        _register_atexit()

    def _start_writing(self) -> None:
        """An empty queue, no writer threads yet (the first record starts them), and the
        writer process still to open: a new ledger's, and a forked child's (see
        :func:`_after_fork_in_child`)."""
        # The hot path appends under a plain lock (a C-level acquire, no Condition) and wakes
        # the writer only when it sleeps; flush() and back-pressure wait on _cv.
        self._items: deque[_Item] = deque()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._enqueued = 0
        self._done = 0
        self._executing = 0  # records of the batch the database is being sent right now
        self._writer_idle = False
        self._wake = threading.Event()
        self._flush_wanted = threading.Event()
        self._failing_since: float | None = None
        self._last_error: BaseException | None = None
        self._full_warned = False
        # Two threads: one prices and serializes batch N+1 (CPU, holds the GIL) while the
        # other waits on the database for batch N (GIL released); at most one batch between.
        self._prepared: queue.Queue[_Prepared | None] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._io_thread: threading.Thread | None = None
        # The writer process's side of the books: records it has, not yet confirmed written.
        self._remote: WriterProcess | None = None
        plan = self._remote_plan
        self._remote_options = dict(plan) if plan is not None else None  # until the 1st batch
        self._remote_key = 0
        self._unacked: deque[bytes] = deque()  # sent through the pipe, not confirmed
        self._pipe_acked = 0
        self._remote_acked = 0
        # Once the writer process has this ledger open, where the callback path puts its calls
        # (None: in the queue, for this process's writer thread).
        self._ring: Ring | None = None
        self._ring_put = 0  # records put in the ring, in all
        self._ring_acked = 0  # of those, confirmed written by the writer process
        self._remote_finished = threading.Event()

    def _start_threads(self) -> None:
        """Start the writer threads, once (on the first record: a ledger only read has none)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="tokenledger-writer", daemon=True
            )
            self._io_thread = threading.Thread(
                target=self._run_io, name="tokenledger-io", daemon=True
            )
            self._thread.start()
            self._io_thread.start()

    def _after_fork(self) -> None:
        """Make this ledger a forked child's own.

        The parent writes what it had queued, put in its ring or sent to its writer process:
        the child drops its copies of those (written twice, they would count twice where a
        replay is not the same row, and a queue copy could race the parent's). It keeps none
        of the parent's threads (gone), locks (perhaps held by one of them), database
        connections or writer process (speaking on them would interleave with the parent),
        and starts its own on its first record.
        """
        if self._ring is not None:
            with contextlib.suppress(BufferError, ValueError, OSError):  # left mapped: harmless
                self._ring.close()  # this process's mapping and descriptor only
        self._writer.abandon()
        self.engine.dispose(close=False)
        self._tempdir = None  # the parent removes it
        for handler in list(self._handlers):
            handler._after_fork()
        self._start_writing()

    _yield_between_slices = True
    """Whether the writer thread gives up the GIL between slices of a batch (in the
    application, for its threads' sake; the writer process has none and a short switch
    interval instead)."""

    def __repr__(self) -> str:
        return f"Ledger({self.url.render_as_string(hide_password=True)!r})"

    def _prepare_database(self) -> None:
        """Connect, and create the schema if it is missing."""
        create_schema(self.engine)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the hot path --------------------------------------------------------------------

    def record(self, record: UsageRecord) -> None:
        """Queue ``record`` for writing (no I/O; waits only when ``max_pending`` is reached)."""
        if self._closed:
            # Never lose a call: a record arriving after close() goes to the fallback file.
            error = LedgerError(f"{self!r} is closed; the record was saved to a fallback file")
            self._save_unwritten([record], error)
            raise error
        self._enqueue(record)

    def record_packed(self, packed: bytes) -> None:
        """Queue a record packed by :mod:`~langchain_tokenledger.packing` (as :meth:`record`).

        This is how :class:`~langchain_tokenledger.TokenLedgerHandler` hands over its calls.

        Example:
            >>> from langchain_tokenledger.packing import pack_record
            >>> ledger = Ledger("sqlite://")
            >>> ledger.record_packed(pack_record(UsageRecord(run_id="r1", total_tokens=5)))
            >>> ledger.flush()
            >>> ledger.query("SELECT run_id, total_tokens FROM llm_calls")
            [{'run_id': 'r1', 'total_tokens': 5}]
        """
        if self._ring is not None:
            with self._lock:
                ring = self._ring
                # Behind queued records only when the ring was full: the writer thread puts
                # those. (The ring's size bounds it: max_pending bounds the queue.)
                if ring is not None and not self._items and ring.put(packed):
                    self._enqueued += 1
                    self._ring_put += 1
                    return
        if self._closed:
            self.record(unpack_record(packed))
        else:
            self._enqueue(packed)

    def _enqueue(self, item: _Item) -> None:
        if self._enqueued - self._done - self._executing >= self.max_pending:
            self._wait_for_room()
        if self._thread is None:
            self._start_threads()
        with self._lock:
            self._enqueued += 1
            self._items.append(item)
        if self._writer_idle:
            self._wake.set()

    def _wait_for_room(self) -> None:
        if not self._full_warned:
            self._full_warned = True
            logger.warning(
                "%r: %d records waiting to be written; callers now wait for the writer",
                self,
                self.max_pending,
            )
        with self._cv:
            while self._enqueued - self._done - self._executing >= self.max_pending:
                if self._closed:
                    return
                self._cv.wait(0.1)

    def record_many(self, records: Sequence[UsageRecord]) -> None:
        """Queue several records (at once when there is room for all of them)."""
        self._extend(records)

    def _extend(self, items: Sequence[_Item]) -> None:
        if self._closed or self._enqueued - self._done + len(items) > self.max_pending:
            for item in items:
                if isinstance(item, UsageRecord):
                    self.record(item)
                else:
                    self.record_packed(item)
            return
        if self._thread is None:
            self._start_threads()
        with self._lock:
            self._enqueued += len(items)
            self._items.extend(items)
        if self._writer_idle:
            self._wake.set()

    # -- durability ----------------------------------------------------------------------

    @property
    def writer(self) -> WriterMode:
        """Where this ledger's rows are written now: ``"process"`` or ``"thread"``.

        Example:
            >>> Ledger("sqlite://", writer="thread").writer
            'thread'
        """
        remote = self._remote is not None or self._remote_options is not None
        return "process" if remote else "thread"

    @property
    def pending(self) -> int:
        """Records queued or being written, not yet committed.

        With the writer process, as of its last report: at most a quarter of a second old
        while records flow, exact once :meth:`flush` returns.
        """
        with self._lock:
            return self._enqueued - self._done

    def flush(self, timeout: float | None = None) -> None:
        """Block until every record queued so far is committed.

        Raises :class:`LedgerError` if ``timeout`` seconds pass first (the records stay queued
        and the writer keeps retrying).
        """
        with self._cv:
            target = self._enqueued
            if self._done >= target:
                return
            self._flush_wanted.set()
            self._wake.set()
            remote = self._remote if self._ring is not None else None
        if remote is not None:  # the writer process takes the ring's records now
            remote.send(("flush", self._remote_key))
        with self._cv:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._done < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise LedgerError(
                        f"{self!r}: {target - self._done} records not written after "
                        f"{timeout}s (last error: {self._last_error!r})"
                    )
                self._cv.wait(remaining if remaining is not None else 1.0)

    def close(self, timeout: float = 30.0) -> None:
        """Flush, stop the writer and release the engine. Safe to call twice.

        Records that cannot be written within ``timeout`` seconds are saved to a JSON-lines file
        in ``fallback_dir`` and reported with an error log.
        """
        if self._closed:
            return
        for handler in list(self._handlers):
            try:
                handler.close_in_flight()
            except Exception:  # closing must go on; the fault is logged
                logger.exception("%r: closing a handler's in-flight calls failed", self)
        self._closed = True
        self._closing_deadline = time.monotonic() + timeout
        self._flush_wanted.set()
        self._wake.set()
        deadline = time.monotonic() + timeout + 5
        thread, io_thread = self._thread, self._io_thread
        if thread is not None:
            thread.join(timeout + 5)
        self._close_remote(timeout)
        self._detach_ring()  # what a record_packed() racing with close() put there
        if io_thread is not None:
            io_thread.join(max(0.0, deadline - time.monotonic()))
        self._write_taken_back()
        self._writer.close()
        self.engine.dispose()
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
        _live.discard(self)

    def _close_remote(self, timeout: float) -> None:
        remote = self._remote
        if remote is None:
            return
        sent = remote.send(("close", self._remote_key, timeout))
        if sent and not self._remote_finished.wait(timeout + 5):
            self._remote_lost(f"the writer process did not close in {timeout + 5:.0f}s")
        remote.forget(self._remote_key)

    def _write_taken_back(self) -> None:
        """Write here what a writer process lost during close() had not confirmed."""
        rest = self._take_all()
        for start in range(0, len(rest), self.batch_size):
            self._write_until_done(*self._prepare(rest[start : start + self.batch_size]))

    # -- the writer thread ---------------------------------------------------------------

    def _take_batch(self) -> list[_Item] | None:
        """Block for the next batch; ``None`` once close() has been called and all is taken."""
        items = self._items
        while not items:
            if self._closed:
                return None
            # Announce the sleep, then look again: a record appended before the announcement
            # is seen here, one appended after it sets _wake (see record()).
            self._writer_idle = True
            if not items and not self._closed:
                self._wake.wait()
            self._wake.clear()
            self._writer_idle = False
        if len(items) < self.batch_size and not self._closed:
            self._flush_wanted.wait(self.linger)  # let a batch build up; flush/close cut it short
        popleft = items.popleft
        return [popleft() for _ in range(min(len(items), self.batch_size))]

    def _take_all(self) -> list[_Item]:
        """Everything still queued (no waiting: for the ends of close())."""
        rest: list[_Item] = []
        while self._items:
            rest.append(self._items.popleft())
        return rest

    def _run(self) -> None:
        try:
            while True:
                batch = self._take_batch()
                if batch is None:
                    self._drain_after_close()
                    return
                if not self._send_remote(batch):
                    self._prepared.put(self._prepare(batch))
        finally:
            self._prepared.put(None)

    def _prepare(self, items: list[_Item]) -> _Prepared:
        """Price and serialize ``items`` straight from their field values: a packed call is
        unpacked to its values only, never built into a record (a fifth of the writer's
        CPU per row)."""
        prices: list[Price] = []
        rows: list[Row] | Exception = []
        for start in range(0, len(items), _SLICE):
            part: list[Sequence[Any]] = [
                unpack_values(item) if isinstance(item, bytes) else record_values(item)
                for item in items[start : start + _SLICE]
            ]
            part_prices = self._price(part)
            prices += part_prices
            if isinstance(rows, list):
                try:
                    rows += self._writer.prepare_values(part, part_prices)
                except Exception as exc:  # a bug, not bad data (to_row never fails on a value)
                    logger.exception("%r: serializing %d rows failed", self, len(items))
                    rows = exc
            if self._yield_between_slices:
                # Pure Python holds the GIL until the interpreter forces a switch (5 ms): let a
                # thread that waits for it (the I/O thread between statements, the app) in now.
                time.sleep(0)
        return items, prices, rows

    def _run_io(self) -> None:
        while True:
            item = self._prepared.get()
            if item is None:
                return
            with self._cv:
                self._executing = len(item[0])
                self._cv.notify_all()  # that batch no longer counts against max_pending
            self._write_until_done(*item)

    def _price(self, part: list[Sequence[Any]]) -> list[Price]:
        pricer = self.pricer
        out: list[Price] = []
        for values in part:
            try:
                out.append(price_values(pricer, values))
            except Exception:  # pricing must never cost a row
                run_id = values[0]
                logger.exception("pricing failed for run %s; written unpriced", run_id)
                notes = [*values[_NOTES], "pricing_failed"]
                out.append((_decimal(values[_COST]), values[_SOURCE], notes))
        return out

    def _write_until_done(
        self, batch: list[_Item], prices: list[Price], rows: list[Row] | Exception
    ) -> None:
        self._execute_with_retry(batch, prices, rows)
        with self._cv:
            self._done += len(batch)
            self._executing = 0
            if self._done >= self._enqueued:
                self._flush_wanted.clear()
            self._cv.notify_all()

    def _is_data_error(self, exc: Exception) -> bool:
        """A fault of the rows themselves (a value the column refuses), not of the database."""
        dbapi = self.engine.dialect.dbapi
        kinds = tuple(
            k
            for k in (getattr(dbapi, "DataError", None), getattr(dbapi, "IntegrityError", None))
            if isinstance(k, type)
        )
        return bool(kinds) and isinstance(exc, kinds)

    def _execute_with_retry(
        self, batch: list[_Item], prices: list[Price], rows: list[Row] | Exception
    ) -> None:
        """Write ``rows`` until it works. Rows the database refuses as data are isolated by
        halving the batch, and only those are saved to the fallback file (the rest is written):
        one bad value never blocks the ledger."""
        attempt = 0
        while True:
            try:
                if isinstance(rows, Exception):
                    raise rows.with_traceback(None)
                self._writer.execute(rows)
            except Exception as exc:
                attempt += 1
                self._last_error = exc
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                if attempt == 1 or attempt % 10 == 0:
                    logger.warning(
                        "%r: writing %d rows failed (attempt %d), retrying: %r",
                        self,
                        len(batch),
                        attempt,
                        exc,
                    )
                refused = attempt >= 3 and not isinstance(rows, Exception)
                if refused and self._is_data_error(exc):
                    assert not isinstance(rows, Exception)
                    if len(batch) > 1:
                        half = len(batch) // 2
                        self._execute_with_retry(batch[:half], prices[:half], rows[:half])
                        self._execute_with_retry(batch[half:], prices[half:], rows[half:])
                    else:
                        self._save_priced(batch, prices, exc)
                    self._failing_since = None
                    return
                if self._closed and time.monotonic() >= self._closing_deadline:
                    self._save_priced(batch, prices, exc)
                    return
                time.sleep(min(0.05 * 2**attempt, 2.0))
                continue
            if self._failing_since is not None:
                logger.warning("%r: writes recovered after %d attempts", self, attempt + 1)
                self._failing_since = None
            return

    def _save_priced(self, batch: list[_Item], prices: list[Price], exc: BaseException) -> None:
        self._save_unwritten(
            [
                r.replace(cost_usd=cost, price_source=source, notes=notes)
                for r, (cost, source, notes) in zip(unpack_records(batch), prices, strict=True)
            ],
            exc,
        )

    def _drain_after_close(self) -> None:
        # Records appended by a record() call that raced with close().
        rest = self._take_all()
        for start in range(0, len(rest), self.batch_size):
            batch = rest[start : start + self.batch_size]
            if not self._send_remote(batch):
                self._prepared.put(self._prepare(batch))

    # -- the writer process (see writer_process.py) -------------------------------------

    def _options_for_remote(
        self, engine_url: sa.URL, prices: Mapping[str, Any] | str | os.PathLike[str] | None
    ) -> dict[str, Any] | None:
        """How the writer process opens this ledger; ``None`` if it cannot."""
        if isinstance(prices, Mapping):
            prices = dict(prices)
            try:
                marshal.dumps(prices)
            except ValueError:  # values only this process can hold: price here
                return None
        elif prices is not None:
            prices = str(Path(prices).resolve())
        if engine_url.get_backend_name() == "sqlite" and engine_url.database:
            # The writer process has its own working directory.
            engine_url = engine_url.set(database=str(Path(engine_url.database).resolve()))
        return {
            "poll": max(self.linger, 0.002),
            "url": engine_url.render_as_string(hide_password=False),
            "prices": prices,
            "batch_size": self.batch_size,
            "linger": min(self.linger, 0.005),
            "max_pending": 2**62,  # bounded here: only what max_pending admits is sent
            "fallback_dir": str(self.fallback_dir.resolve()),
            "shown_as": repr(self),
        }

    def _connect_remote(self) -> None:
        """Open this ledger in the writer process (on its first batch: a ledger that is only
        read never starts one)."""
        from .writer_process import WriterProcess

        options, self._remote_options = self._remote_options, None
        process = WriterProcess.shared()
        if options is None or process is None:
            return
        ring = _new_ring()
        if ring is not None:
            options["ring"] = ring.path
        key = process.open(self, options)
        if key is None:
            if ring is not None:
                ring.close()
            return
        with self._lock:
            self._remote, self._remote_key, self._ring = process, key, ring

    def _send_remote(self, items: list[_Item]) -> bool:
        """Hand ``items`` to the writer process; ``False`` if they must be written here."""
        if self._remote_options is not None:
            self._connect_remote()
        remote = self._remote
        if remote is None:
            return False
        packed = [item if isinstance(item, bytes) else pack_record(item) for item in items]
        key = self._remote_key
        with self._lock:
            if self._remote is None:
                return False
            ring = self._ring
            if ring is not None:  # the ring was full, or a record is too big for it: the rest
                put = ring.put
                count = len(packed)
                packed = [p for p in packed if not put(p)]
                self._ring_put += count - len(packed)
                if not packed and not self._flush_wanted.is_set() and not self._closed:
                    return True
            self._unacked.extend(packed)
        messages: list[tuple[Any, ...]] = [
            ("rows", key, packed[start : start + _SEND_SLICE])
            for start in range(0, len(packed), _SEND_SLICE)
        ]
        if self._flush_wanted.is_set() or self._closed:
            messages.append(("flush", key))
        remote.send(*messages)  # if the process is gone, _remote_lost has put them back
        return True

    def _remote_done(self, ring_count: int, pipe_count: int) -> None:
        """The writer process has committed (and released) ``ring_count`` records of the ring
        and ``pipe_count`` of those sent through the pipe, in all."""
        with self._cv:
            newly = ring_count + pipe_count - self._remote_acked
            if newly <= 0:
                return
            self._remote_acked = ring_count + pipe_count
            self._ring_acked = ring_count
            unacked = self._unacked
            for _ in range(min(pipe_count - self._pipe_acked, len(unacked))):
                unacked.popleft()
            self._pipe_acked = pipe_count
            self._done += newly
            if self._done >= self._enqueued:
                self._flush_wanted.clear()
            self._cv.notify_all()

    def _remote_log(self, level: int, message: str) -> None:
        logger.log(level, "%s", message)
        if level >= logging.WARNING and "recovered" not in message:
            self._last_error = LedgerError(message)

    def _remote_closed(self, ring_count: int, pipe_count: int) -> None:
        self._remote_done(ring_count, pipe_count)
        self._remote_finished.set()

    def _remote_lost(self, reason: str) -> None:
        """The writer process is gone: write what it had not confirmed here (idempotently)."""
        with self._cv:
            if self._remote is None:
                return
            self._remote = None
            back = list(self._unacked) + self._drop_ring()
            self._unacked = deque()
            self._items.extendleft(reversed(back))
            self._cv.notify_all()
        if not self._closed:
            logger.warning(
                "%r: %s; writing in this process (%d records taken back)", self, reason, len(back)
            )
        self._remote_finished.set()
        self._wake.set()

    def _remote_no_ring(self) -> None:
        """The writer process cannot open the ring: its records go through the pipe."""
        self._detach_ring()
        self._wake.set()  # for what the ring held

    def _detach_ring(self) -> None:
        """Stop using the ring; records in it the writer process did not release are queued
        here again (after close(): a record_packed() that raced with it)."""
        with self._cv:
            self._items.extendleft(reversed(self._drop_ring()))
            self._cv.notify_all()

    def _drop_ring(self) -> list[bytes]:
        """Close the ring; the records the writer process has not released, to write here.

        The process releases before it reports: records released and not reported are written,
        and records reported and not released (were it the other way) would be written twice;
        either way ``_done`` is set right (the caller holds the lock)."""
        ring, self._ring = self._ring, None
        if ring is None:
            return []
        back = ring.unreleased()
        self._done += self._ring_put - self._ring_acked - len(back)
        self._ring_put = self._ring_acked = 0
        ring.close()
        return back

    def _save_unwritten(self, batch: Sequence[UsageRecord], exc: BaseException) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = self.fallback_dir / f"tokenledger-unwritten-{stamp}-{os.getpid()}.jsonl"
        try:
            with path.open("a", encoding="utf-8") as f:
                for r in batch:
                    f.write(json.dumps(asdict(r), default=_json_default) + "\n")
            where = f"saved to {path}"
        except OSError as save_exc:
            where = f"and could not be saved ({save_exc!r})"
        logger.error(
            "%r: %d LLM call records could not be written (%r); %s",
            self,
            len(batch),
            exc,
            where,
        )

    # -- reading (see query.py) ----------------------------------------------------------

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Run one read-only SQL statement with bound ``:name`` parameters; rows as dicts.

        Writes and multiple statements are refused (:class:`~.query.QueryError`).

        Example:
            >>> sql = "SELECT COUNT(*) AS n FROM llm_calls WHERE model = :m"
            >>> ledger.query(sql, m="gpt-4o-mini")  # doctest: +SKIP
            [{'n': 0}]
        """
        from .query import run_query

        return run_query(self.engine, sql, params)

    def usage(self, run_id: str | Any) -> dict[str, dict[str, Any]]:
        """Per-model totals of every call under ``run_id`` (a root or any inner run).

        Returns the ``{model_name: {prompt_tokens, completion_tokens, total_tokens,
        successful_requests, total_cost, ...}}`` shape users build by hand today.

        Example:
            >>> ledger.usage(run_id)["gpt-4o-mini"]["total_tokens"]  # doctest: +SKIP
            42
        """
        from .query import usage_for_run

        return usage_for_run(self.engine, run_id)

    def summary(
        self,
        by: Sequence[str] | str = ("model",),
        *,
        since: When | None = None,
        until: When | None = None,
        tags: Iterable[str] | str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[SummaryRow]:
        """Totals grouped by ``by``; see :func:`langchain_tokenledger.query.summarize`.

        Example:
            >>> [(r["model"], r.cost_usd) for r in ledger.summary(since="7d")]  # doctest: +SKIP
            [('gpt-4o', Decimal('0.0125')), ('gpt-4o-mini', Decimal('0.00042'))]
        """
        from .query import summarize

        return summarize(self.engine, by=by, since=since, until=until, tags=tags, metadata=metadata)

    def to_pandas(self, sql: str | None = None, **params: Any) -> Any:
        """A ``pandas.DataFrame`` of ``llm_calls`` (or of ``sql``); needs the ``pandas`` extra.

        Example:
            >>> ledger.to_pandas().groupby("model")["cost_usd"].sum()  # doctest: +SKIP
        """
        from .query import to_pandas

        return to_pandas(self.engine, sql, params)

    def reprice(self, **filters: Any) -> Any:
        """Recompute ``cost_usd`` from ``usage_details`` with today's prices and overrides."""
        self.flush()
        from .reprice import reprice

        return reprice(self, **filters)


def price_record(pricer: Pricer, record: UsageRecord) -> UsageRecord:
    """``record`` with ``cost_usd``/``price_source`` filled, or the reason for none in ``notes``.

    The rules are :func:`price_of`'s.
    """
    cost, source, notes = price_of(pricer, record)
    if cost is record.cost_usd and source is record.price_source and notes is record.notes:
        return record
    return record.replace(cost_usd=cost, price_source=source, notes=notes)


def price_of(pricer: Pricer, record: UsageRecord) -> Price:
    """``(cost_usd, price_source, notes)`` of ``record``: what :func:`price_record` fills in.

    Rules: an LLM-cache hit costs 0; any other row is priced from
    :func:`langchain_tokenledger.usage.priced_usage` at the prices in force when the call
    started, or stays NULL (its notes say why). A record that already has a cost keeps it.
    (The writer thread prices with :func:`price_values`, on what the handler packed, and
    writes the price into the row without building a priced copy of the record.)

    Example:
        >>> from langchain_tokenledger.pricing import Pricer
        >>> price_of(Pricer(), UsageRecord(run_id="r1", cache_hit=True))[0]
        Decimal('0')
    """
    return price_values(pricer, record_values(record))


_COST, _SOURCE, _NOTES, _CACHE_HIT, _MODEL, _PROVIDER, _STARTED = (
    RECORD_FIELDS.index(name)
    for name in (
        "cost_usd",
        "price_source",
        "notes",
        "cache_hit",
        "model",
        "provider",
        "started_at",
    )
)


def price_values(pricer: Pricer, values: Sequence[Any]) -> Price:
    """:func:`price_of` from a record's field values in column order: those of
    :func:`~langchain_tokenledger.records.record_values`, or a packed record's (timestamps as
    POSIX floats or ISO text, the cost as text; see :mod:`~langchain_tokenledger.packing`).

    Example:
        >>> from langchain_tokenledger.pricing import Pricer
        >>> price_values(Pricer(), record_values(UsageRecord(run_id="r1", cost_usd=Decimal(2))))
        (Decimal('2'), None, [])
    """
    cost, notes = values[_COST], values[_NOTES]
    if cost is not None:
        return _decimal(cost), values[_SOURCE], notes
    if values[_CACHE_HIT]:
        return Decimal(0), pricer.version, notes
    usage = usage_to_price(values)  # read only: no copy
    if usage is None:
        return None, values[_SOURCE], notes
    when = _as_datetime(values[_STARTED])
    result = pricer.price(model=values[_MODEL], provider=values[_PROVIDER], usage=usage, when=when)
    if result.notes:
        notes = [*notes, *(n for n in result.notes if n not in notes)]
    return result.cost_usd, result.price_source, notes


def _json_default(value: Any) -> Any:
    if isinstance(value, (Decimal, datetime)):
        return str(value)
    return repr(value)


def _register_atexit() -> None:
    global _atexit_registered
    with _atexit_lock:
        if not _atexit_registered:
            atexit.register(_close_all)
            _atexit_registered = True
        _close_at_multiprocessing_exit()


_default: Ledger | None = None
_default_lock = threading.Lock()


def default_ledger() -> Ledger:
    """The process-wide ledger used when none is given (``$TOKENLEDGER_URL`` or SQLite).

    Example:
        >>> ledger = default_ledger()  # doctest: +SKIP
    """
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Ledger()
        return _default
