"""``Ledger``: owns the SQL engine and the background writer that batches rows into it.

The callback path only calls :meth:`Ledger.record` (a queue put). One daemon thread per ledger
drains the queue, prices the records, and writes them in multi-row, idempotent batches. A failed
batch is retried with backoff and kept in memory (bounded); what still cannot be written at
:meth:`Ledger.close` is saved to a JSON-lines file and reported loudly.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from .records import UsageRecord
from .schema import create_schema
from .writers import BatchWriter, writer_for

if TYPE_CHECKING:
    from .pricing import Pricer

logger = logging.getLogger("langchain_tokenledger")

DEFAULT_URL = "sqlite:///tokenledger.db"
URL_ENV = "TOKENLEDGER_URL"

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
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout = 10000")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.close()


_live: weakref.WeakSet[Ledger] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_registered = False


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
        batch_size: most rows per insert.
        linger: seconds the writer waits for a batch to fill before writing (flush cuts it short).
        max_pending: most records held in memory; past it :meth:`record` waits (back-pressure).
        fallback_dir: where rows that could not be written by :meth:`close` are saved.
        engine_kwargs: passed to :func:`sqlalchemy.create_engine`.
    """

    def __init__(
        self,
        url: str | sa.URL | None = None,
        *,
        prices: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        batch_size: int = 2000,
        linger: float = 0.05,
        max_pending: int = 200_000,
        fallback_dir: str | os.PathLike[str] | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if max_pending < batch_size:
            raise ValueError("max_pending must be at least batch_size")
        if linger < 0:
            raise ValueError("linger must not be negative")
        from .pricing import Pricer

        self.pricer: Pricer = Pricer(prices)
        self.url = resolve_url(url)
        self.engine = _create_engine(self.url, engine_kwargs or {})
        try:
            create_schema(self.engine)
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise LedgerError(
                f"cannot open ledger {self.url.render_as_string(hide_password=True)}: "
                f"{getattr(exc, 'orig', None) or exc}"
            ) from exc
        self.batch_size = batch_size
        self.linger = linger
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else Path.cwd()
        self._writer: BatchWriter = writer_for(self.engine)
        self._queue: queue.Queue[UsageRecord | None] = queue.Queue(maxsize=max_pending)
        self._cv = threading.Condition()
        self._enqueued = 0
        self._done = 0
        self._flush_wanted = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._closing_deadline = float("inf")
        self._failing_since: float | None = None
        self._last_error: BaseException | None = None
        self._full_warned = False
        self._thread = threading.Thread(
            target=self._run, name="tokenledger-writer", daemon=True
        )
        self._thread.start()
        _live.add(self)
        _register_atexit()

    def __repr__(self) -> str:
        return f"Ledger({self.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the hot path --------------------------------------------------------------------

    def record(self, record: UsageRecord) -> None:
        """Queue ``record`` for writing (no I/O; waits only when ``max_pending`` is reached)."""
        if self._closed:
            raise LedgerError(f"{self!r} is closed")
        with self._cv:
            self._enqueued += 1
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            if not self._full_warned:
                self._full_warned = True
                logger.warning(
                    "%r: %d records waiting to be written; callers now wait for the writer",
                    self,
                    self._queue.maxsize,
                )
            self._queue.put(record)

    def record_many(self, records: Sequence[UsageRecord]) -> None:
        """Queue several records."""
        for r in records:
            self.record(r)

    # -- durability ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records queued or being written, not yet committed."""
        with self._cv:
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
        self._closed = True
        self._closing_deadline = time.monotonic() + timeout
        self._flush_wanted.set()
        self._queue.put(None)
        self._thread.join(timeout + 5)
        self._writer.close()
        self.engine.dispose()
        _live.discard(self)

    # -- the writer thread ---------------------------------------------------------------

    def _take_batch(self) -> list[UsageRecord] | None:
        """Block for the next batch; ``None`` once close() has been called and all is taken."""
        item = self._queue.get()
        if item is None:
            return None
        batch = [item]
        deadline = time.monotonic() + self.linger
        while len(batch) < self.batch_size:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                if self._flush_wanted.is_set() or self._closed:
                    break
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=wait)
                except queue.Empty:
                    break
            if nxt is None:
                self._queue.put(None)  # seen again after this batch: the stop signal
                break
            batch.append(nxt)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                self._drain_after_close()
                return
            self._write_until_done(batch)

    def _price(self, batch: list[UsageRecord]) -> list[UsageRecord]:
        out: list[UsageRecord] = []
        for r in batch:
            try:
                out.append(price_record(self.pricer, r))
            except Exception:  # pricing must never cost a row
                logger.exception("pricing failed for run %s; written unpriced", r.run_id)
                out.append(r.replace(notes=[*r.notes, "pricing_failed"]))
        return out

    def _write_until_done(self, batch: list[UsageRecord]) -> None:
        batch = self._price(batch)
        attempt = 0
        while True:
            try:
                self._writer.write(batch)
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
                if self._closed and time.monotonic() >= self._closing_deadline:
                    self._save_unwritten(batch, exc)
                    break
                time.sleep(min(0.05 * 2**attempt, 2.0))
                continue
            if self._failing_since is not None:
                logger.warning("%r: writes recovered after %d attempts", self, attempt + 1)
                self._failing_since = None
            break
        with self._cv:
            self._done += len(batch)
            if self._done >= self._enqueued:
                self._flush_wanted.clear()
            self._cv.notify_all()

    def _drain_after_close(self) -> None:
        rest: list[UsageRecord] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                rest.append(item)
        for start in range(0, len(rest), self.batch_size):
            self._write_until_done(rest[start : start + self.batch_size])

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
        """Run a read-only SQL statement with bound parameters; rows as dicts.

        Example:
            >>> ledger.query("SELECT COUNT(*) AS n FROM llm_calls WHERE model = :m", m="x")  # doctest: +SKIP
            [{'n': 0}]
        """
        from .query import run_query

        return run_query(self.engine, sql, params)

    def usage(self, run_id: str | Any) -> dict[str, dict[str, Any]]:
        """Per-model totals of every call under ``run_id`` (a root or any inner run).

        Returns the ``{model_name: {prompt_tokens, completion_tokens, total_tokens,
        successful_requests, total_cost, ...}}`` shape users build by hand today.
        """
        from .query import usage_for_run

        return usage_for_run(self.engine, str(run_id))

    def summary(self, by: Sequence[str] | str = ("model",), **filters: Any) -> list[Any]:
        """Grouped totals; see :func:`langchain_tokenledger.query.summarize`."""
        from .query import summarize

        return summarize(self.engine, by=by, **filters)

    def to_pandas(self, sql: str | None = None, **params: Any) -> Any:
        """A ``pandas.DataFrame`` of ``llm_calls`` (or of ``sql``); needs the ``pandas`` extra."""
        from .query import to_pandas

        return to_pandas(self.engine, sql, params)

    def reprice(self, **filters: Any) -> Any:
        """Recompute ``cost_usd`` from ``usage_details`` with today's prices and overrides."""
        self.flush()
        from .reprice import reprice

        return reprice(self, **filters)


def price_record(pricer: Pricer, record: UsageRecord) -> UsageRecord:
    """``record`` with ``cost_usd``/``price_source`` filled, or the reason for none in ``notes``.

    Rules: an LLM-cache hit costs 0; a row with provider usage is priced from ``usage_details``
    (so tier and cache details count); an estimated row from its token columns; a row with
    unknown usage stays NULL (its ``usage_unknown`` note says why).
    """
    if record.cost_usd is not None:
        return record
    if record.cache_hit:
        return record.replace(cost_usd=Decimal(0), price_source=pricer.version)
    if record.usage_source == "none" or record.input_tokens is None:
        return record
    usage: Mapping[str, Any]
    if record.usage_source == "provider" and record.usage_details:
        usage = record.usage_details
    else:
        usage = {
            "input_tokens": record.input_tokens,
            "output_tokens": record.output_tokens or 0,
            "total_tokens": record.total_tokens or 0,
        }
    result = pricer.price(model=record.model, provider=record.provider, usage=usage)
    notes = record.notes
    if result.notes:
        notes = [*notes, *(n for n in result.notes if n not in notes)]
    return record.replace(cost_usd=result.cost_usd, price_source=result.price_source, notes=notes)


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
