"""Batch writers: records -> rows -> idempotent multi-row inserts, one transaction per batch.

Each writer owns one raw DBAPI connection (used by the ledger's writer thread only) and the
fastest idempotent path its database offers: SQLite ``INSERT .. ON CONFLICT DO NOTHING`` with
many rows per statement, PostgreSQL ``COPY`` into a temporary table then ``INSERT .. ON CONFLICT
DO NOTHING``, MariaDB/MySQL a multi-row ``INSERT .. ON DUPLICATE KEY UPDATE``. A replayed
record (same ``run_id``) never creates a second row.

Serialization is the writer's main CPU cost and it holds the GIL, so it competes with the
application's own threads: rows are built from one C-level attribute fetch, the price is written
into the row (no priced copy of the record), JSON columns go through orjson when it is installed
(langchain-core brings it on CPython) or a prebuilt stdlib C encoder, and timestamps and costs
take the cheapest exact conversion.
"""

from __future__ import annotations

import contextlib
import json
import json.encoder
import logging
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from itertools import chain
from operator import attrgetter
from typing import Any, Protocol

import sqlalchemy as sa

from .records import RECORD_FIELDS, UsageRecord
from .schema import llm_calls

logger = logging.getLogger("langchain_tokenledger")

Row = list[Any]
Price = tuple[Decimal | None, str | None, list[str]]
"""``(cost_usd, price_source, notes)`` of a record, as the writer thread computes it."""

_COLUMNS = ", ".join(RECORD_FIELDS)
_UTC = timezone.utc
_STRING_LIMITS = {
    c.name: c.type.length
    for c in llm_calls.columns
    if isinstance(c.type, sa.String) and c.type.length and c.name != "run_id"
}
_CLIP_CHECKS = tuple((RECORD_FIELDS.index(name), limit) for name, limit in _STRING_LIMITS.items())
_all_values = attrgetter(*RECORD_FIELDS)

_COST = RECORD_FIELDS.index("cost_usd")
_PRICE_SOURCE = RECORD_FIELDS.index("price_source")
_NOTES = RECORD_FIELDS.index("notes")
_STARTED = RECORD_FIELDS.index("started_at")
_ENDED = RECORD_FIELDS.index("ended_at")
_JSON_COLUMNS = tuple(
    (RECORD_FIELDS.index(name), empty)
    for name, empty in (
        ("usage_details", "{}"),
        ("tags", "[]"),
        ("metadata", "{}"),
        ("notes", "[]"),
    )
)


class BatchWriter(Protocol):
    """Writes batches of records in one transaction each, skipping run_ids already stored.

    Writing has two halves so that the ledger can overlap them: :meth:`prepare` turns records
    into rows (pure CPU, holds the GIL), :meth:`execute` sends rows to the database (mostly
    waiting on it, GIL released) and may be retried with the same rows. ``prices`` (one per
    record) is what the writer thread priced them at; ``None`` writes the records' own
    ``cost_usd``/``price_source``/``notes``.
    """

    def prepare(
        self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None
    ) -> list[Row]: ...

    def execute(self, rows: list[Row]) -> None: ...

    def write(
        self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None
    ) -> None: ...

    def close(self) -> None: ...


def _stdlib_dumps() -> Callable[[Any], str]:
    """Compact JSON (non-ASCII kept, unknown objects as ``str``) from a prebuilt C encoder.

    ``json.dumps`` with any option builds a new encoder on every call, which costs more than
    encoding a small dict.
    """
    stdlib = json.JSONEncoder(separators=(",", ":"), default=str, ensure_ascii=False).encode
    make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:  # no C accelerator (e.g. PyPy)
        return stdlib
    # markers=None skips the circular-reference check: a cycle raises RecursionError instead,
    # which _json handles like any other unencodable value.
    encode = make_encoder(
        None, str, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
    join = "".join

    def dumps(value: Any) -> str:
        return join(encode(value, 0))

    return dumps


_stdlib = _stdlib_dumps()


def _make_dumps() -> Callable[[Any], str]:
    """orjson (about 4x faster on these small objects) with the stdlib encoder's output.

    Unknown objects, datetimes and dataclasses become ``str(obj)`` as with the stdlib; what
    orjson refuses (integers beyond 64 bits, ...) is left to the stdlib encoder.
    """
    try:
        import orjson
    except ImportError:  # PyPy, or a stripped-down install
        return _stdlib
    orjson_dumps = orjson.dumps
    options = (
        orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
    )

    def dumps(value: Any) -> str:
        try:
            return orjson_dumps(value, default=str, option=options).decode()
        except TypeError:  # orjson.JSONEncodeError
            return _stdlib(value)

    return dumps


_dumps = _make_dumps()


def _json(value: Any, empty: str) -> str:
    if not value:
        return empty
    try:
        return _dumps(value)
    except (TypeError, ValueError, RecursionError):
        # Keys JSON cannot hold, or a cycle: keep the content readable rather than lose the row.
        logger.warning("langchain-tokenledger: a JSON column could not be encoded; kept as text")
        return _stdlib({"unencodable": repr(value)} if empty == "{}" else [repr(value)])


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is not None and value.tzinfo is not _UTC:
        value = value.astimezone(_UTC)
    return value.replace(tzinfo=None)


def _sqlite_ts(value: datetime | None) -> str | None:
    """SQLAlchemy's SQLite DATETIME text, always with microseconds (text order = time order)."""
    if value is None:
        return None
    if value.tzinfo is not _UTC:  # the handler's timestamps are UTC already
        value = value.astimezone(_UTC) if value.tzinfo is not None else value
    # %-formatting the fields is about 1.5x faster than replace(tzinfo=None).isoformat(...).
    return _SQLITE_TS % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


_SQLITE_TS = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


def _decimal_text(value: Decimal | None) -> str | None:
    # SQLite's NUMERIC affinity parses both "0.0001" and "1E-4" to the same number.
    return None if value is None else str(value)


def _same(value: Any) -> Any:
    return value


def _clip(row: Row) -> list[str]:
    """Shorten over-long names to their column's length (a row is never lost to a long name);
    the names of the clipped columns."""
    clipped: list[str] = []
    for index, limit in _CLIP_CHECKS:
        value = row[index]
        if value.__class__ is str and len(value) > limit:
            row[index] = value[:limit]
            clipped.append(RECORD_FIELDS[index])
    return clipped


def to_row(
    r: UsageRecord,
    ts: Callable[[datetime | None], Any],
    cost: Callable[[Decimal | None], Any],
    price: Price | None = None,
) -> Row:
    """One record as a list in column order, JSON columns serialized (hot loop: keep it flat).

    ``price`` (``(cost_usd, price_source, notes)``) replaces the record's own.

    Example:
        >>> row = to_row(UsageRecord(run_id="r1", tags=["a"]), _sqlite_ts, _decimal_text)
        >>> row[0], row[RECORD_FIELDS.index("tags")], row[RECORD_FIELDS.index("notes")]
        ('r1', '["a"]', '[]')
    """
    row = list(_all_values(r))
    if price is not None:
        row[_COST], row[_PRICE_SOURCE], row[_NOTES] = price
    clipped = _clip(row)
    if clipped:
        row[_NOTES] = [*row[_NOTES], "truncated:" + ",".join(clipped)]
    row[_COST] = cost(row[_COST])
    row[_STARTED] = ts(row[_STARTED])
    row[_ENDED] = ts(row[_ENDED])
    for index, empty in _JSON_COLUMNS:
        row[index] = _json(row[index], empty)
    return row


def to_rows(
    records: Sequence[UsageRecord],
    prices: Sequence[Price] | None,
    ts: Callable[[datetime | None], Any],
    cost: Callable[[Decimal | None], Any],
) -> list[Row]:
    """:func:`to_row` of each record (with its price).

    Rows may repeat a ``run_id``: every writer keeps the first and skips the others.
    """
    if prices is None:
        return [to_row(r, ts, cost) for r in records]
    return [to_row(r, ts, cost, p) for r, p in zip(records, prices, strict=True)]


def _first_of_each(rows: list[Row]) -> list[Row]:
    if len({row[0] for row in rows}) == len(rows):
        return rows
    seen: set[str] = set()
    unique: list[Row] = []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            unique.append(row)
    return unique


class _RawWriter:
    """Shared connection handling: one raw DBAPI connection, reopened after a failure."""

    _ts: Callable[[datetime | None], Any] = staticmethod(_same)
    _cost: Callable[[Decimal | None], Any] = staticmethod(_same)

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._conn: Any = None

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self.engine.raw_connection()
        return self._conn

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken; nothing more to do
                conn.invalidate()

    def prepare(
        self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None
    ) -> list[Row]:
        return to_rows(records, prices, self._ts, self._cost)

    def execute(self, rows: list[Row]) -> None:
        conn = self._connection()
        try:
            self._execute(conn, rows)
            conn.commit()
        except BaseException:
            self._discard()
            raise

    def write(self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None) -> None:
        self.execute(self.prepare(records, prices))

    def _execute(self, conn: Any, rows: list[Row]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _sqlite_max_variables() -> int:
    """Most ``?`` parameters one statement may have (SQLite's compile-time limit)."""
    limit_id = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)  # Python 3.11+
    if limit_id is not None:
        probe = sqlite3.connect(":memory:")
        try:
            return int(probe.getlimit(limit_id))  # type: ignore[attr-defined,unused-ignore]
        finally:
            probe.close()
    return 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999


class SQLiteWriter(_RawWriter):
    """``INSERT .. ON CONFLICT (run_id) DO NOTHING``, up to 1024 rows per statement.

    Timestamps are written as SQLAlchemy's SQLite text format.

    SQLite releases the GIL while it executes a statement, and a thread that wants the GIL back
    waits up to the holder's switch interval (5 ms); one statement per row (``executemany``)
    would pay that wait once per row whenever another thread keeps the GIL busy. Batches are
    cut into power-of-two chunks, so a handful of cached statements cover any batch size. The
    writer's connection gets a larger page cache and WAL (the ledger's indexes outgrow
    SQLite's 2 MB default cache after a few ten thousand rows).
    """

    _ROW = f"({', '.join('?' for _ in RECORD_FIELDS)})"
    _PRAGMAS = ("PRAGMA cache_size = -32768", "PRAGMA wal_autocheckpoint = 4000")
    _ts = staticmethod(_sqlite_ts)
    _cost = staticmethod(_decimal_text)

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        most = max(1, min(1024, _sqlite_max_variables() // len(RECORD_FIELDS)))
        self._chunk = 1 << (most.bit_length() - 1)
        self._statements: dict[int, str] = {}

    def _connection(self) -> Any:
        if self._conn is None:
            conn = super()._connection()
            cur = conn.cursor()
            try:
                for pragma in self._PRAGMAS:
                    cur.execute(pragma)
            finally:
                cur.close()
        return self._conn

    def _statement(self, rows: int) -> str:
        sql = self._statements.get(rows)
        if sql is None:
            sql = self._statements[rows] = (
                # ON CONFLICT (run_id), not OR IGNORE: OR IGNORE would also skip, silently, a
                # row that breaks another constraint (a NULL status).
                f"INSERT INTO llm_calls ({_COLUMNS}) VALUES "
                + ", ".join([self._ROW] * rows)
                + " ON CONFLICT (run_id) DO NOTHING"
            )
        return sql

    def _execute(self, conn: Any, rows: list[Row]) -> None:
        cur = conn.cursor()
        try:
            start, size = 0, self._chunk
            while start < len(rows):
                while len(rows) - start < size:
                    size //= 2
                chunk = rows[start : start + size]
                cur.execute(self._statement(size), list(chain.from_iterable(chunk)))
                start += size
        finally:
            cur.close()


class PostgresWriter(_RawWriter):
    """``COPY`` into a session-local staging table, then an idempotent ``INSERT .. SELECT``."""

    def _execute(self, conn: Any, rows: list[Row]) -> None:
        cur = conn.cursor()
        try:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _tokenledger_stage "
                "(LIKE llm_calls INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            with cur.copy(f"COPY _tokenledger_stage ({_COLUMNS}) FROM STDIN") as copy:
                write_row = copy.write_row
                for row in rows:
                    write_row(row)
            cur.execute(
                f"INSERT INTO llm_calls ({_COLUMNS}) SELECT {_COLUMNS} FROM _tokenledger_stage "
                "ON CONFLICT (run_id) DO NOTHING"
            )
        finally:
            cur.close()


class MySQLWriter(_RawWriter):
    """One multi-row ``INSERT .. ON DUPLICATE KEY UPDATE run_id = run_id`` (PyMySQL batches it)."""

    _sql = (
        f"INSERT INTO llm_calls ({_COLUMNS}) "
        f"VALUES ({', '.join('%s' for _ in RECORD_FIELDS)}) "
        "ON DUPLICATE KEY UPDATE run_id = run_id"
    )
    _ts = staticmethod(_naive_utc)

    def _execute(self, conn: Any, rows: list[Row]) -> None:
        cur = conn.cursor()
        try:
            cur.executemany(self._sql, rows)
        finally:
            cur.close()


class CoreWriter:
    """Any other SQLAlchemy dialect: skip stored run_ids, then a Core ``executemany``."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def prepare(
        self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None
    ) -> list[Row]:
        return to_rows(records, prices, _same, _same)

    def execute(self, rows: list[Row]) -> None:
        rows = _first_of_each(rows)
        with self.engine.begin() as conn:
            ids = [row[0] for row in rows]
            stored = set(
                conn.execute(sa.select(llm_calls.c.run_id).where(llm_calls.c.run_id.in_(ids)))
                .scalars()
                .all()
            )
            params = [
                dict(zip(RECORD_FIELDS, row, strict=True)) for row in rows if row[0] not in stored
            ]
            for p in params:
                for key in ("usage_details", "tags", "metadata", "notes"):
                    p[key] = json.loads(p[key])
            if params:
                conn.execute(llm_calls.insert(), params)

    def write(self, records: Sequence[UsageRecord], prices: Sequence[Price] | None = None) -> None:
        self.execute(self.prepare(records, prices))

    def close(self) -> None:
        pass


def writer_for(engine: sa.Engine) -> BatchWriter:
    """The fastest idempotent writer for ``engine``'s database.

    Example:
        >>> type(writer_for(sa.create_engine("sqlite://"))).__name__
        'SQLiteWriter'
    """
    name = engine.dialect.name
    driver = engine.dialect.driver
    if name == "sqlite":
        return SQLiteWriter(engine)
    if name == "postgresql" and driver == "psycopg":
        return PostgresWriter(engine)
    if name in ("mysql", "mariadb"):
        return MySQLWriter(engine)
    return CoreWriter(engine)
